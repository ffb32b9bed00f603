"""The README and docs/ hold together: every relative link in README.md and docs/*.md points at a file that exists
(and, with a `#fragment`, at a heading that exists there), and every docs page is linked from the README and links
back to it. The README is the front door; what it does not hold lives in docs/, one page per topic."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import ROOT

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))

FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} +(.+?) *#*$", re.MULTILINE)


def prose(text: str) -> str:
    """The text without fenced code blocks and code spans, whose brackets are not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def links(path: Path) -> list[str]:
    return LINK.findall(prose(path.read_text(encoding="utf-8")))


def anchors(path: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation but `-` and `_` dropped, spaces to `-`, repeats numbered."""
    seen: dict[str, int] = {}
    ids = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        ids.add(slug if n == 0 else f"{slug}-{n}")
    return ids


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not a file here
            continue
        file_part, _, fragment = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.is_file():
            broken.append(f"{target} (no file {linked})")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            broken.append(f"{target} (no heading #{fragment} in {linked.name})")
    return broken


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files_and_headings_that_exist(path: Path) -> None:
    assert links(path), f"{path.name} links to nothing"
    assert broken_links(path) == [], f"broken links in {path.relative_to(ROOT)}"


def test_every_docs_page_is_linked_from_the_readme_and_links_back() -> None:
    assert DOCS, "docs/ has no pages"
    from_readme = {(ROOT / t.partition("#")[0]).resolve() for t in links(README) if t.startswith("docs/")}
    for page in DOCS:
        assert page.resolve() in from_readme, f"README.md does not link to docs/{page.name}"
        first, _, _ = page.read_text(encoding="utf-8").partition("\n")
        assert first.startswith("# "), f"docs/{page.name} does not start with a title line"
        assert "../README.md" in links(page), f"docs/{page.name} has no link back to the README"


README_MAX_LINES = 250


def test_the_readme_is_a_short_front_door_with_a_code_map() -> None:
    """What it is, the two commands, the examples, a code map naming every module, the settings table, links."""
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES, "README.md grew past its limit: move the long read to docs/"
    code_map = text.split("## Code map", 1)[1].split("\n## ", 1)[0]
    modules = sorted((ROOT / "inference").rglob("*.py")) + sorted((ROOT / "webapp").rglob("*.py"))
    missing = [
        str(path.relative_to(ROOT)) for path in modules if path.name != "__init__.py" and path.name not in code_map
    ]
    # and every folder, as `name/`: the tree in the code map is the tree on disk
    missing += [
        str(folder.relative_to(ROOT)) + "/"
        for package in ("inference", "webapp")
        for folder in sorted((ROOT / package).rglob("*"))
        if folder.is_dir() and folder.name != "__pycache__" and f"{folder.name}/" not in code_map
    ]
    assert not missing, f"the README's code map does not name: {', '.join(missing)}"
