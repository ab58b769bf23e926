"""What every ``jobembed`` command shares: the Typer app, its error handling, the shared options, and the runner of
a stage command. The stage commands live with their stages (``jobembed.stages``); ``jobembed.cli.commands`` adds
them to the app, beside the commands of no stage (run, status, classify, serve, clean eval/train).

Every command is thin: the work happens in the stages and the bundle (``jobembed.bundle``), which tests and
experiments call directly.

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
import inspect
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from jobembed import __version__, ui
from jobembed.config import TextColumn
from jobembed.errors import JobembedError
from jobembed.sections import ChunkingMode, CleanBackend, CleanLanguage, Precision, SystemName

console = Console()
err_console = Console(stderr=True)


class OneLineErrors(TyperGroup):
    """Usage errors as one red line and exit 1, like every other error, instead of a usage box and exit 2; each
    command listed by its docstring's first paragraph as one flowing line."""

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None and command.short_help is None and command.help:
            # typer's rich help lists a command by its first paragraph with the docstring's line breaks kept, so a
            # paragraph wrapped at 120 columns in the source broke mid-sentence in the list
            command.short_help = " ".join(inspect.cleandoc(command.help).split("\n\n")[0].split())
        return command

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
    cls=OneLineErrors,
    help="Job-vacancy texts to job categories: frozen vs fine-tuned encoders, ANN heads, honest reports.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the error family into one red line + exit 1; Ctrl-C into exit 130 with a reassuring line."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ui.set_progress(not kwargs.get("quiet", False))
        try:
            return fn(*args, **kwargs)
        except JobembedError as e:
            # escaped: a message's own brackets ("jobembed[mlflow]", "[0, 1]") are text, not rich markup
            message = escape(" ".join(str(e).split()))
            err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
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


def probability(value: float | None) -> float | None:
    """A share in [0, 1]: NaN is named as not a number (the range check alone said 'should be ≤ 1')."""
    if value is None:
        return None
    if math.isnan(value):
        raise typer.BadParameter("nan is not a number; give a value from 0 to 1, e.g. 0.9")
    if not 0 <= value <= 1:
        raise typer.BadParameter(f"{value} is outside 0 to 1")
    return value


def int_list(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        sizes = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a comma-separated list of integers, e.g. 512,256") from None
    if any(s < 1 for s in sizes):
        raise typer.BadParameter(f"{value!r}: every size must be a positive integer")
    return sizes


def seed_list(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a comma-separated list of integer seeds, e.g. 13,14,15") from None


def systems_list(value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [s.strip() for s in value.split(",") if s.strip()]
    allowed = [s.value for s in SystemName]
    bad = [s for s in names if s not in allowed]
    if not names or bad:
        found = repr(bad[0]) if bad else "nothing"
        raise typer.BadParameter(f"{found} is not a system; give a comma list of {', '.join(allowed)}")
    return names


def pairs(values: list[str] | None, flag: str, example: str = "skill=kompetence") -> dict[str, str]:
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


def overrides(params: dict[str, Any], ctx: typer.Context) -> tuple[dict[str, Any], dict[str, str]]:
    """Config overrides from the command's ``a__b`` parameters, and dotted field -> flag for error messages."""
    opts = {p.name: p.opts[0] for p in ctx.command.params if p.name and "__" in p.name}
    out = {}
    for name, value in params.items():
        if "__" not in name or value is None or value == []:
            continue
        if name in _PAIR_OPTIONS:
            value = pairs(value, opts[name], _PAIR_OPTIONS[name])
        elif isinstance(value, Path):
            value = str(value)
        elif hasattr(value, "value") and isinstance(value.value, str):  # an Enum member
            value = value.value
        out[_dotted(name)] = value
    return out, {_dotted(name): flag for name, flag in opts.items()}


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


def require_run(run_dir: Path, config_path: Path | None) -> None:
    """For commands that only look at a run (status, dry runs): one line when RUN holds no run, instead of the
    defaults resolving models that are not there."""
    if config_path is None and not (Path(run_dir) / "config.yaml").is_file():
        raise JobembedError(
            f"{run_dir} holds no run (no config.yaml)",
            fix=f"make one with `jobembed prepare {run_dir} --input ADS.csv` or `jobembed run -c FILE`, or pass its "
            "settings with -c FILE",
        )


def stage_command(stage: str, params: dict[str, Any]) -> Path:
    """Load the run's config with the flags on top and run ``stage`` (and whatever it needs that is stale)."""
    from jobembed.engine import config_for_run, run_stages

    values, flags = overrides(params, params["ctx"])
    cfg = config_for_run(params["run_dir"], params["config"], values, flags=flags)
    run_stages(cfg, target=stage, force=params["force"], progress=not params["quiet"], on_stage=print_stage)
    other_ranks_stop()
    return cfg.run_dir


def other_ranks_stop() -> None:
    """Under torchrun / accelerate launch only rank 0 reports (the others ran the fine-tune alone)."""
    from jobembed import distributed

    if not distributed.is_main():
        raise typer.Exit(0)


def print_stage(stage: str, what: str, reason: str) -> None:
    """One progress line per stage: why it runs, that it is current, or why it is off."""
    if what == "skip":
        console.print(f"[cyan]{stage}[/]: up to date, skipped (--force to re-run)")
    elif what == "off":
        console.print(f"[cyan]{stage}[/]: off ({reason})")
    else:
        console.print(f"[cyan]{stage}[/]: running ({reason})")


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
