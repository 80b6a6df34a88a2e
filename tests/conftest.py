"""Shared fixtures: a tiny dataset in the competition's layout, and the three branches trained on it once."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

# Tiny tensors run faster on one thread, and results stay identical run to run.
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs only where CUDA is present (and then always runs)")
    config.addinivalue_line("markers", "timed_runtimes: --runtime auto times the runtimes instead of a fixed table")
    config.addinivalue_line("markers", "real_text_encoder: reads the installed all-MiniLM-L6-v2, not the tiny "
                            "stand-in every other test reads")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: run on a GPU machine (make gpu-check)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def cpu_unless_marked_cuda(request, monkeypatch):
    """The suite runs on the CPU on every machine, so a GPU machine runs the same tests: ``--device
    auto`` (every script's default) resolves to the CPU here. Tests marked ``cuda`` see the GPU."""
    if request.node.get_closest_marker("cuda") is None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# What ``--runtime auto`` measures, fixed: timings on a shared test machine are noise, and a
# choice that changed from run to run would change the reference values. OpenVINO first, the
# choice before auto measured.
FIXED_RUNTIME_SPEEDS = {"openvino": 300.0, "onnxruntime": 200.0, "torch": 100.0}


def fixed_runtime_speeds(patch: pytest.MonkeyPatch) -> None:
    """Make ``--runtime auto`` choose by :data:`FIXED_RUNTIME_SPEEDS` instead of timing."""
    from pipeline.engine import runtimes

    patch.setattr(runtimes, "measure_runtime", lambda name, *args: FIXED_RUNTIME_SPEEDS[name])


@pytest.fixture(autouse=True)
def runtime_speeds_fixed(request, monkeypatch):
    """Every test's ``--runtime auto`` chooses by the fixed table unless marked ``timed_runtimes``."""
    if request.node.get_closest_marker("timed_runtimes") is None:
        fixed_runtime_speeds(monkeypatch)


WORDS = {1: "person", 3: "car", 18: "dog", 19: "horse"}
COLOURS = {1: (220, 40, 40), 3: (40, 200, 40), 18: (40, 40, 220), 19: (220, 220, 40)}
# The k-th caption of an image: each form after the first brings words no other form has, so
# a vocabulary shows which caption rows a model read.
CAPTION_FORMS = ("A photo of {}.", "Here is {}.", "We can see {}.")


def make_tiny_dataset(root: Path, n_train: int = 48, n_test: int = 10, seed: int = 0, *,
                      captions_per_image: int = 1, images: bool = True) -> Path:
    """The competition's layout under ``root``: ``train.csv`` (ImageID, Labels, Caption),
    ``test.csv`` (ImageID, Caption) and ``data/<i>.jpg``, with images ``0 .. n_train-1`` for
    training and the next ``n_test`` to predict.

    Each 32x32 image holds one or two of the 4 labels as coloured bars on grey, and its captions
    name them. ``captions_per_image`` > 1 writes one row per caption (an image's rows apart
    from each other) and declares the repeats in ``dataset.json``; ``images=False`` leaves out
    the image folder (a captions-only dataset).
    """
    if not 1 <= captions_per_image <= len(CAPTION_FORMS):
        raise ValueError(f"captions_per_image must be 1..{len(CAPTION_FORMS)}")
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    if images:
        (root / "data").mkdir(exist_ok=True)
    train, test = [], []
    for i in range(n_train + n_test):
        labels = sorted(rng.choice(list(WORDS), size=rng.integers(1, 3), replace=False).tolist())
        if images:
            image = np.full((32, 32, 3), 128, dtype=np.uint8)
            for k, label in enumerate(labels):
                x = 2 + 15 * k
                image[4:28, x:x + 12] = COLOURS[label]
            Image.fromarray(image).save(root / "data" / f"{i}.jpg")
        named = " and ".join(f"a {WORDS[label]}" for label in labels)
        captions = [form.format(named) for form in CAPTION_FORMS[:captions_per_image]]
        if i < n_train:
            labels_field = " ".join(map(str, labels))
            train.append([{"ImageID": f"{i}.jpg", "Labels": labels_field, "Caption": c} for c in captions])
        else:
            test.append([{"ImageID": f"{i}.jpg", "Caption": c} for c in captions])
    for name, per_image, columns in (("train.csv", train, ["ImageID", "Labels", "Caption"]),
                                     ("test.csv", test, ["ImageID", "Caption"])):
        # First captions in image order, then each further caption in reverse image order.
        rows = [image_rows[0] for image_rows in per_image]
        for k in range(1, captions_per_image):
            rows += [image_rows[k] for image_rows in reversed(per_image)]
        pd.DataFrame(rows, columns=columns).to_csv(root / name, index=False)
    if captions_per_image > 1:
        (root / "dataset.json").write_text(json.dumps({n: {"repeated_ids": True} for n in ("train.csv", "test.csv")}))
    return root


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    return make_tiny_dataset(tmp_path / "tiny")


# Options that keep the image branch tiny: a 100k-parameter timm test model at 32 px.
TINY_IMAGE_ARGS = [
    "--device", "cpu", "--mode", "frozen", "--backbone", "test_efficientnet", "--resolution", "32", "--workers", "0", "--batch-size", "16",
    "--epochs", "3", "--decoder-epochs", "2", "--head-hidden", "32", "--decoder-embed", "16",
    "--decoder-hidden", "32", "--val-fraction", "0.25",
]
# The same for the caption branch.
TINY_CAPTION_ARGS = ["--epochs", "3", "--embed-dim", "16", "--hidden-size", "16", "--val-fraction", "0.25",
                     "--min-freq", "1"]
# Rows of test.csv in the trained_branches dataset: enough for one odd image file of each kind.
TRAINED_N_TEST = 24


@pytest.fixture(scope="session")
def trained_branches(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset, weights): a tiny dataset with all three branches trained on it, once per session.

    Shared by every test that needs trained weights: a test that writes into either folder
    (inference writes fusion.json and a feature cache into the weights) copies it first.
    """
    import train_caption_rnn
    import train_efficientnet

    root = tmp_path_factory.mktemp("trained")
    data = make_tiny_dataset(root / "tiny", n_test=TRAINED_N_TEST)
    weights = root / "weights"
    # Session fixtures are set up before the per-test CPU pin: pin here as well.
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        patch.setattr(torch.cuda, "is_available", lambda: False)
        fixed_runtime_speeds(patch)
        warnings.filterwarnings("ignore", "backbone test_efficientnet", UserWarning)
        train_efficientnet.main(["--data", str(data), "--weights", str(weights), *TINY_IMAGE_ARGS])
        train_caption_rnn.main(["--data", str(data), "--weights", str(weights), "--device", "cpu",
                                *TINY_CAPTION_ARGS])
    return data, weights


def count_extracted_rows(monkeypatch) -> list[int]:
    """The rows each cached extraction computes from now on (its missing shards; a cache hit
    adds nothing), and the image count of each uncached ``extract_features`` call."""
    import pipeline.features as features_module

    extracted: list[int] = []
    into_store, in_memory = features_module.extract_into_store, features_module.extract_features

    def counting_store(extractor, paths, image_ids, views, store, shards, *args, **kwargs):
        extracted.append(sum(len(store.shard_range(k)) for k in shards))
        return into_store(extractor, paths, image_ids, views, store, shards, *args, **kwargs)

    def counting_memory(backbone, paths, image_ids, *args, **kwargs):
        extracted.append(len(image_ids))
        return in_memory(backbone, paths, image_ids, *args, **kwargs)

    monkeypatch.setattr(features_module, "extract_into_store", counting_store)
    monkeypatch.setattr(features_module, "extract_features", counting_memory)
    return extracted


def make_tiny_encoder(folder: Path) -> Path:
    """A 2-layer, 16-wide BERT with a word-level vocabulary of the tiny captions, saved in
    ``folder`` as ``transformers`` saves a model: a stand-in for MiniLM that loads in well under
    a second. Its weights come from seed 0 without touching the caller's random state."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = sorted({w for name in WORDS.values() for w in [name]} | {"a", "photo", "of", "here", "is", "we", "can",
                                                                     "see", "and", "."})
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    config = BertConfig(vocab_size=5 + len(words), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", autouse=True)
def stand_in_text_encoders(tmp_path_factory) -> dict:
    """Every registered text encoder (``--text-encoder``, ``--decoder-caption``: MiniLM by default)
    is the tiny stand-in for the whole session, session fixtures included: the suite's trainings
    never load the real 22M-parameter MiniLM. The stand-in is built on first use. Returns the
    real registry, for the tests marked ``real_text_encoder``."""
    from pipeline import text_features

    real = dict(text_features.TEXT_ENCODERS)
    built: list[Path] = []

    def stand_in() -> Path:
        if not built:
            built.append(make_tiny_encoder(tmp_path_factory.mktemp("tiny-encoder")))
        return built[0]

    with pytest.MonkeyPatch.context() as patch:
        for name in real:
            patch.setitem(text_features.TEXT_ENCODERS, name, stand_in)
        stand_in_threads(patch)
        yield real


def stand_in_threads(patch: pytest.MonkeyPatch) -> None:
    """The caption trainer's encoding stays on one thread, where the product gives it every core:
    the stand-in's matrices are too small for a second thread, whose waiting made each encoding
    several times slower on loaded cores, and a process forked later (tests/test_cache_safety.py)
    cannot use an OpenMP pool its parent started."""
    from pipeline.engine.runtime import cpu_threads
    from pipeline.train import caption

    patch.setattr(caption, "cpu_threads", lambda threads: cpu_threads(min(threads, 1)))


@pytest.fixture(autouse=True)
def real_text_encoders_where_marked(request, monkeypatch, stand_in_text_encoders):
    """A test marked ``real_text_encoder`` reads the installed encoders (offline, from their packages)."""
    if request.node.get_closest_marker("real_text_encoder") is not None:
        from pipeline import text_features

        for name, folder in stand_in_text_encoders.items():
            monkeypatch.setitem(text_features.TEXT_ENCODERS, name, folder)


@pytest.fixture
def tiny_text_encoder() -> Path:
    """The folder of the stand-in encoder that ``minilm`` reads in every test."""
    from pipeline import text_features

    return text_features.TEXT_ENCODERS["minilm"]()


@pytest.fixture
def backbone():
    """A 32 px test EfficientNet with random weights (timm warns that they are random)."""
    from pipeline.models.backbones import create_backbone

    with pytest.warns(UserWarning):
        return create_backbone("test_efficientnet", resolution=32)
