"""clean: rewrite each ad as occupation, skills and tasks (gliner2) or strip its noise (rules) (``clean/``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from jobembed import data
from jobembed.artifacts import read_json
from jobembed.clean.core import Cleaner, clean_splits
from jobembed.clean.gliner import WINDOWS_VERSION
from jobembed.cli.base import (
    BackendOpt,
    ConfigOpt,
    DeviceOpt,
    ExtractorOpt,
    ForceOpt,
    LanguageOpt,
    PrecisionOpt,
    QuietOpt,
    RunArg,
    ThresholdOpt,
    console,
    friendly,
    stage_command,
)
from jobembed.config import TextColumn, register_check, register_section, write_resolved
from jobembed.engine import Stage, StageContext, register, register_pin
from jobembed.sections import CleanBackend, CleanConfig, CleanFallback
from jobembed.stages._common import canon

if TYPE_CHECKING:
    from jobembed.config import PipelineConfig


register_section("clean", CleanConfig)


def _clean_identity(config: PipelineConfig) -> dict[str, object]:
    """The cleaner's backend, pattern files and (gliner2) model fingerprint, schema and windowing version.

    The windowing version is here rather than in the stage's code version so that only gliner2 runs re-clean
    when windows change (rules runs, and everything downstream of them, keep their keys).
    """
    info = Cleaner(config.clean).info()
    if info["backend"] == str(CleanBackend.gliner2):
        info["windows_version"] = WINDOWS_VERSION
    return info


def _run_clean(ctx: StageContext) -> dict[str, Any]:
    config = ctx.config
    splits = data.load_splits(config.run_dir / "prepare")
    report = clean_splits(splits=splits, config=config.clean, out_dir=ctx.out, progress=ctx.progress)
    write_resolved(config.clean, ctx.out)
    return {k: report[k] for k in ("sources", "fallbacks", "empty_outputs", "mean_chars", "seconds")} | {
        "pii_rows": report["pii_check"]["rows_with_pii"]
    }


def _pin_clean(config: PipelineConfig) -> PipelineConfig:
    if config.clean.backend != CleanBackend.gliner2:
        return config
    return config.model_copy(update={"clean": config.clean.model_copy(update={"model": canon(config.clean.model)})})


def _text_has_a_source(config: PipelineConfig) -> None:
    """text_column clean_text needs a cleaner; with none asked for, the stages read the raw text."""
    if config.text_column == TextColumn.clean_text and config.clean.backend == CleanBackend.none:
        if "text_column" not in config.model_fields_set:
            config.text_column = TextColumn.text  # no cleaning asked for: the raw text, as the user expects
            return
        raise ValueError("text_column clean_text needs a cleaning backend (clean.backend rules or gliner2), not none")


register_check(_text_has_a_source)
register_pin(_pin_clean)


@friendly
def clean_command(
    ctx: typer.Context,
    run_dir: RunArg,
    clean__backend: BackendOpt = None,
    clean__language: LanguageOpt = None,
    clean__model: ExtractorOpt = None,
    clean__threshold: ThresholdOpt = None,
    clean__fallback: Annotated[
        CleanFallback | None, typer.Option("--fallback", help="When nothing is extracted: rules, raw or empty.")
    ] = None,
    clean__window_tokens: Annotated[
        int | None, typer.Option("--window-tokens", min=32, help="Extractor tokens per window.")
    ] = None,
    clean__batch_size: Annotated[
        int | None, typer.Option("--batch-size", min=1, help="Windows per GLiNER2 batch.")
    ] = None,
    clean__device: DeviceOpt = None,
    clean__precision: PrecisionOpt = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Clean every split of RUN into RUN/clean/ (prepare's files are not touched), with a cleaning report.

    Later stages read the cleaned text when the run's text_column is clean_text (--text-column clean_text).
    """

    run = stage_command("clean", dict(locals()))
    r = read_json(run / "clean" / "report.json")
    console.print(
        f"[green]cleaned[/] ({r['cleaner']['backend']}): {sum(r['rows'].values())} ads, "
        f"{r['mean_chars']['before']:.0f} → {r['mean_chars']['after']:.0f} characters on average; "
        f"sources {r['sources']}; personal data left in {r['pii_check']['rows_with_pii']} "
        f"→ {run / 'clean' / 'report.md'}"
    )


register(
    Stage(
        "clean",
        section="clean",
        inputs=("prepare",),
        run=_run_clean,
        identity=_clean_identity,
        products=("*.parquet",),
        names_models=lambda config: config.clean.backend == CleanBackend.gliner2,
        help="rewrite each ad as occupation, skills and tasks (gliner2), or strip its noise (rules)",
        command=clean_command,
        command_name="clean run",
    )
)
