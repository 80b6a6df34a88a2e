"""The programs as a user meets them: --help at once and current, prefixes refused, one default
per option, and the package installable with its console commands."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.choices import DEFAULT_BACKBONE
from pipeline.tools import bench, convert, demo, export

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["train_efficientnet.py", "train_caption_rnn.py", "inference.py"]
PARSERS = {"train_efficientnet.py": cli.train_image_parser, "train_caption_rnn.py": cli.train_caption_parser,
           "inference.py": cli.infer_parser, "pipeline.tools.demo": demo.get_args_parser,
           "pipeline.tools.export": export.get_args_parser, "pipeline.tools.bench": bench.get_args_parser}
HEAVY = ("torch", "timm", "torchvision", "pandas", "openvino")


def test_building_the_parsers_loads_no_heavy_library():
    """--help answers before torch and timm load (16 s on the 2-core machine before; 0.2 s after)."""
    code = ("import sys, train_efficientnet, train_caption_rnn, inference\n"
            "for script in (train_efficientnet, train_caption_rnn, inference):\n"
            "    script.get_args_parser().format_help()\n"
            f"print(sorted(name for name in {HEAVY!r} if name in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_without_loading_torch(script):
    """``--help`` exits 0 with the usage, and run_main does not import torch on its way out."""
    code = (f"import runpy, sys\nsys.argv = [{script!r}, '--help']\n"
            f"try:\n    runpy.run_path({script!r}, run_name='__main__')\n"
            "except SystemExit as exit:\n    assert exit.code in (0, None), exit.code\n"
            "print('torch' in sys.modules, file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.startswith("usage:") and result.stderr.strip() == "False"


@pytest.mark.parametrize("name", PARSERS)
def test_an_option_prefix_is_refused(name, capsys):
    """``--epoch``/``--dat`` were read as ``--epochs``/``--data``; now a prefix is an unknown option."""
    parser = PARSERS[name]()
    with pytest.raises(SystemExit) as exit:
        parser.parse_args(["--dat", "x"] if name != "pipeline.tools.demo" else ["--num-image", "3"])
    assert exit.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_convert_subcommands_refuse_prefixes(capsys):
    with pytest.raises(SystemExit):
        convert.get_args_parser().parse_args(["voc", "--roo", "x", "--out", "y"])
    assert "required: --root" in capsys.readouterr().err  # --roo was not read as --root


def _help_strings(parser: argparse.ArgumentParser) -> dict[str, str]:
    formatter = parser._get_formatter()
    return {action.option_strings[0]: formatter._get_help_string(action) % vars(action)
            for action in parser._actions if action.option_strings and action.help}


@pytest.mark.parametrize("name", PARSERS)
def test_each_option_states_one_default(name):
    """A help text that says its default got argparse's "(default: ...)" as well; a None default
    printed "(default: None)"."""
    for flag, text in _help_strings(PARSERS[name]()).items():
        assert len(re.findall(r"\bdefault[:\s]", text, re.IGNORECASE)) <= 1, f"{name} {flag}: {text}"
        assert "(default: None)" not in text, f"{name} {flag}: {text}"


def test_image_help_names_the_current_default_backbone():
    helps = _help_strings(cli.train_image_parser())
    assert f"(default: {DEFAULT_BACKBONE})" in helps["--backbone"]
    assert "Lite0" not in helps["--resolution"] + helps["--train-from-stage"]


# --- the installed package -------------------------------------------------------------------

COMMANDS = ("cml-train-image", "cml-train-caption", "cml-infer")


def _package_data() -> list[str]:
    """Every file of the package that is not Python source: what the install must carry too."""
    return sorted(str(path.relative_to(ROOT)) for path in (ROOT / "pipeline").rglob("*")
                  if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts)


def test_pip_install_gives_the_package_its_data_and_the_console_commands(tmp_path):
    """``pip install .`` stopped at "Multiple top-level packages discovered in a flat-layout"."""
    source = tmp_path / "clone"  # a copy, so the build's files never land in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "requirements.txt", "README.md", "LICENSE"):
        (source / name).write_bytes((ROOT / name).read_bytes())
    subprocess.run(["cp", "-r", str(ROOT / "pipeline"), str(source / "pipeline")], check=True)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--target", str(target), str(source)], check=True)
    assert sorted(path.name for path in target.iterdir() if not path.name.endswith(".dist-info")) == ["bin", "pipeline"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    found = subprocess.run([sys.executable, "-c", "import pipeline, pipeline.cli; print(pipeline.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
    assert found.stdout.strip() == str(target / "pipeline" / "__init__.py")
    for data_file in _package_data():
        assert (target / data_file).is_file(), f"{data_file} is not installed"
    for command in COMMANDS:
        shown = subprocess.run([str(target / "bin" / command), "--help"], cwd=elsewhere, env=env,
                               capture_output=True, text=True, check=True)
        assert shown.stdout.startswith(f"usage: {command} [options]"), shown.stdout[:200]


def test_the_licence_is_declared_and_shipped():
    """Apache-2.0, the licence of timm, the bundled Lite weights' packages, nltk and OpenVINO."""
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "[yyyy]" not in text


# --- first contact: the install ------------------------------------------------------------------

def test_the_install_shows_pips_progress():
    """``make demo`` printed nothing for the 2 minutes of its pip install (--quiet)."""
    installs = [line for line in (ROOT / "Makefile").read_text(encoding="utf-8").splitlines()
                if "pip install" in line and not line.lstrip().startswith(("#", "@echo"))]
    assert installs and all("--progress-bar on" in line and "--quiet" not in line and " -q" not in line
                            for line in installs)


def test_the_readme_cpu_install_pins_the_versions_of_requirements():
    """The documented CPU-only install names the torch and torchvision that requirements.txt pins."""
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
                if "==" in line and not line.startswith("#"))
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert (f"pip install torch=={pins['torch']} torchvision=={pins['torchvision']} "
            "--index-url https://download.pytorch.org/whl/cpu") in readme
    assert all(command in readme for command in COMMANDS) and "pip install ." in readme
