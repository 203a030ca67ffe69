"""pyproject.toml tells the truth about the package: what it imports is declared, its version is written once."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import sys
from pathlib import Path

import pytest

import phi3embed

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "phi3embed"
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(line: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
    assert match, line
    return _normal(match.group(1))


def _imported_top_level_modules() -> dict[str, str]:
    """Every module the package imports (at the top of a file or inside a function) -> one file that does."""
    found: dict[str, str] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(REPO)))
    return found


#: Modules imported from a distribution of another name, for environments that do not install that extra (the
#: CI legs other than main install no faiss): installed metadata answers everywhere else.
OTHER_NAMES = {"faiss": ["faiss-cpu"]}


def test_every_imported_distribution_is_declared() -> None:
    declared = {_requirement_name(line) for line in PROJECT["dependencies"]}
    for extra in PROJECT["optional-dependencies"].values():
        declared |= {_requirement_name(line) for line in extra}
    distributions = importlib.metadata.packages_distributions()  # installed top-level module -> distributions
    undeclared = {}
    for module, where in _imported_top_level_modules().items():
        if module in sys.stdlib_module_names or module == "phi3embed":
            continue
        # not installed: the distribution it is known to come from, else the module's own name
        names = {_normal(d) for d in distributions.get(module, OTHER_NAMES.get(module, [module]))}
        if not names & declared:
            undeclared[module] = where
    assert undeclared == {}, "imported but not declared in pyproject.toml"


def test_the_version_is_written_once() -> None:
    assert "version" not in PROJECT and "version" in PROJECT["dynamic"]
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["dynamic"]["version"]
    assert config == {"attr": "phi3embed.__version__"}
    # every metadata of this tree's build: the installed one (editable: direct_url.json names the tree) and the
    # egg-info setuptools leaves in the tree, which is on sys.path first when pytest runs from the repository
    built_here = [
        dist
        for dist in importlib.metadata.distributions(name="phi3embed")
        if json.loads(dist.read_text("direct_url.json") or "{}").get("url") == REPO.as_uri()
        or REPO in Path(str(dist.locate_file(""))).resolve().parents
        or Path(str(dist.locate_file(""))).resolve() == REPO
    ]
    if not built_here:
        pytest.skip("phi3embed is not installed from this tree (run through PYTHONPATH, or built from an archive)")
    assert {dist.version for dist in built_here} == {phi3embed.__version__}
