"""The docs stay true: the package tree in docs/design.md lists exactly the package's modules,
every relative link (and ``#anchor``) in README.md and docs/*.md resolves, every docs file is
reachable from the README, and the README stays a front page of at most 200 lines."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
TREE_DOC = DOCS / "design.md"
README_MAX_LINES = 200


def doc_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def package_tree() -> set[str]:
    """Module paths (``pipeline/data/images.py``) of docs/design.md's ``pipeline/`` tree block."""
    text = TREE_DOC.read_text(encoding="utf-8")
    block = re.search(r"```\npipeline/\n(.*?)```", text, re.S)
    assert block, f"{TREE_DOC.relative_to(ROOT)} has no package tree starting with 'pipeline/'"
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
    actual = {p.relative_to(ROOT).as_posix() for p in (ROOT / "pipeline").rglob("*.py") if p.name != "__init__.py"}
    listed = package_tree()
    assert sorted(actual - listed) == [], "modules missing from the package tree in docs/design.md"
    assert sorted(listed - actual) == [], "the package tree in docs/design.md lists modules that do not exist"


# --- links and anchors -------------------------------------------------------------------

FENCE = re.compile(r"^(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
# [text](target) and ![alt](target), with an optional "title".
INLINE_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line outside fenced code blocks."""
    lines, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line.lstrip())
        if fence is None and match:
            fence = match.group(1)
        elif fence is not None and line.lstrip().startswith(fence):
            fence = None
        elif fence is None:
            lines.append((number, line))
    assert fence is None, "a fenced code block is never closed"
    return lines


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its rendered text lower-cased, punctuation dropped
    (letters, digits, ``_``, ``-`` and spaces kept), each space a hyphen."""
    text = INLINE_CODE.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link's text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("*", "")  # emphasis
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, with GitHub's -1, -2 suffixes for repeats."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every link and image in a Markdown file, outside code."""
    found = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        definition = REFERENCE_DEF.match(line)
        if definition:
            found.append((number, definition.group(1)))
            continue
        prose = INLINE_CODE.sub("", line)
        found += [(number, match.group(1)) for match in INLINE_LINK.finditer(prose)]
    return found


def broken_link(source: Path, target: str) -> str | None:
    """Why a relative link from ``source`` does not resolve, or None when it does."""
    if SCHEME.match(target) or target.startswith("//"):
        return None  # not relative: http(s), mailto
    if not target:
        return "empty link target"
    file_part, _, anchor = target.partition("#")
    if file_part.startswith("/"):
        return "absolute path: use a path relative to the file"
    destination = (source.parent / unquote(file_part)).resolve() if file_part else source
    if ROOT not in destination.parents and destination != ROOT:
        return "points outside the repository"
    if not destination.exists():
        return f"no such file: {destination.relative_to(ROOT)}"
    if anchor:
        if destination.suffix != ".md":
            return f"#{anchor} on a file that is not Markdown"
        if unquote(anchor) not in anchors(destination):
            return f"no heading with anchor #{anchor} in {destination.relative_to(ROOT)}"
    return None


def test_github_slugs():
    assert github_slug("Fine-tuning: the recipe, on CPU and GPU") == "fine-tuning-the-recipe-on-cpu-and-gpu"
    assert github_slug("Dataset files (`train.csv`, `test.csv`, `--eval-csv`)") == "dataset-files-traincsv-testcsv---eval-csv"
    assert github_slug("Scaling up: from 15,000 images to a million") == "scaling-up-from-15000-images-to-a-million"
    assert github_slug("**Bold** and [a link](x.md)") == "bold-and-a-link"


def test_links_are_found_outside_code_only(tmp_path: Path):
    sample = tmp_path / "sample.md"
    sample.write_text("see [a](a.md) and `[b](b.md)`\n```\n[c](c.md)\n# not a heading\n```\n"
                      "![d](d.png \"title\")\n[e]: e.md\n## Twice\n## Twice\n", encoding="utf-8")
    assert [target for _, target in links(sample)] == ["a.md", "d.png", "e.md"]
    assert anchors(sample) == {"twice", "twice-1"}


def test_broken_links_are_caught():
    assert broken_link(README, "docs/no-such-file.md")
    assert broken_link(README, "#no-such-heading")
    assert broken_link(README, "docs/design.md#no-such-heading")
    assert broken_link(README, "/docs/design.md")
    assert broken_link(README, "../outside.md")
    assert broken_link(README, "docs/design.md#the-package") is None
    assert broken_link(README, "https://example.org/x.md#anything") is None


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(path: Path):
    problems = [f"{path.relative_to(ROOT)}:{line}: ({target}) {why}"
                for line, target in links(path) if (why := broken_link(path, target))]
    assert problems == []


def test_every_docs_file_is_linked_from_the_readme():
    assert DOCS.is_dir() and list(DOCS.glob("*.md")), "docs/ holds no Markdown files"
    linked = {(README.parent / unquote(target.partition("#")[0])).resolve()
              for _, target in links(README) if not SCHEME.match(target) and target.partition("#")[0]}
    orphans = [p.relative_to(ROOT).as_posix() for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert orphans == [], "docs files the README does not link to"


def test_the_readme_is_a_front_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move depth into docs/"
