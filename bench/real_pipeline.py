"""Time the whole default recipe on real data, from nothing: `make bench-real`.

Runs train_efficientnet.py twice (cold, then with the feature cache warm),
train_caption_rnn.py and inference.py --evaluate as a user would, each in its own
process, and records wall time, peak memory and the scores each stage reports.
Writes OUTPUT/real_pipeline.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def run_stage(name: str, argv: list[str], log_dir: Path) -> dict:
    """Run one script, teeing its output to a log; return seconds and peak RSS."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    with open(log_dir / f"{name}.log", "w") as log:
        result = subprocess.run([sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{name} failed (exit {result.returncode}); see {log_dir / f'{name}.log'}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"seconds": round(seconds, 1), "peak_rss_mb_so_far": round(max(peak, before) / 1024)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--data", default="../shared/comp5329", help="real dataset folder")
    parser.add_argument("--work", default="/tmp/real-bench", help="scratch folder for weights and outputs (emptied)")
    parser.add_argument("--output", default="output", help="where real_pipeline.json goes")
    parser.add_argument("--seed", type=int, default=0, help="--seed for both training scripts (judge a change on two)")
    parser.add_argument("--skip-warm", action="store_true", help="skip the warm-cache rerun of train_efficientnet.py")
    args = parser.parse_args(argv)

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    weights, output, logs = work / "weights", work / "output", work / "logs"
    logs.mkdir(parents=True)
    common = ["--data", args.data, "--weights", str(weights)]
    training = [*common, "--seed", str(args.seed)]
    stages = {}
    started = time.perf_counter()
    stages["train_efficientnet_cold"] = run_stage("train_efficientnet_cold", ["train_efficientnet.py", *training], logs)
    image_summary = json.loads((weights / "image_summary.json").read_text())
    stages["train_caption_rnn"] = run_stage("train_caption_rnn", ["train_caption_rnn.py", *training], logs)
    stages["inference"] = run_stage("inference", ["inference.py", *common, "--output", str(output), "--evaluate"], logs)
    recipe_seconds = time.perf_counter() - started
    if not args.skip_warm:
        stages["train_efficientnet_warm"] = run_stage(
            "train_efficientnet_warm", ["train_efficientnet.py", *training], logs
        )

    metrics = json.loads((output / "metrics.json").read_text())
    with open(output / "submission.csv") as submission:
        submission_rows = sum(1 for _ in submission) - 1
    result = {
        "data": args.data,
        "seed": args.seed,
        "recipe_seconds_from_nothing": round(recipe_seconds, 1),
        "stages": stages,
        "image_training": image_summary,
        "validation_samples_f1": {name: round(m["samples_f1"], 4) for name, m in metrics["branches"].items()},
        "submission_rows": submission_rows,
    }
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "real_pipeline.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
