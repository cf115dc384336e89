"""The documentation's links hold: every relative link and every ``docs/...`` path named in README.md and docs/
exists, and the README stays a landing page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "k8s" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target)
_DOCS_PATH = re.compile(r"(?<![\w/.-])docs/[\w./-]*\w")  # a docs/... path named in text or code


def _relative_links(text: str) -> list[str]:
    targets = (m.group(1).split("#", 1)[0] for m in _LINK.finditer(text))
    return [t for t in targets if t and not re.match(r"^[a-z][a-z0-9+.-]*:", t)]  # no http:, mailto:, s3: ...


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_exist(page):
    missing = [t for t in _relative_links(page.read_text()) if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_docs_paths_exist(page):
    named = set(_DOCS_PATH.findall(page.read_text()))
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"{page.relative_to(ROOT)} names docs paths that do not exist: {missing}"


def test_the_checks_catch_a_broken_link():
    assert _relative_links("see [x](docs/nope.md#a) and [y](https://e.org) and [z](s3://b/k)") == ["docs/nope.md"]
    assert _DOCS_PATH.findall("(docs/data.md: Inputs) and `docs/img/a.png`.") == ["docs/data.md", "docs/img/a.png"]


def test_readme_is_a_landing_page():
    """Reference text belongs in docs/; the README says what it is, how to run it, what it measured and where
    each topic lives (15 KB at most), and links every page of docs/."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 15 * 1024, f"README.md is {len(readme.encode()):,} bytes; move reference to docs/"
    unlinked = [p.name for p in (ROOT / "docs").glob("*.md") if f"docs/{p.name}" not in readme]
    assert not unlinked, f"README.md's documentation index lacks {unlinked}"
