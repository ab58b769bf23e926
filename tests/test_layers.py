"""The package is a clean stack: a module imports only modules below it (cli -> pipeline -> stages -> helpers)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "jobembed"
# Lowest first. A new module goes where its imports allow; a stage never imports the pipeline or the CLI.
LAYERS = [
    "errors",
    "artifacts",
    "config",
    "ui",
    "store",
    "fingerprint",
    "tables",
    "dedup",
    "data",
    "builtin_e5",
    "encoders",
    "embed",
    "metrics",
    "baselines",
    "head",
    "evaluate",
    "report",
    "bundle",
    "pipeline",
    "cli",
]


def _imports(path: Path) -> set[str]:
    """jobembed modules imported anywhere in the file (top level and inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jobembed"):
            parts = node.module.split(".")
            if len(parts) > 1:
                found.add(parts[1])
            else:
                found.update(alias.name for alias in node.names if alias.name in LAYERS)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("jobembed."))
    return found


def test_every_module_has_a_layer():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules == set(LAYERS)


@pytest.mark.parametrize("module", LAYERS)
def test_imports_only_point_down(module):
    below = set(LAYERS[: LAYERS.index(module)])
    upward = _imports(PACKAGE / f"{module}.py") - below - {module}
    assert not upward, f"jobembed.{module} imports {sorted(upward)}, which sit above it"
