"""The GPU check's stages and its report (run by .gpu/check.sh; see bench/gpu_pack.py).

First the preflight (bench/gpu_preflight.py): every library the pipeline imports, at its
minimum version, in the interpreter holding torch; packed wheels are unzipped into PACK/site
only for what that interpreter lacks or has too old, and what is still missing fails the check
once, by name, before any stage. Then, on the packed real-data subset, each stage in its own
process, as a user runs them: frozen mode (the baseline); the fine-tune recipe (compiled on a
GPU, with a persistent inductor cache in PACK/cache), with the busy % of the GPU in use sampled
over its timed training steps (the warm-up step that compiles is reported on its own); the
caption branch; inference from the fine-tuned checkpoint, evaluated on the carved test split;
the CUDA-only tests; a one-process NCCL torchrun fine-tune (uncompiled: DDP splits the graph
and would compile it again); the benchmark. A stage that fails is recorded with the end of its
output and the others still run; an overall --deadline caps every stage's timeout, and stages
it leaves no time for are marked skipped. Writes OUT/gpu_check.json after every stage:
versions (torch, CUDA, cuDNN, timm, torchvision, Python, GPU, driver), /dev/shm's size, F1 per
branch, seconds per stage, img/s, GPU busy % (p10, p50, mean), peak GPU memory, errors. Exits 1
when any stage failed or was skipped."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import gpu_preflight
from gpu_preflight import PreflightError, canonical

ROOT = Path(__file__).resolve().parents[1]


PYTHON_TAG = f"cp{sys.version_info[0]}{sys.version_info[1]}"
# The CUDA tests before the torchrun stage and the benchmark: they are what a deadline must not skip.
STAGES = ("frozen", "finetune", "caption", "inference", "cuda_tests", "torchrun_nccl_1process", "bench")
# Kept free at the deadline for writing the report and stopping the sampler.
REPORT_RESERVE_S = 2.0
VERSION_KEYS = ("python", "torch", "cuda", "cudnn", "timm", "torchvision", "gpu_name", "driver")


def busy_stats(values: list[float]) -> dict:
    """p10, p50 and mean of GPU busy % samples (none: an empty dict)."""
    if not values:
        return {}
    p10 = statistics.quantiles(values, n=10, method="inclusive")[0] if len(values) > 1 else values[0]
    return {
        "busy_pct_p10": round(p10, 1),
        "busy_pct_p50": round(statistics.median(values), 1),
        "busy_pct_mean": round(statistics.fmean(values), 1),
    }


class GpuSampler:
    """``nvidia-smi -i GPU`` polled every 200 ms in the background: (time, busy %, memory MB)
    samples of the one device the stages use, not of every visible one."""

    def __init__(self, gpu: str) -> None:
        self.samples: list[tuple[float, float, float]] = []
        self.process: subprocess.Popen[str] | None = None
        if shutil.which("nvidia-smi"):
            self.process = subprocess.Popen(
                [
                    "nvidia-smi",
                    "-i",
                    gpu,
                    "--query-gpu=utilization.gpu,memory.used",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    "200",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True).start()

    def _read(self, lines: Iterable[str]) -> None:
        for line in lines:
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
        return {
            "samples": len(chosen),
            **busy_stats([b for b, _ in chosen]),
            "memory_mb_max": max(m for _, m in chosen),
        }

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


def run_stage(
    report: dict, name: str, argv: list[str], logs: Path, budget: float, deadline: Deadline, env: dict
) -> bool:
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
        process = subprocess.Popen(
            [sys.executable, *argv], cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            returncode = process.wait(timeout=timeout)
            ok, error = returncode == 0, f"exit {returncode}"
        except subprocess.TimeoutExpired:
            stop_group(process)
            ok, error = False, f"timed out after {timeout:.0f} s"
            if timeout < budget:
                deadline.reached = True
                error += " (the deadline)"
    stage: dict[str, Any] = {"ok": ok, "seconds": round(time.time() - started, 1), "started": started}
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


def install_wheels(
    pack: Path, report: dict, deadline: Deadline, needed: set[str] | None = None, parse=None, ranks=None
) -> Path | None:
    """Unzip into PACK/site the best wheel for this Python of each distribution in ``needed``
    (canonical names; None: every packed one), one wheel at a time, so one bad wheel costs
    only its own package; wheels for another Python are skipped. A wheel that fails to
    install, or a needed distribution that wheels/manifest.json requires on this Python with
    no wheel for it, fails the stage by name (one of REQUIREMENTS is left to the preflight's
    single failure). Returns the site folder (None: nothing was installed)."""
    wheels, site = pack / "wheels", pack / "site"
    shutil.rmtree(site, ignore_errors=True)
    files = sorted(wheels.glob("*.whl"))
    if not files:
        return None
    started = time.time()
    if parse is None:
        parse, ranks = gpu_preflight.wheel_tools(wheels)
    manifest_path = wheels / "manifest.json"
    manifest_error: str | None = None
    try:
        required = json.loads(manifest_path.read_text())["required"]
    except (OSError, ValueError, KeyError) as error:
        required, manifest_error = {}, f"{manifest_path}: unreadable ({error})"
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    best: dict[str, tuple[int, Path]] = {}
    skipped, kept = [], set()
    errors = [manifest_error] if manifest_error else []
    for file in files:
        try:
            name, _, _, tags = parse(file.name)
        except ValueError as error:  # packaging's InvalidWheelFilename is a ValueError
            errors.append(f"{file.name}: not a wheel file name ({error})")
            continue
        if needed is not None and canonical(name) not in needed:
            kept.add(str(name))
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
    installed = []
    for _name, (_, file) in sorted(best.items()):
        if deadline.cap(60) is None:
            errors.append(f"{file.name}: not installed: deadline")
            continue
        try:
            gpu_preflight.unpack_wheel(file, site)
        except (OSError, zipfile.BadZipFile) as error:
            errors.append(f"{file.name}: installing it failed ({type(error).__name__}: {error})")
        else:
            installed.append(file.name)
    preflight_names = {canonical(r.distribution) for r in gpu_preflight.REQUIREMENTS}
    for name, versions in sorted(required.items()):
        wanted = needed is None or canonical(name) in needed
        if wanted and version in versions and canonical(name) not in best and canonical(name) not in preflight_names:
            errors.append(f"{name}: no wheel for {PYTHON_TAG} in {wheels}")
    stage = {
        "ok": not errors,
        "seconds": round(time.time() - started, 1),
        "started": started,
        "installed": installed,
        "skipped": skipped,
        "not_needed": sorted(kept),
    }
    if errors:
        stage["error"] = "; ".join(errors)
        report["errors"].extend(f"wheels: {error}" for error in errors)
        for problem in errors:
            print(f"[gpu check] wheels: FAILED: {problem}", file=sys.stderr, flush=True)
    report["stages"]["wheels"] = stage
    print(
        f"[gpu check] wheels: {len(installed)} installed, {len(skipped)} skipped, {len(kept)} not needed "
        f"here, {'ok' if not errors else 'FAILED'} in {stage['seconds']} s",
        flush=True,
    )
    return site if installed else None


def stage_env(site: Path | None) -> dict:
    """The stages' environment: PACK/site (when something was installed there) and the
    repository first on PYTHONPATH."""
    paths = [str(p) for p in (site, ROOT) if p is not None]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(paths)}


def preflight(pack: Path, report: dict, deadline: Deadline, device: str, run_stages: set[str]) -> dict | None:
    """Probe the interpreter's libraries, install packed wheels for what it lacks, probe again.
    Returns the stages' environment, or None (after one error naming every missing or too old
    requirement, and this interpreter) when the stages cannot run."""
    started = time.time()
    wheels = pack / "wheels"
    try:
        manifest = json.loads((wheels / "manifest.json").read_text()).get("required", {})
    except (OSError, ValueError):
        manifest = {}
    packed = {file.name.split("-")[0] for file in wheels.glob("*.whl")} | set(manifest)
    wanted = [(r.distribution, r.module) for r in gpu_preflight.REQUIREMENTS]
    listed = {canonical(d) for d, _ in wanted}
    wanted += [(name, gpu_preflight.module_of(name)) for name in sorted(packed) if canonical(name) not in listed]
    minimums = {canonical(r.distribution): r.minimum for r in gpu_preflight.REQUIREMENTS}
    record: dict[str, Any] = {
        "ok": False,
        "started": started,
        "interpreter": sys.executable,
        "shm": gpu_preflight.shm_size(),
    }
    report["stages"]["preflight"] = record
    try:
        timeout = deadline.cap(180)
        if timeout is None:
            raise PreflightError("no time left")
        first = gpu_preflight.probe(wanted, device, stage_env(None), timeout)
        machine = first["packages"]
        # Missing or too old, and needed on this Python (tomli, say, only on 3.10).
        this_python = f"{sys.version_info[0]}.{sys.version_info[1]}"
        needed = {
            canonical(name)
            for name, found in machine.items()
            if ("version" not in found or gpu_preflight.too_old(found["version"], minimums.get(canonical(name), "")))
            and (canonical(name) in minimums or this_python in manifest.get(name, [this_python]))
        }
        site = install_wheels(pack, report, deadline, needed)
        env = stage_env(site)
        final = {"packages": machine, "device": first["device"]}
        if site is not None:  # what the stages see, with PACK/site first
            timeout = deadline.cap(180)
            if timeout is None:
                raise PreflightError("no time left")
            final = gpu_preflight.probe(wanted, device, env, timeout)
    except subprocess.TimeoutExpired as error:
        deadline.reached = deadline.reached or error.timeout < 180
        record.update(
            seconds=round(time.time() - started, 1), error=f"the import probe timed out after {error.timeout:.0f} s"
        )
        report["errors"].append(f"preflight: {record['error']}")
        return None
    except PreflightError as error:
        deadline.reached = deadline.reached or str(error) == "no time left"
        record.update(seconds=round(time.time() - started, 1), error=str(error))
        report["errors"].append(f"preflight: {error}")
        return None
    failures, warnings = gpu_preflight.problems(final["packages"], run_stages)
    record.update(
        seconds=round(time.time() - started, 1),
        ok=not failures,
        machine={name: found.get("version") for name, found in machine.items()},
        from_pack=sorted(
            name
            for name, found in final["packages"].items()
            if site is not None and str(site) in str(found.get("path") or "")
        ),
        versions={name: found.get("version") for name, found in final["packages"].items()},
        warnings=warnings,
    )
    report["versions"] = {
        **{key: None for key in VERSION_KEYS},
        **final["device"],
        **{name: final["packages"].get(name, {}).get("version") for name in ("torch", "timm", "torchvision")},
    }
    shm = record["shm"]
    if shm.get("total_mb", 1024) < 1024:
        warnings.append(
            f"/dev/shm is {shm['total_mb']} MB: loader workers may fail with a bus error (docker: --shm-size=8g)"
        )
    for warning in warnings:
        print(f"[gpu check] preflight: warning: {warning}", file=sys.stderr, flush=True)
    if failures:
        pronoun = "it" if len(failures) == 1 else "them"
        record["error"] = (
            f"{sys.executable} lacks {', '.join(failures)}, and the pack has no usable wheel for "
            f"{pronoun}: install {pronoun} there, or run with PYTHON=<an interpreter that has them>; "
            "no stage was run"
        )
        report["errors"].append(f"preflight: {record['error']}")
        print(f"[gpu check] preflight: FAILED: {record['error']}", file=sys.stderr, flush=True)
        return None
    from_pack = ", ".join(record["from_pack"]) or "nothing"
    print(f"[gpu check] preflight: ok in {record['seconds']} s (from the pack: {from_pack})", flush=True)
    return env


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
    result = subprocess.run(
        ["nvidia-smi", "-i", gpu, f"--query-gpu={fields}", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return [part.strip() for part in result.stdout.strip().split(",")] if result.returncode == 0 else None


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--pack", default=".gpu", help="the folder bench/gpu_pack.py wrote")
    parser.add_argument("--out", default=".gpu/out", help="where gpu_check.json goes")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="where every stage runs")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="a few steps of everything at a small resolution: tests this script on a CPU",
    )
    # Lite0, not the scripts' default Lite2: the pack carries only Lite0's weights, 22 MB smaller.
    parser.add_argument(
        "--backbone",
        default="tf_efficientnet_lite0",
        help="the backbone of every image stage (its bundled weights must be in the pack)",
    )
    parser.add_argument("--work", default=None, help="scratch folder for weights and logs (default: a new temp dir)")
    parser.add_argument(
        "--deadline",
        type=float,
        default=480.0,
        help="seconds for the whole check, wheels included; stages left are skipped, the report is still written",
    )
    parser.add_argument(
        "--stages",
        default=",".join(STAGES),
        help=f"comma-separated stages to run, in this order: {','.join(STAGES)} (cuda_tests only with --device cuda)",
    )
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
    report: dict = {
        "device": args.device,
        "tiny": args.tiny,
        "python": sys.version.split()[0],
        "deadline": {"seconds": args.deadline, "reached": False},
        "stages": {},
        "errors": [],
        "versions": {key: None for key in VERSION_KEYS},
    }
    sampler = None
    try:
        run_stages = {name for name in chosen if name != "cuda_tests" or args.device == "cuda"}
        env = preflight(pack, report, deadline, args.device, run_stages)
        write_report(report, path)
        if env is None and not deadline.reached:
            for name in STAGES:
                if name in run_stages:
                    report["stages"][name] = {"ok": False, "skipped": "preflight"}
            return report
        env = env or stage_env(None)  # out of time: each stage is marked skipped by the deadline
        # Compiled graphs kept between checks on the same machine: a second check loads them.
        cache = pack / "cache"
        env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))
        env.setdefault("TRITON_CACHE_DIR", str(cache / "triton"))
        env.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
        env.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
        found = report["versions"]
        gpu = gpu_in_use(found)
        if args.device == "cuda":
            name, driver = smi_query(gpu, "name,driver_version") or (found.get("gpu_name"), None)
            found.update(gpu_name=found.get("gpu_name") or name, driver=driver)
            report["gpu_index"] = gpu
            sampler = GpuSampler(gpu)
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True) if shutil.which("nvidia-smi") else None
        report["nvidia_smi"] = smi.stdout.splitlines()[:20] if smi else "not available"
        write_report(report, path)

        tiny = (
            [
                "--resolution",
                "64",
                "--batch-size",
                "16",
                "--epochs",
                "2",
                "--decoder-epochs",
                "1",
                "--finetune-epochs",
                "1",
                "--workers",
                "1",
            ]
            if args.tiny
            else []
        )
        common = ["--data", str(data), "--device", args.device]
        # The recipe's captions read all-MiniLM-L6-v2 (88 MB in its package), which the pack (at most
        # 60 MB) cannot carry, nor the transformers stack that loads it: the check trains the decoder on
        # the image alone and the caption models on their own words, GPU paths both.
        tiny += ["--backbone", args.backbone, "--decoder-caption", "none"]
        caption_words = ["--text-encoder", "words"]
        budget = 240 if args.tiny else 300
        frozen, tuned = work / "frozen", work / "finetune"
        caption_args = ["--ensemble", "1", "--epochs", "2"] if args.tiny else []
        bench_args = (
            [
                "--num-images",
                "32",
                "--forward-seconds",
                "0.5",
                "--repeats",
                "1",
                "--no-compare",
                "--finetune-batches",
                "2",
                "--finetune-batch-size",
                "8",
                "--head-rows",
                "512",
            ]
            if args.tiny
            else ["--repeats", "1"]
        )
        # The recipe's stage compiles on a GPU, where it is meant to (--compile auto would not,
        # on a subset this short); nowhere else: compiling on a CPU takes minutes.
        compiled = ["--compile", "on" if args.device == "cuda" else "off"]
        commands = {
            "frozen": ["train_efficientnet.py", *common, "--weights", str(frozen), "--mode", "frozen", *tiny],
            "finetune": [
                "train_efficientnet.py",
                *common,
                "--weights",
                str(tuned),
                "--mode",
                "finetune",
                *tiny,
                *compiled,
            ],
            "caption": ["train_caption_rnn.py", *common, "--weights", str(tuned), *caption_words, *caption_args],
            "inference": [
                "inference.py",
                *common,
                "--weights",
                str(tuned),
                "--output",
                str(work / "o"),
                "--evaluate",
                "--eval-csv",
                str(data / "test_labels.csv"),
            ],
            "torchrun_nccl_1process": [
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                "1",
                "train_efficientnet.py",
                *common,
                "--weights",
                str(work / "ddp"),
                "--mode",
                "finetune",
                *tiny,
                "--finetune-epochs",
                "1",
                "--compile",
                "off",
            ],
            "bench": [
                "-m",
                "pipeline.tools.bench",
                *common,
                "--weights",
                str(tuned),
                "--output",
                str(work / "bench"),
                *bench_args,
            ],
            "cuda_tests": ["-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_cuda.py"],
        }
        for name in STAGES:
            if name in run_stages:
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
        # train_img_s: images over the seconds of the training epochs' steps alone (the warm-up
        # step that compiles, validation, EMA scoring, checkpoints and extraction are outside
        # the trainer's epoch clock): steady state.
        report["finetune"] = {
            key: tuned_summary.get(key)
            for key in (
                "training_precision",
                "lr",
                "train_images",
                "image_best_epoch",
                "training_seconds",
                "train_step_seconds",
                "train_img_s",
                "warmup_step_seconds",
                "extract_seconds",
                "total_seconds",
                "peak_gpu_memory_mb",
            )
        }
        if sampler is not None:
            time.sleep(0.5)
            # Busy % over the training epochs' steps only: validation and saving would lower it.
            windows = tuned_summary.get("train_epoch_windows_unix") or (
                [tuned_summary["training_window_unix"]] if tuned_summary.get("training_window_unix") else []
            )
            report["gpu_while_training"] = sampler.between(windows) if windows else {"samples": 0}
            report["gpu_whole_check"] = sampler.between([(deadline.started, time.time())])
        report["bench"] = {
            key: bench.get(key)
            for key in (
                "backbone_forward_img_s",
                "pipeline_img_s",
                "pipeline_over_forward",
                "train_finetune_img_s",
                "train_cached_head_img_s",
                "train_cached_decoder_img_s",
                "precision",
                "device",
            )
        }
    finally:
        if sampler is not None:
            sampler.stop()
        report["deadline"]["reached"] = deadline.reached
        report["seconds"] = round(time.time() - deadline.started, 1)
        report["stage_seconds"] = {name: stage.get("seconds") for name, stage in report["stages"].items()}
        write_report(report, path)
    print(json.dumps({k: report.get(k) for k in ("versions", "f1", "finetune", "errors", "seconds")}, indent=2))
    print(f"[gpu check] wrote {path}; logs in {logs}")
    return report


if __name__ == "__main__":
    # A failed or skipped stage fails the check, after the report is written.
    sys.exit(1 if main()["errors"] else 0)
