"""Hides installed packages from an interpreter, for tests of the GPU check's preflight: with
this folder on PYTHONPATH, each top-level package named in $HIDDEN_PACKAGES (comma-separated)
cannot be imported from the interpreter's own site-packages, as on a machine without it; a
copy elsewhere on sys.path (the check's PACK/site) still imports."""

import importlib.abc
import importlib.machinery
import os
import site
import sys

HIDDEN = {name.strip() for name in os.environ.get("HIDDEN_PACKAGES", "").split(",") if name.strip()}
INSTALLED = tuple(os.path.realpath(p) for p in [*site.getsitepackages(), site.getusersitepackages()])


class HideInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name not in HIDDEN:
            return None  # submodules follow their package's own __path__
        elsewhere = [p for p in sys.path if not os.path.realpath(p or ".").startswith(INSTALLED)]
        spec = importlib.machinery.PathFinder.find_spec(name, elsewhere)
        if spec is None:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by tests/hidden_packages)", name=name)
        return spec


if HIDDEN:
    sys.meta_path.insert(0, HideInstalled())
