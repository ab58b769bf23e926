"""Pydantic configs, one per stage, plus the pipeline config that holds them all.

YAML files in ``configs/`` fill these models; CLI flags override single fields (``apply_overrides``);
the resolved config is written next to every output (``write_resolved``). Unknown keys are errors, so
a typo in a YAML file fails loudly instead of being ignored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from jobembed.artifacts import atomic_write_text
from jobembed.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LabelSetConfig(_Strict):
    """A CSV that lists the allowed labels, with optional names and descriptions for zero-shot."""

    path: Path
    code_col: str = "code"
    name_col: str | None = "name"
    description_col: str | None = None
    # e.g. {"level": "isco_submajor"}: one file may hold several label levels (pl-jobads labels.csv does).
    filter: dict[str, str] = Field(default_factory=dict)


class PrepareConfig(_Strict):
    """``prepare``: read, validate, dedupe, split."""

    input: Path | None = None
    text_col: str = "text"
    label_col: str = "label"
    id_col: str | None = None
    labels: LabelSetConfig | None = None
    # 2, not 1: a class needs at least one ad on each side of a split to be learnable and testable.
    min_class_count: int = Field(2, ge=1)
    rare_policy: Literal["error", "drop", "merge"] = "merge"
    other_label: str = "other"
    # Reposts with conflicting labels (real: 34 in pl-jobads) keep the majority label; ties keep the first.
    conflict_policy: Literal["majority", "drop"] = "majority"
    # Cosine of TF-IDF word-bigram vectors above which two ads count as the same repost (edited copies).
    near_duplicate_threshold: float = Field(0.9, gt=0, le=1)
    test_size: float = Field(0.2, gt=0, lt=1)
    val_size: float = Field(0.1, ge=0, lt=1)
    seed: int = 13
    # Stratified subsample before splitting; for demos and quick looks. None keeps everything.
    max_rows: int | None = Field(None, ge=10)


class EmbedConfig(_Strict):
    """``embed``: encoder, prompts and batching."""

    model: str = "sentence-transformers/paraphrase-multilingual-mpnet-base-v2"
    # "auto" takes the model family's prefix from jobembed/presets/prompts.yaml (e5: "query: ").
    text_prompt: str | None = "auto"
    label_prompt: str | None = "auto"
    # 256 covers the head of most ads (the median Polish ad is ~310 XLM-R tokens) at a quarter of the
    # attention cost of 512; see docs/truncation.md for what the cut costs in accuracy.
    max_seq_length: int = Field(256, ge=8, le=8192)
    batch_size: int = Field(32, ge=1)
    device: str = "auto"
    # fp16 only applies on CUDA; CPUs stay at fp32 where half precision is slower.
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    # Vectors are written to the cache every this many texts, so an interrupted run loses at most this much.
    checkpoint_every: int = Field(2048, ge=1)
    cache_dir: Path | None = None


class HeadConfig(_Strict):
    """``train-head``: the MLP on embeddings (scikit-learn style, PyTorch inside)."""

    hidden_sizes: list[int] = Field(default_factory=lambda: [512])
    # dropout 0.5 and lr 3e-4 beat 0.2 and 1e-3 in 5-fold CV on pl-jobads sub-major groups with e5-small
    # (macro-F1 0.589 vs 0.580, accuracy 0.686 vs 0.681; 2026-11-26): the head overfits 5k ads within ~10 epochs.
    dropout: float = Field(0.5, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    learning_rate: float = Field(3e-4, gt=0)
    batch_size: int = Field(64, ge=1)
    max_epochs: int = Field(200, ge=1)
    # Epochs without a better validation macro-F1 before stopping.
    patience: int = Field(20, ge=1)
    # sqrt sits between none (majority classes win) and balanced (rare classes with 1-5 ads overfit).
    class_weight: Literal["none", "balanced", "sqrt"] = "sqrt"
    calibrate: bool = True
    # z-score the embedding coordinates on the training rows before the first layer (see head.py for why).
    standardize: bool = True
    # Share of the training ads held out for early stopping when no validation split is given.
    validation_fraction: float = Field(0.1, gt=0, lt=1)
    device: str = "auto"
    seed: int = 13


class TfidfConfig(_Strict):
    """The classical bar: word + char n-gram TF-IDF into logistic regression."""

    word_ngrams: tuple[int, int] = (1, 2)
    char_ngrams: tuple[int, int] = (2, 5)
    # Per vectorizer. On pl-jobads 50k+50k features fit 2.6x faster than 200k+200k (lbfgs time grows with
    # features x classes) at the same test accuracy (0.71) and macro-F1 (0.59), measured 2026-11-26.
    max_features: int = 50_000
    C: float = 10.0
    max_iter: int = 1000
    # lbfgs stops at 1e-3 in ~35 iterations with the same predictions as 1e-4 (68 s -> 26 s on 5.5k ads).
    tol: float = 1e-3


class ReportConfig(_Strict):
    """``compare-report``: which systems, which encoders, how to evaluate."""

    # Extra encoders to compare beside embed.model (e.g. a fine-tuned folder); same splits, same systems.
    encoders: list[str] = Field(default_factory=list)
    systems: list[Literal["zeroshot", "centroid", "tfidf", "logreg", "mlp"]] = Field(
        default_factory=lambda: ["zeroshot", "centroid", "tfidf", "logreg", "mlp"]
    )
    # The split column to read texts from; a cleaning stage adds e.g. "clean_text".
    text_column: str = "text"
    # What the zero-shot baseline embeds for each category.
    label_text: Literal["name", "description", "name_description"] = "name_description"
    cv_folds: int = Field(5, ge=2)
    # Macro-F1 over classes with at least this many test ads (rare classes swing macro-F1 on 1-2 ads).
    min_support: int = Field(5, ge=1)
    bootstrap: int = Field(1000, ge=0)
    top_k: int = Field(3, ge=1)
    tfidf: TfidfConfig = Field(default_factory=TfidfConfig)


class BundleConfig(_Strict):
    """What goes into a bundle besides the head."""

    # Copy a local/builtin encoder folder into the bundle so it runs where the cache is absent
    # (a server); off by default because e5-small alone is ~470 MB.
    copy_encoder: bool = False


class ClassifyConfig(_Strict):
    top_k: int = Field(3, ge=1)
    min_confidence: float = Field(0.0, ge=0, le=1)
    uncertain_label: str = "uncertain"


class PipelineConfig(_Strict):
    """``run``: the whole pipeline from one file."""

    name: str = "default"
    runs_dir: Path = Path("runs")
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    bundle: BundleConfig = Field(default_factory=BundleConfig)
    classify: ClassifyConfig = Field(default_factory=ClassifyConfig)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\") or v.startswith("."):
            raise ValueError(f"run name {v!r} must be a plain folder name")
        return v

    @property
    def run_dir(self) -> Path:
        return self.runs_dir / self.name


def _expand(value: Any, base: Path) -> Any:
    """Expand ``${VAR:-default}``/``~`` in strings; relative paths stay relative to the caller's cwd."""
    if isinstance(value, dict):
        return {k: _expand(v, base) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, base) for v in value]
    if isinstance(value, str) and "${" in value:
        import re

        def sub(m: re.Match[str]) -> str:
            name, _, default = m.group(1).partition(":-")
            return os.environ.get(name) or default

        return re.sub(r"\$\{([^}]+)\}", sub, value)
    return value


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Read a pipeline YAML (or defaults when ``path`` is None) and apply dotted overrides.

    Args:
        path: YAML file with any subset of ``PipelineConfig`` fields.
        overrides: ``{"embed.model": "builtin:...", ...}``; ``None`` values are ignored so unset CLI
            flags do not clobber the file.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found", fix="pass an existing YAML file, e.g. configs/demo.yaml")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(
                f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)})", fix="correct the YAML syntax"
            ) from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at top level, found {type(data).__name__}")
        data = _expand(data, path.parent)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        src = f"{path}: " if path else ""
        raise ConfigError(
            f"{src}config field '{where}': {first['msg']} (got {first.get('input')!r})",
            fix="correct that field in the YAML or the matching CLI flag",
        ) from None


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
