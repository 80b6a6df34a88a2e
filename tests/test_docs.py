"""The package tree in docs/design.md lists exactly the modules the package has."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def package_tree() -> set[str]:
    """Module paths (``pipeline/data/images.py``) of docs/design.md's ``pipeline/`` tree block."""
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    block = re.search(r"```\npipeline/\n(.*?)```", text, re.S)
    assert block, "docs/design.md has no package tree starting with 'pipeline/'"
    modules, folder = set(), "pipeline/"
    for line in block.group(1).splitlines():
        match = re.match(r"^( *)(\S+)", line)
        if not match:
            continue
        indent, name = len(match.group(1)), match.group(2)
        if name.endswith("/"):
            folder = "pipeline/" + name if indent == 2 else name
            if indent == 0:
                folder = None  # a top-level folder beside pipeline/ (bench/)
        elif name.endswith(".py") and folder is not None:
            modules.add((folder if indent > 2 else "pipeline/") + name)
    return modules


def test_the_package_tree_lists_every_module_and_no_other():
    actual = {str(p.relative_to(ROOT)) for p in (ROOT / "pipeline").rglob("*.py") if p.name != "__init__.py"}
    listed = package_tree()
    assert sorted(actual - listed) == [], "modules missing from the package tree in docs/design.md"
    assert sorted(listed - actual) == [], "the package tree in docs/design.md lists modules that do not exist"
