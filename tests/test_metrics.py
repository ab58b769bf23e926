import numpy as np
import pytest

from jobembed import metrics


def test_metrics_known_values():
    y = ["a", "a", "b", "b", "c"]
    p = ["a", "b", "b", "b", "a"]
    m = metrics.classification_metrics(y, p, min_support=2)
    assert m["accuracy"] == pytest.approx(3 / 5)
    # per class F1: a = 0.5, b = 0.8, c = 0 -> macro 0.433; classes with >= 2 true ads: a, b -> 0.65
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0) / 3)
    assert m["macro_f1_min_support"] == pytest.approx((0.5 + 0.8) / 2)
    assert set(metrics.METRICS) <= set(m)


def test_per_class_table_counts_predictions():
    table = metrics.per_class_table(["a", "a", "b"], ["a", "b", "b"], labels=["a", "b", "c"])
    assert table.set_index("label").loc["b", "predicted"] == 2
    assert table.set_index("label").loc["c", "support"] == 0


def test_mcnemar_counts_and_p():
    y = ["a"] * 20
    a = ["a"] * 20
    b = ["a"] * 5 + ["x"] * 15
    r = metrics.mcnemar(y, a, b)
    assert (r["a_only"], r["b_only"]) == (15, 0)
    assert r["p_value"] < 0.001
    assert metrics.mcnemar(y, a, a)["p_value"] == 1.0


def test_corrected_ttest_is_more_conservative_than_plain():
    a = np.array([0.80, 0.82, 0.79, 0.81, 0.83])
    b = a - np.array([0.02, 0.01, 0.03, 0.02, 0.01])
    r = metrics.corrected_paired_ttest(a, b, n_train=800, n_test=200)
    from scipy import stats

    plain = stats.ttest_rel(a, b).pvalue
    assert r["mean_diff"] == pytest.approx(0.018)
    assert plain < r["p_value"] < 1


def test_bootstrap_ci_brackets_the_estimate():
    rng = np.random.default_rng(0)
    y = rng.choice(list("abc"), 300)
    p = np.where(rng.random(300) < 0.7, y, "a")
    lo, hi = metrics.bootstrap_ci(y, p, metrics.accuracy, n_resamples=300)
    assert lo < metrics.accuracy(y, p) < hi
    assert hi - lo < 0.2


def test_fit_temperature_recovers_scale():
    rng = np.random.default_rng(0)
    true_t = 0.5
    logits = rng.normal(size=(4000, 5))
    proba = metrics.softmax(logits / true_t)
    y = np.array([rng.choice(5, p=row / row.sum()) for row in proba.astype(float)])
    assert metrics.fit_temperature(logits, y) == pytest.approx(true_t, rel=0.15)


def test_ece_perfect_is_zero():
    proba = np.eye(3)[[0, 1, 2, 0]]
    assert metrics.expected_calibration_error(proba, np.array([0, 1, 2, 0])) == 0


def test_summarize_folds_mean_std():
    s = metrics.summarize_folds([{"accuracy": 0.5}, {"accuracy": 0.7}])
    assert s["accuracy"]["mean"] == pytest.approx(0.6)
    assert s["accuracy"]["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))


def test_bootstrap_over_repost_groups_is_wider_than_over_rows():
    """Reposts are right or wrong together: resampling rows as if independent understates the spread."""
    rng = np.random.default_rng(1)
    y = rng.choice(["a", "b"], 100)
    p = np.where(rng.random(100) < 0.7, y, np.where(y == "a", "b", "a"))
    y10, p10 = np.repeat(y, 10), np.repeat(p, 10)  # every ad posted ten times
    groups = np.repeat(np.arange(100), 10)
    rows = metrics.bootstrap_ci(y10, p10, metrics.accuracy, n_resamples=400)
    grouped = metrics.bootstrap_ci(y10, p10, metrics.accuracy, groups=groups, n_resamples=400)
    plain = metrics.bootstrap_ci(y, p, metrics.accuracy, n_resamples=400)
    assert grouped[1] - grouped[0] > 2 * (rows[1] - rows[0])
    assert abs((grouped[1] - grouped[0]) - (plain[1] - plain[0])) < 0.05  # as wide as the 100 distinct ads
