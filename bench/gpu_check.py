"""The GPU check's stages and its report (run by .gpu/check.sh; see bench/gpu_pack.py).

First the packed wheels are installed into PACK/site, one pip call per wheel (a wheel for
another Python is skipped; a failed or missing required one fails the "wheels" stage by
name). Then, on the packed real-data subset, each stage in its own process, as a user runs
them: frozen mode (the baseline); the fine-tune recipe, with the busy % of the GPU in use
sampled while it trains; the caption branch; inference from the fine-tuned checkpoint,
evaluated on the carved test split; a one-process NCCL torchrun fine-tune; the benchmark; the
CUDA-only tests. A stage that fails is recorded with the end of its output and the others
still run; an overall --deadline caps every stage's timeout, and stages it leaves no time for
are marked skipped. Writes OUT/gpu_check.json after every stage: versions (torch, CUDA, cuDNN,
timm, torchvision, Python, GPU, driver), F1 per branch, seconds, img/s, GPU busy % (p10, p50,
mean), peak GPU memory, errors. Exits 1 when any stage failed or was skipped."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


PYTHON_TAG = f"cp{sys.version_info[0]}{sys.version_info[1]}"
STAGES = ("frozen", "finetune", "caption", "inference", "torchrun_nccl_1process", "bench", "cuda_tests")
# Kept free at the deadline for writing the report and stopping the sampler.
REPORT_RESERVE_S = 2.0
VERSIONS_PROBE = r"""
import json, platform, sys
out = {"python": platform.python_version()}
try:
    import torch
    out.update(torch=torch.__version__, cuda=torch.version.cuda,
               cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
               cuda_available=torch.cuda.is_available())
    if sys.argv[1] == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(gpu_name=props.name, gpu_uuid=str(getattr(props, "uuid", "")) or None)
except Exception as error:  # reported, not raised: the other versions still matter
    out["torch_error"] = repr(error)
for name in ("timm", "torchvision"):
    try:
        out[name] = __import__(name).__version__
    except Exception as error:
        out[name] = None
        out[name + "_error"] = repr(error)
print(json.dumps(out))
"""
VERSION_KEYS = ("python", "torch", "cuda", "cudnn", "timm", "torchvision", "gpu_name", "driver")


def busy_stats(values: list[float]) -> dict:
    """p10, p50 and mean of GPU busy % samples (none: an empty dict)."""
    if not values:
        return {}
    p10 = statistics.quantiles(values, n=10, method="inclusive")[0] if len(values) > 1 else values[0]
    return {"busy_pct_p10": round(p10, 1), "busy_pct_p50": round(statistics.median(values), 1),
            "busy_pct_mean": round(statistics.fmean(values), 1)}


class GpuSampler:
    """``nvidia-smi -i GPU`` polled every 200 ms in the background: (time, busy %, memory MB)
    samples of the one device the stages use, not of every visible one."""

    def __init__(self, gpu: str) -> None:
        self.samples: list[tuple[float, float, float]] = []
        self.process = None
        if shutil.which("nvidia-smi"):
            self.process = subprocess.Popen(
                ["nvidia-smi", "-i", gpu, "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                 "-lms", "200"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                busy, memory = (float(x) for x in line.split(",")[:2])
            except ValueError:
                continue
            self.samples.append((time.time(), busy, memory))

    def between(self, windows: list[tuple[float, float]]) -> dict:
        """Busy % stats and peak memory of the samples inside any of ``windows`` (unix times)."""
        chosen = [(busy, memory) for t, busy, memory in self.samples if any(a <= t <= b for a, b in windows)]
        if not chosen:
            return {"samples": 0}
        return {"samples": len(chosen), **busy_stats([b for b, _ in chosen]),
                "memory_mb_max": max(m for _, m in chosen)}

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()


class Deadline:
    """The check's overall time limit: every stage's timeout is capped by what is left of it."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.started = seconds, time.time()
        self.reached = False

    def left(self) -> float:
        return self.seconds - REPORT_RESERVE_S - (time.time() - self.started)

    def cap(self, budget: float) -> float | None:
        """``budget`` capped by the time left; None (and the deadline marked reached) when none is."""
        left = self.left()
        if left < 1.0:
            self.reached = True
            return None
        return min(budget, left)


def write_report(report: dict, path: Path) -> None:
    """Atomic, so a check killed from outside still leaves the last complete report."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(temporary, path)


def run_stage(report: dict, name: str, argv: list[str], logs: Path, budget: float, deadline: Deadline,
              env: dict) -> bool:
    """Run ``python argv`` from the repository root in its own process group, killed with its
    children (loader workers, torchrun's ranks) at its timeout; record seconds, and the
    output's end on failure. Not started at all once the deadline has passed."""
    timeout = deadline.cap(budget)
    if timeout is None:
        report["stages"][name] = {"ok": False, "skipped": "deadline"}
        report["errors"].append(f"{name}: skipped: deadline")
        print(f"[gpu check] {name}: skipped: deadline", flush=True)
        return False
    started = time.time()
    log = logs / f"{name}.log"
    print(f"[gpu check] {name}: {' '.join(argv)}", flush=True)
    with open(log, "w") as handle:
        process = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                   env=env, start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout)
            ok, error = returncode == 0, f"exit {returncode}"
        except subprocess.TimeoutExpired:
            stop_group(process)
            ok, error = False, f"timed out after {timeout:.0f} s"
            if timeout < budget:
                deadline.reached = True
                error += " (the deadline)"
    stage = {"ok": ok, "seconds": round(time.time() - started, 1), "started": started}
    if not ok:
        tail = log.read_text(errors="replace")[-2500:]
        stage["error"] = f"{error}: ...{tail}"
        report["errors"].append(f"{name}: {error}")
    report["stages"][name] = stage
    print(f"[gpu check] {name}: {'ok' if ok else 'FAILED'} in {stage['seconds']} s", flush=True)
    return ok


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the stage's process group, SIGKILL if it is still there 5 s later."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def wheel_tags():
    """``packaging``'s wheel-name parser and this interpreter's supported tags (pip's vendored
    copy where ``packaging`` itself is not installed: pip is needed to install anyway)."""
    try:
        from packaging.tags import sys_tags
        from packaging.utils import parse_wheel_filename
    except ImportError:
        from pip._vendor.packaging.tags import sys_tags
        from pip._vendor.packaging.utils import parse_wheel_filename
    return parse_wheel_filename, {tag: rank for rank, tag in enumerate(sys_tags())}


def install_wheels(pack: Path, report: dict, deadline: Deadline) -> Path | None:
    """Install PACK/wheels into PACK/site one wheel at a time, each with its own pip call, so
    one bad wheel costs only its own package. Per package the wheel whose tags this Python
    ranks best is chosen; wheels for another Python are skipped. A wheel that fails to
    install, or a package that wheels/manifest.json requires on this Python with no wheel
    for it, fails the stage by name. Returns the site folder (None: nothing packed)."""
    wheels, site = pack / "wheels", pack / "site"
    files = sorted(wheels.glob("*.whl"))
    if not files:
        return None
    started = time.time()
    parse, ranks = wheel_tags()
    manifest_path = wheels / "manifest.json"
    try:
        required = json.loads(manifest_path.read_text())["required"]
    except (OSError, ValueError, KeyError) as error:
        required, manifest_error = {}, f"{manifest_path}: unreadable ({error})"
    else:
        manifest_error = None
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    best: dict[str, tuple[int, Path]] = {}
    skipped = []
    errors = [manifest_error] if manifest_error else []
    for file in files:
        try:
            name, _, _, tags = parse(file.name)
        except ValueError as error:  # packaging's InvalidWheelFilename is a ValueError
            errors.append(f"{file.name}: not a wheel file name ({error})")
            continue
        rank = min((ranks[tag] for tag in tags if tag in ranks), default=None)
        if rank is None:
            skipped.append(f"{file.name}: not for this Python ({PYTHON_TAG})")
        elif name not in best or rank < best[name][0]:
            if name in best:
                skipped.append(f"{best[name][1].name}: {file.name} fits this Python better")
            best[name] = (rank, file)
        else:
            skipped.append(f"{file.name}: {best[name][1].name} fits this Python better")
    shutil.rmtree(site, ignore_errors=True)
    installed = []
    for name, (_, file) in sorted(best.items()):
        timeout = deadline.cap(120)
        if timeout is None:
            errors.append(f"{file.name}: not installed: deadline")
            continue
        try:
            result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                                     "--no-compile", "--disable-pip-version-check", "--upgrade", "--target",
                                     str(site), str(file)], capture_output=True, text=True, timeout=timeout)
            failure = None if result.returncode == 0 else f"exit {result.returncode}: {result.stderr.strip()[-600:]}"
        except subprocess.TimeoutExpired:
            failure = f"timed out after {timeout:.0f} s"
        if failure:
            errors.append(f"{file.name}: installing it failed ({failure})")
        else:
            installed.append(file.name)
    for name, versions in sorted(required.items()):
        if version in versions and canonical(name) not in best:
            errors.append(f"{name}: no wheel for {PYTHON_TAG} in {wheels}")
    stage = {"ok": not errors, "seconds": round(time.time() - started, 1), "started": started,
             "installed": installed, "skipped": skipped}
    if errors:
        stage["error"] = "; ".join(errors)
        report["errors"].extend(f"wheels: {error}" for error in errors)
        for error in errors:
            print(f"[gpu check] wheels: FAILED: {error}", file=sys.stderr, flush=True)
    report["stages"]["wheels"] = stage
    print(f"[gpu check] wheels: {len(installed)} installed, {len(skipped)} skipped, "
          f"{'ok' if not errors else 'FAILED'} in {stage['seconds']} s", flush=True)
    return site


def canonical(name: str) -> str:
    """A distribution name as wheel file names and ``packaging`` compare them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def versions(device: str, env: dict, deadline: Deadline) -> dict:
    """torch, CUDA, cuDNN, timm, torchvision and Python versions as the stages see them (a child
    process with their PYTHONPATH), and the GPU's name and driver from nvidia-smi."""
    found = {key: None for key in VERSION_KEYS}
    timeout = deadline.cap(120)
    if timeout is None:
        return {**found, "error": "not probed: deadline"}
    try:
        result = subprocess.run([sys.executable, "-c", VERSIONS_PROBE, device], capture_output=True, text=True,
                                env=env, timeout=timeout)
        found.update(json.loads(result.stdout.strip().splitlines()[-1]))
    except subprocess.TimeoutExpired:
        deadline.reached = deadline.reached or timeout < 120
        found["error"] = f"version probe timed out after {timeout:.0f} s"
    except (ValueError, IndexError) as error:
        found["error"] = f"version probe failed: {error!r}"
    return found


def gpu_in_use(found: dict) -> str:
    """The nvidia-smi id of the device the stages use (their cuda:0): its UUID where torch gave
    one, else the first entry of CUDA_VISIBLE_DEVICES, else index 0."""
    uuid = found.get("gpu_uuid")
    if uuid:
        return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return visible or "0"


def smi_query(gpu: str, fields: str) -> list[str] | None:
    if not shutil.which("nvidia-smi"):
        return None
    result = subprocess.run(["nvidia-smi", "-i", gpu, f"--query-gpu={fields}", "--format=csv,noheader"],
                            capture_output=True, text=True, timeout=30)
    return [part.strip() for part in result.stdout.strip().split(",")] if result.returncode == 0 else None


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--pack", default=".gpu", help="the folder bench/gpu_pack.py wrote")
    parser.add_argument("--out", default=".gpu/out", help="where gpu_check.json goes")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="where every stage runs")
    parser.add_argument("--tiny", action="store_true",
                        help="a few steps of everything at a small resolution: tests this script on a CPU")
    # Lite0, not the scripts' default Lite2: the pack carries only Lite0's weights, 22 MB smaller.
    parser.add_argument("--backbone", default="tf_efficientnet_lite0",
                        help="the backbone of every image stage (its bundled weights must be in the pack)")
    parser.add_argument("--work", default=None, help="scratch folder for weights and logs (default: a new temp dir)")
    parser.add_argument("--deadline", type=float, default=480.0,
                        help="seconds for the whole check, wheels included; stages left are skipped, "
                             "the report is still written")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated stages to run, in this order: {','.join(STAGES)} "
                             "(cuda_tests only with --device cuda)")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.stages.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(STAGES))
    if unknown:
        parser.error(f"--stages: unknown {', '.join(unknown)} (known: {', '.join(STAGES)})")
    if args.deadline <= 0:
        parser.error(f"--deadline {args.deadline:g}: must be above 0 seconds")

    deadline = Deadline(args.deadline)
    pack, out = Path(args.pack).resolve(), Path(args.out).resolve()
    data = pack / "data"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_check.json"
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-check-")).resolve()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": args.device, "tiny": args.tiny, "python": sys.version.split()[0],
                    "deadline": {"seconds": args.deadline, "reached": False}, "stages": {}, "errors": []}
    sampler = None
    try:
        site = install_wheels(pack, report, deadline)
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(str(p) for p in (site, ROOT) if p is not None)
               + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")}
        found = versions(args.device, env, deadline)
        gpu = gpu_in_use(found)
        if args.device == "cuda":
            name, driver = smi_query(gpu, "name,driver_version") or (found.get("gpu_name"), None)
            found.update(gpu_name=found.get("gpu_name") or name, driver=driver)
            report["gpu_index"] = gpu
            sampler = GpuSampler(gpu)
        report["versions"] = found
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True) if shutil.which("nvidia-smi") else None
        report["nvidia_smi"] = smi.stdout.splitlines()[:20] if smi else "not available"
        write_report(report, path)

        tiny = ["--resolution", "64", "--batch-size", "16", "--epochs", "2", "--decoder-epochs", "1",
                "--finetune-epochs", "1", "--workers", "1"] if args.tiny else []
        common = ["--data", str(data), "--device", args.device]
        tiny += ["--backbone", args.backbone]
        budget = 240 if args.tiny else 300
        frozen, tuned = work / "frozen", work / "finetune"
        caption_args = ["--ensemble", "1", "--epochs", "2"] if args.tiny else []
        bench_args = ["--num-images", "32", "--forward-seconds", "0.5", "--repeats", "1", "--no-compare",
                      "--finetune-batches", "2", "--finetune-batch-size", "8", "--head-rows", "512"] if args.tiny \
            else ["--repeats", "1"]
        commands = {
            "frozen": ["train_efficientnet.py", *common, "--weights", str(frozen), "--mode", "frozen", *tiny],
            "finetune": ["train_efficientnet.py", *common, "--weights", str(tuned), "--mode", "finetune", *tiny],
            "caption": ["train_caption_rnn.py", *common, "--weights", str(tuned), *caption_args],
            "inference": ["inference.py", *common, "--weights", str(tuned), "--output", str(work / "o"),
                          "--evaluate", "--eval-csv", str(data / "test_labels.csv")],
            "torchrun_nccl_1process": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                                       "train_efficientnet.py", *common, "--weights", str(work / "ddp"),
                                       "--mode", "finetune", *tiny, "--finetune-epochs", "1"],
            "bench": ["-m", "pipeline.tools.bench", *common, "--weights", str(tuned), "--output",
                      str(work / "bench"), *bench_args],
            "cuda_tests": ["-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_cuda.py"],
        }
        for name in STAGES:
            if name in chosen and (name != "cuda_tests" or args.device == "cuda"):
                run_stage(report, name, commands[name], logs, budget, deadline, env)
                write_report(report, path)

        frozen_summary = read_json(frozen / "image_summary.json")
        tuned_summary = read_json(tuned / "image_summary.json")
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
        # train_img_s: images over the seconds of the training epochs' steps alone (validation,
        # EMA scoring, checkpoints and extraction are outside the trainer's epoch clock).
        report["finetune"] = {key: tuned_summary.get(key) for key in (
            "training_precision", "lr", "train_images", "image_best_epoch", "training_seconds", "train_step_seconds",
            "train_img_s", "extract_seconds", "total_seconds", "peak_gpu_memory_mb")}
        if sampler is not None:
            time.sleep(0.5)
            # Busy % over the training epochs' steps only: validation and saving would lower it.
            windows = tuned_summary.get("train_epoch_windows_unix") or (
                [tuned_summary["training_window_unix"]] if tuned_summary.get("training_window_unix") else [])
            report["gpu_while_training"] = sampler.between(windows) if windows else {"samples": 0}
            report["gpu_whole_check"] = sampler.between([(deadline.started, time.time())])
        report["bench"] = {key: bench.get(key) for key in (
            "backbone_forward_img_s", "pipeline_img_s", "pipeline_over_forward", "train_finetune_img_s",
            "train_cached_head_img_s", "train_cached_decoder_img_s", "precision", "device")}
    finally:
        if sampler is not None:
            sampler.stop()
        report["deadline"]["reached"] = deadline.reached
        report["seconds"] = round(time.time() - deadline.started, 1)
        write_report(report, path)
    print(json.dumps({k: report.get(k) for k in ("versions", "f1", "finetune", "errors", "seconds")}, indent=2))
    print(f"[gpu check] wrote {path}; logs in {logs}")
    return report


if __name__ == "__main__":
    # A failed or skipped stage fails the check, after the report is written.
    sys.exit(1 if main()["errors"] else 0)
