"""The commands of no stage (run, status, classify, serve, clean eval/train), and every stage's command added to the
app: ``jobembed <stage>`` runs that stage (``clean run`` the clean stage), and the names stages had before a rename
stay as hidden aliases.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from jobembed.artifacts import read_json
from jobembed.cli.base import (
    BackendOpt,
    ConfigOpt,
    DeviceOpt,
    ExtractorOpt,
    LabelMapOpt,
    LanguageOpt,
    OneLineErrors,
    QuietOpt,
    RunArg,
    ThresholdOpt,
    app,
    console,
    friendly,
    other_ranks_stop,
    overrides,
    pairs,
    print_stage,
    probability,
    require_run,
)
from jobembed.cli.serving import serve_command
from jobembed.config import load_config
from jobembed.engine import config_for_run, describe, pin_models, run_stages
from jobembed.errors import JobembedError
from jobembed.sections import TrackingBackend
from jobembed.stages import STAGES
from jobembed.stages.report import finetuned_lines, selective_lines, summary_table
from jobembed.stages.triplets import triplets_line

clean_app = typer.Typer(
    cls=OneLineErrors,
    help="Cleaning: rewrite ads as occupation, skills and tasks (gliner2) or strip their noise (rules).",
    no_args_is_help=True,
)
GROUPS = {"clean": clean_app}


def _add_stage_commands() -> dict[str, str]:
    """Every stage's command, in run order; the names a stage had before a rename stay callable, hidden.

    Returns:
        old command name -> the command's name now.
    """
    former = {}
    for stage in STAGES.values():
        if stage.command is None:
            continue
        group, _, name = stage.cli_name.rpartition(" ")
        (GROUPS[group] if group else app).command(name)(stage.command)
        for old in stage.formerly:
            app.command(old, hidden=True, help=f"Old name of `jobembed {stage.cli_name}` (same flags).")(stage.command)
            former[old] = stage.cli_name
    return former


FORMER_COMMANDS = _add_stage_commands()
app.add_typer(clean_app, name="clean")


@clean_app.command("eval")
@friendly
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
    """Score a cleaner on gold spans (JSONL), per entity type.

    gliner2: span precision/recall/F1 per type, exact and overlap; rules: how much gold span text survives."""
    from jobembed.artifacts import write_json
    from jobembed.clean.eval import eval_markdown, evaluate_cleaner

    values, flags = overrides(dict(locals()), ctx)
    cfg = load_config(config, values, flags=flags)
    if out is not None:
        check_writable(out)
    mapping = pairs(label_map, "--label-map")
    result = evaluate_cleaner(gold_path=gold, config=cfg.clean, label_map=mapping, progress=not quiet)
    console.print(eval_markdown(result), markup=False, highlight=False)
    if out is not None:
        write_json(out, result)
        console.print(f"[green]wrote[/] {out}")


@clean_app.command("train")
@friendly
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

    values, flags = overrides(dict(locals()), ctx)
    cfg = load_config(config, values, flags=flags)
    check_writable(out / "jobembed-extractor.json")
    result = train_extractor(
        gold_path=gold,
        out_dir=out,
        config=cfg.clean,
        encoder=encoder,
        start_from=start_from,
        label_map=pairs(label_map, "--label-map"),
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
@friendly
def run(
    config: Annotated[Path, typer.Option("--config", "-c", help="Pipeline YAML, e.g. configs/demo.yaml.")],
    name: Annotated[str | None, typer.Option("--name", help="Run name (folder under runs_dir).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Re-run every stage, even when up to date.")] = False,
    tracking: Annotated[
        TrackingBackend | None,
        typer.Option(
            "--tracking", help="Log each stage that runs: mlflow, wandb or tensorboard (default: tracking.backend)."
        ),
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Run the whole pipeline from one config, skipping stages whose outputs are up to date.

    On an existing run the file is layered on the run's config.yaml (the file's fields win): a field it leaves out
    keeps the run's value. A stage that is off (finetune without finetune.enabled) neither runs nor is read, and its
    folder is left as it is. With --tracking (or tracking.backend) every stage that runs is logged: one tracker run
    per run folder, one child per stage (config, key, summary, outputs; the report's metrics and page; the bundle)."""
    flags = {"name": "--name", "tracking.backend": "--tracking"}
    backend = {"tracking.backend": tracking.value if tracking else None}
    cfg = load_config(config, {"name": name} | backend, flags=flags)
    if (cfg.run_dir / "config.yaml").is_file():
        cfg = config_for_run(cfg.run_dir, config, backend, flags=flags)
    run_stages(cfg, force=force, progress=not quiet, on_stage=print_stage)
    other_ranks_stop()
    console.print(triplets_line(read_json(cfg.run_dir / "triplets" / "report.json"), cfg.run_dir / "triplets"))
    metrics = read_json(cfg.run_dir / "report" / "metrics.json")
    console.print(summary_table(metrics))
    for line in finetuned_lines(metrics) + selective_lines(metrics):
        console.print(line)
    console.print(f"[green]done[/]: report {cfg.run_dir / 'report' / 'report.md'}, bundle {cfg.run_dir / 'bundle'}")


@app.command()
@friendly
def status(
    ctx: typer.Context,
    run_dir: RunArg,
    config: ConfigOpt = None,
) -> None:
    """Show what each stage of RUN would do now, and why; nothing runs and nothing is written.

    Each stage is current, runs (the reason), waits for an input that runs first, or off."""
    require_run(run_dir, config)
    values, flags = overrides(dict(locals()), ctx)
    cfg = pin_models(config_for_run(run_dir, config, values, flags=flags))
    table = Table(title=f"stages of {cfg.run_dir}")
    for col in ("stage", "state", "why", "what it does"):
        table.add_column(col, overflow="fold")
    colour = {"current": "green", "runs": "yellow", "waits": "yellow", "off": "dim"}
    for row in describe(cfg):
        state = f"[{colour.get(row['state'], 'white')}]{row['state']}[/]"
        table.add_row(row["stage"], state, row["why"], row["help"])
    console.print(table)


# ------------------------------------------------------------------------------------------ classify

_OUT_SUFFIXES = (".csv", ".jsonl", ".ndjson", ".parquet", ".pq")


@app.command()
@friendly
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
    top_k: Annotated[
        int | None, typer.Option("--top-k", min=1, help="How many labels to list (default: the bundle's, 3).")
    ] = None,
    min_confidence: Annotated[
        float | None,
        typer.Option(
            "--min-confidence",
            callback=probability,
            help="Below this top probability (0 to 1), answer 'uncertain' (default: the bundle's setting). Not with "
            "--target-accuracy.",
        ),
    ] = None,
    target_accuracy: Annotated[
        float | None,
        typer.Option(
            "--target-accuracy",
            callback=probability,
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
        check_writable(out)
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


app.command("serve")(serve_command)


def check_writable(out: Path) -> None:
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
