"""``compare-report``: every system on the same splits, with spread and significance.

Systems (``report.systems``), each run once per encoder in ``[embed.model, *report.encoders]`` except
TF-IDF, which needs no encoder:

==========  ===============================================================================
zeroshot    argmax cosine to the embedded category names/descriptions (no labelled ads used)
centroid    argmax cosine to the class centroids of the training embeddings
logreg      scikit-learn logistic regression on the frozen embeddings
mlp         jobembed's MLP head (early stopping + temperature calibration on validation)
tfidf       word + char n-gram TF-IDF + logistic regression on the raw text column
==========  ===============================================================================

Evaluation: (1) fit on ``train`` (the MLP stops early on ``val``), score on the untouched ``test``
split, with bootstrap intervals; (2) stratified, repost-grouped k-fold cross-validation over
``train + val``, mean ± std per metric; (3) the winner by CV macro-F1 against every other system:
exact McNemar on test and the Nadeau-Bengio corrected t-test on the folds.

Outputs in ``out_dir``: ``report.md``, ``metrics.json``, ``per_class/<system>.csv``, ``figures/*.png``,
``config.yaml``; the winner among the bundleable systems (zeroshot, centroid, mlp) is saved as the run's
bundle.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: reports are written on servers and in CI
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from rich.progress import Progress
from sklearn.model_selection import StratifiedGroupKFold

from jobembed import evaluate
from jobembed.artifacts import write_json, write_manifest
from jobembed.baselines import CentroidClassifier, CosineClassifier, embedding_logreg, label_texts, tfidf_logreg
from jobembed.config import PipelineConfig, write_resolved
from jobembed.data import load_labels, load_splits
from jobembed.embed import make_embedders, short_name
from jobembed.errors import DataError
from jobembed.head import MLPHead

BUNDLEABLE = ("mlp", "centroid", "zeroshot")
SYSTEM_TITLES = {
    "zeroshot": "zero-shot cosine (category texts)",
    "centroid": "centroid cosine",
    "logreg": "logistic regression on embeddings",
    "mlp": "MLP head",
    "tfidf": "TF-IDF + logistic regression",
}


@dataclass(frozen=True)
class System:
    name: str
    encoder: str | None  # None: TF-IDF reads text, not vectors

    @property
    def key(self) -> str:
        if self.encoder is None:
            return self.name
        return f"{self.name}@{short_name(self.encoder)}"


@dataclass
class EncodedData:
    """Vectors of one encoder for the dev pool (train + val), the test split and the label texts."""

    dev: np.ndarray
    test: np.ndarray
    label_vectors: np.ndarray


def _fit_predict(
    system: System,
    *,
    config: PipelineConfig,
    enc: EncodedData | None,
    labels: pd.DataFrame,
    dev: pd.DataFrame,
    train_idx: np.ndarray,
    val_idx: np.ndarray | None,
    X_eval: np.ndarray | None,
    texts_eval: list[str],
) -> tuple[np.ndarray, Any]:
    """Fit one system on dev rows ``train_idx`` (``val_idx`` for early stopping) and predict the eval rows.

    Returns:
        (predicted labels for the eval rows, the fitted model)
    """
    y = dev["label"].to_numpy(dtype=str)
    text_col = config.report.text_column
    if system.name == "tfidf":
        model = tfidf_logreg(config.report.tfidf, seed=config.prepare.seed)
        model.fit(dev[text_col].iloc[train_idx].tolist(), y[train_idx])
        return model.predict(texts_eval), model
    assert enc is not None and X_eval is not None
    X_tr, y_tr = enc.dev[train_idx], y[train_idx]
    X_val = enc.dev[val_idx] if val_idx is not None and len(val_idx) else None
    y_val = y[val_idx] if X_val is not None else None
    if system.name == "zeroshot":
        model = CosineClassifier().fit_prototypes(enc.label_vectors, labels["label"].astype(str).tolist())
    elif system.name == "centroid":
        model = CentroidClassifier().fit(X_tr, y_tr)
    elif system.name == "logreg":
        model = embedding_logreg(seed=config.prepare.seed).fit(X_tr, y_tr)
    elif system.name == "mlp":
        model = MLPHead.from_config(config.head).fit(X_tr, y_tr, X_val=X_val, y_val=y_val)
    else:  # pragma: no cover - guarded by the config's Literal
        raise ValueError(system.name)
    if isinstance(model, CosineClassifier) and X_val is not None:
        model.calibrate(X_val, y_val)
    return np.asarray(model.predict(X_eval), dtype=str), model


def _encode_all(
    config: PipelineConfig, encoder: str, dev: pd.DataFrame, test: pd.DataFrame, labels: pd.DataFrame, progress: bool
) -> EncodedData:
    embed_cfg = config.embed.model_copy(update={"model": encoder})
    text_embedder, label_embedder = make_embedders(embed_cfg)
    col = config.report.text_column
    return EncodedData(
        dev=text_embedder.encode(dev[col].tolist(), progress=progress, description=f"embed train+val ({encoder})"),
        test=text_embedder.encode(test[col].tolist(), progress=progress, description=f"embed test ({encoder})"),
        label_vectors=label_embedder.encode(label_texts(labels, config.report.label_text)),
    )


def compare_report(
    *, run_dir: Path, config: PipelineConfig, out_dir: Path | None = None, progress: bool = True
) -> dict[str, Any]:
    """Run the comparison for a prepared run and write the report.

    Args:
        run_dir: run folder with ``prepare/`` (splits, labels.json) from ``jobembed prepare``.
        config: the resolved pipeline config (embed, head, report sections are used).
        out_dir: where the report goes (default ``run_dir/report``).

    Returns:
        The content of ``metrics.json`` (systems, winner, pairwise tests, data sizes).
    """
    out_dir = out_dir or run_dir / "report"
    splits = load_splits(run_dir / "prepare")
    labels = load_labels(run_dir / "prepare")
    col = config.report.text_column
    for name, frame in splits.items():
        if len(frame) and col not in frame.columns:
            raise DataError(
                f"split {name} has no column {col!r}",
                found=", ".join(frame.columns),
                fix="set report.text_column / --text-column to an existing column",
            )
    dev = pd.concat([splits["train"], splits["val"]], ignore_index=True)
    test = splits["test"]
    if len(test) == 0:
        raise DataError("the test split is empty", fix="re-run prepare with a larger --test-size or more data")
    n_train = len(splits["train"])
    train_idx, val_idx = np.arange(n_train), np.arange(n_train, len(dev))
    y_dev, y_test = dev["label"].to_numpy(dtype=str), test["label"].to_numpy(dtype=str)

    encoders_ = list(dict.fromkeys([config.embed.model, *config.report.encoders]))
    systems = [System("tfidf", None)] if "tfidf" in config.report.systems else []
    systems += [System(s, e) for e in encoders_ for s in config.report.systems if s != "tfidf"]
    encoded = {e: _encode_all(config, e, dev, test, labels, progress) for e in encoders_}

    with warnings.catch_warnings():  # classes rarer than k folds are expected (and reported per class)
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        folds = list(
            StratifiedGroupKFold(config.report.cv_folds, shuffle=True, random_state=config.prepare.seed).split(
                np.zeros(len(dev)), y_dev, groups=dev["group"].to_numpy()
            )
        )
    results: dict[str, dict[str, Any]] = {}
    fitted: dict[str, Any] = {}
    test_preds: dict[str, np.ndarray] = {}
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("fitting systems", total=len(systems) * (len(folds) + 1))
        for system in systems:
            enc = encoded.get(system.encoder) if system.encoder else None
            pred, model = _fit_predict(
                system,
                config=config,
                enc=enc,
                labels=labels,
                dev=dev,
                train_idx=train_idx,
                val_idx=val_idx,
                X_eval=enc.test if enc else None,
                texts_eval=test[col].tolist(),
            )
            bar.advance(task)
            fitted[system.key], test_preds[system.key] = model, pred
            fold_metrics = []
            for tr, te in folds:
                # Inside CV the MLP carves its own early-stopping split from the training folds.
                fold_pred, _ = _fit_predict(
                    system,
                    config=config,
                    enc=enc,
                    labels=labels,
                    dev=dev,
                    train_idx=tr,
                    val_idx=None,
                    X_eval=enc.dev[te] if enc else None,
                    texts_eval=dev[col].iloc[te].tolist(),
                )
                fold_metrics.append(
                    evaluate.classification_metrics(y_dev[te], fold_pred, min_support=config.report.min_support)
                )
                bar.advance(task)
            n_boot = config.report.bootstrap
            results[system.key] = {
                "system": system.name,
                "encoder": system.encoder,
                "title": SYSTEM_TITLES[system.name],
                "test": evaluate.classification_metrics(y_test, pred, min_support=config.report.min_support),
                "test_ci95": {
                    "accuracy": evaluate.bootstrap_ci(y_test, pred, evaluate.accuracy, n_resamples=n_boot),
                    "macro_f1": evaluate.bootstrap_ci(y_test, pred, evaluate.macro_f1, n_resamples=n_boot),
                },
                "cv": {"summary": evaluate.summarize_folds(fold_metrics), "folds": fold_metrics},
            }

    ranking = sorted(results, key=lambda k: results[k]["cv"]["summary"]["macro_f1"]["mean"], reverse=True)
    winner = ranking[0]
    fold_size = len(dev) / len(folds)
    pairwise = []
    for key in ranking[1:]:
        pairwise.append(
            {
                "a": winner,
                "b": key,
                "mcnemar_test": evaluate.mcnemar(y_test, test_preds[winner], test_preds[key]),
                "cv_macro_f1_ttest": evaluate.corrected_paired_ttest(
                    [f["macro_f1"] for f in results[winner]["cv"]["folds"]],
                    [f["macro_f1"] for f in results[key]["cv"]["folds"]],
                    n_train=int(len(dev) - fold_size),
                    n_test=int(fold_size),
                ),
            }
        )
    label_order = sorted(set(labels["label"].astype(str)) | set(y_test))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "per_class").mkdir(exist_ok=True)
    per_class = {key: evaluate.per_class_table(y_test, test_preds[key], labels=label_order) for key in ranking}
    for key, table in per_class.items():
        table.to_csv(out_dir / "per_class" / f"{key}.csv", index=False)
    figures = _figures(out_dir / "figures", results, ranking, y_test, test_preds, label_order)
    best_bundleable = next((k for k in ranking if results[k]["system"] in BUNDLEABLE), None)
    metrics = {
        "format": "jobembed-report/1",
        "data": {
            "train": n_train,
            "val": len(splits["val"]),
            "test": len(test),
            "classes": len(set(y_dev) | set(y_test)),
            "labels": len(label_order),
            "cv_folds": len(folds),
            "text_column": col,
        },
        "systems": results,
        "ranking": ranking,
        "winner": winner,
        "bundled": best_bundleable,
        "pairwise": pairwise,
        "figures": figures,
    }
    write_json(out_dir / "metrics.json", metrics)
    write_resolved(config, out_dir)
    (out_dir / "report.md").write_text(
        render_markdown(metrics, labels=labels, per_class=per_class[winner]), encoding="utf-8"
    )
    if best_bundleable is not None:
        from jobembed.bundle import save_bundle

        system = results[best_bundleable]
        save_bundle(
            run_dir / "bundle",
            model=fitted[best_bundleable],
            system=system["system"],
            encoder=system["encoder"],
            config=config,
            labels=labels,
            copy_encoder=config.bundle.copy_encoder,
            metrics={"test": system["test"], "cv": system["cv"]["summary"]},
        )
    write_manifest(run_dir, stage="compare-report", config=config.model_dump(mode="json"), inputs={"winner": winner})
    return metrics


def _figures(
    folder: Path,
    results: dict,
    ranking: list[str],
    y_test: np.ndarray,
    preds: dict[str, np.ndarray],
    label_order: list[str],
) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(ranking) + 1.5))
    means = [results[k]["cv"]["summary"]["macro_f1"]["mean"] for k in ranking]
    stds = [results[k]["cv"]["summary"]["macro_f1"]["std"] for k in ranking]
    ax.barh(ranking[::-1], means[::-1], xerr=stds[::-1], color="#4c72b0", capsize=3)
    ax.set_xlabel("macro-F1, k-fold CV (mean ± std)")
    ax.set_xlim(0, 1)
    fig.tight_layout()
    fig.savefig(folder / "cv_macro_f1.png", dpi=120)
    plt.close(fig)
    written.append("figures/cv_macro_f1.png")
    for key in ranking:
        cm = evaluate.confusion(y_test, preds[key], labels=label_order).astype(float)
        cm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)  # row-normalised: recall per true class
        size = max(5, 0.28 * len(label_order) + 2)
        fig, ax = plt.subplots(figsize=(size, size))
        im = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(label_order)), label_order, rotation=90, fontsize=7)
        ax.set_yticks(range(len(label_order)), label_order, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{key}: test confusion (row-normalised)")
        fig.colorbar(im, ax=ax, fraction=0.04)
        fig.tight_layout()
        name = f"figures/confusion-{key}.png"
        fig.savefig(folder.parent / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written


def _fmt(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.3f}"


def render_markdown(metrics: dict[str, Any], *, labels: pd.DataFrame, per_class: pd.DataFrame) -> str:
    """The human report: the answer first, then the table, significance and per-class detail."""
    res, ranking, winner, data = metrics["systems"], metrics["ranking"], metrics["winner"], metrics["data"]
    k = data["cv_folds"]
    lines = [
        "# jobembed compare-report",
        "",
        f"Data: {data['train']} train, {data['val']} validation, {data['test']} test ads; "
        f"{data['classes']} classes with ads ({data.get('labels', data['classes'])} in the label set); "
        f"text column `{data['text_column']}`. CV: {k}-fold stratified over train+validation, reposts kept in one "
        "fold. Test: fit on train (the MLP stops early on validation), scored once on the held-out test split.",
        "",
        "## Answer",
        "",
    ]
    lines += _answer(metrics)
    lines += [
        "",
        "## All systems (sorted by CV macro-F1)",
        "",
        "| system | CV macro-F1 | CV accuracy | test accuracy [95% CI] | test macro-F1 [95% CI] | "
        "test macro-F1 (classes ≥ min support) | test weighted F1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in ranking:
        r = res[key]
        cv, t, ci = r["cv"]["summary"], r["test"], r["test_ci95"]
        lines.append(
            f"| {key}{' **(best)**' if key == winner else ''} | {_fmt(cv['macro_f1']['mean'])} ± "
            f"{_fmt(cv['macro_f1']['std'])} | {_fmt(cv['accuracy']['mean'])} ± {_fmt(cv['accuracy']['std'])} | "
            f"{_fmt(t['accuracy'])} [{_fmt(ci['accuracy'][0])}, {_fmt(ci['accuracy'][1])}] | {_fmt(t['macro_f1'])} "
            f"[{_fmt(ci['macro_f1'][0])}, {_fmt(ci['macro_f1'][1])}] | {_fmt(t['macro_f1_min_support'])} | "
            f"{_fmt(t['weighted_f1'])} |"
        )
    lines += [
        "",
        "Precision and recall (test, macro / weighted):",
        "",
        "| system | macro P | macro R | weighted P | weighted R |",
        "|---|---|---|---|---|",
    ]
    for key in ranking:
        t = res[key]["test"]
        lines.append(
            f"| {key} | {_fmt(t['macro_precision'])} | {_fmt(t['macro_recall'])} | "
            f"{_fmt(t['weighted_precision'])} | {_fmt(t['weighted_recall'])} |"
        )
    lines += [
        "",
        f"## Significance: {winner} against each other system",
        "",
        "McNemar: exact two-sided test on the test ads that exactly one of the two systems gets right. "
        "CV t-test: Nadeau-Bengio corrected resampled t-test on per-fold macro-F1.",
        "",
        "| other system | test: only best right | test: only other right | McNemar p | CV macro-F1 diff | "
        "corrected t-test p |",
        "|---|---|---|---|---|---|",
    ]
    for pair in metrics["pairwise"]:
        m, t = pair["mcnemar_test"], pair["cv_macro_f1_ttest"]
        lines.append(
            f"| {pair['b']} | {m['a_only']} | {m['b_only']} | {m['p_value']:.3g} | "
            f"{t['mean_diff']:+.3f} | {_fmt_p(t['p_value'])} |"
        )
    names = dict(zip(labels["label"].astype(str), labels["name"].astype(str), strict=True))
    lines += [
        "",
        f"## Per class ({winner}, test split)",
        "",
        "Every system's table is in `per_class/<system>.csv`.",
        "",
        "| label | name | precision | recall | F1 | support | predicted |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in per_class.sort_values("support", ascending=False).itertuples():
        lines.append(
            f"| {row.label} | {names.get(row.label, '')} | {row.precision:.3f} | {row.recall:.3f} | "
            f"{row.f1:.3f} | {row.support} | {row.predicted} |"
        )
    lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in metrics["figures"]]
    if metrics.get("bundled"):
        lines += [
            "",
            f"The bundle in `../bundle/` holds **{metrics['bundled']}** (the best system a bundle can "
            "serve: MLP head or cosine prototypes on an encoder).",
        ]
    return "\n".join(lines) + "\n"


def _fmt_p(p: float) -> str:
    return "–" if p is None or np.isnan(p) else f"{p:.3g}"


def _answer(metrics: dict[str, Any]) -> list[str]:
    """One paragraph that answers the question the toolkit exists for, with the numbers."""
    res, winner = metrics["systems"], metrics["winner"]
    out = []

    def cv(key: str) -> str:
        s = res[key]["cv"]["summary"]["macro_f1"]
        return f"{s['mean']:.3f} ± {s['std']:.3f}"

    pairs = {p["b"]: p for p in metrics["pairwise"]}
    for head_key in [k for k in res if res[k]["system"] == "mlp"]:
        enc = res[head_key]["encoder"]
        for base in ("centroid", "zeroshot", "logreg"):
            base_key = next((k for k in res if res[k]["system"] == base and res[k]["encoder"] == enc), None)
            if base_key is None:
                continue
            diff = (
                res[head_key]["cv"]["summary"]["macro_f1"]["mean"] - res[base_key]["cv"]["summary"]["macro_f1"]["mean"]
            )
            verdict = "beats" if diff > 0 else "does not beat"
            out.append(
                f"- The MLP head {verdict} {SYSTEM_TITLES[base]} on `{enc}`: CV macro-F1 {cv(head_key)} vs "
                f"{cv(base_key)} ({diff:+.3f})."
            )
    if "tfidf" in res:
        best_emb = next((k for k in metrics["ranking"] if k != "tfidf"), None)
        if best_emb:
            diff = (
                res[best_emb]["cv"]["summary"]["macro_f1"]["mean"] - res["tfidf"]["cv"]["summary"]["macro_f1"]["mean"]
            )
            who = (
                f"{best_emb} beats TF-IDF + LR"
                if diff > 0
                else f"TF-IDF + LR beats every embedding system (a finding: {best_emb} is {-diff:.3f} behind)"
            )
            out.append(f"- {who}: CV macro-F1 {cv(best_emb)} vs {cv('tfidf')}.")
    p = pairs.get(metrics["ranking"][1]) if len(metrics["ranking"]) > 1 else None
    sig = ""
    if p:
        pv = p["cv_macro_f1_ttest"]["p_value"]
        sig = (
            f" Against the runner-up {p['b']}: McNemar p = {p['mcnemar_test']['p_value']:.3g}, "
            f"corrected CV t-test p = {_fmt_p(pv)}."
        )
    out.append(f"- Best by CV macro-F1: **{winner}** ({cv(winner)}).{sig}")
    return out
