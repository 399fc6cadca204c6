"""The documentation stays navigable and complete: every relative link and anchor resolves, the config
reference names every key, and the README stays short."""
import dataclasses
import re
from pathlib import Path

import pytest

from diffmoe_scale.config import Config

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "launch" / "README.md",
         REPO / "slurm" / "README.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(page: Path) -> str:
    """The page without fenced code blocks and inline code, where brackets are not links."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+\s+(.*)$", re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def relative_links(page: Path) -> list[str]:
    return [target for target in LINK.findall(prose(page)) if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_every_relative_link_and_anchor_resolves(page):
    assert page.exists()
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.relative_to(REPO)}: link to a missing path: {target}"
        if anchor:
            assert anchor in anchors(linked), f"{page.relative_to(REPO)}: no heading for the anchor: {target}"


def test_the_pages_link_to_each_other():
    """Every page of docs/ is reachable from the README."""
    linked = {(REPO / target.partition("#")[0]).resolve() for target in relative_links(REPO / "README.md")}
    assert set((REPO / "docs").glob("*.md")) <= linked


def test_the_config_reference_names_every_key():
    reference = (REPO / "docs" / "configuration.md").read_text()
    defaults = Config()
    keys = [f"{section.name}.{key.name}" for section in dataclasses.fields(defaults)
            for key in dataclasses.fields(getattr(defaults, section.name))]
    missing = [key for key in keys if f"`{key}`" not in reference]
    assert not missing, f"docs/configuration.md does not describe {missing}"


def test_the_readme_stays_short_and_the_docs_carry_no_issue_numbers():
    assert len((REPO / "README.md").read_text().splitlines()) <= 250
    for page in PAGES:
        assert not re.search(r"\bissues? #?\d+|(?<![\w/])#\d+\b", page.read_text(), re.I), page
