"""prepare: read the ads, validate them, remove duplicates, group reposts, split (``prepare/``)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from jobembed import data
from jobembed.artifacts import file_sha256, read_json
from jobembed.cli.base import ConfigOpt, ForceOpt, QuietOpt, RunArg, console, friendly, stage_command
from jobembed.config import register_section
from jobembed.engine import KeepStamp, Stage, StageContext, register
from jobembed.errors import ConfigError
from jobembed.sections import ConflictPolicy, PrepareConfig, RarePolicy

if TYPE_CHECKING:
    from jobembed.config import PipelineConfig


register_section("prepare", PrepareConfig)


def _prepare_identity(config: PipelineConfig) -> dict[str, str]:
    p = config.prepare
    if p.input is None:
        raise KeepStamp(
            f"{config.run_dir} has no prepared splits, and no input file is set (prepare.input)",
            fix=f"run `jobembed prepare {config.run_dir} --input ADS.csv` first",
        )
    if Path(p.input).is_dir():
        raise KeepStamp(
            f"the --input {p.input} (prepare.input) is a folder, not a file",
            fix="pass the ads file itself (CSV, JSONL or Parquet), e.g. --input data/ads.csv",
        )
    if not Path(p.input).is_file():
        raise KeepStamp(
            f"the --input file {p.input} (prepare.input) is not found",
            fix=f"check the path (relative paths start at {Path.cwd()}), or pass --input",
        )
    out = {"input": file_sha256(Path(p.input))}
    if p.labels is not None and Path(p.labels.path).is_file():
        out["labels"] = file_sha256(Path(p.labels.path))
    if p.taxonomy is not None:
        for name, path in (("taxonomy", p.taxonomy.path), ("taxonomy_map", p.taxonomy.map)):
            if path is None:
                continue
            if not Path(path).is_file():
                raise KeepStamp(
                    f"the taxonomy file {path} (prepare.taxonomy.{'path' if name == 'taxonomy' else 'map'}) is not "
                    "found",
                    fix="check the path, or drop prepare.taxonomy",
                )
            out[name] = file_sha256(Path(path))
    return out


def _run_prepare(ctx: StageContext) -> dict[str, Any]:
    config = ctx.config
    if config.prepare.input is None:
        raise ConfigError(
            "prepare needs an input file", fix="pass --input (CSV, JSONL or Parquet) or set prepare.input"
        )
    result = data.prepare(config=config.prepare, out_dir=ctx.out, progress=ctx.progress)
    if config.prepare.taxonomy is not None:
        result.card["taxonomy"] = _add_taxonomy(config.prepare, ctx.out, result.card)
    return {"card": result.card}


def _add_taxonomy(p: PrepareConfig, out: Path, card: dict[str, Any]) -> dict[str, Any]:
    """taxonomy.parquet, each label's own taxonomy text in labels.json, and the taxonomy's counts in the data card."""
    from jobembed import taxonomy
    from jobembed.artifacts import atomic_write_bytes, write_json

    assert p.taxonomy is not None
    labels = read_json(out / "labels.json")
    rare = card["rare_classes"]
    merged = dict.fromkeys(rare["classes"], rare["merged_into"]) if rare["merged_into"] else {}
    dropped = set(rare["classes"]) if str(rare["policy"]) == RarePolicy.drop.value else set()
    table, summary = taxonomy.roll_up(
        taxonomy.load_taxonomy(p.taxonomy),
        labels=[str(d["label"]) for d in labels],
        config=p.taxonomy,
        merged=merged,
        dropped=dropped,
    )
    buf = io.BytesIO()
    table.to_parquet(buf, index=False)
    atomic_write_bytes(out / "taxonomy.parquet", buf.getvalue())
    for d in labels:
        d["taxonomy"] = taxonomy.label_text(table, str(d["label"]), p.taxonomy.label_kinds)
        d["taxonomy_texts"] = taxonomy.label_texts_all(table, str(d["label"]), p.taxonomy.prototype_kinds)
    write_json(out / "labels.json", labels)
    card["taxonomy"] = summary
    write_json(out / "data_card.json", card)
    return summary


@friendly
def prepare_command(
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

    run = stage_command("prepare", dict(locals()))
    console.print(data.data_card_table(read_json(run / "prepare" / "data_card.json")))
    console.print(f"[green]prepared[/] {run / 'prepare'}")


register(
    Stage(
        "prepare",
        section="prepare",
        run=_run_prepare,
        identity=_prepare_identity,
        products=("*.parquet", "labels.json"),  # taxonomy.parquet too, when prepare.taxonomy is set
        help="read, validate, dedupe, group reposts, split",
        command=prepare_command,
    )
)
