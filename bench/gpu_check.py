"""The GPU check's stages and its report (run by .gpu/check.sh; see bench/gpu_pack.py).

On the packed real-data subset, each stage in its own process, as a user runs them:
nvidia-smi; frozen mode (the baseline); the fine-tune recipe, with GPU utilisation sampled
while it trains; the caption branch; inference from the fine-tuned checkpoint, evaluated on
the carved test split; a one-process NCCL torchrun fine-tune; the benchmark; the CUDA-only
tests. A stage that fails is recorded with the end of its output and the others still run.
Writes OUT/gpu_check.json: F1 per branch, seconds, img/s, GPU busy %, peak GPU memory, errors.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class GpuSampler:
    """``nvidia-smi`` polled every 200 ms in the background: (time, busy %, memory MB) samples."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []
        self.process = None
        if shutil.which("nvidia-smi"):
            self.process = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                 "-lms", "200"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                busy, memory = (float(x) for x in line.split(",")[:2])
            except ValueError:
                continue
            self.samples.append((time.time(), busy, memory))

    def between(self, start: float, end: float) -> dict:
        chosen = [(busy, memory) for t, busy, memory in self.samples if start <= t <= end]
        if not chosen:
            return {"samples": 0}
        return {"samples": len(chosen), "busy_pct_mean": round(sum(b for b, _ in chosen) / len(chosen), 1),
                "memory_mb_max": max(m for _, m in chosen)}

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()


def run_stage(report: dict, name: str, argv: list[str], logs: Path, timeout: float) -> bool:
    """Run ``python argv`` from the repository root; record seconds, and the output's end on failure."""
    started = time.time()
    log = logs / f"{name}.log"
    print(f"[gpu check] {name}: {' '.join(argv)}", flush=True)
    try:
        with open(log, "w") as handle:
            result = subprocess.run([sys.executable, *argv], cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                    timeout=timeout)
        ok, error = result.returncode == 0, f"exit {result.returncode}"
    except subprocess.TimeoutExpired:
        ok, error = False, f"timed out after {timeout:.0f} s"
    stage = {"ok": ok, "seconds": round(time.time() - started, 1), "started": started}
    if not ok:
        tail = log.read_text(errors="replace")[-2500:]
        stage["error"] = f"{error}: ...{tail}"
        report["errors"].append(f"{name}: {error}")
    report["stages"][name] = stage
    print(f"[gpu check] {name}: {'ok' if ok else 'FAILED'} in {stage['seconds']} s", flush=True)
    return ok


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pack", default=".gpu", help="the folder bench/gpu_pack.py wrote")
    parser.add_argument("--out", default=".gpu/out", help="where gpu_check.json goes")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="where every stage runs")
    parser.add_argument("--tiny", action="store_true",
                        help="a few steps of everything at a small resolution: tests this script on a CPU")
    # Lite0, not the scripts' default Lite2: the pack carries only Lite0's weights, 22 MB smaller.
    parser.add_argument("--backbone", default="tf_efficientnet_lite0",
                        help="the backbone of every image stage (its bundled weights must be in the pack)")
    parser.add_argument("--work", default=None, help="scratch folder for weights and logs (default: a new temp dir)")
    args = parser.parse_args(argv)

    pack, out = Path(args.pack).resolve(), Path(args.out).resolve()
    data = pack / "data"
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-check-")).resolve()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True) if shutil.which("nvidia-smi") else None
    report: dict = {"device": args.device, "tiny": args.tiny, "python": sys.version.split()[0],
                    "nvidia_smi": smi.stdout.splitlines()[:20] if smi else "not available",
                    "stages": {}, "errors": []}
    tiny = ["--resolution", "64", "--batch-size", "16", "--epochs", "2", "--decoder-epochs", "1",
            "--finetune-epochs", "1", "--workers", "1"] if args.tiny else []
    common = ["--data", str(data), "--device", args.device]
    tiny += ["--backbone", args.backbone]
    budget = 240 if args.tiny else 300
    sampler = GpuSampler() if args.device == "cuda" else None
    started = time.time()

    frozen, tuned = work / "frozen", work / "finetune"
    run_stage(report, "frozen", ["train_efficientnet.py", *common, "--weights", str(frozen), "--mode", "frozen",
                                 *tiny], logs, budget)
    run_stage(report, "finetune", ["train_efficientnet.py", *common, "--weights", str(tuned), "--mode", "finetune",
                                   *tiny], logs, budget)
    caption_args = ["--ensemble", "1", "--epochs", "2"] if args.tiny else []
    run_stage(report, "caption", ["train_caption_rnn.py", *common, "--weights", str(tuned), *caption_args],
              logs, budget)
    run_stage(report, "inference", ["inference.py", *common, "--weights", str(tuned), "--output", str(work / "o"),
                                    "--evaluate", "--eval-csv", str(data / "test_labels.csv")], logs, budget)
    run_stage(report, "torchrun_nccl_1process",
              ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "train_efficientnet.py",
               *common, "--weights", str(work / "ddp"), "--mode", "finetune", *tiny,
               "--finetune-epochs", "1"], logs, budget)
    bench_args = ["--num-images", "32", "--forward-seconds", "0.5", "--repeats", "1", "--no-compare",
                  "--finetune-batches", "2", "--finetune-batch-size", "8", "--head-rows", "512"] if args.tiny \
        else ["--repeats", "1"]
    run_stage(report, "bench", ["-m", "pipeline.tools.bench", *common, "--weights", str(tuned),
                                "--output", str(work / "bench"), *bench_args], logs, budget)
    if args.device == "cuda":
        run_stage(report, "cuda_tests", ["-m", "pytest", "-q", "-rs", "tests/test_cuda.py"], logs, budget)

    frozen_summary, tuned_summary = read_json(frozen / "image_summary.json"), read_json(tuned / "image_summary.json")
    metrics = read_json(work / "o" / "metrics.json").get("branches", {})
    fusion = read_json(tuned / "fusion.json")
    bench = read_json(work / "bench" / "bench.json")
    report["f1"] = {
        "frozen_image_val": frozen_summary.get("image_val_samples_f1"),
        "finetune_image_val": tuned_summary.get("image_val_samples_f1"),
        "finetune_beats_frozen": (tuned_summary.get("image_val_samples_f1", 0) or 0)
        > (frozen_summary.get("image_val_samples_f1", 1) or 1),
        "fused_val": fusion.get("val_samples_f1"),
        "test_split": {name: round(m["samples_f1"], 4) for name, m in metrics.items()},
    }
    report["finetune"] = {key: tuned_summary.get(key) for key in (
        "training_precision", "lr", "train_images", "image_best_epoch", "training_seconds", "train_img_s",
        "extract_seconds", "total_seconds", "peak_gpu_memory_mb")}
    window = tuned_summary.get("training_window_unix")
    if sampler is not None:
        time.sleep(0.5)
        report["gpu_while_training"] = sampler.between(*window) if window else {"samples": 0}
        report["gpu_whole_check"] = sampler.between(started, time.time())
        sampler.stop()
    report["bench"] = {key: bench.get(key) for key in (
        "backbone_forward_img_s", "pipeline_img_s", "pipeline_over_forward", "train_finetune_img_s",
        "train_cached_head_img_s", "train_cached_decoder_img_s", "precision", "device")}
    report["seconds"] = round(time.time() - started, 1)
    path = out / "gpu_check.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("f1", "finetune", "errors", "seconds")}, indent=2))
    print(f"[gpu check] wrote {path}; logs in {logs}")
    return report


if __name__ == "__main__":
    main()
