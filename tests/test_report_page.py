"""output/report.html: written by ``inference.py --evaluate``, self-contained, its thumbnails capped,
and, in headless Chromium, rendered with every image loaded and a tuner that scores fusion settings
exactly as pipeline.fusion and pipeline.metrics do."""

from __future__ import annotations

import base64
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import inference
from pipeline.data.dataset import DatasetPaths
from pipeline.fusion import FusionSettings, load_fusion
from pipeline.metrics import evaluate_probs, samples_f1
from pipeline.report_page import PageLimits, write_report_page
from tests.conftest import WORDS

pytestmark = pytest.mark.filterwarnings("ignore:backbone test_efficientnet:UserWarning")

CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver")
NO_BROWSER = ("headless Chromium is not installed (apt-get install chromium chromium-driver): "
              "the page is not rendered in a browser")


def run(data, weights, output, *extra):
    return inference.main(["--data", str(data), "--weights", str(weights), "--output", str(output),
                           "--workers", "0", "--val-fraction", "0.25", *extra])


def embedded(page: str, element: str) -> dict:
    match = re.search(rf'<script type="application/json" id="{element}">(.*?)</script>', page, re.S)
    assert match, f"no {element} in the page"
    return json.loads(match.group(1))


def page_arrays(data: dict) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The labels and probabilities the page embeds, decoded as its script decodes them."""
    n, labels = data["n"], len(data["labels"])
    y = np.frombuffer(base64.b64decode(data["y"]), np.uint8).reshape(n, labels)
    probs = {b: np.frombuffer(base64.b64decode(p["data"]), "<" + p["dtype"]).reshape(n, labels)
             for b, p in data["probs"].items()}
    return y, probs


def python_f1(data: dict, weights: dict, threshold: float, per_label: dict) -> float:
    """Samples-F1 of the given settings by pipeline.fusion and pipeline.metrics on the page's arrays."""
    y, probs = page_arrays(data)
    settings = FusionSettings(**{**data["fusion"], "method": "weighted", "stacker": None, "weights": weights,
                                 "threshold": threshold, "per_label_thresholds": per_label})
    return samples_f1(y, settings.predict(probs))


@pytest.fixture(scope="module")
def evaluated(trained_branches, tmp_path_factory):
    """(weights, output) of one ``--evaluate`` run on the tiny trained branches."""
    data, weights = trained_branches
    root = tmp_path_factory.mktemp("report")
    shutil.copytree(weights, root / "weights")
    # The page names labels as dataset.json does (without one, these ids would be their own names).
    data = Path(shutil.copytree(data, root / "data"))
    (data / "dataset.json").write_text(json.dumps({"train.csv": {"labels": {str(i): w for i, w in WORDS.items()}}}))
    with pytest.MonkeyPatch.context() as patch:
        import torch

        patch.setattr(torch.cuda, "is_available", lambda: False)
        run(data, root / "weights", root / "out", "--evaluate")
    return root / "weights", root / "out"


def test_evaluate_writes_one_self_contained_page(evaluated):
    weights, out = evaluated
    page = (out / "report.html").read_text(encoding="utf-8")
    for name in WORDS.values():
        assert f"<h3>{name} " in page
    # Self-contained: nothing to fetch; every image is inline data.
    assert not re.search(r"""(src|href)\s*=\s*['"](https?:|//)""", page)
    assert re.findall(r"""<img[^>]*src=['"](?!data:)""", page) == []
    thumbs = embedded(page, "thumbs")
    referenced = set(re.findall(r"data-thumb='(\d+)'", page))
    assert referenced and referenced == set(thumbs)
    for encoded in thumbs.values():
        with Image.open(BytesIO(base64.b64decode(encoded))) as image:
            assert image.format == "JPEG" and max(image.size) <= PageLimits().size
    # The tiny images are 32 px: thumbnails are never enlarged.
    assert all(Image.open(BytesIO(base64.b64decode(t))).size == (32, 32) for t in thumbs.values())
    data = embedded(page, "report-data")
    metrics = json.loads((out / "metrics.json").read_text())
    assert data["fused_samples_f1"] == metrics["branches"]["fused"]["samples_f1"]
    assert data["target"] == str(weights / "fusion.json")
    # The embedded probabilities are the very ones evaluated: fused again, they give metrics.json's F1.
    saved = load_fusion(weights / "fusion.json")
    assert python_f1(data, saved.weights, saved.threshold, saved.per_label_thresholds) == \
        pytest.approx(metrics["branches"]["fused"]["samples_f1"], abs=1e-12)
    y, _ = page_arrays(data)
    assert y.sum(axis=0).tolist() == [metrics["branches"]["fused"]["per_label"][str(i)]["support"] for i in WORDS]
    assert len(page.encode()) < 400_000


def test_no_report_writes_none(trained_branches, tmp_path):
    data, weights = trained_branches
    shutil.copytree(weights, tmp_path / "weights")
    run(data, tmp_path / "weights", tmp_path / "out", "--evaluate", "--no-report")
    assert (tmp_path / "out" / "metrics.json").is_file()
    assert not (tmp_path / "out" / "report.html").exists()


def test_thumbnails_keep_to_the_caps_and_the_page_states_them(tmp_path):
    rng = np.random.default_rng(0)
    n, labels = 20, 3
    (tmp_path / "data").mkdir()
    ids = [f"{i}.jpg" for i in range(n)]
    for image_id in ids:
        Image.fromarray(rng.integers(0, 255, (90, 160, 3), dtype=np.uint8)).save(tmp_path / "data" / image_id)
    y = (rng.random((n, labels)) < 0.4).astype(np.int64)
    y[y.sum(axis=1) == 0, 0] = 1
    probs = {"image": rng.random((n, labels)).astype(np.float32), "caption": rng.random((n, labels)).astype(np.float32)}
    settings = FusionSettings(branches=["image", "caption"], label_ids=[1, 2, 3], weights={"image": 0.5, "caption": 0.5},
                              threshold=0.5)
    metrics = {"fused": evaluate_probs(y, settings.probabilities(probs), settings.thresholds(), [1, 2, 3])}
    limits = PageLimits(per_label=2, disagreement=2, total=5, size=48)
    frame = __import__("pandas").DataFrame({"ImageID": ids, "Caption": [f"caption {i} </script>" for i in range(n)]})
    summary = write_report_page(tmp_path / "report.html", y, probs, settings, [1, 2, 3], metrics, frame,
                                DatasetPaths(tmp_path, tmp_path / "data"), source="validation split",
                                weights_dir=tmp_path, command="python inference.py", limits=limits)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    thumbs = embedded(page, "thumbs")
    # 3 labels x 2 kinds x 2 + 2 entries ask for more images than the cap of 5 allows.
    assert summary["thumbnails"] == len(thumbs) == 5
    for encoded in thumbs.values():
        with Image.open(BytesIO(base64.b64decode(encoded))) as image:
            assert image.size == (48, 27)  # 160x90 shrunk to 48 px on its longest side
    assert "at most 2 per label and kind, 2 in the disagreement gallery, 5 distinct images in all, each at most 48 px" \
        in page
    assert "gallery entries left out by the cap" in page
    # Captions are escaped, never markup.
    assert re.search(r"caption \d+ &lt;/script&gt;", page) and not re.search(r"caption \d+ </script>", page)


# --- headless Chromium -----------------------------------------------------------------------


class Browser:
    """Headless Chromium driven through chromedriver's W3C WebDriver HTTP protocol (stdlib only)."""

    def __init__(self, profile: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.driver = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                self._call("GET", "/status")
                break
            except OSError:
                time.sleep(0.1)
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                "--window-size=1280,2400"]
        session = self._call("POST", "/session", {"capabilities": {"alwaysMatch": {
            "browserName": "chrome", "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
            "goog:loggingPrefs": {"browser": "ALL"}}}})
        self.session = f"/session/{session['sessionId']}"

    def _call(self, method: str, path: str, body: dict | None = None):
        request = urllib.request.Request(self.base + path, method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())["value"]

    def open(self, url: str) -> None:
        self._call("POST", self.session + "/url", {"url": url})

    def run(self, script: str):
        return self._call("POST", self.session + "/execute/sync", {"script": script, "args": []})

    def screenshot(self) -> bytes:
        return base64.b64decode(self._call("GET", self.session + "/screenshot"))

    def console(self) -> list[dict]:
        return self._call("POST", self.session + "/se/log", {"type": "browser"})

    def close(self) -> None:
        try:
            self._call("DELETE", self.session)
        finally:
            self.driver.terminate()
            self.driver.wait(timeout=30)


@pytest.mark.skipif(not (Path(CHROMIUM).is_file() and CHROMEDRIVER), reason=NO_BROWSER)
def test_page_renders_in_chromium_and_its_tuner_scores_as_python(evaluated, tmp_path):
    weights, out = evaluated
    page = out / "report.html"
    data = embedded(page.read_text(encoding="utf-8"), "report-data")
    metrics = json.loads((out / "metrics.json").read_text())
    browser = Browser(tmp_path / "profile")
    try:
        browser.open(page.as_uri())
        state = browser.run(
            "return {text: document.body.innerText,"
            " images: [...document.images].map(i => [i.alt, i.complete, i.naturalWidth]),"
            " f1: document.getElementById('tuner-f1').dataset.value,"
            " error: document.getElementById('page-error').hidden ? '' : document.getElementById('page-error').textContent,"
            " fusion: document.getElementById('fusion-json').textContent,"
            " download: document.getElementById('download').href};")
        shot = browser.screenshot()
        for name in WORDS.values():
            assert name in state["text"]
        assert len(state["images"]) > 5
        assert [i for i in state["images"] if not (i[1] and i[2] > 0)] == []
        assert state["error"] == ""
        # The tuner, at the settings in use, gives --evaluate's fused samples-F1.
        assert float(state["f1"]) == pytest.approx(metrics["branches"]["fused"]["samples_f1"], abs=1e-4)
        shown = json.loads(state["fusion"])
        # The download link saves exactly the text shown.
        assert urllib.parse.unquote(state["download"].partition(",")[2]) == state["fusion"]
        saved = load_fusion(weights / "fusion.json")
        assert shown["weights"] == saved.weights and shown["per_label_thresholds"] == saved.per_label_thresholds

        # Other settings through the fragment: the page's F1 is Python's for them, and its
        # fusion.json text loads as fusion.json and holds them.
        weights_set = {"image": 0.2, "decoder": 0.1, "caption": 0.7}
        fragment = "w=" + ",".join(f"{b}:{w}" for b, w in weights_set.items()) + "&t=0.37&pl=1:0.6,19:0.2"
        browser.open(page.as_uri() + "#" + fragment)
        state = browser.run("return {f1: document.getElementById('tuner-f1').dataset.value,"
                            " fusion: document.getElementById('fusion-json').textContent};")
        expected = python_f1(data, weights_set, 0.37, {"1": 0.6, "19": 0.2})
        assert float(state["f1"]) == pytest.approx(expected, abs=1e-9)
        (tmp_path / "fusion.json").write_text(state["fusion"])
        tuned = load_fusion(tmp_path / "fusion.json")
        assert (tuned.weights, tuned.threshold, tuned.per_label_thresholds) == (weights_set, 0.37, {"1": 0.6, "19": 0.2})

        # A slider moved by hand re-scores too.
        state = browser.run("const r = document.getElementById('t-range'); r.value = '0.8';"
                            " r.dispatchEvent(new Event('input'));"
                            " return document.getElementById('tuner-f1').dataset.value;")
        assert float(state) == pytest.approx(python_f1(data, weights_set, 0.8, {"1": 0.6, "19": 0.2}), abs=1e-9)
        # A fragment naming a branch the page lacks says so, and the score of the rest still shows.
        browser.open(page.as_uri() + "#w=nosuch:1&t=0.5")
        state = browser.run("return [document.getElementById('tuner-error').textContent,"
                            " document.getElementById('tuner-f1').dataset.value];")
        assert "nosuch is not one of the branches" in state[0] and state[1] != ""
        errors = [entry for entry in browser.console() if entry.get("level") == "SEVERE"]
        assert errors == []
    finally:
        browser.close()
    with Image.open(BytesIO(shot)) as image:
        assert image.format == "PNG" and image.size[0] >= 800
        # A rendered page, not a blank one: many distinct colours.
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 50
