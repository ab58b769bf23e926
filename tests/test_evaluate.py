"""evaluate_systems: the pure comparison, on synthetic vectors (no encoder, no files)."""

import numpy as np
import pandas as pd
import pytest

from jobembed.config import PipelineConfig
from jobembed.embed import RunVectors
from jobembed.errors import DataError
from jobembed.evaluate import EvalSettings, evaluate_systems

CLASSES = ["a", "b", "c"]


def _splits(n_per_class=30, seed=0, single_class=False):
    rng = np.random.default_rng(seed)
    labels = np.repeat(["a"] if single_class else CLASSES, n_per_class)
    rng.shuffle(labels)
    words = {"a": "kierowca ciężarówki", "b": "pielęgniarka szpital", "c": "programista python"}
    frame = pd.DataFrame(
        {
            "id": [f"ad{i}" for i in range(len(labels))],
            "text": [f"{words[y]} oferta {rng.integers(1000)}" for y in labels],
            "label": labels,
            "group": np.arange(len(labels)) // 2,  # pairs of reposts
        }
    )
    n = len(frame)
    parts = {"train": frame.iloc[: n // 2], "val": frame.iloc[n // 2 : 2 * n // 3], "test": frame.iloc[2 * n // 3 :]}
    return {k: v.reset_index(drop=True) for k, v in parts.items()}


def _vectors(splits, name, fingerprint, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(3, 16)) * 2

    def enc(frame):
        idx = np.searchsorted(CLASSES, frame["label"].to_numpy())
        return (centers[idx] + rng.normal(size=(len(frame), 16))).astype(np.float32)

    return RunVectors(
        name, fingerprint, "fp32", None, enc(splits["train"]), enc(splits["val"]), enc(splits["test"]), centers[:3]
    )


LABELS = pd.DataFrame({"label": CLASSES, "name": CLASSES, "description": ["", "", ""]})


def _config(**report):
    return PipelineConfig.model_validate(
        {
            "text_column": "text",  # the in-memory splits here have no clean stage's column
            "report": {"cv_folds": 3, "bootstrap": 50, "tfidf": {"max_features": 500}, **report},
            "head": {"max_epochs": 20},
        }
    )


def test_every_system_with_unique_keys_and_readable_names():
    splits = _splits()
    vectors = {
        "runs/a/encoder": _vectors(splits, "runs/a/encoder", "1" * 16),
        "runs/b/encoder": _vectors(splits, "runs/b/encoder", "2" * 16, 1),
    }
    result = evaluate_systems(
        settings=EvalSettings.of(_config()), splits=splits, labels=LABELS, vectors=vectors, progress=False
    )
    systems = result.metrics["systems"]
    assert len(systems) == 1 + 5 * 2  # tfidf once, the others (fusion included) per encoder
    assert "mlp@encoder-11111111" in systems and "mlp@encoder-22222222" in systems
    assert systems["mlp@encoder-11111111"]["display"] == "mlp@encoder-11111111"  # same short name: slug shown
    assert result.metrics["winner"] == result.metrics["ranking"][0]
    assert set(result.models) == set(systems) and set(result.per_class) == set(systems)
    for r in systems.values():
        lo, hi = r["test_ci95"]["accuracy"]
        assert lo <= r["test"]["accuracy"] <= hi


def test_single_class_is_a_clear_error():
    splits = _splits(single_class=True)
    with pytest.raises(DataError, match="single class"):
        evaluate_systems(settings=EvalSettings.of(_config()), splits=splits, labels=LABELS, vectors={}, progress=False)


def test_more_folds_than_groups_is_a_clear_error():
    splits = _splits(n_per_class=4)
    with pytest.raises(DataError, match="--cv-folds 50"):
        evaluate_systems(
            settings=EvalSettings.of(_config(cv_folds=50)), splits=splits, labels=LABELS, vectors={}, progress=False
        )


def test_cv_folds_larger_than_the_smallest_class_still_runs():
    """Reproduces: --cv-folds larger than the smallest class crashed (the MLP's own holdout inside a fold)."""
    splits = _splits(n_per_class=12)
    vectors = {"m": _vectors(splits, "m", "3" * 16)}
    result = evaluate_systems(
        settings=EvalSettings.of(_config(cv_folds=8, systems=["mlp", "centroid"])),
        splits=splits,
        labels=LABELS,
        vectors=vectors,
        progress=False,
    )
    assert len(result.metrics["systems"]["mlp@m-33333333"]["cv"]["folds"]) == 8


def test_out_of_fold_probabilities_are_the_fold_models_answers_and_read_back(tmp_path):
    """Every CV system's out-of-fold probabilities (what a second round's judge reads): one row per dev ad, columns
    the dev classes, the argmax is the out-of-fold prediction, and report/oof/ reads back the same numbers."""
    from jobembed.oof import read_oof, write_oof

    splits = _splits()
    vectors = {"enc": _vectors(splits, "enc", "1" * 16)}
    result = evaluate_systems(
        settings=EvalSettings.of(_config(systems=["tfidf", "centroid", "mlp"])),
        splits=splits,
        labels=LABELS,
        vectors=vectors,
        progress=False,
    )
    n_dev = len(splits["train"]) + len(splits["val"])
    assert set(result.oof_proba) == set(result.metrics["systems"])
    for key, proba in result.oof_proba.items():
        assert proba.shape == (n_dev, 3)
        np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
        assert (np.array(CLASSES)[proba.argmax(axis=1)] == result.oof_pred[key]).mean() > 0.97  # ties aside
    write_oof(
        tmp_path / "oof",
        ids=result.dev_ids,
        labels=result.y_dev,
        probs=result.oof_proba,
        file_keys={k: k.replace("/", "_") for k in result.oof_proba},
        macro_f1={},
    )
    key = "mlp@enc-11111111"
    back = read_oof(tmp_path / "oof" / f"{key}.parquet")
    assert back.system == key and back.classes.tolist() == CLASSES
    np.testing.assert_allclose(back.probs, result.oof_proba[key], atol=1e-6)
    ids = np.array(["ad7", "ad0"])
    np.testing.assert_allclose(
        back.rows_for(ids, what="ads", source=tmp_path), result.oof_proba[key][[7, 0]], atol=1e-6
    )
    with pytest.raises(DataError, match=r"1 of the 2 ads are not among them \(first: 'elsewhere'\)"):
        back.rows_for(np.array(["ad1", "elsewhere"]), what="ads", source=tmp_path)
