import numpy as np
import pandas as pd
import pytest

from jobembed.baselines import (
    CentroidClassifier,
    CosineClassifier,
    embedding_logreg,
    tfidf_logreg,
)
from jobembed.data import label_texts
from jobembed.errors import BundleError, DataError
from jobembed.sections import TfidfConfig
from tests.synthetic import make_ads


@pytest.fixture(scope="module")
def blobs():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 16)) * 3
    y = np.repeat(np.array(["d", "a", "c", "b"]), 50)
    X = centers[np.searchsorted(np.array(["a", "b", "c", "d"]), y)] + rng.normal(size=(200, 16))
    return X.astype(np.float32), y


def test_centroid_classifies_blobs_and_orders_classes(blobs):
    X, y = blobs
    clf = CentroidClassifier().fit(X, y)
    assert list(clf.classes_) == ["a", "b", "c", "d"]
    assert (clf.predict(X) == y).mean() > 0.95
    proba = clf.predict_proba(X)
    assert proba.shape == (200, 4)
    np.testing.assert_allclose(proba.sum(axis=1), 1, atol=1e-5)
    assert (clf.classes_[proba.argmax(1)] == clf.predict(X)).all()


def test_zero_shot_uses_given_prototypes(blobs):
    X, y = blobs
    protos = np.stack([X[y == c].mean(0) for c in ["c", "a"]])
    clf = CosineClassifier().fit_prototypes(protos, ["c", "a"])
    pred = clf.predict(X[np.isin(y, ["a", "c"])])
    assert (pred == y[np.isin(y, ["a", "c"])]).mean() > 0.95


def test_calibrate_fits_temperature_and_ignores_unknown_labels(blobs):
    X, y = blobs
    clf = CentroidClassifier(temperature=1.0).fit(X[y != "d"], y[y != "d"])
    clf.calibrate(X, y)  # "d" is unknown to the classifier: ignored, no crash
    assert 0 < clf.temperature_ < 1.0  # cosines in [-1, 1] need a small temperature to be confident


def test_cosine_dimension_mismatch_is_clear(blobs):
    X, y = blobs
    clf = CentroidClassifier().fit(X, y)
    with pytest.raises(DataError, match="dim 16"):
        clf.predict(X[:, :8])


def test_cosine_save_load_roundtrip_and_tamper(tmp_path, blobs):
    X, y = blobs
    clf = CentroidClassifier().fit(X, y).calibrate(X, y)
    clf.save(tmp_path / "h")
    again = CosineClassifier.load(tmp_path / "h")
    np.testing.assert_allclose(again.predict_proba(X), clf.predict_proba(X), rtol=1e-6)
    weights = tmp_path / "h" / "head.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(BundleError, match="corrupt"):
        CosineClassifier.load(tmp_path / "h")


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("name", ["Drivers", "x"]),
        ("description", ["Drive trucks", "x"]),
        ("name_description", ["Drivers. Drive trucks", "x"]),
    ],
)
def test_label_texts_modes_fall_back_to_name_or_label(mode, expected):
    labels = pd.DataFrame({"label": ["83", "x"], "name": ["Drivers", ""], "description": ["Drive trucks", ""]})
    assert label_texts(labels, mode) == expected


def test_tfidf_and_embedding_logreg_learn():
    ads = make_ads(15, seed=1)
    train, test = ads.iloc[:70], ads.iloc[70:]
    model = tfidf_logreg(TfidfConfig(max_features=5000), seed=0).fit(train["text"], train["label"])
    assert (model.predict(test["text"]) == test["label"]).mean() > 0.8
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 8)) + np.repeat(np.eye(3, 8) * 4, 20, axis=0)
    y = np.repeat(["a", "b", "c"], 20)
    assert (embedding_logreg(seed=0).fit(X, y).predict(X) == y).mean() > 0.95
