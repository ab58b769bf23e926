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
    "distributed",
    "store",
    "fingerprint",
    "engine",
    "tables",
    "dedup",
    "data",
    "builtin_e5",
    "encoders",
    "onnx_backend",
    "clean",
    "embed",
    "metrics",
    "hierarchy",
    "baselines",
    "triplets",
    "finetune",
    "head",
    "hybrid",
    "evaluate",
    "report",
    "bundle",
    "serve",
    "pipeline",
    "cli",
]


# Inside the stage packages, lowest first.
CLEAN_LAYERS = ["spans", "pii", "rules", "gliner", "core", "eval", "train"]
TRIPLET_LAYERS = ["mine", "llm", "client", "judges", "core"]
PACKAGES = {"clean": CLEAN_LAYERS, "triplets": TRIPLET_LAYERS}


def _imports(path: Path) -> set[str]:
    """jobembed modules imported anywhere in the file (top level and inside functions); for a package, in any
    of its files."""
    if path.is_dir():
        return set().union(*(_imports(f) for f in path.glob("*.py")))
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


def _source(module: str) -> Path:
    return PACKAGE / module if (PACKAGE / module).is_dir() else PACKAGE / f"{module}.py"


def test_every_module_has_a_layer():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert modules | packages == set(LAYERS)
    assert {p.stem for p in (PACKAGE / "clean").glob("*.py")} - {"__init__"} == set(CLEAN_LAYERS)


@pytest.mark.parametrize("module", LAYERS)
def test_imports_only_point_down(module):
    below = set(LAYERS[: LAYERS.index(module)])
    upward = _imports(_source(module)) - below - {module}
    assert not upward, f"jobembed.{module} imports {sorted(upward)}, which sit above it"


@pytest.mark.parametrize("module", CLEAN_LAYERS)
def test_clean_package_is_a_stack(module):
    path = PACKAGE / "clean" / f"{module}.py"
    inner = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jobembed.clean."):
            inner.add(node.module.split(".")[2])
    upward = inner - set(CLEAN_LAYERS[: CLEAN_LAYERS.index(module)])
    assert not upward, f"jobembed.clean.{module} imports {sorted(upward)}, which sit above it"


def test_the_engine_names_no_stage():
    """Stages register with the engine; the engine's code (docstrings included) names none of them."""
    import re

    from jobembed import pipeline

    text = (PACKAGE / "engine.py").read_text(encoding="utf-8").lower()
    named = {
        word
        for stage in pipeline.STAGES.values()
        for word in {stage.name, stage.dir_name, stage.section or ""} - {""}
        if re.search(rf"(?<![\w.-]){re.escape(word)}(?![\w-])", text)
    }
    assert not named, f"engine.py names the stages {sorted(named)}"
