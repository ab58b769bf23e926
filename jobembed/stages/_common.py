"""What several stages share: prepare's splits with the run's text, an encoder's vectors and folder, canonical model
references."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobembed import data, embed, encoders
from jobembed.bundle import EncoderInfo
from jobembed.clean.core import load_clean_column
from jobembed.config import TextColumn
from jobembed.engine import StageContext

if TYPE_CHECKING:
    import pandas as pd

    from jobembed.config import PipelineConfig


def reads_clean_text(config: PipelineConfig) -> bool:
    """Whether the stages after clean read the clean stage's text."""
    return config.text_column == TextColumn.clean_text


def canon(ref: str, cache_dir: Path | None = None) -> str:
    """A model reference in canonical form: builtins in lower case, Hub ids pinned to a commit, folders as given."""
    resolved = encoders.resolve(ref, cache_dir=cache_dir, build=False)
    return ref if resolved.kind == "local" else resolved.ref


def encoder_part(
    config: PipelineConfig, refs: Sequence[str], *, also: tuple[str, ...] = ()
) -> Callable[[], tuple[str, ...]]:
    """The embed folders of the encoders ``refs`` (and the patterns ``also``), as a function that gives those patterns
    of embed's files: resolving a model is left to the key's hashing (``engine.Patterns``)."""

    def patterns() -> tuple[str, ...]:
        out = []
        for ref in refs:
            resolved = encoders.resolve(ref, cache_dir=config.embed.cache_dir)
            out.append(f"{embed.encoder_slug(resolved.ref, encoders.fingerprint_of(resolved))}/*")
        return (*out, *also)

    return patterns


def prepared(config: PipelineConfig, *, texts: bool = True) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """Prepare's splits and labels; with ``text_column: clean_text`` (and ``texts``) each split gains the clean
    stage's column."""
    prepare_dir = config.run_dir / "prepare"
    splits = data.load_splits(prepare_dir)
    if texts and reads_clean_text(config):
        for name, frame in splits.items():
            frame["clean_text"] = load_clean_column(config.run_dir / "clean", name, frame["id"]).to_numpy()
    return splits, data.load_labels(prepare_dir)


def trains_on_taxonomy(config: PipelineConfig) -> bool:
    """Whether the systems train on the taxonomy's texts (``report.taxonomy_rows`` on a run with a taxonomy): then every
    encoder encodes them too."""
    return config.prepare.taxonomy is not None and config.report.taxonomy_rows is not None


def taxonomy_rows(config: PipelineConfig) -> pd.DataFrame | None:
    """prepare's taxonomy table (``data.load_taxonomy_rows``) when the systems train on it, else None."""
    return data.load_taxonomy_rows(config.run_dir / "prepare") if trains_on_taxonomy(config) else None


def run_vectors(config: PipelineConfig, model: str, splits, labels) -> embed.RunVectors:
    """``model``'s vectors of every split, of the category texts and of the taxonomy's texts (when the run has a
    taxonomy), from the embed stage's folder."""
    return embed.load_vectors(
        config.run_dir / "embed",
        model=model,
        config=config.embed,
        splits=splits,
        labels=labels,
        text_column=config.text_column,
        taxonomy=taxonomy_rows(config),
    )


def embed_into(ctx: StageContext, section: Any) -> dict[str, Any]:
    """Every split and the category texts encoded with ``section``'s encoders into the stage's folder."""
    splits, labels = prepared(ctx.config)
    folders = embed.embed_splits(
        splits=splits,
        labels=labels,
        out_dir=ctx.out,
        config=section,
        text_column=ctx.config.text_column,
        taxonomy=taxonomy_rows(ctx.config),
        progress=ctx.progress,
    )
    return {"folders": {k: v.name for k, v in folders.items()}}


def encoder_info(config: PipelineConfig, run_vectors: embed.RunVectors) -> EncoderInfo:
    """What a bundle records of the encoder that made ``run_vectors``."""
    return EncoderInfo(
        model=run_vectors.model,
        fingerprint=run_vectors.fingerprint,
        precision=run_vectors.precision,
        text_prompt=run_vectors.text_prompt,
        max_seq_length=config.embed.max_seq_length,
    )


def frozen_identity(config: PipelineConfig) -> dict[str, str]:
    """The content fingerprint of the frozen encoder (``embed.model``) whose vectors a stage reads."""
    return {"model": encoders.model_fingerprint(config.embed.model, cache_dir=config.embed.cache_dir)}


def names_models(config: PipelineConfig) -> bool:
    """For ``Stage.names_models`` of a stage that always resolves a model reference."""
    return True
