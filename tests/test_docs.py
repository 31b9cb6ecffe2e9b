"""The README stays short, and no relative link of README.md or docs/*.md points nowhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_WORDS = 2_000

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_CODE = re.compile(r"`[^`]*`")


def _prose(text: str) -> list[str]:
    """The lines outside fenced code blocks (a `# comment` in a bash block is no heading)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text, lower case, without punctuation, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in _prose(page.read_text()):
        if m := _HEADING.match(line):
            slug = _slug(m.group(2))
            anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _links(page: Path) -> list[str]:
    return [m.group(1) for line in _prose(page.read_text()) for m in _LINK.finditer(_CODE.sub("``", line))]


def test_readme_is_short() -> None:
    words = len((ROOT / "README.md").read_text().split())
    assert words <= README_MAX_WORDS, f"README.md has {words} words: move detail into docs/ (limit {README_MAX_WORDS})"


def test_readme_shows_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    assert "make run" in text and "make test" in text


def test_slug_follows_github() -> None:
    assert _slug("The default experiment: what `make run` measured") == "the-default-experiment-what-make-run-measured"
    assert _slug("Reference strength → separation") == "reference-strength--separation"
    assert _slug("Self-reference: the student's own history") == "self-reference-the-students-own-history"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for link in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto:: not checked offline
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link} (no file {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target})")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(f"{link} (no heading with that anchor in {target.relative_to(ROOT)})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_api_snippets_import_what_exists() -> None:
    """Every `from selective_lm... import name` of docs/api.md's code blocks names something that exists (the offline
    snippet's `embedded_model_dir` included), without running the snippets (they need models and data)."""
    import importlib

    text = (ROOT / "docs" / "api.md").read_text()
    found = re.findall(r"^from (selective_lm[\w.]*) import ([\w, ]+)$", text, flags=re.MULTILINE)
    assert ("selective_lm.data.assets", "embedded_model_dir") in found
    missing = [f"{module}.{name.strip()}" for module, names in found for name in names.split(",")
               if not hasattr(importlib.import_module(module), name.strip())]
    assert not missing, missing


def test_no_page_promises_the_smoke_grid_in_seconds() -> None:
    """`slm run --preset smoke` takes minutes on a slow CPU (84 s of CPU, 3 min wall on a busy 2-core machine):
    the pages and the preset say minutes for the grid, seconds only for a stage."""
    preset = ROOT / "src" / "selective_lm" / "config" / "presets" / "smoke.yaml"
    for page in [*PAGES, preset]:
        text = " ".join(page.read_text().split()).lower()
        assert "grid in seconds" not in text and "seconds, not minutes" not in text, page.name
    assert "whole grid in minutes" in (ROOT / "docs" / "commands.md").read_text()
