"""MLPHead: learning, probabilities, reproducibility, early stopping, calibration, persistence, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import log_softmax
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

from jobembed.errors import BundleError, ConfigError, DataError
from jobembed.head import HEAD_FORMAT, HeadInputError, MLPHead, class_weights
from jobembed.metrics import expected_calibration_error
from jobembed.sections import HeadConfig

DIM = 24
# Deliberately not sorted: classes_ must come out sorted whatever order the labels arrive in.
LABELS = ["pielęgniarka", "kierowca", "programista", "magazynier", "księgowa"]
RARE = "księgowa"
CENTERS = np.random.default_rng(99).normal(size=(len(LABELS), DIM)) * 1.5


def make_blobs(n_per_class: int, *, seed: int, n_rare: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs around ``CENTERS`` (unit noise), ``n_rare`` points for the rare class; shuffled."""
    rng = np.random.default_rng(seed)
    counts = [n_rare if label == RARE else n_per_class for label in LABELS]
    X = np.vstack([c + rng.normal(size=(n, DIM)) for c, n in zip(CENTERS, counts, strict=True)])
    y = np.repeat(LABELS, counts)
    order = rng.permutation(len(y))
    return X[order].astype(np.float32), y[order]


X_TRAIN, Y_TRAIN = make_blobs(50, seed=0, n_rare=3)
X_TEST, Y_TEST = make_blobs(30, seed=1, n_rare=10)
FAST = {"hidden_sizes": (32,), "learning_rate": 1e-2, "batch_size": 32, "max_epochs": 60, "patience": 8}


@pytest.fixture(scope="module")
def head() -> MLPHead:
    """One head fitted on ``X_TRAIN`` (internal holdout), shared by read-only tests."""
    return MLPHead(**FAST, random_state=0).fit(X_TRAIN, Y_TRAIN)


# --------------------------------------------------------------------------------------- learning


def test_learns_separable_blobs(head: MLPHead) -> None:
    assert (head.predict(X_TEST) == Y_TEST).mean() >= 0.95
    check_is_fitted(head)
    assert head.n_features_in_ == DIM
    assert isinstance(head.model_, torch.nn.Module)


def test_proba_rows_sum_to_one_and_columns_follow_classes(head: MLPHead) -> None:
    assert list(head.classes_) == sorted(LABELS)
    proba = head.predict_proba(X_TEST)
    assert proba.shape == (len(X_TEST), len(LABELS))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-12)
    assert (proba >= 0).all()
    # The column of each blob's own label is the most probable one at the blob centre.
    centre_proba = head.predict_proba(CENTERS.astype(np.float32))
    assert [head.classes_[j] for j in centre_proba.argmax(axis=1)] == LABELS
    np.testing.assert_array_equal(head.classes_[proba.argmax(axis=1)], head.predict(X_TEST))
    # Temperature scales the logits, so it never changes the ranking.
    np.testing.assert_array_equal(head.decision_function(X_TEST).argmax(axis=1), proba.argmax(axis=1))


def test_same_seed_reproduces_bit_for_bit_and_other_seed_differs(head: MLPHead) -> None:
    again = MLPHead(**FAST, random_state=0).fit(X_TRAIN, Y_TRAIN)
    np.testing.assert_array_equal(again.predict_proba(X_TEST), head.predict_proba(X_TEST))
    assert again.history_ == head.history_
    other = MLPHead(**FAST, random_state=1).fit(X_TRAIN, Y_TRAIN)
    assert not np.array_equal(other.predict_proba(X_TEST), head.predict_proba(X_TEST))


def test_fit_leaves_global_torch_rng_alone() -> None:
    before = torch.get_rng_state()
    MLPHead(**{**FAST, "max_epochs": 2}).fit(X_TRAIN, Y_TRAIN)
    assert torch.equal(torch.get_rng_state(), before)


def test_early_stopping_stops_before_max_epochs_and_records_history(head: MLPHead) -> None:
    f1s = [h["val_macro_f1"] for h in head.history_]
    assert head.n_iter_ < FAST["max_epochs"]
    assert len(head.history_) == head.n_iter_
    assert [h["epoch"] for h in head.history_] == list(range(1, head.n_iter_ + 1))
    assert set(head.history_[0]) == {"epoch", "train_loss", "val_macro_f1", "val_loss"}
    assert 1 <= head.best_epoch_ <= head.n_iter_
    assert head.best_val_score_ == max(f1s) == head.history_[head.best_epoch_ - 1]["val_macro_f1"]
    # Patience counts epochs since the first epoch that reached the best F1.
    assert head.n_iter_ - (f1s.index(max(f1s)) + 1) == FAST["patience"]
    # Among epochs tied at the best F1, the kept one has the lowest validation loss.
    tied = [h["val_loss"] for h in head.history_ if h["val_macro_f1"] == max(f1s)]
    assert head.history_[head.best_epoch_ - 1]["val_loss"] == min(tied)


# ------------------------------------------------------------------------------------ class weights


@pytest.mark.parametrize("mode", ["none", "balanced", "sqrt"])
def test_class_weights(mode: str) -> None:
    counts = np.array([100, 10, 1, 0])
    w = class_weights(counts, mode)
    assert w[3] == 0  # a class without training examples gets no weight
    if mode == "none":
        np.testing.assert_array_equal(w[:3], 1.0)
    else:
        assert w[0] < w[1] < w[2]  # rarer class, larger weight
    if mode == "balanced":
        np.testing.assert_allclose(w[:3], 111 / (3 * counts[:3]))
    if mode == "sqrt":
        np.testing.assert_allclose(w[:3].mean(), 1.0)
        balanced = class_weights(counts, "balanced")
        np.testing.assert_allclose(w[:3] / w[0], np.sqrt(balanced[:3] / balanced[0]))


def test_rare_class_weight_grows_from_none_to_sqrt_to_balanced() -> None:
    fitted = {
        mode: MLPHead(**{**FAST, "max_epochs": 1}, class_weight=mode).fit(X_TRAIN, Y_TRAIN)
        for mode in ("none", "sqrt", "balanced")
    }
    rare, common = (list(fitted["none"].classes_).index(label) for label in (RARE, "kierowca"))
    relative = {mode: h.class_weights_[rare] / h.class_weights_[common] for mode, h in fitted.items()}
    assert relative["none"] < relative["sqrt"] < relative["balanced"]


# ------------------------------------------------------------------------------------- calibration


def test_temperature_lowers_validation_nll_when_overconfident() -> None:
    """Label noise plus a wide net without regularisation gives overconfident logits (T > 1)."""

    def noisy(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, 3, n)
        X = CENTERS[idx] + rng.normal(size=(n, DIM))
        flip = rng.random(n) < 0.2
        idx[flip] = rng.integers(0, 3, flip.sum())
        return X.astype(np.float32), np.array(LABELS)[idx]

    (X, y), (X_val, y_val) = noisy(120, 1), noisy(150, 2)
    params = {"hidden_sizes": (128,), "dropout": 0.0, "weight_decay": 0.0, "learning_rate": 1e-2, "batch_size": 16}
    h = MLPHead(**params, max_epochs=30, patience=30, random_state=0).fit(X, y, X_val=X_val, y_val=y_val)

    y_idx = np.searchsorted(h.classes_, y_val)
    logits = h.decision_function(X_val)
    nll_raw = -log_softmax(logits, axis=1)[np.arange(len(y_idx)), y_idx].mean()
    nll_cal = -np.log(h.predict_proba(X_val)[np.arange(len(y_idx)), y_idx]).mean()
    assert h.temperature_ > 1.0
    assert nll_cal < nll_raw
    assert h.calibration_["n_val"] == len(y_val)
    assert h.calibration_["nll_after"] < h.calibration_["nll_before"]
    assert 0 <= h.calibration_["ece_after"] <= 1

    raw = MLPHead(**params, max_epochs=30, patience=30, random_state=0, calibrate=False).fit(
        X, y, X_val=X_val, y_val=y_val
    )
    assert raw.temperature_ == 1.0
    np.testing.assert_array_equal(raw.decision_function(X_val), logits)


def test_expected_calibration_error() -> None:
    # Confidence 0.9 and 90% correct: perfectly calibrated. Confidence 0.9 and all wrong: ECE 0.9.
    proba = np.tile([0.9, 0.1], (10, 1))
    assert expected_calibration_error(proba, np.array([0] * 9 + [1])) == pytest.approx(0.0)
    assert expected_calibration_error(proba, np.ones(10, dtype=int)) == pytest.approx(0.9)


# ------------------------------------------------------------------------------------ persistence


def test_save_load_round_trip_gives_identical_probabilities(head: MLPHead, tmp_path: Path) -> None:
    head.save(tmp_path)
    meta = json.loads((tmp_path / "head.json").read_text(encoding="utf-8"))
    assert meta["format"] == HEAD_FORMAT
    assert meta["classes"] == sorted(LABELS)
    assert meta["n_features_in"] == DIM and meta["hidden_sizes"] == [32]
    loaded = MLPHead.load(tmp_path, device="cpu")
    np.testing.assert_array_equal(loaded.predict_proba(X_TEST), head.predict_proba(X_TEST))
    np.testing.assert_array_equal(loaded.classes_, head.classes_)
    assert loaded.temperature_ == head.temperature_
    assert loaded.best_epoch_ == head.best_epoch_
    assert loaded.get_params() == {**head.get_params(), "device": "cpu"}


def test_tampered_weights_are_rejected(head: MLPHead, tmp_path: Path) -> None:
    head.save(tmp_path)
    weights = tmp_path / "head.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="corrupt"):
        MLPHead.load(tmp_path)


def test_other_format_version_is_rejected(head: MLPHead, tmp_path: Path) -> None:
    head.save(tmp_path)
    meta_path = tmp_path / "head.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["format"] = "jobembed-head/2"
    meta_path.write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(BundleError, match=r"jobembed-head/1.*jobembed-head/2.*retrain with this jobembed version"):
        MLPHead.load(tmp_path)


def test_missing_bundle_is_a_bundle_error(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not found"):
        MLPHead.load(tmp_path)


# ------------------------------------------------------------------------ sklearn contract, errors


def test_clone_and_get_params_round_trip() -> None:
    h = MLPHead(hidden_sizes=(8, 4), dropout=0.3, class_weight="balanced", random_state=7)
    c = clone(h)
    assert c.get_params() == h.get_params()
    assert MLPHead(**h.get_params()).get_params() == h.get_params()
    assert c.set_params(dropout=0.1).dropout == 0.1


def test_clone_of_fitted_head_is_unfitted(head: MLPHead) -> None:
    with pytest.raises(NotFittedError):
        clone(head).predict(X_TEST)


def test_predict_before_fit_raises_not_fitted() -> None:
    with pytest.raises(NotFittedError):
        MLPHead().predict_proba(X_TEST)


def test_wrong_feature_dimension_is_a_clear_error(head: MLPHead) -> None:
    with pytest.raises(HeadInputError, match=f"16 features.*fitted on {DIM}") as info:
        head.predict(np.zeros((3, 16), dtype=np.float32))
    assert isinstance(info.value, ValueError) and isinstance(info.value, DataError)


@pytest.mark.parametrize(
    ("X", "y", "pattern"),
    [
        (X_TRAIN[0], Y_TRAIN[:1], "2-D"),
        (np.where(np.arange(DIM) == 3, np.nan, X_TRAIN), Y_TRAIN, "NaN"),
        (X_TRAIN, Y_TRAIN[:-1], f"{len(Y_TRAIN) - 1} labels but X has {len(Y_TRAIN)} rows"),
        (X_TRAIN, np.full(len(Y_TRAIN), "kierowca"), "single class"),
    ],
)
def test_bad_training_data_is_a_clear_error(X: np.ndarray, y: np.ndarray, pattern: str) -> None:
    with pytest.raises(HeadInputError, match=pattern):
        MLPHead(**FAST).fit(X, y)


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("dropout", 1.0),
        ("class_weight", "inverse"),
        ("hidden_sizes", (0,)),
        ("batch_size", 0),
        ("learning_rate", 0.0),
        ("validation_fraction", 1.0),
        ("device", "tpu-ish"),
    ],
)
def test_bad_hyperparameter_raises_config_error_in_fit(param: str, value: object) -> None:
    h = MLPHead(**{param: value})  # construction never validates (scikit-learn contract)
    with pytest.raises(ConfigError, match=param if param != "device" else "device"):
        h.fit(X_TRAIN, Y_TRAIN)


def test_from_config_maps_every_field() -> None:
    cfg = HeadConfig(hidden_sizes=[64, 32], dropout=0.1, class_weight="balanced", patience=5, seed=42)
    h = MLPHead.from_config(cfg)
    assert h.hidden_sizes == (64, 32)
    assert (h.dropout, h.class_weight, h.patience, h.random_state) == (0.1, "balanced", 5, 42)
    assert h.max_epochs == cfg.max_epochs and h.validation_fraction == cfg.validation_fraction


# ------------------------------------------------------------------------------- validation data


def test_unseen_validation_labels_are_ignored_with_a_warning() -> None:
    X_val = np.vstack([X_TEST, X_TEST[:4] + 5])
    y_val = np.concatenate([Y_TEST, ["ogrodnik"] * 4])
    with pytest.warns(UserWarning, match="ogrodnik"):
        h = MLPHead(**FAST).fit(X_TRAIN, Y_TRAIN, X_val=X_val, y_val=y_val)
    assert "ogrodnik" not in h.classes_
    assert h.calibration_["n_val"] == len(Y_TEST)


def test_singleton_class_stays_in_training() -> None:
    X = np.vstack([X_TRAIN, CENTERS[:1].astype(np.float32) + 8])
    y = np.concatenate([Y_TRAIN, ["ogrodnik"]])
    h = MLPHead(**FAST).fit(X, y)
    assert "ogrodnik" in h.classes_
    tr, va = h._holdout(np.searchsorted(h.classes_, y), h.random_state, None)
    assert len(y) - 1 in tr and len(y) - 1 not in va
    assert set(LABELS) - {RARE} <= set(y[va])  # stratified: every common class is validated
    assert h.calibration_["n_val"] == len(va)


def test_early_stopping_holdout_keeps_reposts_together() -> None:
    """Reproduces: the MLP's own holdout (inside CV) was stratified but not grouped, so a repost in training and
    its copy in the early-stopping rows made validation look better than it is."""
    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(len(Y_TRAIN) // 3 + 1), 3)[: len(Y_TRAIN)]
    y = Y_TRAIN[np.searchsorted(groups, groups, side="left")]  # one label per group
    X = X_TRAIN + rng.normal(scale=0.01, size=X_TRAIN.shape).astype(np.float32)
    head = MLPHead(**FAST)
    tr, va = head._holdout(np.unique(y, return_inverse=True)[1], 0, groups)
    assert not set(groups[tr]) & set(groups[va])
    assert len(set(y[va])) >= len(set(y)) - 1  # still stratified
    fitted = MLPHead(**FAST).fit(X, y, groups=groups)
    _, va_fit = fitted._holdout(np.unique(y, return_inverse=True)[1], fitted.random_state, groups)
    assert fitted.calibration_["n_val"] == len(va_fit)
    with pytest.raises(HeadInputError, match="groups"):
        MLPHead(**FAST).fit(X, y, groups=groups[:-1])


@pytest.mark.parametrize("standardize", [True, False])
def test_standardize_keeps_training_statistics_in_the_weights(tmp_path: Path, standardize: bool) -> None:
    X = X_TRAIN * 0.01 + 5.0  # tiny, offset coordinates: the regime of unit-norm sentence embeddings
    head = MLPHead(**FAST, standardize=standardize, random_state=0).fit(X, Y_TRAIN)
    stats = head.model_[0]
    if standardize:
        np.testing.assert_allclose(stats.mean.numpy(), X.mean(axis=0), rtol=1e-3)  # training part of X
    else:
        assert torch.count_nonzero(stats.mean) == 0 and torch.all(stats.scale == 1)
    head.save(tmp_path)
    loaded = MLPHead.load(tmp_path, device="cpu")
    np.testing.assert_array_equal(loaded.model_[0].mean.numpy(), stats.mean.numpy())
    np.testing.assert_allclose(loaded.predict_proba(X), head.predict_proba(X), rtol=1e-6)
