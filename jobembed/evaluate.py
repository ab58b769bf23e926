"""``evaluate_systems``: every system on the same splits, with spread and significance. Pure: no files.

Systems (``report.systems``), each run once per encoder whose vectors are given, except TF-IDF, which
reads the text and needs no encoder:

==========  ===============================================================================
zeroshot    argmax cosine to the embedded category names/descriptions (no labelled ads used)
centroid    argmax cosine to the class centroids of the training embeddings
logreg      scikit-learn logistic regression on the embeddings
mlp         jobembed's MLP head (early stopping + temperature calibration on validation)
tfidf       word + char n-gram TF-IDF + logistic regression on the text column
fusion      late fusion of calibrated TF-IDF + LR and MLP probabilities, weight chosen on validation
stack       the MLP on the embedding plus out-of-fold TF-IDF + LR log-probabilities
hier        the MLP with a second loss on the parent level of nested codes (ISCO sub-major in major)
topdown     the parent group first, then the class within it, probabilities multiplied (``report.topdown_base``:
            fusion or MLP models at both levels; the published reference's recipe on pl-jobads)
e2e         the end-to-end classifier: the linear layer ``finetune --loss classifier`` trained with the encoder
            (only on such an encoder; nothing is fitted here but its temperature)
==========  ===============================================================================

Taxonomy rows (``report.taxonomy_rows``): the label taxonomy's own texts (prepare's ``taxonomy.parquet``) join the
training side of every fit of the systems that train (centroid, logreg, mlp, tfidf, fusion, hier, topdown), each
weighing ``weight`` of an ad; never a validation slice, a held-out fold or test, since they are not ads.

Protocol: (1) fit on ``train`` (the MLP stops early on ``val``), score once on the held-out ``test``
split, with bootstrap intervals that resample repost groups; (2) stratified, repost-grouped k-fold
cross-validation over ``train + val``, mean ± std per metric (inside a fold the MLP holds out its own
stratified, grouped early-stopping rows); (3) the winner by CV macro-F1 against every other system: exact
McNemar on test and the Nadeau-Bengio corrected t-test on the folds. Where labels nest (``hierarchy``),
every system is also scored at the parent level from the same predictions (parent of the predicted class).
Selective classification: per system, the confidence threshold at which its out-of-fold answers over the dev
pool (from the CV above) reach ``report.target_accuracy``, and the coverage and accuracy it gives on test;
calibration (ECE) on test before and after a temperature fit on validation.

``report.write_report`` turns the result into files; ``finetune`` can call this on its own encoder.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from jobembed import metrics, ui
from jobembed.baselines import (
    CentroidClassifier,
    CosineClassifier,
    balanced_sample_weight,
    embedding_logreg,
    tfidf_logreg,
)
from jobembed.config import TextColumn
from jobembed.embed import RunVectors, encoder_slug, short_name
from jobembed.errors import DataError
from jobembed.head import MLPHead, holdout_split
from jobembed.hierarchy import Hierarchy, find_hierarchy
from jobembed.hybrid import HybridHead
from jobembed.sections import HeadConfig, ReportConfig
from jobembed.topdown import TopDownHead

REPORT_FORMAT = "jobembed-report/4"
BUNDLEABLE = ("mlp", "fusion", "stack", "hier", "topdown", "e2e", "centroid", "zeroshot")
HYBRID_SYSTEMS = ("fusion", "stack")
# The systems that read texts as well as vectors (predict_proba(X, texts=...)).
TEXT_SYSTEMS = ("fusion", "stack", "topdown")
# The systems that train on taxonomy rows when report.taxonomy_rows is set (zero-shot trains on nothing; the stack's
# out-of-fold features would need the rows inside its inner folds, which are repost groups of ads).
EXTRA_ROW_SYSTEMS = ("centroid", "logreg", "mlp", "tfidf", "fusion", "hier", "topdown")
SYSTEM_TITLES = {
    "zeroshot": "zero-shot cosine (category texts)",
    "centroid": "centroid cosine",
    "logreg": "logistic regression on embeddings",
    "mlp": "MLP head",
    "tfidf": "TF-IDF + logistic regression",
    "fusion": "late fusion of TF-IDF + LR and the MLP head",
    "stack": "MLP head on embedding + out-of-fold TF-IDF + LR",
    "hier": "MLP head with a parent-level loss (hierarchy)",
    "topdown": "top-down: parent group, then the class within it",
    "e2e": "end-to-end classifier (the fine-tune's own linear layer)",
}


@dataclass(frozen=True)
class FoldVectors:
    """One CV fold's encoder's vectors: the dev pool (train + val order), the category texts, and the taxonomy's
    texts (None when the run has no taxonomy)."""

    dev: np.ndarray
    labels: np.ndarray
    taxonomy: np.ndarray | None = None
    # the fold's end-to-end classifier layer (weight, bias, classes) when the recipe's loss is ``classifier``
    classifier: tuple[np.ndarray, np.ndarray, list[str]] | None = None


@dataclass(frozen=True)
class ExtraRows:
    """Labelled texts that are not ads (``report.taxonomy_rows``), joined to the training side of every fit of the
    ``EXTRA_ROW_SYSTEMS``, ``weight`` each (an ad weighs 1).

    Attributes:
        rows: indices into prepare's taxonomy table, and so into every encoder's taxonomy vectors.
        texts: those rows' texts (what TF-IDF reads); labels: their labels.
        weight: each row's weight relative to an ad.
        kinds: the taxonomy kinds they come from (for the report).
    """

    rows: np.ndarray
    texts: list[str]
    labels: np.ndarray
    weight: float
    kinds: tuple[str, ...] = ()


@dataclass(frozen=True)
class System:
    """One system: a method, and the encoder whose vectors it reads (None for TF-IDF).

    ``key`` is unique (short name + fingerprint: two folders both called ``encoder`` never collide) and
    names files; ``display`` is what tables show.
    """

    name: str
    vectors: RunVectors | None = field(default=None, compare=False, hash=False)
    slug: str | None = None
    display_encoder: str | None = None
    # A fine-tuning recipe run inside the CV: per fold, that fold's encoder's vectors; the held-out protocol (test
    # split) reads ``vectors``, the finetune stage's encoder.
    fold_vectors: tuple[FoldVectors, ...] | None = field(default=None, compare=False, hash=False)

    @property
    def key(self) -> str:
        return self.name if self.slug is None else f"{self.name}@{self.slug}"

    @property
    def display(self) -> str:
        return self.name if self.display_encoder is None else f"{self.name}@{self.display_encoder}"


@dataclass
class Evaluation:
    """What ``evaluate_systems`` found.

    Attributes:
        metrics: JSON-able summary (``metrics.json``): data sizes, every system's test and CV metrics with
            intervals, the ranking, the winner, pairwise tests, the best bundleable system.
        models: system key -> the model fitted on ``train`` (the one scored on test).
        test_predictions: system key -> ``(n_test,)`` predicted labels.
        per_class: system key -> per-class precision/recall/F1 on test.
        label_order: every label (label set and test labels), in the order of tables and figures.
        y_test: ``(n_test,)`` true labels.
        oof: system key -> ``(confidence, correct)`` of every dev ad from cross-validation (the abstention
            threshold is chosen on it; the bundle keeps its winner's, so classify computes the same threshold).
        oof_pred: system key -> the predicted label of every dev ad from the fold model that held it out (exact
            McNemar on the pooled out-of-fold answers: every dev ad predicted once).
        oof_proba: system key -> ``(n_dev, k)`` out-of-fold probabilities, columns ``np.unique(y_dev)`` (the
            report writes them to ``oof/`` for a second round of judging).
    """

    metrics: dict[str, Any]
    models: dict[str, Any]
    test_predictions: dict[str, np.ndarray]
    per_class: dict[str, pd.DataFrame]
    label_order: list[str]
    y_test: np.ndarray
    oof: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    oof_pred: dict[str, np.ndarray] = field(default_factory=dict)
    # the dev pool's ids and labels, in the order of ``oof`` and ``oof_pred``
    dev_ids: np.ndarray | None = None
    y_dev: np.ndarray | None = None
    oof_proba: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalSettings:
    """What evaluation reads of a run's config: its own section, the MLP head's, the text the systems read, the
    seed of the splits that every model and fold is seeded from, and the taxonomy rows the systems train on."""

    report: ReportConfig
    head: HeadConfig
    text_column: TextColumn
    seed: int
    extra: ExtraRows | None = None

    @classmethod
    def of(cls, config: Any, extra: ExtraRows | None = None) -> EvalSettings:
        """From a PipelineConfig (``report``, ``head``, ``text_column`` and ``prepare.seed``) and the run's taxonomy
        rows (``extra_rows``)."""
        return cls(
            report=config.report,
            head=config.head,
            text_column=config.text_column,
            seed=config.prepare.seed,
            extra=extra,
        )


def extra_rows(config: Any, taxonomy: pd.DataFrame | None) -> ExtraRows | None:
    """The taxonomy rows ``report.taxonomy_rows`` asks for, from prepare's taxonomy table.

    Raises:
        DataError: rows are asked for, but the run has no taxonomy, or none of its rows is of the kinds asked for.
    """
    wanted = config.report.taxonomy_rows
    if wanted is None:
        return None
    if taxonomy is None:
        raise DataError(
            "report.taxonomy_rows is set, but this run's prepare read no taxonomy (prepare/taxonomy.parquet)",
            fix="set prepare.taxonomy (a table of code, text, kind) and re-run prepare, or unset report.taxonomy_rows",
        )
    keep = taxonomy["kind"].isin(wanted.kinds).to_numpy() if wanted.kinds else np.ones(len(taxonomy), dtype=bool)
    if not keep.any():
        raise DataError(
            f"report.taxonomy_rows.kinds {wanted.kinds} match no taxonomy row",
            found="kinds " + ", ".join(sorted(set(taxonomy["kind"]))),
            fix="name kinds the taxonomy has, or leave kinds empty for all of them",
        )
    rows = np.flatnonzero(keep)
    return ExtraRows(
        rows=rows,
        texts=taxonomy["text"].iloc[rows].astype(str).tolist(),
        labels=taxonomy["label"].iloc[rows].to_numpy(dtype=str),
        weight=float(wanted.weight),
        kinds=tuple(sorted(set(taxonomy["kind"].iloc[rows]))),
    )


@dataclass(frozen=True)
class TunedCV:
    """A fine-tuning recipe inside the CV: one fine-tuned encoder per fold (``finetune-cv``) for the CV, and the
    finetune stage's encoder (fine-tuned on train, val for checkpoint choice) for the test split and the bundle.

    Attributes:
        tuned: the finetune stage's encoder's vectors of every split.
        folds: per CV fold, that fold's encoder's vectors (dev pool in train + val order, category texts, taxonomy).
        base: the frozen encoder's reference it was fine-tuned from (its systems are the comparison).
        display: what tables call the encoder (``multilingual-e5-small-finetuned``).
    """

    tuned: RunVectors
    folds: tuple[FoldVectors, ...]
    base: str
    display: str


def build_systems(
    settings: EvalSettings, vectors: Mapping[str, RunVectors], tuned_cv: TunedCV | None = None
) -> list[System]:
    """The systems to run: TF-IDF once, every other system once per encoder (and once on the fine-tuned encoder of
    ``tuned_cv``), in config order."""
    slugs = {ref: encoder_slug(v.model, v.fingerprint) for ref, v in vectors.items()}
    shorts = {ref: short_name(v.model) for ref, v in vectors.items()}
    clash = {s for s in shorts.values() if list(shorts.values()).count(s) > 1}
    names = [str(s) for s in settings.report.systems]
    systems = [System("tfidf")] if "tfidf" in names else []
    for ref, vec in vectors.items():
        display = slugs[ref] if shorts[ref] in clash else shorts[ref]
        systems += [System(s, vec, slugs[ref], display) for s in names if s != "tfidf" and _has(s, vec)]
    if tuned_cv is not None:
        slug = encoder_slug(tuned_cv.tuned.model, tuned_cv.tuned.fingerprint)
        systems += [
            System(s, tuned_cv.tuned, slug, tuned_cv.display, fold_vectors=tuned_cv.folds)
            for s in names
            if s != "tfidf" and _has(s, tuned_cv.tuned)
        ]
    return systems


def _has(name: str, vectors: RunVectors) -> bool:
    """Whether an encoder has what the system needs: ``e2e`` only exists on an encoder fine-tuned as a classifier."""
    return name != "e2e" or vectors.classifier is not None


def _fit_predict(
    system: System,
    *,
    settings: EvalSettings,
    labels: pd.DataFrame,
    dev: pd.DataFrame,
    X_dev: np.ndarray | None,
    train_idx: np.ndarray,
    val_idx: np.ndarray | None,
    X_eval: np.ndarray | None,
    texts_eval: list[str],
    hierarchy: Hierarchy | None = None,
    X_extra: np.ndarray | None = None,
) -> tuple[np.ndarray, Any]:
    """Fit one system on dev rows ``train_idx`` (``val_idx`` for early stopping) and predict the eval rows.

    With ``settings.extra`` (taxonomy rows) the systems of ``EXTRA_ROW_SYSTEMS`` also train on those rows
    (``X_extra``: their vectors from the system's encoder), weighted; the heads' held-out slice is then cut here,
    from the ads alone, exactly as the head would cut it.

    Returns:
        (predicted labels for the eval rows, the fitted model)
    """
    col = settings.text_column
    y = dev["label"].to_numpy(dtype=str)
    texts_dev = dev[col].tolist()
    extra = settings.extra if system.name in EXTRA_ROW_SYSTEMS else None
    if extra is not None and system.vectors is not None and X_extra is None:
        raise DataError(
            f"{system.display} has no vectors of the taxonomy texts that report.taxonomy_rows asks for",
            fix="re-run `jobembed report RUN` (it re-runs embed, embed-finetuned, finetune-cv or finetune-seeds, "
            "whichever made these vectors, to encode the taxonomy texts too)",
        )
    heads_hold_out = system.name in ("mlp", "hier", "fusion", "topdown")
    if extra is not None and heads_hold_out and (val_idx is None or not len(val_idx)):
        # the slice the head would hold out of the fold's ads (same function, fraction, seed and groups)
        tr, va = holdout_split(
            np.unique(y[train_idx], return_inverse=True)[1],
            fraction=settings.head.validation_fraction,
            seed=settings.head.seed,
            groups=dev["group"].to_numpy()[train_idx],
        )
        train_idx, val_idx = train_idx[tr], train_idx[va]
    weights = None
    if extra is not None:
        weights = np.concatenate([np.ones(len(train_idx)), np.full(len(extra.labels), extra.weight)])
    texts_tr = [texts_dev[i] for i in train_idx] + (extra.texts if extra is not None else [])
    y_tr = np.concatenate([y[train_idx], extra.labels]) if extra is not None else y[train_idx]
    if system.name == "tfidf":
        if extra is None:
            model = tfidf_logreg(settings.report.tfidf, seed=settings.seed)
            model.fit(texts_tr, y_tr)
        else:
            model = tfidf_logreg(settings.report.tfidf, seed=settings.seed, balanced=False)
            model.fit(texts_tr, y_tr, logreg__sample_weight=balanced_sample_weight(y_tr, weights))
        return np.asarray(model.predict(texts_eval), dtype=str), model
    assert system.vectors is not None and X_dev is not None and X_eval is not None
    X_tr = X_dev[train_idx] if extra is None else np.concatenate([X_dev[train_idx], X_extra]).astype(np.float32)
    X_val = X_dev[val_idx] if val_idx is not None and len(val_idx) else None
    y_val = y[val_idx] if X_val is not None else None
    texts_val = None if X_val is None else [texts_dev[i] for i in val_idx]
    # Repost groups always: the stack's out-of-fold TF-IDF features and any held-out rows keep reposts together.
    groups = dev["group"].to_numpy()[train_idx]
    if extra is not None:  # each taxonomy row is its own group (none is held out: the slice is cut above)
        groups = np.concatenate([groups, groups.max(initial=0) + 1 + np.arange(len(extra.labels))])
    if system.name in HYBRID_SYSTEMS:
        model = HybridHead(
            mode=system.name, head=settings.head, tfidf=settings.report.tfidf, hybrid=settings.report.hybrid
        ).fit(
            X_tr, y_tr, texts=texts_tr, X_val=X_val, y_val=y_val, texts_val=texts_val, groups=groups,
            sample_weight=weights, prior_rows=np.arange(len(y_tr)) < len(train_idx),  # the ads come first
        )  # fmt: skip
        return np.asarray(model.predict(X_eval, texts=texts_eval), dtype=str), model
    if system.name == "topdown":
        parents = hierarchy.parents if hierarchy is not None else {}
        model = TopDownHead(
            base=str(settings.report.topdown_base),
            head=settings.head,
            tfidf=settings.report.tfidf,
            hybrid=settings.report.hybrid,
        ).fit(
            X_tr, y_tr, texts=texts_tr, parents=parents, X_val=X_val, y_val=y_val, texts_val=texts_val,
            groups=groups, sample_weight=weights,
        )  # fmt: skip
        return np.asarray(model.predict(X_eval, texts=texts_eval), dtype=str), model
    if system.name == "e2e":
        weight, bias, classes = system.vectors.classifier
        model = MLPHead.from_linear(weight, bias, classes, device=settings.head.device)
        if val_idx is None:  # inside a CV fold: the inner slice the fold's fine-tune chose its checkpoint on
            _, va = holdout_split(
                np.unique(y_tr, return_inverse=True)[1],
                fraction=settings.head.validation_fraction,
                seed=settings.head.seed,
                groups=groups,
            )
            X_val, y_val = X_tr[va], y_tr[va]
        if X_val is not None:  # the held-out protocol without a val split: every train ad was trained on, so T = 1
            model.calibrate_on(X_val, y_val)
        return np.asarray(model.predict(X_eval), dtype=str), model
    if system.name == "zeroshot":
        model = CosineClassifier().fit_prototypes(system.vectors.labels, labels["label"].astype(str).tolist())
    elif system.name == "centroid":
        model = CentroidClassifier().fit(X_tr, y_tr, sample_weight=weights)
    elif system.name == "logreg":
        if weights is None:
            model = embedding_logreg(seed=settings.seed).fit(X_tr, y_tr)
        else:
            model = embedding_logreg(seed=settings.seed, balanced=False)
            model.fit(X_tr, y_tr, sample_weight=balanced_sample_weight(y_tr, weights))
    elif system.name in ("mlp", "hier"):
        head_config = settings.head
        parents = hierarchy.parents if hierarchy is not None and system.name == "hier" else None
        if parents:  # with a flat label set `hier` is the flat MLP (the report's hierarchy note says so)
            head_config = head_config.model_copy(update={"parent_weight": settings.report.hierarchy_weight})
        model = MLPHead.from_config(head_config).fit(
            X_tr, y_tr, X_val=X_val, y_val=y_val, groups=groups, parents=parents, sample_weight=weights
        )
    else:  # pragma: no cover - guarded by the config's enum
        raise ValueError(system.name)
    if isinstance(model, CosineClassifier):
        n_ads = len(train_idx)  # the calibration slice comes from the ads
        _calibrate_cosine(
            model, X_tr[:n_ads], y_tr[:n_ads], X_val=X_val, y_val=y_val, groups=groups[:n_ads], head=settings.head
        )
    return np.asarray(model.predict(X_eval), dtype=str), model


def _calibrate_cosine(model: CosineClassifier, X_tr, y_tr, *, X_val, y_val, groups, head) -> None:
    """The softmax temperature of a cosine classifier: on the validation rows, or inside a CV fold on a
    repost-grouped slice of the fold's training rows (as the MLP holds out its own), so out-of-fold confidences
    come from the same recipe as the served model's. The slice stays in the centroids: predictions, and so every
    CV figure, are those of the classifier fit on all of the fold's training rows."""
    if X_val is not None:
        model.calibrate(X_val, y_val)
        return
    try:
        _, va = holdout_split(
            np.unique(y_tr, return_inverse=True)[1], fraction=head.validation_fraction, seed=head.seed, groups=groups
        )
    except DataError:  # too few groups to hold any out: the prior temperature stays
        return
    model.calibrate(X_tr[va], y_tr[va])


def fit_on_train(
    system: System,
    *,
    settings: EvalSettings,
    labels: pd.DataFrame,
    splits: dict[str, pd.DataFrame],
    hierarchy: Hierarchy | None = None,
) -> tuple[np.ndarray, Any]:
    """The held-out protocol: fit ``system`` on train (val for early stopping and calibration), predict test.

    Returns:
        (test predictions in test-split order, the fitted model).
    """
    dev = dev_pool(splits)
    n_train, v = len(splits["train"]), system.vectors
    return _fit_predict(
        system,
        settings=settings,
        labels=labels,
        dev=dev,
        X_dev=None if v is None else np.concatenate([v.train, v.val]),
        train_idx=np.arange(n_train),
        val_idx=np.arange(n_train, len(dev)),
        X_eval=None if v is None else v.test,
        texts_eval=splits["test"][settings.text_column].tolist(),
        hierarchy=hierarchy,
        X_extra=_extra_vectors(settings, None if v is None else v.taxonomy),
    )


def _extra_vectors(settings: EvalSettings, taxonomy: np.ndarray | None) -> np.ndarray | None:
    """The taxonomy rows' vectors of one encoder (None without taxonomy rows or without that encoder's vectors)."""
    if settings.extra is None or taxonomy is None:
        return None
    return taxonomy[settings.extra.rows]


def uncalibrated_proba(model: Any, X: np.ndarray | None) -> np.ndarray | None:
    """An MLP head's probabilities at temperature 1 (None for other systems)."""
    if isinstance(model, MLPHead):
        return metrics.softmax(model.decision_function(X))
    return None


def predict_proba(system: System, model: Any, X: np.ndarray | None, texts: list[str]) -> np.ndarray:
    """``(n, k)`` probabilities of a fitted system, columns in ``model.classes_`` order."""
    if system.name == "tfidf":
        return np.asarray(model.predict_proba(texts))
    if system.name in TEXT_SYSTEMS:
        return model.predict_proba(X, texts=texts)
    return np.asarray(model.predict_proba(X))


def selective_scores(
    *,
    classes: np.ndarray,
    oof: tuple[np.ndarray, np.ndarray] | None,
    proba_val: np.ndarray,
    y_val: np.ndarray,
    proba_test: np.ndarray,
    y_test: np.ndarray,
    target: float,
    proba_test_uncalibrated: np.ndarray | None = None,
) -> dict[str, Any]:
    """Abstention and calibration of one system: threshold chosen on out-of-fold answers, scored on test.

    The validation split stops the MLP early, calibrates it and picks the fusion weight, so its confidences are
    optimistic: a threshold read off them answers below the target. The threshold is instead the one at which the
    system's out-of-fold answers over the dev pool (each ad predicted by the fold model that did not see it or its
    reposts, in cross-validation) reach ``target``; the test split shows what it gives.

    Args:
        oof: ``(confidence, correct)`` of every dev ad from cross-validation; None when the system was not
            cross-validated (the threshold is then None).
        proba_val / y_val: validation probabilities, only for the calibration diagnostic (a temperature fit on them).
        proba_test_uncalibrated: for heads that already serve temperature-scaled probabilities (the MLP), their
            test probabilities at temperature 1, so the report shows calibration before and after scaling.

    Returns:
        ``target_accuracy``, ``threshold``, ``oof`` and ``test`` (coverage, accuracy, answered at that threshold),
        ``oof_curve`` and ``test_curve`` (``metrics.coverage_curve``), and ``calibration``: test ECE before and after
        a temperature fit on validation, with reliability points.
    """
    threshold = metrics.threshold_from_scores(*oof, target) if oof is not None else None
    known = np.isin(y_val, classes)
    log_val = np.log(np.maximum(proba_val[known], 1e-12))
    temperature = metrics.fit_temperature(log_val, np.searchsorted(classes, y_val[known])) if known.sum() > 1 else 1.0
    scaled = metrics.softmax(np.log(np.maximum(proba_test, 1e-12)) / temperature)
    test_known = np.isin(y_test, classes)
    y_idx = np.searchsorted(classes, y_test[test_known])
    if proba_test_uncalibrated is not None:  # served = scaled; "before" is the head at temperature 1
        scaled, proba_before = proba_test, proba_test_uncalibrated
    else:
        proba_before = proba_test
    return {
        "target_accuracy": target,
        "threshold": threshold,
        "chosen_on": "out-of-fold" if oof is not None else None,
        "oof": metrics.selective_from_scores(*oof, threshold) if oof is not None else None,
        "test": metrics.selective_at(y_test, proba_test, classes, threshold),
        "oof_curve": metrics.curve_from_scores(*oof) if oof is not None else None,
        "test_curve": metrics.coverage_curve(y_test, proba_test, classes),
        "calibration": {
            "temperature": temperature,
            "ece_test": metrics.expected_calibration_error(proba_before[test_known], y_idx),
            "ece_test_scaled": metrics.expected_calibration_error(scaled[test_known], y_idx),
            "reliability": metrics.reliability(y_test, proba_before, classes),
            "reliability_scaled": metrics.reliability(y_test, scaled, classes),
        },
    }


def _parent_scores(
    hierarchy: Hierarchy, y_true: np.ndarray, pred: np.ndarray, *, min_support: int
) -> dict[str, float] | None:
    if hierarchy.flat:
        return None
    return metrics.classification_metrics(
        hierarchy.parent_of(y_true), hierarchy.parent_of(pred), min_support=min_support
    )


def _test_scores(
    y_test: np.ndarray, pred: np.ndarray, *, groups: np.ndarray, n_boot: int, min_support: int
) -> dict[str, Any]:
    """Test metrics and group-bootstrap 95% intervals of accuracy and macro-F1."""
    return {
        "test": metrics.classification_metrics(y_test, pred, min_support=min_support),
        "test_ci95": {
            m: metrics.bootstrap_ci(y_test, pred, fn, groups=groups, n_resamples=n_boot)
            for m, fn in (("accuracy", metrics.accuracy), ("macro_f1", metrics.macro_f1))
        },
    }


def dev_pool(splits: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Train + val in the order the CV reads them (fold indices point into this frame)."""
    return pd.concat([splits["train"], splits["val"]], ignore_index=True)


def cv_folds(dev: pd.DataFrame, *, n_folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k-fold over the dev pool with every repost group inside one fold.

    Raises:
        DataError: fewer repost groups than folds.
    """
    n_groups = dev["group"].nunique()
    if n_groups < n_folds:
        raise DataError(
            f"--cv-folds {n_folds} needs at least {n_folds} groups of ads in train+val, found {n_groups}",
            fix=f"use --cv-folds {max(2, min(n_groups, 5))} or fewer, or prepare more data",
        )
    y = dev["label"].to_numpy(dtype=str)
    with warnings.catch_warnings():  # classes rarer than k folds are expected (and reported per class)
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        splitter = StratifiedGroupKFold(n_folds, shuffle=True, random_state=seed)
        return list(splitter.split(np.zeros(len(dev)), y, groups=dev["group"].to_numpy()))


def cross_validate(
    system: System,
    *,
    settings: EvalSettings,
    labels: pd.DataFrame,
    dev: pd.DataFrame,
    X_dev: np.ndarray | None,
    folds: list[tuple[np.ndarray, np.ndarray]],
    on_fold: Callable[[], None] | None = None,
    hierarchy: Hierarchy | None = None,
) -> tuple[list[dict[str, float]], tuple[np.ndarray, np.ndarray], np.ndarray, np.ndarray]:
    """Per-fold metrics of one system over the dev pool (train + val), and its out-of-fold answers; the test
    split is not involved.

    Inside a fold the MLP holds out its own stratified, repost-grouped early-stopping rows. With a
    hierarchy each fold also has ``parent_accuracy`` and ``parent_macro_f1`` (parent of the predicted class). A
    system with ``fold_vectors`` reads fold i's own vectors in fold i (``X_dev`` is then ignored).

    Returns:
        ``(fold metrics, (confidence, correct), predictions, probabilities)``: the pair, the predictions and the
        ``(n_dev, k)`` probabilities (columns: the dev pool's classes, sorted; 0 for a class a fold model never saw)
        have one entry per dev row, from the fold model that held the row (and its reposts) out; the abstention
        threshold is chosen on the pair.
    """
    y_dev = dev["label"].to_numpy(dtype=str)
    classes = np.unique(y_dev)
    out = []
    confidence, correct = np.zeros(len(dev)), np.zeros(len(dev), dtype=bool)
    predictions = np.empty(len(dev), dtype=object)
    probabilities = np.zeros((len(dev), len(classes)), dtype=np.float32)
    for i, (tr, te) in enumerate(folds):
        taxonomy = system.vectors.taxonomy if system.vectors is not None else None
        if system.fold_vectors is not None:
            fold_vectors = system.fold_vectors[i]
            X_dev, taxonomy = fold_vectors.dev, fold_vectors.taxonomy
            system = replace(
                system,
                vectors=replace(
                    system.vectors, labels=fold_vectors.labels, taxonomy=taxonomy, classifier=fold_vectors.classifier
                ),
            )
        X_eval = X_dev[te] if X_dev is not None else None
        texts_eval = dev[settings.text_column].iloc[te].tolist()
        pred, model = _fit_predict(
            system,
            settings=settings,
            labels=labels,
            dev=dev,
            X_dev=X_dev,
            train_idx=tr,
            val_idx=None,
            X_eval=X_eval,
            texts_eval=texts_eval,
            hierarchy=hierarchy,
            X_extra=_extra_vectors(settings, taxonomy),
        )
        proba = predict_proba(system, model, X_eval, texts_eval)
        confidence[te], correct[te] = metrics.confidence_and_correct(y_dev[te], proba, model.classes_)
        predictions[te] = pred
        seen = np.isin(np.asarray(model.classes_, dtype=str), classes)  # a taxonomy row's class no dev ad has
        columns = np.searchsorted(classes, np.asarray(model.classes_, dtype=str)[seen])
        probabilities[np.ix_(te, columns)] = proba[:, seen]
        fold = metrics.classification_metrics(y_dev[te], pred, min_support=settings.report.min_support)
        parent = _parent_scores(hierarchy or Hierarchy(), y_dev[te], pred, min_support=settings.report.min_support)
        if parent is not None:
            fold |= {"parent_accuracy": parent["accuracy"], "parent_macro_f1": parent["macro_f1"]}
        out.append(fold)
        if on_fold:
            on_fold()
    return out, (confidence, correct), predictions.astype(str), probabilities


def evaluate_systems(
    *,
    settings: EvalSettings,
    splits: Mapping[str, pd.DataFrame],
    labels: pd.DataFrame,
    vectors: Mapping[str, RunVectors],
    tuned_cv: TunedCV | None = None,
    progress: bool = True,
) -> Evaluation:
    """Fit, test and cross-validate every configured system on the same splits.

    Args:
        settings: what evaluation reads of the run's config (``EvalSettings.of(config)``).
        splits: ``{"train", "val", "test"}`` with columns ``id``, ``label``, ``group`` and the text column.
        labels: ``labels.json`` as a frame (``label``, ``name``, ``description``).
        vectors: encoder reference -> its vectors for these splits (``embed.load_vectors``), in report order.
        tuned_cv: a fine-tuning recipe run inside the CV folds: its systems join the table and the ranking, each
            compared with the same system on the frozen encoder it came from and with TF-IDF + LR (corrected
            t-test over the folds, exact McNemar on the pooled out-of-fold answers and on test).
        progress: a bar over the fits.

    Raises:
        DataError: an empty test split, fewer than two classes, fewer repost groups than CV folds.
    """
    col = settings.text_column
    dev = dev_pool(splits)
    test = splits["test"]
    if len(test) == 0:
        raise DataError("the test split is empty", fix="re-run prepare with a larger --test-size or more data")
    y_dev, y_test = dev["label"].to_numpy(dtype=str), test["label"].to_numpy(dtype=str)
    if len(np.unique(splits["train"]["label"])) < 2:
        raise DataError(
            f"the train split has a single class ({y_dev[0]!r}): nothing to compare",
            fix="prepare data with at least two labels (check --label-col)",
        )
    folds = cv_folds(dev, n_folds=settings.report.cv_folds, seed=settings.seed)
    systems = build_systems(settings, vectors, tuned_cv)
    hierarchy = find_hierarchy(labels["label"].astype(str).tolist() + list(y_dev), mode=settings.report.hierarchy)
    val = splits["val"]
    y_val = val["label"].to_numpy(dtype=str)

    results: dict[str, dict[str, Any]] = {}
    fitted: dict[str, Any] = {}
    test_preds: dict[str, np.ndarray] = {}
    oof: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    oof_pred: dict[str, np.ndarray] = {}
    oof_proba: dict[str, np.ndarray] = {}
    with ui.bar(enabled=progress) as bar:
        task = bar.add_task("fitting systems", total=len(systems) * (len(folds) + 1))
        for system in systems:
            v = system.vectors
            pred, model = fit_on_train(system, settings=settings, labels=labels, splits=splits, hierarchy=hierarchy)
            bar.advance(task)
            fitted[system.key], test_preds[system.key] = model, pred
            fold_metrics, oof[system.key], oof_pred[system.key], oof_proba[system.key] = cross_validate(
                system,
                settings=settings,
                labels=labels,
                dev=dev,
                X_dev=np.concatenate([v.train, v.val]) if v is not None else None,
                folds=folds,
                on_fold=lambda: bar.advance(task),
                hierarchy=hierarchy,
            )
            selective = None
            if len(val):
                selective = selective_scores(
                    classes=np.asarray(model.classes_, dtype=str),
                    oof=oof[system.key],
                    proba_val=predict_proba(system, model, v.val if v is not None else None, val[col].tolist()),
                    y_val=y_val,
                    proba_test=predict_proba(system, model, v.test if v is not None else None, test[col].tolist()),
                    y_test=y_test,
                    target=settings.report.target_accuracy,
                    proba_test_uncalibrated=uncalibrated_proba(model, v.test if v is not None else None),
                )
            n_boot, groups = settings.report.bootstrap, test["group"].to_numpy()
            results[system.key] = {
                "system": system.name,
                "display": system.display,
                "encoder": v.model if v is not None else None,
                "encoder_fingerprint": v.fingerprint if v is not None else None,
                # what the bundle needs to encode new ads as these vectors were (it reads no vectors itself)
                "encoder_precision": v.precision if v is not None else None,
                "encoder_text_prompt": v.text_prompt if v is not None else None,
                "title": SYSTEM_TITLES[system.name],
                **_test_scores(y_test, pred, groups=groups, n_boot=n_boot, min_support=settings.report.min_support),
                "cv": {"summary": metrics.summarize_folds(fold_metrics), "folds": fold_metrics},
                "test_parent": _parent_scores(hierarchy, y_test, pred, min_support=settings.report.min_support),
                "selective": selective,
            }
            if system.name in HYBRID_SYSTEMS:
                results[system.key]["fusion_weight"] = model.weight_
                if model.prior_power_:
                    results[system.key]["prior_power"] = model.prior_power_
            if system.name == "topdown" and hierarchy.flat:
                results[system.key]["note"] = "the labels do not nest (no parent level): topdown is a flat model twice"

    fold_size = len(dev) / len(folds)
    if tuned_cv is not None:
        _versus_frozen(results, tuned_cv, y_dev=y_dev, y_test=y_test, oof_pred=oof_pred, test_preds=test_preds,
                       n_train=int(len(dev) - fold_size), n_test=int(fold_size))  # fmt: skip
    ranking = sorted(results, key=lambda k: results[k]["cv"]["summary"]["macro_f1"]["mean"], reverse=True)
    winner = ranking[0]
    pairwise = [
        {
            "a": winner,
            "b": key,
            "mcnemar_test": metrics.mcnemar(y_test, test_preds[winner], test_preds[key]),
            "cv_macro_f1_ttest": metrics.corrected_paired_ttest(
                [f["macro_f1"] for f in results[winner]["cv"]["folds"]],
                [f["macro_f1"] for f in results[key]["cv"]["folds"]],
                n_train=int(len(dev) - fold_size),
                n_test=int(fold_size),
            ),
        }
        for key in ranking[1:]
    ]
    label_order = sorted(set(labels["label"].astype(str)) | set(y_test))
    per_class = {key: metrics.per_class_table(y_test, test_preds[key], labels=label_order) for key in ranking}
    summary = {
        "format": REPORT_FORMAT,
        "data": {
            "train": len(splits["train"]),
            "val": len(splits["val"]),
            "test": len(test),
            "classes": len(set(y_dev) | set(y_test)),
            "labels": len(label_order),
            "cv_folds": len(folds),
            "text_column": col,
        },
        "hierarchy": {"parents": hierarchy.parents, "note": hierarchy.note},
        "taxonomy_rows": _extra_summary(settings.extra, [str(s) for s in settings.report.systems]),
        # Rare classes, where macro-F1 is lost: per-class F1 over the pooled out-of-fold answers (every dev ad
        # predicted once; test F1 on a class with 1-4 test ads is noise), for the classes with few dev ads.
        "rare_classes_oof": _rare_classes(y_dev, oof_pred, ranking, max_ads=settings.report.rare_class_max_ads),
        "systems": results,
        "ranking": ranking,
        "winner": winner,
        "bundled": next((k for k in ranking if results[k]["system"] in BUNDLEABLE), None),
        "pairwise": pairwise,
    }
    return Evaluation(
        summary,
        fitted,
        test_preds,
        per_class,
        label_order,
        y_test,
        oof,
        oof_pred,
        dev["id"].to_numpy(str),
        y_dev,
        oof_proba=oof_proba,
    )


def _extra_summary(extra: ExtraRows | None, systems: list[str]) -> dict[str, Any] | None:
    if extra is None:
        return None
    counts = pd.Series(extra.labels).value_counts()
    return {
        "rows": len(extra.labels),
        "kinds": list(extra.kinds),
        "weight": extra.weight,
        "systems": [s for s in systems if s in EXTRA_ROW_SYSTEMS],  # those of the report that trained on them
        "labels_reached": len(counts),
        "rows_per_label": {str(k): int(v) for k, v in counts.sort_index().items()},
    }


def _rare_classes(
    y_dev: np.ndarray, oof_pred: Mapping[str, np.ndarray], ranking: list[str], *, max_ads: int
) -> dict[str, Any]:
    """Per-class precision, recall and F1 of every system over the pooled out-of-fold answers, for the classes with
    at most ``max_ads`` dev ads (their counts beside them)."""
    counts = pd.Series(y_dev).value_counts()
    rare = sorted(counts[counts <= max_ads].index.astype(str), key=lambda c: (counts[c], c))
    out: dict[str, Any] = {"max_ads": max_ads, "classes": {c: int(counts[c]) for c in rare}, "systems": {}}
    if not rare:
        return out
    for key in ranking:
        table = metrics.per_class_table(y_dev, oof_pred[key], labels=rare)
        out["systems"][key] = {
            row.label: {"precision": float(row.precision), "recall": float(row.recall), "f1": float(row.f1)}
            for row in table.itertuples()
        }
    return out


def _versus_frozen(
    results: dict[str, dict[str, Any]],
    tuned_cv: TunedCV,
    *,
    y_dev: np.ndarray,
    y_test: np.ndarray,
    oof_pred: Mapping[str, np.ndarray],
    test_preds: Mapping[str, np.ndarray],
    n_train: int,
    n_test: int,
) -> None:
    """Mark the fine-tuned systems and compare each with the same system on its frozen encoder and with TF-IDF + LR:
    the corrected t-test over the folds (few degrees of freedom with few folds), exact McNemar on the pooled
    out-of-fold answers (every dev ad predicted once) and on the test split."""
    tuned_keys = [k for k, r in results.items() if r["encoder"] == tuned_cv.tuned.model]
    for key in tuned_keys:
        r = results[key]
        r["finetuned_cv"] = True
        frozen = next(
            (k for k, o in results.items() if o["system"] == r["system"] and o["encoder"] == tuned_cv.base), None
        )
        versus = {}
        for other in (frozen, "tfidf" if "tfidf" in results else None):
            if other is None:
                continue
            versus[other] = {
                "cv_macro_f1_diff": r["cv"]["summary"]["macro_f1"]["mean"]
                - results[other]["cv"]["summary"]["macro_f1"]["mean"],
                "cv_macro_f1_ttest": metrics.corrected_paired_ttest(
                    [f["macro_f1"] for f in r["cv"]["folds"]],
                    [f["macro_f1"] for f in results[other]["cv"]["folds"]],
                    n_train=n_train,
                    n_test=n_test,
                ),
                "mcnemar_oof": metrics.mcnemar(y_dev, oof_pred[key], oof_pred[other]),
                "mcnemar_test": metrics.mcnemar(y_test, test_preds[key], test_preds[other]),
            }
        r["versus"] = versus
        r["frozen_key"] = frozen


def evaluate_finetuned(
    *,
    settings: EvalSettings,
    splits: Mapping[str, pd.DataFrame],
    labels: pd.DataFrame,
    tuned: RunVectors,
    frozen_key_of: Mapping[str, str],
    frozen_preds: Mapping[str, np.ndarray],
    source: Mapping[str, Any],
    ads_seen: set[str],
    fitted: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The fine-tuned encoder's systems, on the test split only.

    Its triplets showed it the labels of training ads, so k-fold CV over train + val would score it on ads whose
    labels it learned: not a fair estimate, and not run. Each system is fit on train (validation for early
    stopping and calibration), scored once on test with group-bootstrap intervals, and compared by exact McNemar
    with the same system on the frozen encoder and with TF-IDF + LR.

    Args:
        tuned: the fine-tuned encoder's vectors.
        frozen_key_of: system name -> the key of the same system on the frozen encoder (from evaluate_systems).
        frozen_preds: system key -> test predictions (evaluate_systems' ``test_preds``).
        source: what trained the encoder (finetune.json's triplets: judge, rows, ...; positive strategy).
        ads_seen: ids of the ads in its training triplets.
        fitted: if given, system key -> the fitted model is added to it (for the bundle).
    """
    col = settings.text_column
    dev = dev_pool(splits)
    test = splits["test"]
    y_test = test["label"].to_numpy(dtype=str)
    seen_test = ads_seen & set(test["id"].astype(str))
    if seen_test:  # triplets never reads the test split; an outside triplet file might
        raise DataError(
            f"the fine-tuned encoder's triplets hold {len(seen_test)} test ads (e.g. {sorted(seen_test)[0]})",
            fix="fine-tune on triplets mined without the test split (jobembed triplets)",
        )
    cv_note = (
        f"not run: the encoder saw the labels of {len(ads_seen & set(dev['id'].astype(str)))} train ads through its "
        "triplets"
        if ads_seen
        else "not run: the encoder's triplets carry no ad ids, so whose labels it saw is unknown, and whether test "
        "ads are among them could not be checked (triplets writes the ids)"
    )
    names = [s for s in map(str, settings.report.systems) if s != "tfidf" and _has(s, tuned)]
    slug = encoder_slug(tuned.model, tuned.fingerprint)
    # "multilingual-e5-small-finetuned", not the folder's name ("model")
    display = (
        f"{short_name(str(source['base_model']))}-finetuned" if source.get("base_model") else short_name(tuned.model)
    )
    label_positive = source.get("positive") == "label"
    hierarchy = find_hierarchy(
        labels["label"].astype(str).tolist() + dev["label"].astype(str).tolist(), mode=settings.report.hierarchy
    )
    val = splits["val"]
    out: dict[str, Any] = {}
    with ui.bar(enabled=progress) as bar:
        task = bar.add_task("fitting systems on the fine-tuned encoder", total=len(names))
        for name in names:
            system = System(name, tuned, slug, display)
            pred, model = fit_on_train(system, settings=settings, labels=labels, splits=splits, hierarchy=hierarchy)
            if fitted is not None:
                fitted[system.key] = model
            bar.advance(task)
            groups, n_boot = test["group"].to_numpy(), settings.report.bootstrap
            title = SYSTEM_TITLES[name]
            if name == "zeroshot" and label_positive:
                title = "category-text cosine (not zero-shot: the encoder was trained on the category texts)"
            entry: dict[str, Any] = {
                "system": name,
                "display": system.display,
                "title": title,
                "encoder": tuned.model,
                "encoder_fingerprint": tuned.fingerprint,
                "encoder_precision": tuned.precision,
                "encoder_text_prompt": tuned.text_prompt,
                **_test_scores(y_test, pred, groups=groups, n_boot=n_boot, min_support=settings.report.min_support),
                "test_parent": _parent_scores(hierarchy, y_test, pred, min_support=settings.report.min_support),
                # Not cross-validated (its triplets saw train labels): no out-of-fold answers, so no threshold.
                "selective": selective_scores(
                    classes=np.asarray(model.classes_, dtype=str),
                    oof=None,
                    proba_val=predict_proba(system, model, tuned.val, val[col].tolist()),
                    y_val=val["label"].to_numpy(dtype=str),
                    proba_test=predict_proba(system, model, tuned.test, test[col].tolist()),
                    y_test=y_test,
                    target=settings.report.target_accuracy,
                    proba_test_uncalibrated=uncalibrated_proba(model, tuned.test),
                )
                if len(val)
                else None,
                "cv": None,
                "cv_note": cv_note,
            }
            versus = {}
            for other in (frozen_key_of.get(name), "tfidf"):
                if other is not None and other in frozen_preds:
                    versus[other] = metrics.mcnemar(y_test, pred, frozen_preds[other])
            entry["mcnemar_vs"] = versus
            out[system.key] = entry
    return {"source": dict(source), "systems": out}


def summarise_seeds(
    per_seed: Mapping[int, Mapping[str, Mapping[str, Any]]], *, frozen: Mapping[str, Mapping[str, float]]
) -> dict[str, Any]:
    """The test-split protocol over fine-tuning seeds, per system: each seed, the mean and spread, the lift.

    Args:
        per_seed: seed -> system name -> ``{"display", "macro_f1", "accuracy", "mcnemar_frozen",
            "mcnemar_tfidf"}`` (the McNemar dicts of ``metrics.mcnemar``, fine-tuned side first, or None), seeds in
            the protocol's order.
        frozen: system name -> ``{"macro_f1", "accuracy"}`` of the same system on the frozen encoder (test split).

    Returns:
        system name -> ``{"display", "seeds", "macro_f1": {"values", "mean", "std"}, "accuracy": {...},
        "frozen_macro_f1", "lift": {"mean", "std"}, "mcnemar_frozen": [...], "mcnemar_tfidf": [...]}``; ``std`` is
        the sample standard deviation over seeds (0 with one seed).
    """

    def spread(values: list[float]) -> dict[str, Any]:
        arr = np.asarray(values, dtype=float)
        return {"values": values, "mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0}

    seeds = list(per_seed)
    names = [n for n in per_seed[seeds[0]] if all(n in per_seed[s] for s in seeds)]
    out: dict[str, Any] = {}
    for name in names:
        rows = [per_seed[s][name] for s in seeds]
        f1 = [float(r["macro_f1"]) for r in rows]
        base = frozen.get(name, {}).get("macro_f1")
        out[name] = {
            "display": rows[0]["display"],
            "seeds": seeds,
            "macro_f1": spread(f1),
            "accuracy": spread([float(r["accuracy"]) for r in rows]),
            "frozen_macro_f1": base,
            "frozen_accuracy": frozen.get(name, {}).get("accuracy"),
            "lift": spread([v - base for v in f1]) if base is not None else None,
            "mcnemar_frozen": [r.get("mcnemar_frozen") for r in rows],
            "mcnemar_tfidf": [r.get("mcnemar_tfidf") for r in rows],
        }
    return out
