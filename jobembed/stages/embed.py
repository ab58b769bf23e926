"""embed: encode every split and the category texts with every encoder, cached (``embed/``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from jobembed import encoders, ui
from jobembed.artifacts import read_json
from jobembed.cli.base import (
    BatchOpt,
    ChunkingOpt,
    ChunkStrideOpt,
    ConfigOpt,
    DeviceOpt,
    ExtraModelOpt,
    ForceOpt,
    MaxLenOpt,
    ModelOpt,
    PrecisionOpt,
    QuietOpt,
    RunArg,
    TextColOpt,
    console,
    friendly,
    stage_command,
)
from jobembed.config import register_section, write_resolved
from jobembed.engine import Stage, StageContext, register, register_pin
from jobembed.sections import EmbedBackend, EmbedConfig
from jobembed.stages._common import canon, embed_into, names_models, reads_clean_text, trains_on_taxonomy

if TYPE_CHECKING:
    from jobembed.config import PipelineConfig


register_section("embed", EmbedConfig)


def _pin_embed(config: PipelineConfig) -> PipelineConfig:
    """Done once, before the first stage that names a model, and written to the run's config.yaml, so every later
    stage (and the bundle) uses the same weights even if the Hub's ``main`` moves on."""
    e = config.embed
    pinned = e.model_copy(
        update={
            "model": canon(e.model, e.cache_dir),
            "extra_models": [canon(r, e.cache_dir) for r in e.extra_models],
        }
    )
    return config.model_copy(update={"embed": pinned})


def _embed_identity(config: PipelineConfig) -> dict[str, str]:
    """The content fingerprint of every encoder: a folder rebuilt in place with other weights is a new model. Where the
    systems train on the taxonomy's rows, its texts are encoded too (embed/taxonomy/)."""
    out = {ref: encoders.model_fingerprint(ref, cache_dir=config.embed.cache_dir) for ref in config.embed.models()}
    if trains_on_taxonomy(config):
        out["taxonomy_rows"] = "encoded"
    return out


def _run_embed(ctx: StageContext) -> dict[str, Any]:
    e = ctx.config.embed
    if e.backend == EmbedBackend.torch and encoders.pick_device(e.device) == "cpu":
        # a hint, not a switch: the backend changes every vector, so it is the config's choice (never "auto")
        ui.note(
            "embed: encoding with torch on a CPU; embed.backend onnx-int8 (--backend onnx-int8) encoded 1.8x faster "
            "here at the same CV macro-F1 (docs/benchmarks.md)"
        )
    summary = embed_into(ctx, e)
    write_resolved(ctx.config.embed, ctx.out)
    return summary


register_pin(_pin_embed)


@friendly
def embed_command(
    ctx: typer.Context,
    run_dir: RunArg,
    embed__model: ModelOpt = None,
    embed__extra_models: ExtraModelOpt = None,
    pipeline__text_column: TextColOpt = None,
    embed__max_seq_length: MaxLenOpt = None,
    embed__chunking: ChunkingOpt = None,
    embed__chunk_stride: ChunkStrideOpt = None,
    embed__batch_size: BatchOpt = None,
    embed__device: DeviceOpt = None,
    embed__precision: PrecisionOpt = None,
    embed__backend: Annotated[
        EmbedBackend | None,
        typer.Option("--backend", help="torch, or onnx-int8: the int8 ONNX export, faster on a CPU (default: torch)."),
    ] = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Encode every split, the category texts and a taxonomy's texts with each encoder, cached.

    Re-runs and texts shared with another run are free (the cache). --backend onnx-int8 runs the encoder as its int8
    ONNX export (new vectors: a new key, a cache namespace of their own, and a bundle that encodes new ads the same
    way)."""

    run = stage_command("embed", dict(locals()))
    for meta_path in sorted((run / "embed").glob("*/embeddings.json")):
        meta = read_json(meta_path)
        rows = ", ".join(f"{k} {v['rows']}" for k, v in meta["splits"].items())
        console.print(f"[green]{meta['model']}[/] ({meta['fingerprint']}): {rows} → {meta_path.parent}")


register(
    Stage(
        "embed",
        section="embed",
        reads=("text_column",),
        inputs=("prepare", "clean"),
        consumes=lambda config: {"prepare": ("*",), **({"clean": ("*",)} if reads_clean_text(config) else {})},
        run=_run_embed,
        identity=_embed_identity,
        products=("*/*.npy", "*/embeddings.json", "taxonomy/*.json"),
        names_models=names_models,
        help="encode every split and the category texts with every encoder (cached)",
        # 2: embeddings.json no longer carries how many texts came from the cache (it changed with every re-run).
        version=2,
        command=embed_command,
    )
)
