"""Every third-party module the package imports, at the top of a file or inside a function, is a declared
dependency (or, for optional features, in the extra that provides it), so a fresh `pip install .` runs it all."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys

import pytest
from conftest import ROOT

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

OPTIONAL = {"av": "video"}  # imported only by the feature that needs it, with an error naming the extra


def imported_modules() -> dict[str, str]:
    """{top-level module: first file importing it} for the package's absolute imports outside the stdlib."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / "mlx_qwen36").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "mlx_qwen36":
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_every_imported_module_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = requirement_names(project["dependencies"])
    extras = {name: requirement_names(reqs) for name, reqs in project["optional-dependencies"].items()}
    distributions = importlib.metadata.packages_distributions()
    for module, where in imported_modules().items():
        names = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        wanted = extras[OPTIONAL[module]] if module in OPTIONAL else declared
        assert names & wanted, f"{where} imports {module} ({sorted(names)}), which pyproject.toml does not declare"
