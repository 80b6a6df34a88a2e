"""How time and memory grow with the number of images: `make bench-scale` (measures; not a test).

Builds datasets of each --sizes images by linking the images of --source under new names
(labels and captions repeated, a test split of a tenth of the size linked the same way),
then runs on each, as a user would and each in its own process: train_efficientnet.py
(feature or stage-map extraction and head training) and inference.py (test extraction,
heads, fusion, submission). Writes OUTPUT/scale.json (one row per size: images, seconds
per stage, peak RSS per stage, cache bytes on disk) and OUTPUT/scale.png.

Peak RSS is each script's own process (os.wait4), not its loader workers'.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.data.dataset import CAPTION_COLUMN, ID_COLUMN, LABELS_COLUMN, read_csv  # noqa: E402


def build_dataset(source: Path, out: Path, size: int) -> Path:
    """``size`` training rows and ``size // 10`` test rows whose images link to the source's."""
    frame = read_csv(source / "train.csv")
    ids, labels, captions = (frame[c].tolist() for c in (ID_COLUMN, LABELS_COLUMN, CAPTION_COLUMN))
    out.mkdir(parents=True, exist_ok=True)
    images = out / "data"
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir()
    rows: dict[str, list[dict[str, str]]] = {"train": [], "test": []}  # csv rows by split
    source_images = (source / "data").resolve()
    for split, count, prefix in (("train", size, ""), ("test", max(1, size // 10), "t")):
        for k in range(count):
            i = (k if split == "train" else size + k) % len(ids)  # row lookups by list, not by DataFrame row
            name = f"{prefix}{k}.jpg"
            os.symlink(source_images / ids[i], images / name)
            label_text = " ".join(str(label) for label in labels[i])
            rows[split].append(
                {
                    ID_COLUMN: name,
                    **({LABELS_COLUMN: label_text} if split == "train" else {}),
                    CAPTION_COLUMN: captions[i],
                }
            )
    import pandas as pd

    for split, records in rows.items():
        pd.DataFrame(records).to_csv(out / f"{split}.csv", index=False)
    return out


def run(argv: list[str], log: Path) -> dict:
    """Seconds and peak RSS (MB) of one script run in its own process."""
    started = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv[0]} failed; see {log}")
    return {"seconds": round(time.perf_counter() - started, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024)}


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [row["images"] for row in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for stage in ("train_efficientnet", "inference"):
        left.plot(sizes, [row[stage]["seconds"] for row in rows], "o-", label=stage)
        right.plot(sizes, [row[stage]["peak_rss_mb"] for row in rows], "o-", label=stage)
    left.plot(sizes, [rows[0]["train_efficientnet"]["seconds"] * s / sizes[0] for s in sizes], "k:", label="linear")
    left.set(xlabel="training images", ylabel="seconds", title="time")
    right.set(xlabel="training images", ylabel="peak RSS (MB)", title="memory", ylim=(0, None))
    for axis in (left, right):
        axis.legend()
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--source", default="../shared/comp5329", help="real dataset whose images are linked")
    parser.add_argument("--sizes", type=int, nargs="+", default=[15000, 60000, 120000], help="training images")
    parser.add_argument("--work", default="/tmp/scale-bench", help="scratch folder (emptied)")
    parser.add_argument("--output", default="output", help="where scale.json and scale.png go")
    parser.add_argument("--mode", default="auto", help="train_efficientnet.py --mode (auto: the default recipe)")
    args, script_args = parser.parse_known_args(argv)
    source, work, output = Path(args.source), Path(args.work), Path(args.output)
    shutil.rmtree(work, ignore_errors=True)
    output.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        data = build_dataset(source, work / f"n{size}", size)
        weights, logs = work / f"weights-{size}", work / f"logs-{size}"
        logs.mkdir(parents=True)
        common = ["--data", str(data), "--weights", str(weights)]
        row = {"images": size, "test_images": max(1, size // 10), "mode": args.mode}
        row["train_efficientnet"] = run(
            ["train_efficientnet.py", *common, "--mode", args.mode, *script_args], logs / "train_efficientnet.log"
        )
        row["inference"] = run(["inference.py", *common, "--output", str(work / f"out-{size}")], logs / "inference.log")
        row["cache_bytes"] = directory_bytes(weights / "cache")
        summary = json.loads((weights / "image_summary.json").read_text())
        row["image_val_samples_f1"] = summary.get("image_val_samples_f1")
        rows.append(row)
        print(json.dumps(row), flush=True)
        (output / "scale.json").write_text(json.dumps(rows, indent=2) + "\n")
    base = rows[0]
    for row in rows[1:]:
        row["time_ratio"] = round(row["train_efficientnet"]["seconds"] / base["train_efficientnet"]["seconds"], 2)
        row["rss_ratio"] = round(
            max(row[s]["peak_rss_mb"] for s in ("train_efficientnet", "inference"))
            / max(base[s]["peak_rss_mb"] for s in ("train_efficientnet", "inference")),
            2,
        )
    (output / "scale.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot(rows, output / "scale.png")
    return rows


if __name__ == "__main__":
    main()
