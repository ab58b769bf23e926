"""Metrics, spread and significance, on top of scikit-learn and SciPy.

Everything here is pure: arrays in, dicts/frames out. ``evaluate.py`` decides what to compare.

- ``classification_metrics``: accuracy, macro/weighted precision/recall/F1, and macro-F1 over classes
  with at least ``min_support`` true examples (rare classes with 1-5 ads swing plain macro-F1).
- ``bootstrap_ci``: percentile interval of a metric over resampled test ads, or over resampled repost
  groups (a group of reposts is one draw: they are not independent evidence).
- ``mcnemar``: exact paired test of two systems on the same test ads.
- ``corrected_paired_ttest``: Nadeau & Bengio's corrected resampled t-test over CV folds; the plain
  paired t-test is too optimistic because folds share training data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import optimize, special, stats
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

METRICS = (
    "accuracy",
    "macro_precision",
    "macro_recall",
    "macro_f1",
    "weighted_precision",
    "weighted_recall",
    "weighted_f1",
    "macro_f1_min_support",
)


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def nll(logits: np.ndarray, y_idx: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``softmax(logits / T)``; ``logits`` (n, k), ``y_idx`` (n,) ints."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    return float(-special.log_softmax(z, axis=1)[np.arange(len(y_idx)), np.asarray(y_idx)].mean())


def fit_temperature(logits: np.ndarray, y_idx: np.ndarray, *, bounds: tuple[float, float] = (1e-3, 100.0)) -> float:
    """The scalar T minimising the NLL of ``softmax(logits / T)`` on held-out data (Guo et al., 2017).

    Args:
        logits: (n, k) scores; y_idx: (n,) integer column of the true class.

    Returns:
        T within ``bounds``; 1.0 when no T lowers the NLL (bounded Brent can stop on a plateau, and a
        calibration must never make the fit worse).
    """
    res = optimize.minimize_scalar(
        lambda t: nll(logits, y_idx, float(np.exp(t))), bounds=np.log(bounds), method="bounded"
    )
    return float(np.exp(res.x)) if res.fun < nll(logits, y_idx) else 1.0


def expected_calibration_error(proba: np.ndarray, y_idx: np.ndarray, n_bins: int = 15) -> float:
    """ECE of the top-class confidence over ``n_bins`` equal-width bins in (0, 1].

    Args:
        proba: ``(n, k)`` probabilities; y_idx: ``(n,)`` true class indices into its columns.
    """
    if len(y_idx) == 0:
        return float("nan")
    conf = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y_idx
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)


def classification_metrics(y_true: Sequence[str], y_pred: Sequence[str], *, min_support: int = 5) -> dict[str, float]:
    """Accuracy, macro/weighted P/R/F1 and macro-F1 over classes with ≥ ``min_support`` true examples.

    Classes only predicted, never true, count in macro scores with zero (scikit-learn's zero_division=0),
    so a system is not rewarded for inventing classes.
    """
    y_true, y_pred = np.asarray(y_true, dtype=str), np.asarray(y_pred, dtype=str)
    out: dict[str, float] = {"accuracy": float(accuracy_score(y_true, y_pred))}
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average=avg, zero_division=0)
        out |= {f"{avg}_precision": float(p), f"{avg}_recall": float(r), f"{avg}_f1": float(f)}
    labels, counts = np.unique(y_true, return_counts=True)
    frequent = labels[counts >= min_support]
    out["macro_f1_min_support"] = (
        float(f1_score(y_true, y_pred, labels=frequent, average="macro", zero_division=0)) if len(frequent) else np.nan
    )
    return out


def per_class_table(y_true: Sequence[str], y_pred: Sequence[str], *, labels: Sequence[str]) -> pd.DataFrame:
    """One row per label: precision, recall, F1, support (true count), predicted count."""
    y_true, y_pred = np.asarray(y_true, dtype=str), np.asarray(y_pred, dtype=str)
    labels = list(labels)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    predicted = pd.Series(y_pred).value_counts().reindex(labels, fill_value=0).to_numpy()
    return pd.DataFrame({"label": labels, "precision": p, "recall": r, "f1": f, "support": s, "predicted": predicted})


def confusion(y_true: Sequence[str], y_pred: Sequence[str], *, labels: Sequence[str]) -> np.ndarray:
    return confusion_matrix(np.asarray(y_true, dtype=str), np.asarray(y_pred, dtype=str), labels=list(labels))


def bootstrap_ci(
    y_true: Sequence[str],
    y_pred: Sequence[str],
    metric: Callable[[np.ndarray, np.ndarray], float],
    *,
    groups: Sequence[Any] | None = None,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 13,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric(y_true, y_pred)``.

    Args:
        groups: one id per row; when given, whole groups are resampled (a cluster bootstrap), so reposts of
            one ad, which are right or wrong together, do not narrow the interval as if they were independent.
    """
    y_true, y_pred = np.asarray(y_true, dtype=str), np.asarray(y_pred, dtype=str)
    if n_resamples <= 0 or len(y_true) == 0:
        return (np.nan, np.nan)
    rng = np.random.default_rng(seed)
    n = len(y_true)
    if groups is None:
        draws = (rng.integers(0, n, n) for _ in range(n_resamples))
    else:
        codes = pd.factorize(np.asarray(groups))[0]
        order = np.argsort(codes, kind="stable")
        sizes = np.bincount(codes)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        draws = (_group_draw(rng, order, starts, sizes) for _ in range(n_resamples))
    values = [metric(y_true[idx], y_pred[idx]) for idx in draws]
    alpha = (1 - level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))


def _group_draw(rng: np.random.Generator, order: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Row indices of ``len(sizes)`` groups drawn with replacement (rows of a group stay together)."""
    chosen = rng.integers(0, len(sizes), len(sizes))
    lens = sizes[chosen]
    offsets = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
    return order[np.repeat(starts[chosen], lens) + offsets]


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(f1_score(y_true, y_pred, average="macro", zero_division=0))


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(y_true == y_pred))


def mcnemar(y_true: Sequence[str], pred_a: Sequence[str], pred_b: Sequence[str]) -> dict[str, float]:
    """Exact McNemar test: do A and B err on different ads more often than chance allows?

    Returns:
        ``a_only`` (ads A gets right and B wrong), ``b_only``, and the two-sided exact ``p_value``.
    """
    y, a, b = (np.asarray(v, dtype=str) for v in (y_true, pred_a, pred_b))
    a_only = int(np.sum((a == y) & (b != y)))
    b_only = int(np.sum((a != y) & (b == y)))
    n = a_only + b_only
    p = 1.0 if n == 0 else float(stats.binomtest(a_only, n, 0.5).pvalue)
    return {"a_only": a_only, "b_only": b_only, "p_value": p}


def corrected_paired_ttest(
    scores_a: Sequence[float], scores_b: Sequence[float], *, n_train: int, n_test: int
) -> dict[str, float]:
    """Nadeau & Bengio (2003) corrected resampled t-test on per-fold scores of two systems.

    The variance of the fold differences is inflated by ``1/k + n_test/n_train`` because CV folds
    overlap in training data; without the correction the test rejects far too often.
    """
    d = np.asarray(scores_a, dtype=float) - np.asarray(scores_b, dtype=float)
    k = len(d)
    if k < 2:
        return {"mean_diff": float(d.mean()) if k else np.nan, "t": np.nan, "p_value": np.nan}
    var = d.var(ddof=1)
    if var == 0:
        return {"mean_diff": float(d.mean()), "t": np.nan, "p_value": 1.0 if d.mean() == 0 else 0.0}
    t = d.mean() / np.sqrt((1 / k + n_test / n_train) * var)
    p = 2 * stats.t.sf(abs(t), df=k - 1)
    return {"mean_diff": float(d.mean()), "t": float(t), "p_value": float(p)}


def summarize_folds(fold_metrics: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """metric -> {mean, std} over folds (std with ddof=1, the spread a new split would show)."""
    frame = pd.DataFrame(list(fold_metrics))
    return {m: {"mean": float(frame[m].mean()), "std": float(frame[m].std(ddof=1))} for m in frame.columns}


# ------------------------------------------------------------------------------ selective classification


def coverage_curve(
    y_true: Sequence[str], proba: np.ndarray, classes: Sequence[str], *, n_points: int = 100
) -> dict[str, list[float]]:
    """Accuracy of the most confident answers at each coverage (selective classification).

    Answers are sorted by top-class probability; at coverage c the ``c * n`` most confident are kept.
    Sampled at ``n_points`` evenly spaced coverages, each with the confidence threshold that keeps them.

    Args:
        y_true: ``(n,)`` true labels; proba: ``(n, k)`` probabilities; classes: ``(k,)`` their column labels.

    Returns:
        ``{"coverage", "accuracy", "threshold"}`` lists of equal length, coverage ascending.
    """
    y_true = np.asarray(y_true, dtype=str)
    if len(y_true) == 0:
        return {"coverage": [], "accuracy": [], "threshold": []}
    return curve_from_scores(*confidence_and_correct(y_true, proba, classes), n_points=n_points)


def threshold_for_accuracy(
    y_true: Sequence[str], proba: np.ndarray, classes: Sequence[str], target: float
) -> float | None:
    """The lowest confidence threshold whose kept answers (confidence >= it) reach ``target`` accuracy.

    ``threshold_from_scores`` on the top-class probability and whether it is right.
    """
    y_true = np.asarray(y_true, dtype=str)
    if len(y_true) == 0:
        return None
    conf, correct = confidence_and_correct(y_true, proba, classes)
    return threshold_from_scores(conf, correct, target)


def threshold_from_scores(confidence: Sequence[float], correct: Sequence[bool], target: float) -> float | None:
    """The lowest confidence threshold at which the answers kept (confidence >= it) reach ``target`` accuracy.

    The one rule for every threshold jobembed reports or serves: the report computes it on out-of-fold
    confidences, and a bundle stores those confidences so ``classify`` and ``serve`` compute the same number for
    any target. Ties of confidence are kept or dropped together. None when no threshold reaches the target.

    Args:
        confidence: ``(n,)`` top-class probabilities; correct: ``(n,)`` whether that class was the true one.
    """
    thresholds, accuracy = accuracy_by_threshold(confidence, correct)
    ok = np.flatnonzero(accuracy >= target)
    return float(thresholds[ok.max()]) if len(ok) else None


def accuracy_by_threshold(confidence: Sequence[float], correct: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    """``(thresholds, accuracy)``: every distinct confidence, highest first, and the accuracy of the answers at or
    above it (answers tied at a confidence are kept or dropped together)."""
    conf = np.asarray(confidence, dtype=np.float64)
    right = np.asarray(correct, dtype=bool)
    if len(conf) == 0:
        return np.zeros(0), np.zeros(0)
    order = np.argsort(-conf, kind="stable")
    conf, right = conf[order], right[order]
    last = np.flatnonzero(np.r_[conf[1:] != conf[:-1], True])  # the last answer of each distinct confidence
    return conf[last], np.cumsum(right)[last] / (last + 1)


def selective_at(y_true: Sequence[str], proba: np.ndarray, classes: Sequence[str], threshold: float | None) -> dict:
    """Coverage (share answered) and accuracy of the answers with confidence >= ``threshold``."""
    y_true = np.asarray(y_true, dtype=str)
    if threshold is None or len(y_true) == 0:
        return selective_from_scores([], [], None)
    return selective_from_scores(*confidence_and_correct(y_true, proba, classes), threshold)


def selective_from_scores(confidence: Sequence[float], correct: Sequence[bool], threshold: float | None) -> dict:
    """``selective_at`` on ``(confidence, correct)`` pairs (out-of-fold answers, say)."""
    conf, right = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=bool)
    if threshold is None or len(conf) == 0:
        return {"coverage": 0.0, "accuracy": float("nan"), "answered": 0}
    kept = conf >= threshold
    return {
        "coverage": float(kept.mean()),
        "accuracy": float(right[kept].mean()) if kept.any() else float("nan"),
        "answered": int(kept.sum()),
    }


def curve_from_scores(confidence: Sequence[float], correct: Sequence[bool], *, n_points: int = 100) -> dict:
    """``coverage_curve`` on ``(confidence, correct)`` pairs."""
    conf, right = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=bool)
    if len(conf) == 0:
        return {"coverage": [], "accuracy": [], "threshold": []}
    order = np.argsort(-conf, kind="stable")
    cum_acc = np.cumsum(right[order]) / np.arange(1, len(order) + 1)
    keep = np.unique(np.clip(np.ceil(np.linspace(1, n_points, n_points) / n_points * len(order)) - 1, 0, None))
    keep = keep.astype(int)
    return {
        "coverage": [float((i + 1) / len(order)) for i in keep],
        "accuracy": [float(cum_acc[i]) for i in keep],
        "threshold": [float(conf[order][i]) for i in keep],
    }


def reliability(y_true: Sequence[str], proba: np.ndarray, classes: Sequence[str], n_bins: int = 10) -> dict:
    """Per confidence bin: mean confidence, accuracy and count (a reliability diagram's points)."""
    conf, correct = confidence_and_correct(np.asarray(y_true, dtype=str), proba, classes)
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    rows = [(conf[bins == b].mean(), correct[bins == b].mean(), int((bins == b).sum())) for b in np.unique(bins)]
    return {
        "confidence": [float(r[0]) for r in rows],
        "accuracy": [float(r[1]) for r in rows],
        "n": [r[2] for r in rows],
    }


def confidence_and_correct(
    y_true: np.ndarray, proba: np.ndarray, classes: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """``(confidence, correct)``: each row's top-class probability and whether that class is ``y_true``."""
    proba = np.asarray(proba, dtype=np.float64)
    pred = np.asarray(classes, dtype=str)[proba.argmax(axis=1)]
    return proba.max(axis=1), pred == y_true
