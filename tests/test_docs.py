"""The documentation a newcomer reads holds together: every relative link resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"(?m)^#+ (.+)$", page.read_text())
    return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s)://, mailto:
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists() or anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(target)
    assert not broken, f"{page.name}: broken links {broken}"


def test_the_readme_is_a_front_door():
    """Short enough to read at once, opening with the two commands a new user copies."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    first_block = text.split("```bash", 1)[1].split("```", 1)[0]
    assert "ranksearch run --study cls-task" in first_block and "python -m pytest" in first_block


def test_the_study_file_reference_is_generated_from_the_schema():
    """docs/study-file.md's reference is the schema's own field descriptions: a key added or
    changed without regenerating it (`python -m ranksearch.config.reference`) fails here."""
    from ranksearch.config.reference import BEGIN, END, reference

    page = (ROOT / "docs" / "study-file.md").read_text()
    assert BEGIN in page and END in page, "the reference markers are missing"
    written = page[page.index(BEGIN) : page.index(END) + len(END)] + "\n"
    assert written == reference(), "stale: python -m ranksearch.config.reference"
