"""The user's guide stays usable: links resolve, recipes name real flags of their script, the pages stay short."""
from __future__ import annotations

import re
import runpy
import sys

import pytest
from conftest import ROOT

from utils.recipes import read_recipe

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
LINK = re.compile(r"\]\(([^)\s]+)\)")
RECIPE_COMMAND = re.compile(r"# python (\S+\.py) --config (recipes/\S+\.yaml)")


def anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page) -> set[str]:
    """Anchors of a page's headings, leaving out comment lines of code blocks."""
    found, in_code = set(), False
    for line in page.read_text().splitlines():
        in_code ^= line.startswith("```")
        if line.startswith("#") and not in_code:
            found.add(anchor(line.lstrip("#")))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_relative_links_and_anchors_resolve(page):
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: {target} does not exist"
        if fragment:
            assert fragment in anchors(linked), f"{page.name}: no heading #{fragment} in {linked.name}"


def test_the_guide_is_short_and_tells_no_work_log():
    text = "".join(page.read_text() for page in PAGES)
    assert len(text) <= 110_000  # characters, as `cat README.md docs/*.md | wc -m` counts them
    assert not re.search(r"session|issue ?#?\d", text, re.IGNORECASE)


def test_the_readme_test_command_is_the_one_ci_runs():
    command = "pip install -r requirements.txt && HF_HUB_OFFLINE=1 python -m pytest -q"
    assert command in (ROOT / "README.md").read_text().splitlines()
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda recipe: recipe.name)
def test_each_recipe_names_its_script_and_only_its_flags(recipe, monkeypatch):
    match = RECIPE_COMMAND.match(recipe.read_text().splitlines()[0])
    assert match and match.group(2) == f"recipes/{recipe.name}", "first line: # python <script> --config <this file>"
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setattr(sys, "argv", [match.group(1)])
    parser = runpy.run_path(str(ROOT / match.group(1)), run_name="not_main")["get_args_parser"]()
    assert read_recipe(recipe, parser)  # every key a flag of the script, every value one it accepts
