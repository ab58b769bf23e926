"""The ``jobembed`` command line: parse flags, load the config, run the stage graph, print with rich.

Every command is thin: the work happens in the stages (``jobembed.pipeline``) and the bundle
(``jobembed.bundle``), which tests and experiments call directly.

One vocabulary for every command:

- ``RUN`` (an argument): the run folder, ``runs/<name>``; stage commands run their stage and whatever it
  needs that is out of date, and skip what is current (``--force`` re-runs the stage itself).
- ``--config/-c FILE``: a pipeline YAML; default the run's own ``config.yaml``. Flags override it.
- ``--input/-i FILE``: a table to read (CSV, JSONL, Parquet); ``--out/-o FILE``: a file to write.
- ``--text-col``: the column holding the ad text in the table the command reads (prepare, classify);
  ``--text-column``: which of the run's texts the stages after clean read (``text`` or ``clean_text``).
- ``--model``: the encoder whose vectors the command makes or reads (``embed.model``; in ``clean`` the GLiNER2
  model it runs); ``--base-model``: the model a training command starts from (finetune, clean train).
- ``--encoder``: which encoder a bundle serves (frozen or finetuned); ``--workers``: server processes;
  ``--dataloader-workers``: data-loading processes of a fine-tune; ``--batch-size``: items per batch of the
  command's own model (texts, windows or triplets, as its help says).
- Commands and folders share the stage's name (``head`` writes ``head/``); the names used until 2026-12-03
  (``train-head``, ``make-triplets``, ``compare-report``) still work, and runs made under them stay current.
- Options whose Python name holds ``__`` set the config field of that dotted path (``embed__model`` ->
  ``embed.model``, ``pipeline__text_column`` -> ``text_column``), so no command builds an overrides dict by
  hand, and an invalid value is reported against the flag the user typed.

A ``JobembedError`` and every usage error (an unknown option, a value out of range) becomes one red line on
stderr and exit code 1; Ctrl-C keeps finished stages and the caches and exits 130.
"""

from __future__ import annotations

import functools
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from jobembed import __version__, ui
from jobembed.config import (
    BundleEncoderChoice,
    ChunkingMode,
    ClassWeight,
    CleanBackend,
    CleanFallback,
    CleanLanguage,
    ConflictPolicy,
    FinetuneLoss,
    JudgeKind,
    JudgeMode,
    NoiseFilter,
    PositiveStrategy,
    Precision,
    RarePolicy,
    ServeBackend,
    SystemName,
    TextColumn,
)
from jobembed.errors import JobembedError

console = Console()
err_console = Console(stderr=True)


class _OneLineErrors(TyperGroup):
    """Usage errors as one red line and exit 1, like every other error, instead of a usage box and exit 2."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except typer.TyperException as e:  # typer's (vendored) click usage errors
            ctx = getattr(e, "ctx", None)
            where = ctx.command_path if ctx is not None else "jobembed"
            message = " ".join(e.format_message().replace("Value error, ", "").split()).rstrip(".")
            err_console.print(
                f"[bold red]error:[/] {message}. Fix: see `{where} --help`", highlight=False, soft_wrap=True
            )
            if not standalone_mode:
                raise
            sys.exit(1)
        except typer.Abort:
            err_console.print("[yellow]aborted[/]")
            sys.exit(130)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    name="jobembed",
    cls=_OneLineErrors,
    help="Job-vacancy texts to job categories: frozen vs fine-tuned encoders, ANN heads, honest reports.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the error family into one red line + exit 1; Ctrl-C into exit 130 with a reassuring line."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ui.set_progress(not kwargs.get("quiet", False))
        try:
            return fn(*args, **kwargs)
        except JobembedError as e:
            err_console.print(f"[bold red]error:[/] {' '.join(str(e).split())}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print(
                "[yellow]interrupted[/]: finished stages and cached results are kept; "
                "re-run the same command to resume."
            )
            raise typer.Exit(130) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        console.print(f"jobembed {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show version.")] = False,
) -> None:
    """jobembed: turn noisy job-vacancy texts into reliable job-category predictions."""


# ------------------------------------------------------------------------------------------ option helpers


def _device(value: str) -> str:
    """auto | cpu | cuda | cuda:N | mps, checked before any work starts."""
    text = str(value).strip().lower()
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", text):
        raise typer.BadParameter(f"{value!r} is not one of auto, cpu, cuda, cuda:N, mps")
    return text


def _probability(value: float | None) -> float | None:
    """A share in [0, 1]: NaN is named as not a number (the range check alone said 'should be ≤ 1')."""
    if value is None:
        return None
    if math.isnan(value):
        raise typer.BadParameter("nan is not a number; give a value from 0 to 1, e.g. 0.9")
    if not 0 <= value <= 1:
        raise typer.BadParameter(f"{value} is outside 0 to 1")
    return value


def _int_list(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        sizes = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a comma-separated list of integers, e.g. 512,256") from None
    if any(s < 1 for s in sizes):
        raise typer.BadParameter(f"{value!r}: every size must be a positive integer")
    return sizes


def _systems(value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [s.strip() for s in value.split(",") if s.strip()]
    allowed = [s.value for s in SystemName]
    bad = [s for s in names if s not in allowed]
    if not names or bad:
        found = repr(bad[0]) if bad else "nothing"
        raise typer.BadParameter(f"{found} is not a system; give a comma list of {', '.join(allowed)}")
    return names


def _pairs(values: list[str] | None, flag: str, example: str = "skill=kompetence") -> dict[str, str]:
    """Repeatable ``KEY=VALUE`` options -> ``{KEY: VALUE}``; one line naming the flag for anything else.

    Parsed here, not in a Typer callback: Typer turns a callback's dict back into a list (its keys) for a
    list option, which silently broke ``--labels-filter``.
    """
    out = {}
    for item in values or []:
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise JobembedError(f"{flag} {item!r} is not KEY=VALUE", fix=f"write e.g. {flag} {example}")
        out[key.strip()] = val.strip()
    return out


# Options whose repeated KEY=VALUE items fill a dict field of the config.
_PAIR_OPTIONS = {"prepare__labels__filter": "level=isco_submajor"}


def _overrides(params: dict[str, Any], ctx: typer.Context) -> tuple[dict[str, Any], dict[str, str]]:
    """Config overrides from the command's ``a__b`` parameters, and dotted field -> flag for error messages."""
    opts = {p.name: p.opts[0] for p in ctx.command.params if p.name and "__" in p.name}
    overrides = {}
    for name, value in params.items():
        if "__" not in name or value is None or value == []:
            continue
        if name in _PAIR_OPTIONS:
            value = _pairs(value, opts[name], _PAIR_OPTIONS[name])
        elif isinstance(value, Path):
            value = str(value)
        elif hasattr(value, "value") and isinstance(value.value, str):  # an Enum member
            value = value.value
        overrides[_dotted(name)] = value
    return overrides, {_dotted(name): flag for name, flag in opts.items()}


def _dotted(name: str) -> str:
    """``embed__model`` -> ``embed.model``; ``pipeline__text_column`` -> ``text_column`` (a top-level field)."""
    return name.replace("__", ".").removeprefix("pipeline.")


RunArg = Annotated[Path, typer.Argument(help="Run folder, e.g. runs/demo.", metavar="RUN")]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="Pipeline YAML (see configs/), layered on the run's config.yaml: its fields win, flags win over both.",
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Re-run this stage even when it is up to date.")]
ModelOpt = Annotated[
    str | None, typer.Option("--model", help="Encoder: hub id (optionally id@revision), local folder or builtin:NAME.")
]
ExtraModelOpt = Annotated[
    list[str] | None,
    typer.Option("--extra-model", help="Another encoder to embed and compare on the same splits (repeatable)."),
]
TextColOpt = Annotated[
    TextColumn | None,
    typer.Option(
        "--text-column", help="Which ad text the stages after clean read: text (raw) or clean_text (cleaned)."
    ),
]
DeviceOpt = Annotated[
    str | None, typer.Option("--device", parser=_device, metavar="[auto|cpu|cuda|cuda:N|mps]", help="Where to run.")
]
MaxLenOpt = Annotated[int | None, typer.Option("--max-seq-length", min=8, help="Truncate texts to this many tokens.")]
BatchOpt = Annotated[int | None, typer.Option("--batch-size", min=1, help="Texts per encoding batch.")]
PrecisionOpt = Annotated[Precision | None, typer.Option("--precision", help="Encoder precision (auto: fp16 on CUDA).")]
ChunkingOpt = Annotated[
    ChunkingMode | None,
    typer.Option("--chunking", help="none: cut ads at --max-seq-length; mean: average windows over the whole ad."),
]
ChunkStrideOpt = Annotated[
    int | None, typer.Option("--chunk-stride", min=8, help="Tokens between window starts (with --chunking mean).")
]


def _stage_command(stage: str, params: dict[str, Any]) -> Path:
    """Load the run's config with the flags on top and run ``stage`` (and whatever it needs that is stale)."""
    from jobembed import pipeline

    overrides, flags = _overrides(params, params["ctx"])
    cfg = pipeline.config_for_run(params["run_dir"], params["config"], overrides, flags=flags)
    pipeline.run_stages(cfg, target=stage, force=params["force"], progress=not params["quiet"], on_stage=_print_stage)
    _other_ranks_stop()
    return cfg.run_dir


def _other_ranks_stop() -> None:
    """Under torchrun / accelerate launch only rank 0 reports (the others ran the fine-tune alone)."""
    from jobembed import distributed

    if not distributed.is_main():
        raise typer.Exit(0)


def _print_stage(stage: str, what: str, reason: str) -> None:
    """One progress line per stage: why it runs, that it is current, or why it is off."""
    if what == "skip":
        console.print(f"[cyan]{stage}[/]: up to date, skipped (--force to re-run)")
    elif what == "off":
        console.print(f"[cyan]{stage}[/]: off ({reason})")
    else:
        console.print(f"[cyan]{stage}[/]: running ({reason})")


# ------------------------------------------------------------------------------------------ stage commands


@app.command()
@_friendly
def prepare(
    ctx: typer.Context,
    run_dir: RunArg,
    prepare__input: Annotated[
        Path | None, typer.Option("--input", "-i", help="Vacancies as CSV, JSONL or Parquet.")
    ] = None,
    prepare__text_col: Annotated[str | None, typer.Option("--text-col", help="Column with the ad text.")] = None,
    prepare__label_col: Annotated[str | None, typer.Option("--label-col", help="Column with the category.")] = None,
    prepare__id_col: Annotated[
        str | None, typer.Option("--id-col", help="Column with a unique id (row numbers when unset).")
    ] = None,
    prepare__labels__path: Annotated[
        Path | None, typer.Option("--labels", help="CSV of allowed labels with names/descriptions.")
    ] = None,
    prepare__labels__code_col: Annotated[str | None, typer.Option("--labels-code-col", help="Label column.")] = None,
    prepare__labels__name_col: Annotated[str | None, typer.Option("--labels-name-col", help="Name column.")] = None,
    prepare__labels__description_col: Annotated[
        str | None, typer.Option("--labels-description-col", help="Description column in --labels.")
    ] = None,
    prepare__labels__filter: Annotated[
        list[str] | None,
        typer.Option("--labels-filter", help="Keep --labels rows where COLUMN=VALUE (repeatable)."),
    ] = None,
    prepare__min_class_count: Annotated[
        int | None, typer.Option("--min-class-count", min=1, help="Classes with fewer ads are rare.")
    ] = None,
    prepare__rare_policy: Annotated[
        RarePolicy | None, typer.Option("--rare-policy", help="Rare classes: stop, drop them, or merge into 'other'.")
    ] = None,
    prepare__conflict_policy: Annotated[
        ConflictPolicy | None, typer.Option("--conflict-policy", help="Duplicates with different labels.")
    ] = None,
    prepare__near_duplicate_threshold: Annotated[
        float | None,
        typer.Option("--near-duplicate-threshold", min=0.0, max=1.0, help="TF-IDF cosine of one repost group."),
    ] = None,
    prepare__test_size: Annotated[
        float | None, typer.Option("--test-size", min=0.0, max=1.0, help="Share of ads for the test split.")
    ] = None,
    prepare__val_size: Annotated[
        float | None, typer.Option("--val-size", min=0.0, max=1.0, help="Share of ads for the validation split.")
    ] = None,
    prepare__max_rows: Annotated[
        int | None, typer.Option("--max-rows", min=10, help="Stratified subsample of this many ads.")
    ] = None,
    prepare__seed: Annotated[int | None, typer.Option("--seed", help="Random seed for sampling and splits.")] = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Read vacancies, validate, remove duplicates, group reposts, and write stratified train/val/test splits."""
    from jobembed import data
    from jobembed.artifacts import read_json

    run = _stage_command("prepare", dict(locals()))
    console.print(data.data_card_table(read_json(run / "prepare" / "data_card.json")))
    console.print(f"[green]prepared[/] {run / 'prepare'}")


@app.command()
@_friendly
def embed(
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
    config: ConfigOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Encode every split and the category texts with each encoder (cached: re-runs and shared texts are free)."""
    from jobembed.artifacts import read_json

    run = _stage_command("embed", dict(locals()))
    for meta_path in sorted((run / "embed").glob("*/embeddings.json")):
        meta = read_json(meta_path)
        rows = ", ".join(f"{k} {v['rows']}" for k, v in meta["splits"].items())
        console.print(f"[green]{meta['model']}[/] ({meta['fingerprint']}): {rows} → {meta_path.parent}")


@app.command("head")
@_friendly
def head(
    ctx: typer.Context,
    run_dir: RunArg,
    embed__model: ModelOpt = None,
    head__hidden_sizes: Annotated[
        str | None, typer.Option("--hidden-sizes", callback=_int_list, help="Comma-separated sizes, e.g. 512,256.")
    ] = None,
    head__dropout: Annotated[
        float | None, typer.Option("--dropout", min=0.0, max=0.99, help="Dropout after each hidden layer.")
    ] = None,
    head__weight_decay: Annotated[float | None, typer.Option("--weight-decay", min=0.0, help="AdamW decay.")] = None,
    head__learning_rate: Annotated[float | None, typer.Option("--learning-rate", help="AdamW learning rate.")] = None,
    head__class_weight: Annotated[
        ClassWeight | None, typer.Option("--class-weight", help="Loss weights per class.")
    ] = None,
    head__max_epochs: Annotated[int | None, typer.Option("--max-epochs", min=1, help="Upper bound on epochs.")] = None,
    head__patience: Annotated[
        int | None, typer.Option("--patience", min=1, help="Early-stopping patience on validation macro-F1.")
    ] = None,
    head__calibrate: Annotated[
        bool | None, typer.Option("--calibrate/--no-calibrate", help="Temperature-calibrate on validation.")
    ] = None,
    head__device: DeviceOpt = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train the MLP head on the run's embeddings; print validation metrics; save a bundle in RUN/head.

    The test split is not read: report scores it, once.
    """
    from jobembed.bundle import read_bundle_meta

    run = _stage_command("head", dict(locals()))
    m = read_bundle_meta(run / "head").metrics
    val = m.get("val", {})
    if "accuracy" in val:
        console.print(
            f"validation accuracy {val['accuracy']:.3f}, macro-F1 {val['macro_f1']:.3f} "
            f"(best epoch {m['best_epoch']}, temperature {m['temperature']:.2f})"
        )
    console.print(f"[green]bundle[/] {run / 'head'}")


@app.command("report")
@_friendly
def report(
    ctx: typer.Context,
    run_dir: RunArg,
    embed__model: ModelOpt = None,
    embed__extra_models: ExtraModelOpt = None,
    report__systems: Annotated[
        str | None,
        typer.Option("--systems", callback=_systems, help=f"Comma list of {','.join(s.value for s in SystemName)}."),
    ] = None,
    report__cv_folds: Annotated[int | None, typer.Option("--cv-folds", min=2, help="Cross-validation folds.")] = None,
    pipeline__text_column: TextColOpt = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Compare every system in report.systems on every encoder (embed.model and embed.extra_models), on the same
    repost-grouped splits and CV folds. Default systems: zero-shot cosine, centroid cosine, TF-IDF + LR, LR on
    embeddings, the MLP head and fusion (MLP + TF-IDF, late fusion); stack (stacked TF-IDF features) and hier (a
    head trained on both ISCO levels) on request. Systems are ranked by CV macro-F1 over train + val, each scored
    once on the test split with group-bootstrap intervals, corrected t-tests and McNemar against the winner, and an
    abstention threshold chosen on the CV's out-of-fold answers. When finetune is on, the fine-tuned encoder's
    systems get their own test-split section (never ranked: the CV pool holds ads it was trained on).

    Writes RUN/report/ (report.md, metrics.json, per-class CSVs, figures, winner/ and, with a fine-tune,
    winner-finetuned/: the head a bundle serves).
    """
    from jobembed.artifacts import read_json

    run = _stage_command("report", dict(locals()))
    metrics = read_json(run / "report" / "metrics.json")
    console.print(summary_table(metrics))
    for line in finetuned_lines(metrics) + selective_lines(metrics):
        console.print(line)
    console.print(f"[green]report[/] {run / 'report' / 'report.md'}")


@app.command()
@_friendly
def bundle(
    ctx: typer.Context,
    run_dir: RunArg,
    bundle__copy_encoder: Annotated[
        bool | None,
        typer.Option("--copy-encoder/--no-copy-encoder", help="Copy the encoder into the bundle (self-contained)."),
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
    """Package the report's best servable system as RUN/bundle: the best-ranked of the MLP or hier head, the fusion
    or stack hybrid head, or cosine prototypes (centroid, zero-shot); TF-IDF + LR and LR alone are never bundled.
    The bundle holds the head (safetensors), the labels, the encoder reference with its fingerprint, the abstention
    rule's out-of-fold answers and a hash of every file. With --encoder finetuned, the same kind of system on the
    run's fine-tuned encoder, which is copied into the bundle."""
    from jobembed.bundle import read_bundle_meta

    run = _stage_command("bundle", dict(locals()))
    meta = read_bundle_meta(run / "bundle")
    console.print(f"[green]bundle[/] {run / 'bundle'}: {meta.system} on {meta.encoder.source_ref}")


@app.command("triplets")
@_friendly
def triplets(
    ctx: typer.Context,
    run_dir: RunArg,
    triplets__judge: Annotated[
        JudgeKind | None, typer.Option("--judge", help="llm (an endpoint), model (offline, cleanlab) or none.")
    ] = None,
    triplets__llm__mode: Annotated[
        JudgeMode | None, typer.Option("--mode", help="llm: one call per triplet, or per anchor with k candidates.")
    ] = None,
    triplets__llm__base_url: Annotated[
        str | None, typer.Option("--base-url", help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1.")
    ] = None,
    triplets__llm__model: Annotated[
        str | None, typer.Option("--llm-model", help="The judge model's name at the endpoint.")
    ] = None,
    triplets__positive: Annotated[
        PositiveStrategy | None, typer.Option("--positive", help="Same-class ad (nearest/random/farthest) or label.")
    ] = None,
    triplets__max_anchors_per_class: Annotated[
        int | None, typer.Option("--max-anchors-per-class", min=1, help="Cap of anchors per class.")
    ] = None,
    triplets__min_anchors_per_class: Annotated[
        int | None, typer.Option("--min-anchors-per-class", min=1, help="Floor of anchors per class.")
    ] = None,
    triplets__negatives_per_anchor: Annotated[
        int | None, typer.Option("--negatives", min=1, help="Negatives per anchor.")
    ] = None,
    triplets__confused_classes: Annotated[
        int | None, typer.Option("--confused-classes", min=0, help="Negatives from this many most-confused classes.")
    ] = None,
    triplets__relative_margin: Annotated[
        float | None,
        typer.Option(
            "--margin", min=0.01, max=1.0, help="Negatives score below this x the anchor's nearest same-class ad's."
        ),
    ] = None,
    triplets__noise_filter: Annotated[
        NoiseFilter | None, typer.Option("--noise-filter", help="model judge: cleanlab's filter_by method.")
    ] = None,
    triplets__llm__concurrency: Annotated[
        int | None, typer.Option("--concurrency", min=1, help="Calls in flight.")
    ] = None,
    triplets__llm__requests_per_minute: Annotated[
        int | None, typer.Option("--rpm", min=1, help="Requests per minute limit.")
    ] = None,
    triplets__llm__tokens_per_minute: Annotated[
        int | None, typer.Option("--tpm", min=100, help="Tokens per minute limit.")
    ] = None,
    triplets__llm__max_cost: Annotated[
        float | None, typer.Option("--max-cost", min=0.0, help="Stop (resumable) before spending this many USD.")
    ] = None,
    triplets__llm__allow_raw_text: Annotated[
        bool | None,
        typer.Option(
            "--send-raw-text/--no-send-raw-text", help="Allow raw ads (personal data) to an endpoint off this machine."
        ),
    ] = None,
    embed__model: ModelOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print calls, tokens and cost the llm judge needs; send nothing.")
    ] = False,
    batch_file: Annotated[
        Path | None, typer.Option("--batch-file", help="Write the llm calls as an OpenAI Batch API JSONL and stop.")
    ] = None,
    import_batch: Annotated[
        Path | None, typer.Option("--import-batch", help="Read a Batch API output JSONL into the call cache first.")
    ] = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Mine anchor/positive/negative triplets in the training split (a small validation set in val; the test split
    is never read) and judge them: an LLM at any OpenAI-compatible endpoint (key from OPENAI_API_KEY only), an
    offline model (cleanlab, the default) or none. Writes RUN/triplets/: train.parquet, val.parquet, candidates/,
    noise.csv (probably mislabelled ads), report.md."""
    from jobembed import pipeline
    from jobembed.artifacts import read_json
    from jobembed.config import default_cache_dir
    from jobembed.store import open_store
    from jobembed.triplets import client, core

    overrides, flags = _overrides(dict(locals()), ctx)
    cfg = pipeline.config_for_run(run_dir, config, overrides, flags=flags)
    store = open_store(cfg.embed.cache_dir or default_cache_dir())
    if import_batch is not None:
        counts = client.import_batch(import_batch, store=store)
        console.print(
            f"[green]imported[/] {counts['imported']} answers ({counts['errors']} errored lines) from {import_batch}"
        )
    if dry_run or batch_file is not None:
        if cfg.triplets.judge != JudgeKind.llm:
            raise JobembedError("--dry-run and --batch-file are for the llm judge", fix="add --judge llm")
        pipeline.run_stages(cfg, target="embed", progress=not quiet, on_stage=_print_stage)
        inputs = pipeline.triplet_inputs(pipeline.pin_models(cfg))
        core.check_privacy(cfg.triplets, inputs.judge_reads)
        candidates, _ = core.mine(inputs, cfg.triplets)
        job = core.llm_job(inputs, candidates, cfg.triplets)
        if batch_file is not None:
            n = client.write_batch(job.calls, batch_file, store=store)
            console.print(
                f"[green]wrote[/] {n} requests to {batch_file} ({len(job.calls) - n} already answered). Upload it to "
                f"the Batch API, then: jobembed triplets {run_dir} --import-batch OUTPUT.jsonl"
            )
            return
        est = client.plan(
            job.calls,
            config=cfg.triplets.llm,
            store=store,
            expected_completion_tokens=core.EXPECTED_COMPLETION_TOKENS[JudgeMode(cfg.triplets.llm.mode)],
        )
        console.print(
            f"dry run ({cfg.triplets.llm.model}, {cfg.triplets.llm.mode}): {len(candidates)} candidate triplets, "
            f"{est['calls']} calls, {est['cached']} cached, {est['to_send']} to send; "
            f"~{est['prompt_tokens_est']:,} prompt + ~{est['completion_tokens_est']:,} completion tokens; "
            f"~${est['cost_est']:.2f} (Batch API ~${est['batch_cost_est']:.2f}). Nothing was sent."
        )
        return
    pipeline.run_stages(cfg, target="triplets", force=force, progress=not quiet, on_stage=_print_stage)
    console.print(triplets_line(read_json(cfg.run_dir / "triplets" / "report.json"), cfg.run_dir / "triplets"))


@app.command()
@_friendly
def finetune(
    ctx: typer.Context,
    run_dir: RunArg,
    finetune__model: Annotated[
        str | None,
        typer.Option("--base-model", help="Encoder to fine-tune [default: embed.model, the frozen one]."),
    ] = None,
    finetune__triplets: Annotated[
        Path | None, typer.Option("--triplets", help="A Parquet with anchor, positive, negative [default: the run's].")
    ] = None,
    finetune__loss: Annotated[FinetuneLoss | None, typer.Option("--loss", help="Training loss.")] = None,
    finetune__class_aware: Annotated[
        bool | None, typer.Option("--class-aware/--no-class-aware", help="mnrl: no same-class in-batch negatives.")
    ] = None,
    finetune__epochs: Annotated[float | None, typer.Option("--epochs", min=0.01, help="Training epochs.")] = None,
    finetune__batch_size: Annotated[
        int | None, typer.Option("--batch-size", min=2, help="Triplets per training step.")
    ] = None,
    finetune__learning_rate: Annotated[
        float | None, typer.Option("--learning-rate", help="AdamW learning rate.")
    ] = None,
    finetune__max_seq_length: MaxLenOpt = None,
    finetune__max_triplets: Annotated[
        int | None, typer.Option("--max-triplets", min=2, help="Train on at most this many triplets.")
    ] = None,
    finetune__matryoshka_dims: Annotated[
        str | None, typer.Option("--matryoshka-dims", callback=_int_list, help="e.g. 384,256,128.")
    ] = None,
    finetune__gradient_checkpointing: Annotated[
        bool | None, typer.Option("--gradient-checkpointing/--no-gradient-checkpointing", help="Save GPU memory.")
    ] = None,
    finetune__precision: PrecisionOpt = None,
    finetune__device: DeviceOpt = None,
    finetune__pretokenize: Annotated[
        bool | None, typer.Option("--pretokenize/--no-pretokenize", help="Tokenise every text once, up front.")
    ] = None,
    finetune__group_by_length: Annotated[
        bool | None,
        typer.Option("--group-by-length/--no-group-by-length", help="Batches of similar-length triplets."),
    ] = None,
    finetune__compile: Annotated[
        bool | None, typer.Option("--compile/--no-compile", help="torch.compile the model (long GPU runs).")
    ] = None,
    finetune__dataloader_workers: Annotated[
        int | None, typer.Option("--dataloader-workers", min=0, help="Data loader worker processes.")
    ] = None,
    finetune__seed: Annotated[int | None, typer.Option("--seed", help="Training seed.")] = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fine-tune the encoder on the run's kept triplets with SentenceTransformerTrainer (MNRL with the hard negative,
    same-class in-batch negatives masked, by default). Keeps the checkpoint with the best validation centroid-cosine
    macro-F1; after an interruption it resumes from the newest complete checkpoint made under the same settings
    (RUN/finetune/checkpoints/<stage key>/). Writes RUN/finetune/ (model/ with its model card, finetune.json,
    ads_seen.json, log.jsonl) in one swap; the embed-finetuned stage then writes RUN/embed-finetuned/ (the
    fine-tuned vectors report reads). Turns finetune on for the run (finetune.enabled, kept in its
    config.yaml)."""
    from jobembed.artifacts import read_json

    params = dict(locals())
    params["finetune__enabled"] = True  # asking for the stage turns it on for this run (kept in its config.yaml)
    run = _stage_command("finetune", params)
    info = read_json(run / "finetune" / "finetune.json")
    val = info["val"]
    score = val.get("eval_val-centroid_macro_f1")
    console.print(
        f"[green]fine-tuned[/] {info['base_model']} on {info['triplets']['rows']} triplets "
        f"({info['triplets']['judge']}), {info['loss']}, {info['steps']} steps in {info['seconds']} s"
        + (f"; validation centroid macro-F1 {score:.3f}" if score is not None else "")
        + f" → {run / 'finetune' / 'model'}"
    )


# The names these commands had until 2026-12-03 (their stages were renamed; runs made under them stay current).
FORMER_COMMANDS = {"train-head": head, "make-triplets": triplets, "compare-report": report}
for _old_name, _command in FORMER_COMMANDS.items():
    app.command(_old_name, hidden=True, help=f"Old name of `jobembed {_command.__name__}` (same flags).")(_command)
del _old_name, _command


def triplets_line(r: dict[str, Any], folder: Path) -> str:
    """One plain line on what triplets did, which judge and what it cost."""
    train = r["splits"]["train"]
    judge = r["judge"]
    if r["judge_kind"] == "model":
        judge += " (offline: cleanlab on out-of-fold probabilities of the frozen encoder and TF-IDF; no LLM called)"
    line = (
        f"[green]triplets[/] judged by {judge}: kept {train['kept']} of {train['candidates']} training and "
        f"{r['splits']['val']['kept']} validation triplets; {r['noise']['ads']} ads flagged as probably mislabelled"
    )
    if "llm" in r:
        c = r["llm"]
        line += f"; {c['answered']} calls now, {c['cached']} cached, ${c['cost']:.4f}"
        if c.get("note"):
            line += f" [yellow]({c['note']})[/]"
    return f"{line} → {folder / 'report.md'}"


clean_app = typer.Typer(
    cls=_OneLineErrors,
    help="Cleaning: rewrite ads as occupation, skills and tasks (gliner2) or strip their noise (rules).",
    no_args_is_help=True,
)
app.add_typer(clean_app, name="clean")

BackendOpt = Annotated[CleanBackend | None, typer.Option("--backend", help="gliner2, rules or none.")]
LanguageOpt = Annotated[
    CleanLanguage | None, typer.Option("--language", help="Schema, template and rules preset of this language.")
]
ExtractorOpt = Annotated[
    str | None, typer.Option("--model", help="GLiNER2 model: Hub id (id@revision) or a folder from `clean train`.")
]
ThresholdOpt = Annotated[
    float | None, typer.Option("--threshold", min=0.01, max=0.99, help="Span score threshold (gliner2).")
]
LabelMapOpt = Annotated[
    list[str] | None,
    typer.Option("--label-map", help="GOLD_LABEL=ENTITY_TYPE, e.g. skill=kompetence (repeatable)."),
]


@clean_app.command("run")
@_friendly
def clean_run(
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

    Later stages read the cleaned text when the run's text_column is clean_text (--text-col clean_text).
    """
    from jobembed.artifacts import read_json

    run = _stage_command("clean", dict(locals()))
    r = read_json(run / "clean" / "report.json")
    console.print(
        f"[green]cleaned[/] ({r['cleaner']['backend']}): {sum(r['rows'].values())} ads, "
        f"{r['mean_chars']['before']:.0f} → {r['mean_chars']['after']:.0f} characters on average; "
        f"sources {r['sources']}; personal data left in {r['pii_check']['rows_with_pii']} "
        f"→ {run / 'clean' / 'report.md'}"
    )


@clean_app.command("eval")
@_friendly
def clean_eval(
    ctx: typer.Context,
    gold: Annotated[Path, typer.Option("--gold", help="JSONL of {id, text, spans: [{start, end, label, text}]}.")],
    clean__backend: BackendOpt = None,
    clean__language: LanguageOpt = None,
    clean__model: ExtractorOpt = None,
    clean__threshold: ThresholdOpt = None,
    clean__device: DeviceOpt = None,
    label_map: LabelMapOpt = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the result as JSON here.")] = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Score a cleaner on gold spans: span precision/recall/F1 per type, exact and overlap (gliner2), or
    how much gold span text survives (rules)."""
    from jobembed.artifacts import write_json
    from jobembed.clean.eval import eval_markdown, evaluate_cleaner
    from jobembed.config import load_config

    overrides, flags = _overrides(dict(locals()), ctx)
    cfg = load_config(config, overrides, flags=flags)
    if out is not None:
        _check_writable(out)
    mapping = _pairs(label_map, "--label-map")
    result = evaluate_cleaner(gold_path=gold, config=cfg.clean, label_map=mapping, progress=not quiet)
    console.print(eval_markdown(result), markup=False, highlight=False)
    if out is not None:
        write_json(out, result)
        console.print(f"[green]wrote[/] {out}")


@clean_app.command("train")
@_friendly
def clean_train(
    ctx: typer.Context,
    gold: Annotated[Path, typer.Option("--gold", help="Training JSONL of {id, text, spans: [...]}.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the trained GLiNER2 model.")],
    encoder: Annotated[
        str | None,
        typer.Option("--base-model", help="Build a new GLiNER2 on this encoder (builtin:NAME, folder, Hub id)."),
    ] = None,
    start_from: Annotated[
        str | None, typer.Option("--from", help="Continue training this GLiNER2 (folder or Hub id).")
    ] = None,
    clean__language: LanguageOpt = None,
    label_map: LabelMapOpt = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Passes over the training windows.")] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Windows per training step.")] = 8,
    encoder_lr: Annotated[float, typer.Option("--encoder-lr", min=0.0, help="Learning rate of the encoder.")] = 3e-5,
    task_lr: Annotated[float, typer.Option("--task-lr", min=0.0, help="Learning rate of the span heads.")] = 5e-4,
    val_fraction: Annotated[
        float, typer.Option("--val-fraction", min=0.0, max=0.5, help="Documents held out to pick the best epoch.")
    ] = 0.1,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 13,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Adapt a GLiNER2 extractor to your own gold spans (GLiNER2Trainer); use it with --model in clean run."""
    from jobembed.clean.train import train_extractor
    from jobembed.config import load_config

    overrides, flags = _overrides(dict(locals()), ctx)
    cfg = load_config(config, overrides, flags=flags)
    _check_writable(out / "jobembed-extractor.json")
    result = train_extractor(
        gold_path=gold,
        out_dir=out,
        config=cfg.clean,
        encoder=encoder,
        start_from=start_from,
        label_map=_pairs(label_map, "--label-map"),
        epochs=epochs,
        batch_size=batch_size,
        encoder_lr=encoder_lr,
        task_lr=task_lr,
        val_fraction=val_fraction,
        seed=seed,
        device=device or "auto",
    )
    scores = result.get("val_scores") or {}
    if scores:
        m = scores["overlap"]["micro"]
        console.print(f"held-out span F1 (overlap) {m['f1']:.3f}, exact {scores['exact']['micro']['f1']:.3f}")
    console.print(
        f"[green]extractor[/] {out} ({result['fingerprint']}); "
        f"use it: jobembed clean run RUN --backend gliner2 --model {out}"
    )


@app.command()
@_friendly
def run(
    config: Annotated[Path, typer.Option("--config", "-c", help="Pipeline YAML, e.g. configs/demo.yaml.")],
    name: Annotated[str | None, typer.Option("--name", help="Run name (folder under runs_dir).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Re-run every stage, even when up to date.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Run the whole pipeline from one config, skipping stages whose outputs are up to date.

    On an existing run the file is layered on the run's config.yaml (the file's fields win): a field it leaves out
    keeps the run's value. A stage that is off (finetune without finetune.enabled) neither runs nor is read, and its
    folder is left as it is."""
    from jobembed import pipeline
    from jobembed.artifacts import read_json
    from jobembed.config import load_config

    cfg = load_config(config, {"name": name}, flags={"name": "--name"})
    if (cfg.run_dir / "config.yaml").is_file():
        cfg = pipeline.config_for_run(cfg.run_dir, config, {}, flags={})
    pipeline.run_stages(cfg, force=force, progress=not quiet, on_stage=_print_stage)
    _other_ranks_stop()
    console.print(triplets_line(read_json(cfg.run_dir / "triplets" / "report.json"), cfg.run_dir / "triplets"))
    metrics = read_json(cfg.run_dir / "report" / "metrics.json")
    console.print(summary_table(metrics))
    for line in finetuned_lines(metrics) + selective_lines(metrics):
        console.print(line)
    console.print(f"[green]done[/]: report {cfg.run_dir / 'report' / 'report.md'}, bundle {cfg.run_dir / 'bundle'}")


def selective_lines(metrics: dict[str, Any]) -> list[str]:
    """The bundled system's coverage-accuracy curve in a few points, and the threshold chosen on out-of-fold
    answers."""
    key = metrics.get("bundled")
    sel = metrics["systems"][key].get("selective") if key else None
    if not sel or not sel["test_curve"]["coverage"]:
        return []
    r, curve = metrics["systems"][key], sel["test_curve"]
    points = []
    for share in (0.25, 0.5, 0.75, 1.0):
        i = min(range(len(curve["coverage"])), key=lambda j: abs(curve["coverage"][j] - share))
        points.append(f"{curve['coverage'][i]:.0%} → {curve['accuracy'][i]:.1%}")
    out = [f"coverage → accuracy of {r['display']} on test, most confident first: " + ", ".join(points)]
    if sel["threshold"] is None:
        out.append(
            f"  no confidence threshold reached {sel['target_accuracy']:.0%} accuracy on the out-of-fold answers"
        )
    else:
        out.append(
            f"  abstaining below confidence {sel['threshold']:.3f} (out-of-fold answers of the CV, for "
            f"{sel['target_accuracy']:.0%}): "
            f"{sel['test']['coverage']:.0%} of test ads answered at {sel['test']['accuracy']:.1%} accuracy; "
            f"`classify --target-accuracy {sel['target_accuracy']}` uses it "
            "(figure: report/figures/coverage_accuracy.png)"
        )
    return out


def finetuned_lines(metrics: dict[str, Any]) -> list[str]:
    """The fine-tuned encoder's systems, test split only, against the same system on the frozen encoder."""
    ft = metrics.get("finetuned")
    if not ft:
        return []
    out = [f"fine-tuned encoder ({ft['source'].get('rows')} triplets, {ft['source'].get('judge')}), test split only:"]
    for r in ft["systems"].values():
        frozen_key = next((k for k in r["mcnemar_vs"] if k != "tfidf"), None)
        frozen = metrics["systems"].get(frozen_key) if frozen_key else None
        m = r["mcnemar_vs"].get(frozen_key) if frozen_key else None
        tail = f" vs frozen {frozen['test']['macro_f1']:.3f} (McNemar p {m['p_value']:.3g})" if frozen and m else ""
        out.append(f"  {r['display']}: test macro-F1 {r['test']['macro_f1']:.3f}{tail}")
    return out


def summary_table(metrics: dict[str, Any]) -> Table:
    """The report's headline numbers as a rich table."""
    k = metrics["data"]["cv_folds"]
    table = Table(title=f"report ({k}-fold CV on train+val; test split held out)")
    for col in ("system", "CV macro-F1", "CV accuracy", "test accuracy", "test macro-F1", "test macro-F1 (≥min)"):
        if col == "system":
            table.add_column(col, overflow="fold", min_width=16)
        else:
            table.add_column(col, justify="right")
    for key in metrics["ranking"]:
        r = metrics["systems"][key]
        cv, t = r["cv"]["summary"], r["test"]
        name = r.get("display", key)
        table.add_row(
            f"[bold]{name}[/]" if key == metrics["winner"] else name,
            f"{cv['macro_f1']['mean']:.3f} ± {cv['macro_f1']['std']:.3f}",
            f"{cv['accuracy']['mean']:.3f} ± {cv['accuracy']['std']:.3f}",
            f"{t['accuracy']:.3f}",
            f"{t['macro_f1']:.3f}",
            f"{t['macro_f1_min_support']:.3f}",
        )
    return table


# ------------------------------------------------------------------------------------------ classify

_OUT_SUFFIXES = (".csv", ".jsonl", ".ndjson", ".parquet", ".pq")


@app.command()
@_friendly
def classify(
    text: Annotated[str | None, typer.Argument(help="A vacancy text (or use --input).")] = None,
    bundle: Annotated[
        Path | None, typer.Option("--bundle", help="Bundle folder (default: newest under --runs-dir).")
    ] = None,
    input: Annotated[Path | None, typer.Option("--input", "-i", help="CSV/JSONL/Parquet of texts to classify.")] = None,
    text_col: Annotated[str, typer.Option("--text-col", help="Text column in --input.")] = "text",
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write --input's predictions here (.csv, .jsonl or .parquet).")
    ] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", min=1, help="How many labels to list [bundle's: 3].")] = None,
    min_confidence: Annotated[
        float | None,
        typer.Option(
            "--min-confidence",
            callback=_probability,
            help="Below this top probability (0 to 1), answer 'uncertain' [bundle's setting]. Not with "
            "--target-accuracy.",
        ),
    ] = None,
    target_accuracy: Annotated[
        float | None,
        typer.Option(
            "--target-accuracy",
            callback=_probability,
            help="Answer only as confidently as reached this accuracy (0 to 1) on the bundled system's out-of-fold "
            "answers (the report's rule, on the answers stored in the bundle); the rest are 'uncertain'. Not with "
            "--min-confidence.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines instead of a table.")] = False,
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="Where to look for the newest bundle.")] = Path("runs"),
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Predict job categories for new texts with a saved bundle: top-k labels with probabilities."""
    from jobembed.bundle import find_latest_bundle, load_bundle

    if (text is None) == (input is None):
        raise JobembedError(
            "give exactly one of TEXT or --input", fix='jobembed classify "ad text", or --input ads.csv'
        )
    if min_confidence is not None and target_accuracy is not None:
        raise JobembedError(
            "--min-confidence and --target-accuracy both set a confidence threshold",
            fix="give one: --target-accuracy 0.9 (a threshold from the bundle's out-of-fold answers) or "
            "--min-confidence 0.4",
        )
    if target_accuracy == 0:
        raise JobembedError("--target-accuracy 0 asks for nothing", fix="give an accuracy above 0, e.g. 0.9")
    if out is not None:
        if input is None:
            raise JobembedError("--out needs --input", fix="classify a file with --input ads.csv --out predictions.csv")
        if out.is_dir():
            raise JobembedError(f"--out {out} is a folder", fix="pass a file name, e.g. --out predictions.csv")
        if out.suffix.lower() not in _OUT_SUFFIXES:
            raise JobembedError(f"--out {out}", expected="a name ending in " + ", ".join(_OUT_SUFFIXES))
        if out.parent.exists() and not out.parent.is_dir():
            raise JobembedError(f"--out {out}: {out.parent} is a file", fix="pass a path inside a folder")
        _check_writable(out)
    path = bundle or find_latest_bundle(runs_dir)
    loaded = load_bundle(path, device=device or "auto")
    cfg = loaded.classify_config(top_k=top_k, min_confidence=min_confidence, target_accuracy=target_accuracy)
    if text is not None:
        if not text.strip():
            raise JobembedError("the text is empty", fix="pass the vacancy text in quotes")
        pred = loaded.predict([text], config=cfg)[0]
        if as_json:
            sys.stdout.write(json.dumps(pred.as_dict(), ensure_ascii=False) + "\n")
            return
        caption = f"bundle {path}" + (f"; uncertain: {pred.reason}" if pred.reason else "")
        table = Table(title=f"{pred.label}  {pred.name}".strip(), caption=caption)
        for col in ("rank", "label", "name", "probability"):
            table.add_column(col)
        for i, row in enumerate(pred.top_k, 1):
            table.add_row(str(i), row["label"], row["name"], f"{row['probability']:.3f}")
        console.print(table)
        return
    _classify_file(loaded, input, text_col=text_col, out=out, cfg=cfg, as_json=as_json, progress=not quiet)


@app.command()
@_friendly
def serve(
    ctx: typer.Context,
    bundle: Annotated[
        Path | None, typer.Option("--bundle", help="Bundle folder (default: newest under --runs-dir).")
    ] = None,
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="Where to look for the newest bundle.")] = Path("runs"),
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML with a serve: section (see configs/serve.yaml).")
    ] = None,
    serve__host: Annotated[str | None, typer.Option("--host", help="Address to listen on [127.0.0.1].")] = None,
    serve__port: Annotated[int | None, typer.Option("--port", min=0, max=65535, help="Port [8000].")] = None,
    serve__workers: Annotated[
        int | None, typer.Option("--workers", min=1, help="Worker processes, each with its own model [1].")
    ] = None,
    serve__backend: Annotated[
        ServeBackend | None,
        typer.Option("--backend", help="torch, or onnx-int8: the encoder exported to int8 ONNX (faster on CPU)."),
    ] = None,
    serve__batching: Annotated[
        bool | None, typer.Option("--batching/--no-batching", help="Micro-batch concurrent requests (default: on).")
    ] = None,
    serve__batch_wait_ms: Annotated[
        float | None,
        typer.Option("--batch-wait-ms", min=0, help="Under load, wait for more requests [GPU 5, CPU 0]."),
    ] = None,
    serve__cache: Annotated[
        bool | None,
        typer.Option("--cache/--no-cache", help="Answer repeated texts from the embedding cache (default: on)."),
    ] = None,
    serve__device: DeviceOpt = None,
) -> None:
    """Serve a bundle over HTTP: POST /v1/classify, GET /v1/labels, /v1/info, /healthz, /readyz, /metrics, and a
    page at / to paste an ad. The bundle is verified first (format, the hash of every file and of bundle.json's
    answer-changing fields, encoder fingerprint); API keys come from JOBEMBED_API_KEYS (comma-separated; a list
    with no key in it refuses to start). With --cache, repeated texts are answered from a bounded in-memory cache
    of vectors (serve.cache_size texts); nothing is written to disk."""
    from jobembed.bundle import find_latest_bundle
    from jobembed.config import load_config
    from jobembed.serve import api_keys_from_env, check_bundle, run_server

    overrides, flags = _overrides(dict(locals()), ctx)
    cfg = load_config(config, overrides, flags=flags).serve
    keys = f"on ({len(api_keys_from_env())})" if api_keys_from_env() else "off"
    path = bundle or find_latest_bundle(runs_dir)
    meta = check_bundle(path, cfg).meta
    console.print(
        f"[green]serving[/] {path}: {meta.system} on {meta.encoder.source_ref}, {len(meta.classes)} categories, "
        f"{cfg.backend} backend, {cfg.workers} worker(s), API keys {keys}: http://{cfg.host}:{cfg.port}/"
    )
    run_server(path, cfg)


def _check_writable(out: Path) -> None:
    """Fail before any text is encoded when ``--out`` cannot be written."""
    probe = out.with_name(f".{out.name}.probe")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise JobembedError(f"cannot write --out {out} ({e.strerror or e})", fix="pass a writable path") from None


def _classify_file(
    loaded: Any, file: Path, *, text_col: str, out: Path | None, cfg: Any, as_json: bool, progress: bool
) -> None:
    import pandas as pd

    from jobembed.tables import read_table

    frame = read_table(file, what="--input")
    if text_col not in frame.columns:
        raise JobembedError(
            f"{file}: no column {text_col!r}",
            found="columns " + ", ".join(frame.columns),
            fix="pass --text-col with the text column",
        )
    if text_col in frame.attrs.get("non_string", {}):
        raise JobembedError(
            f"{file}: column {text_col!r} holds values that are not text (row {frame.attrs['non_string'][text_col]})",
            fix="pass --text-col with the column that holds the ad texts",
        )
    texts = frame[text_col].tolist()
    rows = frame.attrs["source_rows"]
    empty = [rows[i] for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise JobembedError(
            f"{file}: empty text in row {empty[0]}" + (f" and {len(empty) - 1} more" if len(empty) > 1 else ""),
            fix="remove or fill those rows",
        )
    preds = loaded.predict(texts, config=cfg, progress=progress)
    result = frame.copy()
    result.attrs = {}  # reading metadata, not results (and Parquet writes attrs into its own metadata)
    result["label"] = [p.label for p in preds]
    result["name"] = [p.name for p in preds]
    result["confidence"] = [round(p.confidence, 4) for p in preds]
    result["uncertain"] = [p.uncertain for p in preds]
    result["reason"] = [p.reason or "" for p in preds]
    result["top_k"] = [json.dumps(p.top_k, ensure_ascii=False) for p in preds]
    if out is None:
        if as_json:
            for p in preds:
                sys.stdout.write(json.dumps(p.as_dict(), ensure_ascii=False) + "\n")
        else:
            console.print(result[["label", "name", "confidence"]].to_string())
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        if out.suffix.lower() in {".jsonl", ".ndjson"}:
            result.to_json(tmp, orient="records", lines=True, force_ascii=False)
        elif out.suffix.lower() in {".parquet", ".pq"}:
            result.to_parquet(tmp, index=False)
        else:
            result.to_csv(tmp, index=False)
        tmp.replace(out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise JobembedError(f"cannot write --out {out} ({e.strerror or e})", fix="pass a writable path") from None
    counts = pd.Series([p.uncertain for p in preds]).sum()
    console.print(f"[green]classified[/] {len(preds)} texts → {out} ({int(counts)} uncertain)")


if __name__ == "__main__":  # pragma: no cover
    app()
