"""The config loader and the registry that assembles ``PipelineConfig`` from the stages' sections.

Each stage module registers its section (``register_section(name, model)``) and any check across sections
(``register_check``); ``PipelineConfig`` holds the run's name, folder and text column, and one field per registered
section, in the order the stages registered. It is built on first use, after the built-in stages
(``jobembed.stages``) have registered: importing that package by name here is the registry's one lookup, the way a
plugin registry loads its entry points, so no module below the stages imports them.

YAML files in ``configs/`` fill the models; CLI flags override single fields (``load_config``'s ``overrides``); the
resolved config is written next to every output (``write_resolved``). The sections live in ``jobembed.sections``.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from jobembed.artifacts import atomic_write_text
from jobembed.errors import ConfigError


class Strict(BaseModel):
    """The base of every config model: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=False)
    # Fields that change how fast a stage runs (or where it reads from), not what it computes: left out of
    # stage keys.
    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset()
    # Fields added after runs were made, each with the value those runs had (the behaviour before the field): left
    # out of stage keys while they hold it, so adding one does not re-run what those runs made, and changing its
    # default later does change the key.
    LATER_FIELDS: ClassVar[Mapping[str, Any]] = MappingProxyType({})


class TextColumn(StrEnum):
    text = "text"
    clean_text = "clean_text"


# ------------------------------------------------------------------------------------------ the registry

# The package whose modules register the built-in sections; imported by name on first use of PipelineConfig.
BUILTIN_STAGES = "jobembed.stages"
_SECTIONS: dict[str, type[BaseModel]] = {}
_CHECKS: list[Callable[[Any], None]] = []
_STATE: dict[str, Any] = {"complete": False, "class": None}


def register_section(name: str, model: type[BaseModel]) -> None:
    """Make ``model`` the ``name`` field of PipelineConfig (default: the model's defaults)."""
    assert _STATE["class"] is None, f"section {name} registered after PipelineConfig was built"
    assert name not in _SECTIONS or _SECTIONS[name] is model, f"two sections named {name}"
    _SECTIONS[name] = model


def register_check(check: Callable[[Any], None]) -> None:
    """A check across sections, run on every PipelineConfig after its fields are valid: it raises ValueError (one
    line naming the fields) or adjusts a field the user did not set."""
    assert _STATE["class"] is None, "check registered after PipelineConfig was built"
    _CHECKS.append(check)


def sections_complete() -> None:
    """Called by ``jobembed.stages`` once every built-in stage has registered."""
    _STATE["complete"] = True


class PipelineBase(Strict):
    """``run``: the whole pipeline from one file (the registered sections are added as fields)."""

    name: str = "default"
    runs_dir: Path = Path("runs")
    # The ad text every stage after prepare reads: "text" (prepare's, raw) or "clean_text" (the clean stage's).
    # clean_text (with clean.backend rules) by default: on the pl-jobads dev pool it raised TF-IDF's CV macro-F1 by
    # 0.029 (p = 0.03) and the MLP head's by 0.010 (p = 0.42), halved the text to embed, and no personal data reaches
    # a model (experiments/clean_effect.py, docs/results.md#cleaning). With clean.backend none it falls back to text.
    text_column: TextColumn = TextColumn.clean_text

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\") or v.startswith("."):
            raise ValueError(f"run name {v!r} must be a plain folder name")
        return v

    @model_validator(mode="after")
    def _registered_checks(self) -> PipelineBase:
        for check in _CHECKS:
            check(self)
        return self

    @property
    def run_dir(self) -> Path:
        return self.runs_dir / self.name


def pipeline_config() -> type[PipelineBase]:
    """The PipelineConfig class: PipelineBase with one field per registered section (built once)."""
    if _STATE["class"] is None:
        importlib.import_module(BUILTIN_STAGES)
        assert _STATE["complete"], f"PipelineConfig used while {BUILTIN_STAGES} is still registering (an import cycle)"
        fields: dict[str, Any] = {name: (model, Field(default_factory=model)) for name, model in _SECTIONS.items()}
        _STATE["class"] = create_model("PipelineConfig", __base__=PipelineBase, __module__=__name__, **fields)
    return _STATE["class"]


if TYPE_CHECKING:
    PipelineConfig = PipelineBase
else:

    def __getattr__(name: str) -> Any:
        if name == "PipelineConfig":
            return pipeline_config()
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------------------ loading


def section_for_key(section: BaseModel) -> dict[str, Any]:
    """A config section as JSON without its runtime-only fields (nested sections' too): what a stage key hashes."""
    return section.model_dump(mode="json", exclude=_runtime_exclude(section))


def _runtime_exclude(section: BaseModel) -> dict[str, Any]:
    out: dict[str, Any] = {name: True for name in getattr(section, "RUNTIME_FIELDS", ())}
    # A field added after runs were made is out of the key while it holds the value those runs had (LATER_FIELDS:
    # name -> that value), not while it holds today's default: a default changed later must change the key.
    for name, before in getattr(section, "LATER_FIELDS", {}).items():
        if _same(getattr(section, name), before):
            out[name] = True
    for name in type(section).model_fields:
        value = getattr(section, name)
        if name not in out and isinstance(value, BaseModel) and (inner := _runtime_exclude(value)):
            out[name] = inner
    return out


def _same(value: Any, before: Any) -> bool:
    if isinstance(value, BaseModel):
        return False  # a nested section set where runs had none
    return value == before


_VAR = re.compile(r"\$\{([^}]+)\}")


def _expand(value: Any, where: str, source: str) -> Any:
    """Expand ``${VAR}`` / ``${VAR:-default}`` in strings; an unset variable without a default is an error."""
    if isinstance(value, dict):
        return {k: _expand(v, f"{where}.{k}" if where else str(k), source) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if isinstance(value, str) and "${" in value:

        def sub(m: re.Match[str]) -> str:
            name, sep, default = m.group(1).partition(":-")
            found = os.environ.get(name.strip())
            if found:
                return found
            if sep:
                return default
            raise ConfigError(
                f"{source}: '{where}' uses ${{{name}}}, but {name} is not set",
                fix=f"export {name}=..., or write ${{{name}:-default}} in the YAML",
            )

        return _VAR.sub(sub, value)
    return value


def load_config(
    path: Path | Sequence[Path] | None,
    overrides: dict[str, Any] | None = None,
    *,
    flags: dict[str, str] | None = None,
) -> PipelineConfig:
    """Read a pipeline YAML (or defaults when ``path`` is None) and apply dotted overrides.

    Args:
        path: YAML file with any subset of ``PipelineConfig`` fields, or several, layered: a later file's fields
            win over an earlier one's (sections merge field by field; a list is replaced whole).
        overrides: ``{"embed.model": "builtin:...", ...}``; ``None`` values are ignored so unset CLI
            flags do not clobber the file.
        flags: dotted field -> the CLI flag that set it, so an invalid value is reported against the flag
            the user typed rather than the YAML.
    """
    paths = [] if path is None else [Path(path)] if isinstance(path, str | Path) else [Path(p) for p in path]
    data: dict[str, Any] = {}
    for one in paths:
        data = _merge(data, _read_yaml(one))
    path = paths[-1] if paths else None
    set_by_flag = _apply(data, overrides)
    return _validate(pipeline_config(), data, path=path, set_by_flag=set_by_flag, flags=flags)


def load_section(
    path: Path | None,
    name: str,
    model: type[BaseModel],
    overrides: dict[str, Any] | None = None,
    *,
    flags: dict[str, str] | None = None,
) -> Any:
    """One section of a pipeline YAML (``serve``, say) without assembling the pipeline: for a command that needs
    nothing else, such as ``jobembed-serve`` in an image without the training stack. Overrides and errors as in
    ``load_config`` (dotted, ``<name>.<field>``)."""
    data = {name: _read_yaml(Path(path)).get(name) or {}} if path is not None else {name: {}}
    set_by_flag = _apply(data, overrides)
    section_model = create_model(f"{name.capitalize()}Only", __base__=Strict, **{name: (model, model())})
    return getattr(_validate(section_model, data, path=path, set_by_flag=set_by_flag, flags=flags), name)


def _apply(data: dict[str, Any], overrides: dict[str, Any] | None) -> set[str]:
    """Dotted overrides into ``data`` (``None`` values left out); the dotted names set."""
    set_by_flag: set[str] = set()
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            child = node.get(p)
            if not isinstance(child, dict):
                child = node[p] = {}
            node = child
        node[leaf] = value
        set_by_flag.add(dotted)
    return set_by_flag


def _validate(
    model: type[BaseModel], data: dict[str, Any], *, path: Path | None, set_by_flag: set[str], flags: dict | None
) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = [str(x) for x in first["loc"]]
        where = ".".join(loc)
        msg = first["msg"].removeprefix("Value error, ")
        got = first.get("input")
        shown = "" if isinstance(got, dict) else f" (got {_short(got)})"
        named = [k for k in sorted(set_by_flag & set(flags or {})) if _covers(k, loc)]
        # A section-level check names its fields in the message: keep the flags of those fields.
        named = [flags[k] for k in ([k for k in named if k.rsplit(".", 1)[-1] in msg] or named)]
        if named:
            which = " / ".join(dict.fromkeys(named))
            raise ConfigError(
                f"{which}: {msg}{shown}", fix=f"correct {which} (see --help for the allowed values)"
            ) from None
        src = f"{path}: " if path else ""
        field = f"config field '{where}': " if where else ""  # a check across sections names its own fields
        raise ConfigError(
            f"{src}{field}{msg}{shown}", fix="correct that field in the YAML or the matching CLI flag"
        ) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "not found"
        raise ConfigError(
            f"config file {path} {what}", fix="pass an existing YAML file with --config, e.g. configs/demo.yaml"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(
            f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)})", fix="correct the YAML syntax"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at top level, found {type(data).__name__}")
    return _expand(data, "", str(path))


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` layered on ``base``: mappings merge key by key, anything else in ``top`` replaces ``base``'s."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _covers(dotted: str, loc: list[str]) -> bool:
    """True when the override ``dotted`` set the field at ``loc``, a field inside it, or a field of the section
    a model-level check at ``loc`` complained about (``prepare``: test_size + val_size)."""
    parts = dotted.split(".")
    return loc[: len(parts)] == parts or parts[: len(loc)] == loc


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value.value if isinstance(value, StrEnum) else value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def dump_config(model: BaseModel) -> str:
    """The resolved config as YAML (paths as strings)."""
    return yaml.safe_dump(model.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def write_resolved(model: BaseModel, out_dir: Path, name: str = "config.yaml") -> Path:
    """Write the resolved config next to a stage's outputs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    atomic_write_text(path, dump_config(model))
    return path


def default_cache_dir() -> Path:
    """``$JOBEMBED_CACHE``, else ``$XDG_CACHE_HOME/jobembed``, else ``~/.cache/jobembed``."""
    if env := os.environ.get("JOBEMBED_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "jobembed"
