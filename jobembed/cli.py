"""The ``jobembed`` command line: parse flags, load the config, call the stage, print with rich.

Every command is thin: the work happens in the stage functions (``jobembed.pipeline``, ``data``,
``report``, ``bundle``), which tests and experiments call directly. A ``JobembedError`` becomes one
red line on stderr and exit code 1; Ctrl-C keeps finished stages and the embedding cache.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from jobembed import __version__
from jobembed.errors import JobembedError

app = typer.Typer(
    name="jobembed",
    help="Job-vacancy texts to job categories: frozen vs fine-tuned encoders, ANN heads, honest reports.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="Pipeline YAML (see configs/).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the error family into one red line + exit 1; Ctrl-C into exit 130 with a reassuring line."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except JobembedError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print(
                "[yellow]interrupted[/]: finished stages and cached embeddings are kept; "
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


def _parse_filter(values: list[str] | None) -> dict[str, str]:
    out = {}
    for item in values or []:
        key, sep, val = item.partition("=")
        if not sep:
            raise JobembedError(
                f"--labels-filter {item!r}", expected="COLUMN=VALUE", fix="e.g. --labels-filter level=isco_submajor"
            )
        out[key.strip()] = val.strip()
    return out


@app.command()
@_friendly
def prepare(
    input: Annotated[Path, typer.Argument(help="Vacancies as CSV, JSONL or Parquet.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder; splits go to OUT/prepare/.")],
    text_col: Annotated[str | None, typer.Option(help="Column with the ad text.")] = None,
    label_col: Annotated[str | None, typer.Option(help="Column with the category label.")] = None,
    id_col: Annotated[str | None, typer.Option(help="Column with a unique id (generated when absent).")] = None,
    labels: Annotated[Path | None, typer.Option(help="CSV of allowed labels with names/descriptions.")] = None,
    labels_code_col: Annotated[str | None, typer.Option(help="Label column in --labels.")] = None,
    labels_name_col: Annotated[str | None, typer.Option(help="Name column in --labels.")] = None,
    labels_description_col: Annotated[str | None, typer.Option(help="Description column in --labels.")] = None,
    labels_filter: Annotated[list[str] | None, typer.Option(help="Keep --labels rows where COLUMN=VALUE.")] = None,
    min_class_count: Annotated[int | None, typer.Option(help="Classes with fewer ads are rare.")] = None,
    rare_policy: Annotated[str | None, typer.Option(help="Rare classes: error | drop | merge (into 'other').")] = None,
    conflict_policy: Annotated[
        str | None, typer.Option(help="Duplicates with different labels: majority | drop.")
    ] = None,
    near_duplicate_threshold: Annotated[
        float | None, typer.Option(help="TF-IDF cosine above which two ads are one repost group.")
    ] = None,
    test_size: Annotated[float | None, typer.Option(help="Share of ads for the test split.")] = None,
    val_size: Annotated[float | None, typer.Option(help="Share of ads for the validation split.")] = None,
    max_rows: Annotated[int | None, typer.Option(help="Stratified subsample of this many ads.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed for sampling and splits.")] = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Read vacancies, validate, remove duplicates, and write stratified train/val/test splits + a data card."""
    from jobembed import data, pipeline

    overrides: dict[str, Any] = {
        "prepare.input": str(input),
        "prepare.text_col": text_col,
        "prepare.label_col": label_col,
        "prepare.id_col": id_col,
        "prepare.min_class_count": min_class_count,
        "prepare.rare_policy": rare_policy,
        "prepare.conflict_policy": conflict_policy,
        "prepare.near_duplicate_threshold": near_duplicate_threshold,
        "prepare.test_size": test_size,
        "prepare.val_size": val_size,
        "prepare.max_rows": max_rows,
        "prepare.seed": seed,
    }
    if labels is not None:
        overrides["prepare.labels"] = {
            k: v
            for k, v in {
                "path": str(labels),
                "code_col": labels_code_col,
                "name_col": labels_name_col,
                "description_col": labels_description_col,
                "filter": _parse_filter(labels_filter),
            }.items()
            if v is not None
        }
    cfg = pipeline.config_for_run(out, config, overrides)
    result = pipeline.run_prepare(cfg, progress=not quiet)
    console.print(data.data_card_table(result.card))
    console.print(f"[green]prepared[/] {out / 'prepare'}")


def _run_overrides(
    model: str | None, max_seq_length: int | None, batch_size: int | None, device: str | None, text_column: str | None
) -> dict[str, Any]:
    return {
        "embed.model": model,
        "embed.max_seq_length": max_seq_length,
        "embed.batch_size": batch_size,
        "embed.device": device,
        "report.text_column": text_column,
    }


ModelOpt = Annotated[str | None, typer.Option(help="Encoder: hub id, local folder or builtin:NAME.")]
MaxLenOpt = Annotated[int | None, typer.Option(help="Truncate texts to this many tokens.")]
BatchOpt = Annotated[int | None, typer.Option(help="Encoding batch size.")]
DeviceOpt = Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:N | mps.")]
TextColOpt = Annotated[str | None, typer.Option(help="Split column with the text to embed (e.g. clean_text).")]


@app.command()
@_friendly
def embed(
    run_dir: Annotated[Path, typer.Argument(help="Run folder made by `jobembed prepare`.")],
    model: ModelOpt = None,
    max_seq_length: MaxLenOpt = None,
    batch_size: BatchOpt = None,
    device: DeviceOpt = None,
    text_column: TextColOpt = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Encode every split of a run with a SentenceTransformer (cached: re-runs and shared texts cost nothing)."""
    from jobembed import pipeline

    cfg = pipeline.config_for_run(
        run_dir, config, _run_overrides(model, max_seq_length, batch_size, device, text_column)
    )
    paths = pipeline.run_embed(cfg, progress=not quiet)
    for split, path in paths.items():
        console.print(f"[green]{split}[/] → {path}")


@app.command("train-head")
@_friendly
def train_head(
    run_dir: Annotated[Path, typer.Argument(help="Run folder made by `jobembed prepare`.")],
    model: ModelOpt = None,
    hidden_sizes: Annotated[str | None, typer.Option(help="Comma-separated hidden layer sizes, e.g. 512,256.")] = None,
    dropout: Annotated[float | None, typer.Option(help="Dropout after each hidden layer.")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="AdamW weight decay.")] = None,
    class_weight: Annotated[str | None, typer.Option(help="none | balanced | sqrt.")] = None,
    max_epochs: Annotated[int | None, typer.Option(help="Upper bound on training epochs.")] = None,
    patience: Annotated[int | None, typer.Option(help="Early-stopping patience on validation macro-F1.")] = None,
    calibrate: Annotated[bool | None, typer.Option(help="Temperature-calibrate probabilities on validation.")] = None,
    copy_encoder: Annotated[bool | None, typer.Option(help="Copy the encoder folder into the bundle.")] = None,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Train the MLP head on the run's embeddings and save it as a bundle in RUN_DIR/head."""
    from jobembed import pipeline

    sizes = None
    if hidden_sizes is not None:
        try:
            sizes = [int(x) for x in hidden_sizes.split(",") if x.strip()]
        except ValueError:
            raise JobembedError(
                f"--hidden-sizes {hidden_sizes!r}",
                expected="comma-separated integers",
                fix="e.g. --hidden-sizes 512,256",
            ) from None
    overrides = {
        "embed.model": model,
        "head.hidden_sizes": sizes,
        "head.dropout": dropout,
        "head.weight_decay": weight_decay,
        "head.class_weight": class_weight,
        "head.max_epochs": max_epochs,
        "head.patience": patience,
        "head.calibrate": calibrate,
        "head.device": device,
        "bundle.copy_encoder": copy_encoder,
    }
    cfg = pipeline.config_for_run(run_dir, config, overrides)
    result = pipeline.run_train_head(cfg, progress=not quiet)
    test = result["test"]
    if test:
        console.print(
            f"test accuracy {test['accuracy']:.3f}, macro-F1 {test['macro_f1']:.3f} "
            f"(best epoch {result['best_epoch']}, temperature {result['temperature']:.2f})"
        )
    console.print(f"[green]bundle[/] {result['bundle']}")


@app.command("compare-report")
@_friendly
def compare_report(
    run_dir: Annotated[Path, typer.Argument(help="Run folder made by `jobembed prepare`.")],
    model: ModelOpt = None,
    encoder: Annotated[list[str] | None, typer.Option(help="Extra encoder to compare (repeatable).")] = None,
    systems: Annotated[str | None, typer.Option(help="Comma list of zeroshot,centroid,tfidf,logreg,mlp.")] = None,
    cv_folds: Annotated[int | None, typer.Option(help="Cross-validation folds.")] = None,
    text_column: TextColOpt = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Compare zero-shot cosine, centroid cosine, TF-IDF + LR, LR and the MLP head on the same splits.

    Writes RUN_DIR/report/ (report.md, metrics.json, per-class CSVs, figures) and the best bundleable system
    to RUN_DIR/bundle.
    """
    from jobembed import pipeline

    overrides = {
        "embed.model": model,
        "report.encoders": encoder or None,
        "report.cv_folds": cv_folds,
        "report.text_column": text_column,
        "report.systems": [s.strip() for s in systems.split(",")] if systems else None,
    }
    cfg = pipeline.config_for_run(run_dir, config, overrides)
    metrics = pipeline.run_compare_report(cfg, progress=not quiet)
    console.print(summary_table(metrics))
    console.print(f"[green]report[/] {run_dir / 'report' / 'report.md'}")


def summary_table(metrics: dict[str, Any]) -> Table:
    """The report's headline numbers as a rich table."""
    k = metrics["data"]["cv_folds"]
    table = Table(title=f"compare-report ({k}-fold CV on train+val; test split held out)")
    for col in ("system", "CV macro-F1", "CV accuracy", "test accuracy", "test macro-F1", "test macro-F1 (≥min)"):
        if col == "system":
            table.add_column(col, overflow="fold", min_width=16)
        else:
            table.add_column(col, justify="right")
    for key in metrics["ranking"]:
        r = metrics["systems"][key]
        cv, t = r["cv"]["summary"], r["test"]
        table.add_row(
            f"[bold]{key}[/]" if key == metrics["winner"] else key,
            f"{cv['macro_f1']['mean']:.3f} ± {cv['macro_f1']['std']:.3f}",
            f"{cv['accuracy']['mean']:.3f} ± {cv['accuracy']['std']:.3f}",
            f"{t['accuracy']:.3f}",
            f"{t['macro_f1']:.3f}",
            f"{t['macro_f1_min_support']:.3f}",
        )
    return table


@app.command()
@_friendly
def classify(
    text: Annotated[str | None, typer.Argument(help="A vacancy text (or use --file).")] = None,
    bundle: Annotated[Path | None, typer.Option(help="Bundle folder (default: the newest under --runs-dir).")] = None,
    file: Annotated[Path | None, typer.Option(help="CSV/JSONL/Parquet of texts to classify.")] = None,
    text_col: Annotated[str, typer.Option(help="Text column in --file.")] = "text",
    out: Annotated[Path | None, typer.Option(help="Write predictions for --file here (CSV or JSONL).")] = None,
    top_k: Annotated[int, typer.Option(help="How many labels to list.")] = 3,
    min_confidence: Annotated[float, typer.Option(help="Below this, answer 'uncertain' instead of guessing.")] = 0.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    runs_dir: Annotated[Path, typer.Option(help="Where to look for the newest bundle.")] = Path("runs"),
    device: DeviceOpt = None,
) -> None:
    """Predict job categories for new texts with a saved bundle: top-k labels with probabilities."""
    from jobembed.bundle import find_latest_bundle, load_bundle
    from jobembed.config import ClassifyConfig

    if (text is None) == (file is None):
        raise JobembedError("give exactly one of TEXT or --file", fix='jobembed classify "ad text" or --file ads.csv')
    if not 0 <= min_confidence <= 1:
        raise JobembedError(f"--min-confidence {min_confidence}", expected="a probability in [0, 1]")
    cfg = ClassifyConfig(top_k=max(1, top_k), min_confidence=min_confidence)
    path = bundle or find_latest_bundle(runs_dir)
    loaded = load_bundle(path, device=device or "auto")
    if text is not None:
        if not text.strip():
            raise JobembedError("the text is empty", fix="pass the vacancy text in quotes")
        pred = loaded.predict([text], config=cfg)[0]
        if as_json:
            sys.stdout.write(json.dumps(pred.as_dict(), ensure_ascii=False) + "\n")
            return
        table = Table(title=f"{pred.label}  {pred.name}".strip(), caption=f"bundle {path}")
        for col in ("rank", "label", "name", "probability"):
            table.add_column(col)
        for i, row in enumerate(pred.top_k, 1):
            table.add_row(str(i), row["label"], row["name"], f"{row['probability']:.3f}")
        console.print(table)
        return
    _classify_file(loaded, file, text_col=text_col, out=out, cfg=cfg, as_json=as_json)


def _classify_file(loaded: Any, file: Path, *, text_col: str, out: Path | None, cfg: Any, as_json: bool) -> None:
    import pandas as pd

    from jobembed.tables import read_table

    frame = read_table(file)
    if text_col not in frame.columns:
        raise JobembedError(
            f"{file}: no column {text_col!r}",
            found=", ".join(frame.columns),
            fix="pass --text-col with the text column",
        )
    texts = frame[text_col].fillna("").astype(str).tolist()
    empty = [i + 2 for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise JobembedError(
            f"{file}: empty text in row {empty[0]}" + (f" and {len(empty) - 1} more" if len(empty) > 1 else ""),
            fix="remove or fill those rows",
        )
    preds = loaded.predict(texts, config=cfg)
    result = frame.copy()
    result["label"] = [p.label for p in preds]
    result["name"] = [p.name for p in preds]
    result["confidence"] = [round(p.confidence, 4) for p in preds]
    result["top_k"] = [json.dumps(p.top_k, ensure_ascii=False) for p in preds]
    if out is None:
        if as_json:
            for p in preds:
                sys.stdout.write(json.dumps(p.as_dict(), ensure_ascii=False) + "\n")
        else:
            console.print(result[["label", "name", "confidence"]].to_string())
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix in {".jsonl", ".ndjson"}:
        result.to_json(out, orient="records", lines=True, force_ascii=False)
    elif out.suffix in {".parquet", ".pq"}:
        result.to_parquet(out, index=False)
    else:
        result.to_csv(out, index=False)
    counts = pd.Series([p.label for p in preds]).value_counts()
    console.print(f"[green]classified[/] {len(preds)} texts → {out} ({counts.get(cfg.uncertain_label, 0)} uncertain)")


@app.command()
@_friendly
def run(
    config: Annotated[Path, typer.Argument(help="Pipeline YAML, e.g. configs/demo.yaml.")],
    force: Annotated[bool, typer.Option(help="Re-run every stage, even when up to date.")] = False,
    name: Annotated[str | None, typer.Option(help="Run name (folder under runs_dir).")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Run the pipeline end to end from one config, skipping stages whose outputs are up to date."""
    from jobembed import pipeline
    from jobembed.config import load_config

    cfg = load_config(config, {"name": name})

    def on_stage(stage: str, what: str) -> None:
        console.print(f"[cyan]{stage}[/]: {'up to date, skipped' if what == 'skip' else 'running'}")

    pipeline.run_pipeline(cfg, force=force, progress=not quiet, on_stage=on_stage)
    metrics_path = cfg.run_dir / "report" / "metrics.json"
    if metrics_path.is_file():
        console.print(summary_table(json.loads(metrics_path.read_text(encoding="utf-8"))))
    console.print(f"[green]done[/]: report {cfg.run_dir / 'report' / 'report.md'}, bundle {cfg.run_dir / 'bundle'}")


if __name__ == "__main__":  # pragma: no cover
    app()
