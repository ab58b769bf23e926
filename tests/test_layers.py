"""The package is a clean stack: a module imports only modules below it (cli.commands -> stages -> cli.base ->
workers -> sections -> config -> helpers)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "jobembed"
# Lowest first. A new module goes where its imports allow. "cli.base" is the Typer app and the shared options, below
# the stages (each stage module defines its command); "cli" is the rest of the cli package, above them.
LAYERS = [
    "errors",
    "artifacts",
    "config",
    "sections",
    "ui",
    "distributed",
    "store",
    "fingerprint",
    "tracking",
    "engine",
    "tables",
    "dedup",
    "data",
    "taxonomy",
    "builtin_e5",
    "encoders",
    "onnx_backend",
    "clean",
    "embed",
    "metrics",
    "oof",
    "hierarchy",
    "baselines",
    "head",
    "triplets",
    "finetune",
    "hybrid",
    "topdown",
    "evaluate",
    "report_page",
    "report",
    "bundle",
    "serve",
    "mlflow_model",
    "cli.base",
    "stages",
    "cli",
]


# Inside the packages, lowest first (``__init__`` may import any of its package's modules).
CLEAN_LAYERS = ["spans", "pii", "rules", "gliner", "core", "eval", "train"]
TRIPLET_LAYERS = ["mine", "llm", "client", "judges", "core"]
STAGE_LAYERS = [
    "_common", "prepare", "clean", "embed", "head", "triplets", "finetune", "finetune_seeds", "finetune_cv", "report",
    "bundle",
]  # fmt: skip
PACKAGES = {"clean": CLEAN_LAYERS, "triplets": TRIPLET_LAYERS, "stages": STAGE_LAYERS}


def _layer(module: str) -> str:
    """The layer of a dotted module under jobembed: ``cli.base`` is a layer of its own, any other module of the cli
    package is ``cli``, a module of another package is that package."""
    parts = module.split(".")
    if parts[0] == "cli":
        return "cli.base" if parts[1:2] == ["base"] else "cli"
    return parts[0]


def _imports(path: Path) -> set[str]:
    """Layers imported anywhere in the file (top level and inside functions); for a package, in any of its files."""
    if path.is_dir():
        return set().union(*(_imports(f) for f in path.glob("*.py")))
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jobembed"):
            parts = node.module.split(".")
            if len(parts) > 1:
                found.add(_layer(".".join(parts[1:])))
            else:
                found.update(alias.name for alias in node.names if alias.name in LAYERS)
        elif isinstance(node, ast.Import):
            found.update(_layer(a.name.split(".", 1)[1]) for a in node.names if a.name.startswith("jobembed."))
    return found


def _sources(layer: str) -> list[Path]:
    if layer == "cli.base":
        return [PACKAGE / "cli" / "base.py"]
    if layer == "cli":
        return [p for p in (PACKAGE / "cli").glob("*.py") if p.stem != "base"]
    return [PACKAGE / layer] if (PACKAGE / layer).is_dir() else [PACKAGE / f"{layer}.py"]


def test_every_module_has_a_layer():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert modules | packages | {"cli.base"} == set(LAYERS)
    for package, layers in PACKAGES.items():
        assert {p.stem for p in (PACKAGE / package).glob("*.py")} - {"__init__"} == set(layers), package


@pytest.mark.parametrize("module", LAYERS)
def test_imports_only_point_down(module):
    below = set(LAYERS[: LAYERS.index(module)])
    upward = set().union(*map(_imports, _sources(module))) - below - {module}
    assert not upward, f"jobembed.{module} imports {sorted(upward)}, which sit above it"


@pytest.mark.parametrize(("package", "module"), [(p, m) for p, layers in PACKAGES.items() for m in layers])
def test_each_package_is_a_stack(package, module):
    layers = PACKAGES[package]
    path = PACKAGE / package / f"{module}.py"
    inner = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(f"jobembed.{package}."):
            inner.add(node.module.split(".")[2])
    upward = inner - set(layers[: layers.index(module)])
    assert not upward, f"jobembed.{package}.{module} imports {sorted(upward)}, which sit above it"


def test_the_stages_register_in_the_order_of_their_imports():
    """One module per stage, imported in run order by the package: the registry's order is the stack's."""
    from jobembed import stages

    modules = [s.run.__module__.rsplit(".", 1)[-1] for s in stages.STAGES.values()]
    assert list(dict.fromkeys(modules)) == STAGE_LAYERS[1:]


def test_pipeline_config_is_assembled_from_the_registered_sections():
    """config.py names no section: each stage module registers its own, and PipelineConfig has them in run order.
    Loading a config before anything imported the stages works (the registry loads them on first use)."""
    code = (
        "from jobembed.config import load_config\n"
        "import sys\n"
        "assert 'jobembed.stages' not in sys.modules\n"
        "print(' '.join(load_config(None).model_fields))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [
        "name", "runs_dir", "text_column", "tracking", "prepare", "clean", "embed", "head", "triplets", "finetune",
        "report", "bundle", "classify", "serve",
    ]  # fmt: skip
    text = (PACKAGE / "config.py").read_text(encoding="utf-8")
    assert not [s for s in out[3:] if f"{s.capitalize()}Config" in text], "config.py names a section"


def test_the_engine_names_no_stage():
    """Stages register with the engine; the engine's code (docstrings included) names none of them."""
    import re

    from jobembed import stages

    text = (PACKAGE / "engine.py").read_text(encoding="utf-8").lower()
    named = {
        word
        for stage in stages.STAGES.values()
        for word in {stage.name, stage.dir_name, stage.section or ""} - {""}
        if re.search(rf"(?<![\w.-]){re.escape(word)}(?![\w-])", text)
    }
    assert not named, f"engine.py names the stages {sorted(named)}"
