import numpy as np
import pytest

from jobembed import evaluate


def test_metrics_known_values():
    y = ["a", "a", "b", "b", "c"]
    p = ["a", "b", "b", "b", "a"]
    m = evaluate.classification_metrics(y, p, min_support=2)
    assert m["accuracy"] == pytest.approx(3 / 5)
    # per class F1: a = 0.5, b = 0.8, c = 0 -> macro 0.433; classes with >= 2 true ads: a, b -> 0.65
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0) / 3)
    assert m["macro_f1_min_support"] == pytest.approx((0.5 + 0.8) / 2)
    assert set(evaluate.METRICS) <= set(m)


def test_per_class_table_counts_predictions():
    table = evaluate.per_class_table(["a", "a", "b"], ["a", "b", "b"], labels=["a", "b", "c"])
    assert table.set_index("label").loc["b", "predicted"] == 2
    assert table.set_index("label").loc["c", "support"] == 0


def test_mcnemar_counts_and_p():
    y = ["a"] * 20
    a = ["a"] * 20
    b = ["a"] * 5 + ["x"] * 15
    r = evaluate.mcnemar(y, a, b)
    assert (r["a_only"], r["b_only"]) == (15, 0)
    assert r["p_value"] < 0.001
    assert evaluate.mcnemar(y, a, a)["p_value"] == 1.0


def test_corrected_ttest_is_more_conservative_than_plain():
    a = np.array([0.80, 0.82, 0.79, 0.81, 0.83])
    b = a - np.array([0.02, 0.01, 0.03, 0.02, 0.01])
    r = evaluate.corrected_paired_ttest(a, b, n_train=800, n_test=200)
    from scipy import stats

    plain = stats.ttest_rel(a, b).pvalue
    assert r["mean_diff"] == pytest.approx(0.018)
    assert plain < r["p_value"] < 1


def test_bootstrap_ci_brackets_the_estimate():
    rng = np.random.default_rng(0)
    y = rng.choice(list("abc"), 300)
    p = np.where(rng.random(300) < 0.7, y, "a")
    lo, hi = evaluate.bootstrap_ci(y, p, evaluate.accuracy, n_resamples=300)
    assert lo < evaluate.accuracy(y, p) < hi
    assert hi - lo < 0.2


def test_fit_temperature_recovers_scale():
    rng = np.random.default_rng(0)
    true_t = 0.5
    logits = rng.normal(size=(4000, 5))
    proba = evaluate.softmax(logits / true_t)
    y = np.array([rng.choice(5, p=row / row.sum()) for row in proba.astype(float)])
    assert evaluate.fit_temperature(logits, y) == pytest.approx(true_t, rel=0.15)


def test_ece_perfect_is_zero():
    proba = np.eye(3)[[0, 1, 2, 0]]
    assert evaluate.expected_calibration_error(proba, np.array([0, 1, 2, 0])) == 0


def test_summarize_folds_mean_std():
    s = evaluate.summarize_folds([{"accuracy": 0.5}, {"accuracy": 0.7}])
    assert s["accuracy"]["mean"] == pytest.approx(0.6)
    assert s["accuracy"]["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
