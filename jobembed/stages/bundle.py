"""bundle: the report's best servable system as a deployable bundle (``bundle/``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from jobembed import data, encoders
from jobembed.artifacts import read_json
from jobembed.bundle import EncoderInfo, load_head, save_bundle
from jobembed.cli.base import ConfigOpt, ForceOpt, QuietOpt, RunArg, console, friendly, stage_command
from jobembed.config import register_section
from jobembed.engine import Stage, StageContext, register
from jobembed.errors import DataError
from jobembed.report import PAGE, WINNER_DIR, WINNER_FINETUNED_DIR
from jobembed.sections import BundleConfig, BundleEncoderChoice, EmbedBackend
from jobembed.stages._common import names_models
from jobembed.stages.finetune import finetuned_model
from jobembed.tracking import Tracked

if TYPE_CHECKING:
    from jobembed.config import PipelineConfig


register_section("bundle", BundleConfig)


def _bundle_consume(config: PipelineConfig) -> dict[str, tuple[str, ...]]:
    finetuned = config.bundle.encoder == BundleEncoderChoice.finetuned
    report = (f"{WINNER_FINETUNED_DIR if finetuned else WINNER_DIR}/*",)
    out = {"prepare": ("labels.json",), "report": report + ((PAGE,) if config.bundle.report_page else ())}
    if finetuned or config.report.finetune_cv:  # with the recipe in the CV, the CV winner may be fine-tuned
        out["finetune"] = ("model/*",)  # copied into the bundle
    return out


def _run_bundle(ctx: StageContext) -> dict[str, Any]:
    config = ctx.config
    finetuned = config.bundle.encoder == BundleEncoderChoice.finetuned
    winner_dir = config.run_dir / "report" / (WINNER_FINETUNED_DIR if finetuned else WINNER_DIR)
    if finetuned and not config.finetune.enabled:
        raise DataError(
            "bundle.encoder is finetuned but finetune is off in this run (finetune.enabled: false), so the report "
            "holds no fine-tuned encoder",
            fix="run `jobembed finetune RUN` (it turns the stage on; a model already made under the same settings is "
            "kept and re-used) and report, or bundle the frozen encoder (--encoder frozen)",
        )
    if not (winner_dir / "winner.json").is_file():
        raise DataError(
            f"report found no system a bundle can serve ({', '.join(map(str, config.report.systems))})",
            fix="add mlp, centroid or zeroshot to report.systems (--systems) and re-run report",
        )
    winner = read_json(winner_dir / "winner.json")
    head = load_head(winner_dir / "head", winner["head_kind"])
    labels = data.load_labels(config.run_dir / "prepare")
    tuned = finetuned or _own_finetuned(config, winner)
    encoder = EncoderInfo(
        model=finetuned_model(config) if tuned else winner["encoder"],
        fingerprint=winner["encoder_fingerprint"],
        precision=winner["encoder_precision"],
        text_prompt=winner["encoder_text_prompt"],
        max_seq_length=config.embed.max_seq_length,
    )
    path = save_bundle(
        ctx.out,
        model=head,
        system=winner["system"],
        encoder=encoder,
        config=config,
        labels=labels,
        metrics={**winner["metrics"], "selective": winner.get("selective")},
        # the fine-tuned folder lives in the run and changes with its next fine-tune: the bundle keeps its own copy
        copy_encoder=config.bundle.copy_encoder or tuned,
        report_page=_report_page(config),
        onnx=str(config.bundle.backend) == "onnx-int8",
    )
    return {"bundle": str(path), "system": winner["key"]}


def _own_finetuned(config: PipelineConfig, winner: dict[str, Any]) -> bool:
    """Whether the winner's encoder is this run's fine-tuned model.

    The report records the encoder by the path the run was addressed through; a run folder moved or copied since
    still holds that model in its own ``finetune/model``, which its content fingerprint recognises."""
    own = Path(finetuned_model(config))
    if Path(winner["encoder"]) == own:
        return True
    if Path(winner["encoder"]).name != own.name or not own.is_dir():
        return False  # a hub id, a builtin or another local encoder: bundled by its reference
    return encoders.model_fingerprint(str(own)) == winner["encoder_fingerprint"]


def _identity(config: PipelineConfig) -> dict[str, str] | None:
    """None (the key of every bundle made before this identity existed) unless the CV winner is this run's fine-tuned
    model recorded under another path (a run folder moved or copied since its report): such a bundle copies the run's
    own model, so one made before that was recognised (it points at the old path) is not current."""
    if config.bundle.encoder == BundleEncoderChoice.finetuned:
        return None  # always this run's model, copied
    try:
        winner = read_json(config.run_dir / "report" / WINNER_DIR / "winner.json")
        moved = Path(winner["encoder"]) != Path(finetuned_model(config)) and _own_finetuned(config, winner)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no report yet (or an unreadable one): the stage itself says what is missing
    return {"winner_encoder": "this run's finetune/model, moved"} if moved else None


def _report_page(config: PipelineConfig) -> Path | None:
    if not config.bundle.report_page:
        return None
    page = config.run_dir / "report" / PAGE
    if not page.is_file():
        raise DataError(
            f"bundle.report_page is on, but {page} is missing (a report made before the page existed)",
            fix="re-run `jobembed report RUN --force`, or bundle without --report-page",
        )
    return page


@friendly
def bundle_command(
    ctx: typer.Context,
    run_dir: RunArg,
    bundle__copy_encoder: Annotated[
        bool | None,
        typer.Option("--copy-encoder/--no-copy-encoder", help="Copy the encoder into the bundle (self-contained)."),
    ] = None,
    bundle__backend: Annotated[
        EmbedBackend | None,
        typer.Option(
            "--backend", help="onnx-int8: also store the encoder as int8 ONNX + tokenizer (a server without PyTorch)."
        ),
    ] = None,
    bundle__report_page: Annotated[
        bool | None,
        typer.Option("--report-page/--no-report-page", help="Put the report's page in the bundle (serve --report)."),
    ] = None,
    bundle__encoder: Annotated[
        BundleEncoderChoice | None,
        typer.Option(
            "--encoder",
            help="frozen: the best servable system of the CV ranking; finetuned: that kind of system on the "
            "fine-tuned encoder (scored on the test split only).",
        ),
    ] = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Package the report's best servable system as RUN/bundle, for classify and serve.

    The system is the best-ranked of the MLP, hier or e2e head, the fusion, stack or topdown head, or cosine prototypes
    (centroid, zero-shot); TF-IDF + LR and LR alone are never bundled. The bundle holds the head (safetensors), the
    labels, the encoder reference with its fingerprint, the abstention rule's out-of-fold answers and a hash of every
    file; with --report-page also the report's page (report.html, no ad text) for serve --report; with --backend
    onnx-int8 also the encoder as its int8 ONNX export and tokenizer (encoder-onnx/), which jobembed-serve --backend
    onnx-int8 runs without PyTorch. With --encoder finetuned, the same kind of system on the run's fine-tuned encoder,
    which is copied into the bundle."""
    from jobembed.bundle import read_bundle_meta

    run = stage_command("bundle", dict(locals()))
    meta = read_bundle_meta(run / "bundle")
    console.print(f"[green]bundle[/] {run / 'bundle'}: {meta.system} on {meta.encoder.source_ref}")


register(
    Stage(
        "bundle",
        section="bundle",
        reads=("classify", "clean", "embed", "text_column", "finetune.enabled"),
        ignores=("embed.extra_models",),
        inputs=("prepare", "report", "finetune"),
        consumes=_bundle_consume,
        run=_run_bundle,
        identity=_identity,
        names_models=names_models,
        help="the report's best servable system as a deployable bundle",
        track=lambda config, folder: Tracked(model=folder, artifacts={"bundle_json": folder / "bundle.json"}),
        version=2,  # 2: jobembed-bundle/3, bundle.json covered by its own digest
        command=bundle_command,
    )
)
