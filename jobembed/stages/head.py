"""head: the MLP head on the frozen encoder's vectors, early stopping on validation (``head/``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from jobembed import metrics
from jobembed.bundle import save_bundle
from jobembed.cli.base import (
    ConfigOpt,
    DeviceOpt,
    ForceOpt,
    ModelOpt,
    QuietOpt,
    RunArg,
    console,
    friendly,
    int_list,
    stage_command,
)
from jobembed.config import register_section
from jobembed.engine import Stage, StageContext, register
from jobembed.head import MLPHead
from jobembed.sections import ClassWeight, HeadConfig
from jobembed.stages._common import encoder_info, encoder_part, frozen_identity, names_models, prepared, run_vectors

if TYPE_CHECKING:
    pass


register_section("head", HeadConfig)


def _run_train_head(ctx: StageContext) -> dict[str, Any]:
    """Fit the MLP head on train (early stopping on val), report validation metrics, save a bundle in ``head/``.

    The test split is not read here: it is scored once, by report.
    """
    config = ctx.config
    splits, labels = prepared(config, texts=False)  # the head reads vectors and labels, not texts
    vectors = run_vectors(config, config.embed.model, splits, labels)
    y = {name: frame["label"].to_numpy(dtype=str) for name, frame in splits.items()}
    has_val = len(splits["val"]) > 0
    head = MLPHead.from_config(config.head).set_params(verbose=1 if ctx.progress else 0)
    head.fit(
        vectors.train,
        y["train"],
        X_val=vectors.val if has_val else None,
        y_val=y["val"] if has_val else None,
        groups=None if has_val else splits["train"]["group"].to_numpy(),
    )
    val = (
        metrics.classification_metrics(y["val"], head.predict(vectors.val), min_support=config.report.min_support)
        if has_val
        else {"held_out_macro_f1": head.best_val_score_}
    )
    save_bundle(
        ctx.out,
        model=head,
        system="mlp",
        encoder=encoder_info(config, vectors),
        config=config,
        labels=labels,
        metrics={"val": val, "best_epoch": int(head.best_epoch_), "temperature": head.temperature_},
    )
    return {"val": val, "best_epoch": int(head.best_epoch_), "temperature": head.temperature_}


@friendly
def head_command(
    ctx: typer.Context,
    run_dir: RunArg,
    embed__model: ModelOpt = None,
    head__hidden_sizes: Annotated[
        str | None, typer.Option("--hidden-sizes", callback=int_list, help="Comma-separated sizes, e.g. 512,256.")
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

    run = stage_command("head", dict(locals()))
    m = read_bundle_meta(run / "head").metrics
    val = m.get("val", {})
    if "accuracy" in val:
        console.print(
            f"validation accuracy {val['accuracy']:.3f}, macro-F1 {val['macro_f1']:.3f} "
            f"(best epoch {m['best_epoch']}, temperature {m['temperature']:.2f})"
        )
    console.print(f"[green]bundle[/] {run / 'head'}")


register(
    Stage(
        "head",
        section="head",
        formerly=("train-head",),
        reads=("classify", "clean", "embed", "text_column", "report.min_support"),
        ignores=("embed.extra_models",),
        inputs=("prepare", "embed"),
        consumes=lambda config: {"prepare": ("*",), "embed": encoder_part(config, [config.embed.model])},
        run=_run_train_head,
        identity=frozen_identity,
        names_models=names_models,
        help="MLP head on embed.model's vectors, early stopping on validation; a bundle in head/",
        command=head_command,
    )
)
