"""A deterministic synthetic demo dataset in the competition's layout.

``python -m pipeline.tools.demo --out data/demo`` writes ``train.csv`` (ImageID, Labels,
Caption), ``test.csv`` (ImageID, Caption), ``test_labels.csv`` (the hidden test truth)
and RGB JPEG images in ``data/``. Each label is a drawn object with its own shape and
colour; label sets follow a COCO-like scene model (person on ~70% of images, street,
park, pet, farm, water, sky and rail scenes), and captions name some of the objects with
synonyms, omissions, false mentions and typos. Neither the images nor the captions
alone give every label, so the image branch, the caption branch and their fusion each
have something to learn.

Every image is built from its own child seed, so the output is byte-identical for the
same parameters however many workers draw it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from pipeline.config import OneDefaultHelpFormatter
from pipeline.io import atomic_write_bytes, write_json
from pipeline.labels import COCO_NAMES, COMP5329_LABEL_IDS

# Bump whenever the output for given parameters changes, so stale demo folders regenerate.
GENERATOR_VERSION = 1
MARKER_NAME = ".complete"
JPEG_QUALITY = 90

Color = tuple[int, int, int]
T = TypeVar("T")


# --------------------------------------------------------------------------------------
# Label sets: a small scene model that mimics COCO's co-occurrence.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scene:
    """A kind of photo: how often it occurs, which labels appear in it, how it looks."""

    name: str
    weight: float
    person: float  # probability that people are in the picture
    labels: dict[int, float]  # independent inclusion probability of each other label
    backgrounds: tuple[str, ...]
    places: tuple[str, ...]  # caption location phrases
    views: tuple[str, ...]  # captions that name no object at all


SCENES: tuple[Scene, ...] = (
    Scene(
        "people",
        0.33,
        1.0,
        {15: 0.04, 18: 0.03, 16: 0.02},
        ("indoor", "gradient", "noise", "park"),
        (
            "in a room",
            "at a table",
            "on the beach",
            "in a kitchen",
            "on a tennis court",
            "at a party",
            "on a ski slope",
            "in front of a building",
        ),
        (
            "A kitchen with a wooden table.",
            "A room with some furniture.",
            "A snowy slope on a sunny day.",
            "A tennis court under blue sky.",
        ),
    ),
    Scene(
        "street",
        0.25,
        0.66,
        {3: 0.42, 8: 0.16, 6: 0.13, 10: 0.16, 13: 0.07, 11: 0.06, 14: 0.05, 4: 0.12, 2: 0.12},
        ("street", "street", "gradient", "noise"),
        (
            "on a city street",
            "down the road",
            "at an intersection",
            "in a parking lot",
            "on a busy street",
            "near the sidewalk",
            "in the city",
        ),
        (
            "A busy city street on a cloudy day.",
            "An empty road next to some buildings.",
            "A view of a downtown intersection.",
        ),
    ),
    Scene(
        "park",
        0.10,
        0.72,
        {15: 0.45, 18: 0.3, 16: 0.14, 2: 0.1},
        ("park", "park", "gradient"),
        ("in a park", "on the grass", "near some trees", "in a field of grass", "at the park"),
        ("A green park with some trees.", "A grassy lawn on a sunny afternoon."),
    ),
    Scene(
        "home",
        0.09,
        0.4,
        {17: 0.55, 18: 0.5},
        ("indoor", "indoor", "noise"),
        ("on a couch", "in the living room", "on the kitchen floor", "on a bed", "next to a window"),
        ("A cozy living room with a sofa.", "A messy bedroom with clothes on the bed."),
    ),
    Scene(
        "farm",
        0.07,
        0.5,
        {19: 0.75, 18: 0.15, 16: 0.12},
        ("park", "park", "noise"),
        ("in a field", "on a farm", "in a pasture", "near a wooden fence"),
        ("A wide open field under a blue sky.", "A fence around a green pasture."),
    ),
    Scene(
        "water",
        0.07,
        0.55,
        {9: 0.9, 16: 0.18},
        ("water", "water", "gradient"),
        ("on the lake", "in the harbor", "near the shore", "on the river", "at the marina"),
        ("A calm lake at sunset.", "Waves rolling onto a sandy beach."),
    ),
    Scene(
        "sky",
        0.05,
        0.25,
        {5: 0.9, 16: 0.2},
        ("sky", "sky", "street"),
        ("in the sky", "over the runway", "at the airport", "above the clouds", "on the tarmac"),
        ("A clear blue sky with a few clouds.", "A long runway at an airport."),
    ),
    Scene(
        "rail",
        0.04,
        0.45,
        {7: 0.95, 10: 0.05},
        ("rail", "rail", "gradient"),
        ("at the station", "on the tracks", "through the countryside", "at a platform"),
        ("Empty railroad tracks in the countryside.", "A quiet train platform."),
    ),
)
_SCENE_WEIGHTS = np.array([s.weight for s in SCENES]) / sum(s.weight for s in SCENES)


def _sample_count(rng: np.random.Generator, label: int) -> int:
    """How many instances of a present label to draw (people come in groups more often)."""
    if label == 1:
        return int(rng.choice([1, 2, 3, 4], p=[0.58, 0.25, 0.11, 0.06]))
    if label in (10, 11, 13, 14):
        return 1 if rng.random() < 0.9 else 2
    return int(rng.choice([1, 2, 3], p=[0.75, 0.18, 0.07]))


def sample_label_set(rng: np.random.Generator) -> tuple[Scene, dict[int, int]]:
    """A scene and the instance count of every label present in it (never empty)."""
    scene = SCENES[int(rng.choice(len(SCENES), p=_SCENE_WEIGHTS))]
    present = [label for label, p in scene.labels.items() if rng.random() < p]
    if rng.random() < scene.person:
        present.append(1)
    if not present:
        # A scene with nothing in it falls back to its most typical object.
        present.append(max(scene.labels, key=scene.labels.__getitem__))
    return scene, {label: _sample_count(rng, label) for label in sorted(present)}


# --------------------------------------------------------------------------------------
# Images: one drawn object per label, on varied backgrounds, with confusers and occluders.
# --------------------------------------------------------------------------------------


def _jitter(rng: np.random.Generator, base: Color, amount: float = 18.0) -> Color:
    """A colour near ``base``: overall brightness plus a little per-channel noise."""
    scale = rng.uniform(0.82, 1.15)
    r, g, b = (int(np.clip(c * scale + n, 0, 255)) for c, n in zip(base, rng.normal(0.0, amount, 3), strict=True))
    return r, g, b


def _shade(colour: Color, factor: float) -> Color:
    r, g, b = (int(c * factor) for c in colour)
    return r, g, b


def _pick(rng: np.random.Generator, options: Sequence[T]) -> T:
    return options[int(rng.integers(len(options)))]


class _Pen:
    """Draws in object coordinates: (u, v) in about [-0.5, 0.5], scaled by ``s`` pixels
    around the centre (x, y), mirrored when ``flip`` is -1."""

    def __init__(self, draw: ImageDraw.ImageDraw, x: float, y: float, s: float, flip: int) -> None:
        self.d, self.x, self.y, self.s, self.f = draw, x, y, s, flip

    def pt(self, u: float, v: float) -> tuple[float, float]:
        return self.x + self.f * u * self.s, self.y + v * self.s

    def _box(self, u0: float, v0: float, u1: float, v1: float) -> list[float]:
        (a, b), (c, d) = self.pt(u0, v0), self.pt(u1, v1)
        # PIL refuses boxes whose corners are out of order, which mirroring produces.
        return [min(a, c), min(b, d), max(a, c) + 1, max(b, d) + 1]

    def w(self, width: float) -> int:
        return max(1, round(width * self.s))

    def rect(self, u0: float, v0: float, u1: float, v1: float, fill: Color, radius: float = 0) -> None:
        if radius:
            self.d.rounded_rectangle(self._box(u0, v0, u1, v1), radius=radius * self.s, fill=fill)
        else:
            self.d.rectangle(self._box(u0, v0, u1, v1), fill=fill)

    def ell(self, u0: float, v0: float, u1: float, v1: float, fill: Color) -> None:
        self.d.ellipse(self._box(u0, v0, u1, v1), fill=fill)

    def circle(
        self, u: float, v: float, r: float, fill: Color | None = None, outline: Color | None = None, width: float = 0.0
    ) -> None:
        self.d.ellipse(
            self._box(u - r, v - r, u + r, v + r), fill=fill, outline=outline, width=self.w(width) if outline else 0
        )

    def poly(self, points: Sequence[tuple[float, float]], fill: Color) -> None:
        self.d.polygon([self.pt(u, v) for u, v in points], fill=fill)

    def line(self, points: Sequence[tuple[float, float]], fill: Color, width: float) -> None:
        self.d.line([self.pt(u, v) for u, v in points], fill=fill, width=self.w(width))


BLACK: Color = (25, 25, 28)
GREY: Color = (120, 120, 125)
SKIN: tuple[Color, ...] = ((241, 194, 160), (198, 134, 92), (141, 85, 54), (224, 172, 105))
WINDOW: Color = (160, 205, 235)


def _person(p: _Pen, rng: np.random.Generator) -> None:
    shirt = _jitter(
        rng,
        _pick(rng, ((200, 40, 40), (40, 90, 200), (230, 230, 230), (60, 160, 70), (150, 60, 170), (240, 150, 30))),
        25,
    )
    skin = _jitter(rng, _pick(rng, SKIN), 8)
    pants = _jitter(rng, _pick(rng, ((40, 50, 90), (30, 30, 30), (110, 90, 60))), 10)
    p.line([(-0.05, 0.1), (-0.1, 0.5)], pants, 0.07)
    p.line([(0.05, 0.1), (0.1, 0.5)], pants, 0.07)
    p.ell(-0.14, -0.28, 0.14, 0.16, shirt)
    p.line([(-0.11, -0.2), (-0.26, 0.06)], skin, 0.05)
    p.line([(0.11, -0.2), (0.26, 0.06)], skin, 0.05)
    p.circle(0, -0.38, 0.1, fill=skin)
    p.ell(-0.1, -0.5, 0.1, -0.4, _jitter(rng, _pick(rng, ((40, 30, 20), (200, 170, 90), (90, 50, 20))), 10))


def _bicycle(p: _Pen, rng: np.random.Generator) -> None:
    frame = _jitter(rng, (30, 150, 90), 25)
    for u in (-0.28, 0.28):
        p.circle(u, 0.15, 0.21, outline=BLACK, width=0.04)
    p.line([(-0.28, 0.15), (-0.05, -0.12), (0.2, -0.12), (0.28, 0.15)], frame, 0.045)
    p.line([(-0.05, -0.12), (0.02, 0.15), (-0.28, 0.15)], frame, 0.045)
    p.line([(0.2, -0.12), (0.18, -0.25), (0.28, -0.27)], BLACK, 0.035)
    p.rect(-0.12, -0.2, 0.0, -0.15, BLACK)


def _car(p: _Pen, rng: np.random.Generator) -> None:
    body = _jitter(rng, _pick(rng, ((40, 80, 200), (30, 60, 160), (60, 110, 220))), 22)
    p.poly([(-0.3, -0.03), (-0.18, -0.28), (0.2, -0.28), (0.33, -0.03)], body)
    p.poly([(-0.22, -0.05), (-0.14, -0.23), (0.0, -0.23), (0.0, -0.05)], WINDOW)
    p.poly([(0.04, -0.05), (0.04, -0.23), (0.16, -0.23), (0.26, -0.05)], WINDOW)
    p.rect(-0.5, -0.05, 0.5, 0.2, body, radius=0.07)
    p.rect(0.42, 0.0, 0.5, 0.05, (250, 230, 120))
    for u in (-0.3, 0.3):
        p.circle(u, 0.2, 0.11, fill=BLACK)
        p.circle(u, 0.2, 0.04, fill=(190, 190, 195))


def _motorcycle(p: _Pen, rng: np.random.Generator) -> None:
    body = _jitter(rng, (235, 120, 20), 22)
    for u in (-0.3, 0.3):
        p.circle(u, 0.2, 0.17, fill=BLACK)
        p.circle(u, 0.2, 0.07, fill=(170, 170, 175))
    p.line([(0.3, 0.2), (0.2, -0.15), (0.28, -0.32)], (150, 150, 155), 0.04)
    p.ell(-0.22, -0.12, 0.2, 0.12, body)
    p.rect(-0.3, -0.14, -0.05, -0.06, BLACK, radius=0.03)
    p.rect(-0.08, 0.08, 0.1, 0.2, GREY)


def _airplane(p: _Pen, rng: np.random.Generator) -> None:
    hull = _jitter(rng, (225, 228, 235), 10)
    accent = _jitter(rng, _pick(rng, ((200, 30, 40), (30, 60, 150), (20, 120, 180))), 15)
    p.poly([(-0.02, 0.0), (0.14, 0.0), (-0.14, 0.42), (-0.24, 0.42)], _jitter(rng, (170, 175, 185), 8))
    p.ell(-0.5, -0.075, 0.5, 0.075, hull)
    p.poly([(-0.02, 0.0), (0.1, 0.0), (-0.14, -0.36), (-0.21, -0.36)], _jitter(rng, (190, 195, 205), 8))
    p.poly([(-0.48, -0.03), (-0.36, -0.03), (-0.46, -0.3), (-0.52, -0.3)], accent)
    p.line([(-0.3, -0.02), (0.35, -0.02)], accent, 0.02)
    p.ell(0.38, -0.05, 0.46, -0.01, (40, 60, 90))


def _bus(p: _Pen, rng: np.random.Generator) -> None:
    body = _jitter(rng, (245, 195, 20), 18)
    p.rect(-0.5, -0.3, 0.5, 0.24, body, radius=0.04)
    for i in range(5):
        u = -0.45 + i * 0.17
        p.rect(u, -0.22, u + 0.13, -0.04, (50, 70, 110))
    p.rect(0.36, -0.2, 0.46, 0.18, (60, 60, 70))
    p.rect(-0.5, 0.06, 0.5, 0.09, (200, 60, 30))
    for u in (-0.3, 0.3):
        p.circle(u, 0.24, 0.09, fill=BLACK)


def _train(p: _Pen, rng: np.random.Generator) -> None:
    body = _jitter(rng, (30, 110, 60), 20)
    stripe = _jitter(rng, (235, 235, 235), 8)
    p.line([(-0.55, 0.22), (0.55, 0.22)], (90, 80, 70), 0.03)
    cars = int(rng.integers(2, 4))
    width = 1.0 / cars
    for c in range(cars):
        u0 = -0.5 + c * width
        p.rect(u0 + 0.01, -0.22, u0 + width - 0.01, 0.15, body, radius=0.03 if c == cars - 1 else 0)
        p.rect(u0 + 0.01, 0.02, u0 + width - 0.01, 0.06, stripe)
        for k in range(2):
            wu = u0 + 0.04 + k * width / 2
            p.rect(wu, -0.16, wu + width / 2 - 0.08, -0.05, WINDOW)
        for wheel in (0.08, width - 0.08):
            p.circle(u0 + wheel, 0.17, 0.035, fill=BLACK)


def _truck(p: _Pen, rng: np.random.Generator) -> None:
    cargo = _jitter(rng, _pick(rng, ((200, 200, 205), (150, 150, 160), (230, 230, 225))), 12)
    cab = _jitter(rng, (200, 40, 35), 20)
    p.rect(-0.5, -0.32, 0.14, 0.16, cargo)
    p.rect(0.17, -0.12, 0.5, 0.16, cab, radius=0.03)
    p.rect(0.3, -0.08, 0.45, 0.02, WINDOW)
    for u in (-0.36, -0.16, 0.35):
        p.circle(u, 0.18, 0.09, fill=BLACK)


def _boat(p: _Pen, rng: np.random.Generator) -> None:
    hull = _jitter(rng, _pick(rng, ((130, 75, 35), (110, 60, 30), (240, 240, 240))), 15)
    sail = _jitter(rng, (245, 245, 240), 6)
    p.poly([(-0.5, 0.05), (0.5, 0.05), (0.35, 0.25), (-0.35, 0.25)], hull)
    p.line([(0.0, 0.05), (0.0, -0.45)], (70, 50, 30), 0.03)
    p.poly([(0.02, -0.42), (0.02, 0.0), (0.36, 0.0)], sail)
    p.poly([(-0.02, -0.33), (-0.02, 0.0), (-0.27, 0.0)], sail)
    p.poly([(0.0, -0.45), (0.12, -0.42), (0.0, -0.39)], (210, 40, 40))


def _traffic_light(p: _Pen, rng: np.random.Generator) -> None:
    p.line([(0.0, 0.1), (0.0, 0.5)], GREY, 0.05)
    p.rect(-0.12, -0.46, 0.12, 0.12, _jitter(rng, (35, 35, 35), 6), radius=0.03)
    lit = int(rng.integers(3))
    for i, colour in enumerate(((235, 30, 30), (245, 200, 20), (30, 210, 80))):
        p.circle(0.0, -0.33 + i * 0.15, 0.06, fill=colour if i == lit else _shade(colour, 0.33))


def _fire_hydrant(p: _Pen, rng: np.random.Generator) -> None:
    body = _jitter(rng, _pick(rng, ((215, 35, 30), (215, 35, 30), (240, 200, 30))), 15)
    p.rect(-0.2, 0.34, 0.2, 0.45, _jitter(rng, GREY, 8))
    p.rect(-0.15, -0.2, 0.15, 0.38, body, radius=0.04)
    p.ell(-0.18, -0.36, 0.18, -0.12, body)
    p.rect(-0.04, -0.44, 0.04, -0.32, body)
    p.rect(-0.26, -0.02, -0.14, 0.1, body)
    p.rect(0.14, -0.02, 0.26, 0.1, body)


def _octagon(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    return [
        (cx + r * math.cos(math.pi / 8 + k * math.pi / 4), cy + r * math.sin(math.pi / 8 + k * math.pi / 4))
        for k in range(8)
    ]


def _stop_sign(p: _Pen, rng: np.random.Generator) -> None:
    p.line([(0.0, 0.0), (0.0, 0.5)], GREY, 0.05)
    p.poly(_octagon(0.0, -0.17, 0.32), (240, 240, 240))
    p.poly(_octagon(0.0, -0.17, 0.27), _jitter(rng, (205, 25, 30), 12))
    p.rect(-0.17, -0.2, 0.17, -0.14, (240, 240, 240))


def _parking_meter(p: _Pen, rng: np.random.Generator) -> None:
    head = _jitter(rng, (175, 180, 190), 12)
    p.line([(0.0, 0.0), (0.0, 0.5)], _jitter(rng, (60, 60, 65), 6), 0.08)
    p.ell(-0.14, -0.45, 0.14, -0.25, head)
    p.rect(-0.14, -0.35, 0.14, 0.03, head, radius=0.04)
    p.rect(-0.09, -0.28, 0.09, -0.14, (40, 45, 50))
    p.rect(0.02, -0.25, 0.08, -0.18, (220, 40, 30))


def _bench(p: _Pen, rng: np.random.Generator) -> None:
    wood = _jitter(rng, (150, 95, 45), 18)
    for v in (-0.27, -0.14, 0.0):
        p.rect(-0.5, v, 0.5, v + 0.08, wood)
    for u in (-0.42, 0.42):
        p.line([(u, -0.3), (u, 0.3)], BLACK, 0.04)
        p.line([(u, 0.08), (u + (0.06 if u < 0 else -0.06), 0.3)], BLACK, 0.04)


def _bird(p: _Pen, rng: np.random.Generator) -> None:
    body = _jitter(rng, _pick(rng, ((60, 130, 210), (110, 110, 120), (230, 230, 230), (70, 70, 70))), 20)
    p.poly([(-0.2, 0.0), (-0.48, -0.12), (-0.46, 0.1)], body)
    p.ell(-0.28, -0.14, 0.2, 0.14, body)
    p.circle(0.22, -0.12, 0.11, fill=body)
    p.poly([(0.3, -0.16), (0.48, -0.1), (0.3, -0.06)], (245, 185, 30))
    p.poly([(-0.15, -0.05), (0.1, -0.05), (-0.2, -0.32)], _shade(body, 0.7))
    p.circle(0.25, -0.15, 0.025, fill=BLACK)


def _cat(p: _Pen, rng: np.random.Generator) -> None:
    fur = _jitter(rng, _pick(rng, ((235, 140, 50), (120, 120, 125), (40, 40, 40), (235, 225, 210))), 15)
    p.line([(-0.28, 0.08), (-0.42, -0.05), (-0.46, -0.25)], fur, 0.06)
    p.ell(-0.32, -0.05, 0.18, 0.25, fur)
    p.poly([(0.12, -0.2), (0.15, -0.42), (0.24, -0.26)], fur)
    p.poly([(0.28, -0.26), (0.38, -0.42), (0.4, -0.2)], fur)
    p.circle(0.26, -0.12, 0.16, fill=fur)
    for u in (0.2, 0.32):
        p.circle(u, -0.15, 0.03, fill=(90, 200, 80))
    p.poly([(0.24, -0.08), (0.28, -0.08), (0.26, -0.05)], (230, 130, 150))


def _dog(p: _Pen, rng: np.random.Generator) -> None:
    fur = _jitter(rng, _pick(rng, ((150, 95, 45), (210, 170, 100), (60, 45, 35), (240, 235, 225))), 15)
    dark = _shade(fur, 0.6)
    for u in (-0.28, -0.16, 0.08, 0.2):
        p.line([(u, 0.05), (u, 0.36)], fur, 0.06)
    p.line([(-0.33, -0.02), (-0.45, -0.2)], fur, 0.05)
    p.ell(-0.36, -0.12, 0.27, 0.14, fur)
    p.ell(0.16, -0.34, 0.42, -0.06, fur)
    p.ell(0.36, -0.22, 0.5, -0.12, fur)
    p.ell(0.14, -0.32, 0.22, -0.08, dark)
    p.circle(0.5, -0.17, 0.03, fill=BLACK)
    p.circle(0.31, -0.24, 0.025, fill=BLACK)


def _horse(p: _Pen, rng: np.random.Generator) -> None:
    coat = _jitter(rng, _pick(rng, ((110, 60, 30), (70, 40, 20), (160, 100, 50), (225, 220, 210))), 12)
    mane = _jitter(rng, (30, 20, 15), 6)
    for u in (-0.32, -0.2, 0.14, 0.24):
        p.line([(u, 0.05), (u, 0.5)], coat, 0.055)
    p.line([(-0.38, -0.08), (-0.5, 0.2)], mane, 0.05)
    p.ell(-0.42, -0.16, 0.32, 0.16, coat)
    p.poly([(0.14, -0.05), (0.3, -0.05), (0.44, -0.4), (0.32, -0.46)], coat)
    p.line([(0.22, -0.1), (0.35, -0.46)], mane, 0.04)
    p.ell(0.34, -0.52, 0.58, -0.38, coat)
    p.poly([(0.36, -0.5), (0.38, -0.6), (0.42, -0.5)], coat)


_DRAWERS: dict[int, Callable[[_Pen, np.random.Generator], None]] = {
    1: _person,
    2: _bicycle,
    3: _car,
    4: _motorcycle,
    5: _airplane,
    6: _bus,
    7: _train,
    8: _truck,
    9: _boat,
    10: _traffic_light,
    11: _fire_hydrant,
    13: _stop_sign,
    14: _parking_meter,
    15: _bench,
    16: _bird,
    17: _cat,
    18: _dog,
    19: _horse,
}

# Typical object size as a fraction of the image side (min, max).
_SCALES: dict[int, tuple[float, float]] = {
    1: (0.35, 0.7),
    2: (0.3, 0.55),
    3: (0.3, 0.6),
    4: (0.3, 0.5),
    5: (0.35, 0.8),
    6: (0.4, 0.75),
    7: (0.5, 0.9),
    8: (0.4, 0.7),
    9: (0.3, 0.6),
    10: (0.25, 0.5),
    11: (0.2, 0.4),
    13: (0.25, 0.5),
    14: (0.25, 0.45),
    15: (0.3, 0.6),
    16: (0.15, 0.3),
    17: (0.25, 0.45),
    18: (0.25, 0.5),
    19: (0.35, 0.65),
}


# Non-label things, some shaped like labels (a table looks like a bench, a lamp post like a
# parking meter, a round red sign like a stop sign), so the image alone is not a lookup.
def _tree(p: _Pen, rng: np.random.Generator) -> None:
    p.rect(-0.06, 0.0, 0.06, 0.5, _jitter(rng, (100, 65, 35), 12))
    p.circle(0.0, -0.18, 0.32, fill=_jitter(rng, (45, 120, 45), 20))


def _bush(p: _Pen, rng: np.random.Generator) -> None:
    green = _jitter(rng, (50, 110, 40), 20)
    for u, v, r in ((-0.25, 0.1, 0.25), (0.0, -0.05, 0.3), (0.25, 0.1, 0.25)):
        p.circle(u, v, r, fill=green)


def _house(p: _Pen, rng: np.random.Generator) -> None:
    p.rect(-0.4, -0.1, 0.4, 0.45, _jitter(rng, (200, 180, 150), 25))
    p.poly([(-0.48, -0.1), (0.0, -0.45), (0.48, -0.1)], _jitter(rng, (150, 50, 40), 20))
    p.rect(-0.08, 0.15, 0.08, 0.45, (90, 60, 40))


def _cloud(p: _Pen, rng: np.random.Generator) -> None:
    white = _jitter(rng, (245, 245, 250), 5)
    for u, r in ((-0.25, 0.18), (0.0, 0.25), (0.25, 0.18)):
        p.circle(u, 0.0, r, fill=white)


def _table(p: _Pen, rng: np.random.Generator) -> None:
    wood = _jitter(rng, (140, 90, 50), 20)
    p.rect(-0.5, -0.1, 0.5, 0.0, wood)
    for u in (-0.42, 0.38):
        p.rect(u, 0.0, u + 0.05, 0.35, wood)


def _lamp_post(p: _Pen, rng: np.random.Generator) -> None:
    p.line([(0.0, -0.3), (0.0, 0.5)], _jitter(rng, (50, 50, 55), 8), 0.05)
    p.ell(-0.1, -0.45, 0.1, -0.28, _jitter(rng, (250, 230, 150), 10))


def _round_sign(p: _Pen, rng: np.random.Generator) -> None:
    p.line([(0.0, 0.0), (0.0, 0.5)], GREY, 0.05)
    p.circle(0.0, -0.17, 0.28, fill=_jitter(rng, _pick(rng, ((205, 25, 30), (30, 80, 190))), 12))
    p.rect(-0.17, -0.2, 0.17, -0.14, (240, 240, 240))


def _cone(p: _Pen, rng: np.random.Generator) -> None:
    orange = _jitter(rng, (245, 110, 20), 15)
    p.poly([(-0.2, 0.4), (0.0, -0.4), (0.2, 0.4)], orange)
    p.rect(-0.1, -0.05, 0.1, 0.05, (240, 240, 240))
    p.rect(-0.28, 0.38, 0.28, 0.45, orange)


def _ball(p: _Pen, rng: np.random.Generator) -> None:
    p.circle(0.0, 0.0, 0.3, fill=_jitter(rng, _pick(rng, ((230, 60, 60), (240, 240, 80), (250, 250, 250))), 20))


def _box(p: _Pen, rng: np.random.Generator) -> None:
    p.rect(-0.35, -0.3, 0.35, 0.3, _jitter(rng, (180, 140, 90), 30))


def _blob(p: _Pen, rng: np.random.Generator) -> None:
    r, g, b = (int(c) for c in rng.integers(0, 256, 3))
    p.ell(-0.4, -0.25, 0.4, 0.25, (r, g, b))


_DISTRACTORS: tuple[Callable[[_Pen, np.random.Generator], None], ...] = (
    _tree,
    _tree,
    _house,
    _cloud,
    _table,
    _lamp_post,
    _round_sign,
    _cone,
    _ball,
    _box,
    _blob,
)
_OCCLUDERS: tuple[Callable[[_Pen, np.random.Generator], None], ...] = (_tree, _bush, _box, _blob)


def _gradient(size: int, top: np.ndarray, bottom: np.ndarray, horizontal: bool = False) -> np.ndarray:
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)
    ramp = top[None, :] * (1 - t[:, None]) + bottom[None, :] * t[:, None]  # (size, 3)
    img = np.broadcast_to(ramp[:, None, :], (size, size, 3))
    return img.transpose(1, 0, 2) if horizontal else img


def _colour(rng: np.random.Generator, base: Color, amount: float = 20.0) -> np.ndarray:
    return np.clip(np.asarray(base, np.float32) + rng.normal(0, amount, 3), 0, 255).astype(np.float32)


_GROUNDS: dict[str, tuple[Color, Color]] = {
    # background kind -> (upper part, lower part)
    "street": ((135, 180, 230), (105, 105, 110)),
    "park": ((130, 185, 235), (80, 150, 60)),
    "water": ((150, 195, 240), (40, 90, 150)),
    "sky": ((90, 150, 225), (170, 205, 240)),
    "rail": ((140, 185, 230), (125, 110, 95)),
    "indoor": ((225, 210, 185), (130, 90, 60)),
}


def _background(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """A float32 (size, size, 3) background of the given kind."""
    if kind == "gradient":
        img = _gradient(
            size,
            rng.uniform(0, 255, 3).astype(np.float32),
            rng.uniform(0, 255, 3).astype(np.float32),
            horizontal=rng.random() < 0.3,
        )
    elif kind == "noise":
        # A coarse random colour field, upsampled, gives blotchy textures.
        cells = int(rng.integers(2, 7))
        coarse = rng.uniform(0, 255, (cells, cells, 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR), np.float32)
    else:
        upper, lower = _GROUNDS[kind]
        horizon = int(size * rng.uniform(0.35, 0.7)) if kind != "sky" else size
        img = np.array(_gradient(size, _colour(rng, upper), _colour(rng, upper, 10) * 1.1))
        img[horizon:] = _gradient(size, _colour(rng, lower), _colour(rng, lower) * 0.8)[horizon:]
    # Sensor-like grain; float32 sampling keeps this, the costliest step, cheap.
    return img + np.float32(rng.uniform(2, 14)) * rng.standard_normal((size, size, 3), dtype=np.float32)


def _place(rng: np.random.Generator, label_or_none: int | None, size: int) -> tuple[float, float, float]:
    """Centre and size of one object; some are small or pushed partly out of the frame."""
    lo, hi = _SCALES[label_or_none] if label_or_none is not None else (0.25, 0.6)
    s = rng.uniform(lo, hi) * size
    if rng.random() < 0.18:
        s *= rng.uniform(0.3, 0.5)
    margin = -0.15 if rng.random() < 0.15 else 0.2
    x = rng.uniform(margin, 1 - margin) * size
    y = rng.uniform(margin + 0.05, 1 - margin) * size
    return x, y, s


def render_image(rng: np.random.Generator, scene: Scene, counts: dict[int, int], size: int) -> Image.Image:
    """Draw one image holding ``counts[label]`` instances of every present label."""
    kind = (
        _pick(rng, scene.backgrounds)
        if rng.random() < 0.75
        else _pick(rng, ("gradient", "noise", "park", "street", "indoor"))
    )
    pixels = np.clip(_background(rng, kind, size), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)

    items: list[int | None] = [None] * int(rng.integers(0, 3))
    for label, n in counts.items():
        items += [label] * n
    # Random order: later objects partly cover earlier ones.
    for k in rng.permutation(len(items)):
        item = items[int(k)]
        x, y, s = _place(rng, item, size)
        pen = _Pen(draw, x, y, s, 1 if rng.random() < 0.5 else -1)
        drawer = _DRAWERS[item] if item is not None else _pick(rng, _DISTRACTORS)
        drawer(pen, rng)
    if rng.random() < 0.2:
        x, y, s = _place(rng, None, size)
        _pick(rng, _OCCLUDERS)(_Pen(draw, x, y, s, 1), rng)
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.2)))
    return image


# --------------------------------------------------------------------------------------
# Captions: informative but imperfect.
# --------------------------------------------------------------------------------------

# (singular, plural); shared words such as "bike", "vehicle" and "sign" are deliberately
# ambiguous between labels.
SYNONYMS: dict[int, tuple[tuple[str, str], ...]] = {
    1: (
        ("man", "men"),
        ("woman", "women"),
        ("person", "people"),
        ("kid", "kids"),
        ("boy", "boys"),
        ("girl", "girls"),
        ("guy", "guys"),
        ("child", "children"),
        ("lady", "ladies"),
        ("player", "players"),
    ),
    2: (("bicycle", "bicycles"), ("bike", "bikes"), ("bicycle", "bicycles"), ("cycle", "cycles")),
    3: (
        ("car", "cars"),
        ("car", "cars"),
        ("automobile", "automobiles"),
        ("sedan", "sedans"),
        ("taxi", "taxis"),
        ("vehicle", "vehicles"),
    ),
    4: (
        ("motorcycle", "motorcycles"),
        ("motorbike", "motorbikes"),
        ("bike", "bikes"),
        ("scooter", "scooters"),
        ("motorcycle", "motorcycles"),
    ),
    5: (
        ("airplane", "airplanes"),
        ("plane", "planes"),
        ("jet", "jets"),
        ("airliner", "airliners"),
        ("aircraft", "aircraft"),
    ),
    6: (("bus", "buses"), ("bus", "buses"), ("double decker bus", "double decker buses"), ("shuttle", "shuttles")),
    7: (
        ("train", "trains"),
        ("train", "trains"),
        ("locomotive", "locomotives"),
        ("tram", "trams"),
        ("subway", "subways"),
    ),
    8: (
        ("truck", "trucks"),
        ("truck", "trucks"),
        ("pickup truck", "pickup trucks"),
        ("lorry", "lorries"),
        ("vehicle", "vehicles"),
    ),
    9: (
        ("boat", "boats"),
        ("boat", "boats"),
        ("ship", "ships"),
        ("sailboat", "sailboats"),
        ("yacht", "yachts"),
        ("canoe", "canoes"),
    ),
    10: (
        ("traffic light", "traffic lights"),
        ("stoplight", "stoplights"),
        ("traffic signal", "traffic signals"),
        ("signal", "signals"),
    ),
    11: (("fire hydrant", "fire hydrants"), ("hydrant", "hydrants"), ("fire hydrant", "fire hydrants")),
    13: (
        ("stop sign", "stop signs"),
        ("stop sign", "stop signs"),
        ("stop sign", "stop signs"),
        ("sign", "signs"),
        ("red sign", "red signs"),
    ),
    14: (("parking meter", "parking meters"), ("meter", "meters"), ("parking meter", "parking meters")),
    15: (("bench", "benches"), ("bench", "benches"), ("park bench", "park benches"), ("seat", "seats")),
    16: (("bird", "birds"), ("bird", "birds"), ("seagull", "seagulls"), ("pigeon", "pigeons"), ("duck", "ducks")),
    17: (("cat", "cats"), ("cat", "cats"), ("kitten", "kittens"), ("kitty", "kitties")),
    18: (("dog", "dogs"), ("dog", "dogs"), ("puppy", "puppies"), ("pup", "pups"), ("pooch", "pooches")),
    19: (("horse", "horses"), ("horse", "horses"), ("pony", "ponies"), ("stallion", "stallions")),
}

# What a person does with an object: "A man riding a bike ..."
ACTIONS: dict[int, tuple[str, ...]] = {
    2: ("riding", "pushing", "standing next to"),
    3: ("standing next to", "getting out of", "driving", "washing"),
    4: ("riding", "sitting on", "parking"),
    5: ("boarding", "watching", "walking toward"),
    6: ("waiting for", "getting off", "boarding"),
    7: ("waiting for", "boarding", "looking at"),
    8: ("loading", "standing by", "driving"),
    9: ("rowing", "sitting in", "fishing from"),
    10: ("waiting at", "crossing the street under"),
    11: ("standing by", "walking past"),
    13: ("standing next to", "walking past"),
    14: ("paying at", "standing by"),
    15: ("sitting on", "resting on", "lying on"),
    16: ("feeding", "watching", "photographing"),
    17: ("holding", "petting", "playing with"),
    18: ("walking", "petting", "playing with"),
    19: ("riding", "feeding", "leading", "petting"),
}

# What an object is doing when it is the subject: "Two dogs playing ..."
ACTIVITIES: dict[int, tuple[str, ...]] = {
    1: (
        "standing",
        "walking",
        "sitting",
        "posing for a picture",
        "talking on a phone",
        "eating a sandwich",
        "smiling",
        "playing tennis",
        "holding an umbrella",
    ),
    2: ("parked", "leaning against a wall", "chained to a pole"),
    3: ("parked", "driving", "stopped"),
    4: ("parked", "driving"),
    5: ("flying", "taking off", "landing", "parked"),
    6: ("driving", "parked", "stopped"),
    7: ("pulling into the station", "traveling", "stopped"),
    8: ("parked", "driving"),
    9: ("floating", "docked", "sailing"),
    10: ("hanging", "showing red"),
    11: ("standing",),
    13: ("standing",),
    14: ("standing",),
    15: ("sitting empty",),
    16: ("perched", "flying", "sitting"),
    17: ("sleeping", "sitting", "lying"),
    18: ("running", "playing", "sleeping", "sitting"),
    19: ("grazing", "standing", "running"),
}

# Non-label nouns that real captions are full of (12, "street sign", is never annotated).
EXTRAS: tuple[str, ...] = (
    "a table",
    "some trees",
    "a building",
    "a fence",
    "a cup of coffee",
    "an umbrella",
    "a frisbee",
    "a kite",
    "a laptop",
    "a clock",
    "a skateboard",
    "a surfboard",
    "flowers",
    "a street sign",
    "a lamp post",
    "a traffic cone",
    "a mailbox",
    "a pizza",
    "a backpack",
)
_COUNT_WORDS = {2: "two", 3: "three", 4: "four"}

# Chance that a present label is named in the caption; small street furniture is often left out.
_MENTION = {1: 0.88, 10: 0.6, 11: 0.65, 14: 0.6, 15: 0.7, 16: 0.7}
_MENTION_DEFAULT = 0.8


def _noun_phrase(rng: np.random.Generator, label: int, count: int) -> str:
    singular, plural = _pick(rng, SYNONYMS[label])
    if count == 1:
        return ("an " if singular[0] in "aeiou" else "a ") + singular
    if label == 1 and count >= 3 and rng.random() < 0.4:
        return _pick(rng, ("a group of people", "a crowd of people", "several people"))
    word = _COUNT_WORDS.get(count, "several") if rng.random() < 0.7 else "some"
    return f"{word} {plural}"


def _join(phrases: list[str]) -> str:
    if len(phrases) <= 1:
        return "".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _typo(rng: np.random.Generator, word: str) -> str:
    i = int(rng.integers(1, len(word) - 1))
    kind = rng.integers(3)
    if kind == 0:
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]  # swap two letters
    if kind == 1:
        return word[:i] + word[i + 1 :]  # drop a letter
    return word[:i] + word[i] + word[i:]  # double a letter


def make_caption(rng: np.random.Generator, scene: Scene, counts: dict[int, int]) -> str:
    """One sentence naming some of the present labels, sometimes wrongly or with typos."""
    mentioned = [label for label in counts if rng.random() < _MENTION.get(label, _MENTION_DEFAULT)]
    named = {label: counts[label] for label in mentioned}
    # Now and then a caption names something that is not there ("waiting for a bus").
    absent = [label for label in scene.labels if label not in counts]
    if absent and rng.random() < 0.06:
        named[_pick(rng, absent)] = 1

    place = _pick(rng, scene.places) if rng.random() < 0.7 else ""
    extra = _pick(rng, EXTRAS) if rng.random() < 0.3 else ""
    if not named:
        text = _pick(rng, scene.views).rstrip(".")
        if extra:
            text += f" with {extra}"
    else:
        others = [label for label in named if label != 1]
        rng.shuffle(others)
        if 1 in named and others and rng.random() < 0.8:
            subject = _noun_phrase(rng, 1, named[1])
            obj = others.pop(0)
            verb = _pick(rng, ACTIONS[obj])
            text = f"{subject} {verb} {_noun_phrase(rng, obj, named[obj])}"
        else:
            order = ([1] if 1 in named else []) + others
            first = order[0]
            others = order[1:]
            if rng.random() < 0.75:
                activity = _pick(rng, ACTIVITIES[first])
                text = f"{_noun_phrase(rng, first, named[first])} {activity}"
            else:
                phrases = [_noun_phrase(rng, label, named[label]) for label in [first, *others]]
                others = []
                lead = _pick(rng, ("there is ", "a photo of ", "a view of ", ""))
                text = lead + _join(phrases)
        if place:
            text += f" {place}"
        if others:
            link = _pick(rng, (" near ", " with ", " next to "))
            text += link + _join([_noun_phrase(rng, label, named[label]) for label in others])
        if extra:
            text += _pick(rng, (" near ", " beside ", " with ")) + extra
    words = text.split(" ")
    for i, word in enumerate(words):
        if len(word) >= 4 and word.isalpha() and rng.random() < 0.03:
            words[i] = _typo(rng, word)
    text = " ".join(words)
    text = text[0].upper() + text[1:]
    return text if rng.random() < 0.1 else text + "."


# --------------------------------------------------------------------------------------
# The dataset.
# --------------------------------------------------------------------------------------


def _image_rng(seed: int, index: int) -> np.random.Generator:
    """Image ``index``'s own generator: independent of the order images are made in."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))


def _make_example(job: tuple[int, int, int, str]) -> tuple[str, str]:
    """Sample, draw and save one image; return its (Labels, Caption)."""
    seed, index, size, image_dir = job
    rng = _image_rng(seed, index)
    scene, counts = sample_label_set(rng)
    caption = make_caption(rng, scene, counts)
    image = render_image(rng, scene, counts, size)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    atomic_write_bytes(Path(image_dir) / f"{index}.jpg", buffer.getvalue(), durable=False)
    return " ".join(str(label) for label in counts), caption


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    atomic_write_bytes(path, frame.to_csv(index=False, lineterminator="\n").encode("utf-8"), durable=False)


def _params(num_images: int, test_fraction: float, size: int, seed: int) -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "num_images": num_images,
        "test_fraction": test_fraction,
        "size": size,
        "seed": seed,
    }


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _label_frequencies(label_strings: Sequence[str]) -> dict[int, float]:
    counts = dict.fromkeys(COMP5329_LABEL_IDS, 0)
    for labels in label_strings:
        for token in labels.split():
            counts[int(token)] += 1
    return {label: counts[label] / max(1, len(label_strings)) for label in COMP5329_LABEL_IDS}


def generate_demo(
    out_dir: Path,
    num_images: int = 2000,
    test_fraction: float = 0.2,
    size: int = 160,
    seed: int = 0,
    *,
    force: bool = False,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Write the demo dataset to ``out_dir`` and return a summary.

    The summary holds ``out_dir``, ``num_images``, ``num_train``, ``num_test``, ``seconds``,
    ``skipped`` (True when a matching ``.complete`` marker made the call a no-op),
    ``multi_label_fraction`` and ``label_frequencies`` (label id -> fraction of images).
    ``workers`` defaults to up to two processes; the output does not depend on it.
    """
    start = time.perf_counter()
    if num_images < 2:
        raise ValueError(f"num_images must be at least 2, got {num_images}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    num_test = min(num_images - 1, max(1, round(num_images * test_fraction)))
    num_train = num_images - num_test

    out_dir = Path(out_dir)
    marker = out_dir / MARKER_NAME
    params = _params(num_images, test_fraction, size, seed)
    previous = _read_marker(marker)
    outputs = [out_dir / name for name in ("train.csv", "test.csv", "test_labels.csv")]
    if (
        not force
        and previous
        and previous.get("params") == params
        and "summary" in previous
        and all(p.exists() for p in outputs)
    ):
        summary = dict(previous["summary"])
        summary["label_frequencies"] = {int(k): v for k, v in summary["label_frequencies"].items()}
        summary.update(out_dir=str(out_dir), skipped=True, seconds=time.perf_counter() - start)
        return summary

    # Drop the marker first so an interrupted run is never mistaken for a finished one.
    marker.unlink(missing_ok=True)
    image_dir = out_dir / "data"
    image_dir.mkdir(parents=True, exist_ok=True)
    for stale in image_dir.glob("*.jpg"):
        # Images left by an earlier, larger run would sit beside the new ones.
        if re.fullmatch(r"\d+", stale.stem) and int(stale.stem) >= num_images:
            stale.unlink()
    for partial in image_dir.glob(".*.jpg.tmp"):
        partial.unlink()  # left by an interrupted run

    jobs = [(seed, i, size, str(image_dir)) for i in range(num_images)]
    workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    results: Iterator[tuple[str, str]]
    with contextlib.ExitStack() as stack:
        # Below a few hundred images starting the pool costs more than it saves.
        if workers > 1 and num_images >= 200:
            # fork starts workers without re-importing anything; spawn is the portable fallback.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            pool = stack.enter_context(multiprocessing.get_context(method).Pool(workers))
            results = pool.imap(_make_example, jobs, chunksize=16)
        else:
            results = map(_make_example, jobs)
        rows = list(tqdm(results, total=num_images, desc="demo images", unit="img", disable=not progress))

    ids = [f"{i}.jpg" for i in range(num_images)]
    labels = [row[0] for row in rows]
    captions = [row[1] for row in rows]
    _write_csv(
        pd.DataFrame({"ImageID": ids[:num_train], "Labels": labels[:num_train], "Caption": captions[:num_train]}),
        out_dir / "train.csv",
    )
    _write_csv(pd.DataFrame({"ImageID": ids[num_train:], "Caption": captions[num_train:]}), out_dir / "test.csv")
    _write_csv(pd.DataFrame({"ImageID": ids[num_train:], "Labels": labels[num_train:]}), out_dir / "test_labels.csv")

    summary = {
        "out_dir": str(out_dir),
        "num_images": num_images,
        "num_train": num_train,
        "num_test": num_test,
        "seconds": time.perf_counter() - start,
        "skipped": False,
        "multi_label_fraction": sum(len(s.split()) > 1 for s in labels) / num_images,
        "label_frequencies": _label_frequencies(labels),
    }
    stored = {k: v for k, v in summary.items() if k not in ("out_dir", "skipped", "seconds")}
    write_json(marker, {"params": params, "summary": stored})
    return summary


def get_args_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m pipeline.tools.demo``."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.tools.demo",
        description="Generate a deterministic synthetic demo dataset (drawn objects for the 18 "
        "COMP5329 labels, one caption per image) in the competition's layout: train.csv, "
        "test.csv, test_labels.csv and data/<ImageID>.jpg.",
        formatter_class=OneDefaultHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--out", type=Path, default=Path("data/demo"), help="output dataset folder")
    parser.add_argument("--num-images", type=int, default=2000, help="total images, train and test together")
    parser.add_argument(
        "--test-fraction",
        type=float,
        default=0.2,
        help="fraction of images (the last ones) written to test.csv without labels",
    )
    parser.add_argument("--size", type=int, default=160, help="image width and height in pixels")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical files")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes drawing images (default: min(2, CPU count)); does not change the output",
    )
    parser.add_argument(
        "--force", action="store_true", help="regenerate even if OUT/.complete says this dataset already exists"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    """Generate the dataset from command-line arguments and print a one-line summary."""
    args = get_args_parser().parse_args(argv)
    summary = generate_demo(
        args.out, args.num_images, args.test_fraction, args.size, args.seed, force=args.force, workers=args.workers
    )
    top = sorted(summary["label_frequencies"].items(), key=lambda kv: -kv[1])[:4]
    freq = ", ".join(f"{COCO_NAMES[label]} {share:.0%}" for label, share in top)
    action = "already complete, skipped" if summary["skipped"] else f"{summary['seconds']:.1f} s"
    print(
        f"demo: {summary['num_train']} train + {summary['num_test']} test images "
        f"({summary['multi_label_fraction']:.0%} multi-label; {freq}) in {summary['out_dir']}: {action}"
    )
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
