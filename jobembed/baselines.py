"""The bars every trained head must clear.

- Frozen-encoder cosine, zero-shot: argmax cosine between an ad and each category's embedded name
  and/or description. Needs no labelled ads at all.
- Frozen-encoder cosine to class centroids: the mean training embedding of each class.
- Logistic regression on the frozen embeddings: the plain scikit-learn reference for any head.
- TF-IDF (word + character n-grams) + logistic regression: the classical text baseline, no encoder.

The cosine classifiers follow scikit-learn conventions and can be saved as safetensors + JSON, so a
bundle can serve them exactly like the MLP head.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import FeatureUnion, Pipeline
from sklearn.utils.validation import check_is_fitted

from jobembed.artifacts import check_format, file_sha256, read_json, write_json
from jobembed.errors import BundleError, DataError
from jobembed.metrics import fit_temperature, softmax
from jobembed.sections import TfidfConfig

COSINE_FORMAT = "jobembed-cosine/1"


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class CosineClassifier(ClassifierMixin, BaseEstimator):
    """Nearest prototype by cosine; probabilities are ``softmax(cosine / temperature)``.

    Args:
        temperature: softmax temperature for ``predict_proba``; refit on validation data with
            ``calibrate`` (cosines live in [-1, 1], so a useful temperature is small, around 0.01-0.1).
    """

    def __init__(self, *, temperature: float = 0.05) -> None:
        self.temperature = temperature

    def fit_prototypes(self, prototypes: np.ndarray, classes: list[str] | np.ndarray) -> CosineClassifier:
        """Use one given vector per class (e.g. embedded category descriptions).

        Args:
            prototypes: (n_classes, dim) vectors, any norm.
            classes: n_classes labels, in the row order of ``prototypes``.
        """
        if len(prototypes) != len(classes) or len(classes) == 0:
            raise DataError(f"{len(prototypes)} prototypes for {len(classes)} classes", fix="give one per class")
        order = np.argsort(np.asarray(classes, dtype=str))
        self.classes_ = np.asarray(classes, dtype=str)[order]
        self.prototypes_ = _unit(np.asarray(prototypes))[order]
        self.n_features_in_ = self.prototypes_.shape[1]
        self.temperature_ = float(self.temperature)
        return self

    def fit(self, X: np.ndarray, y: list[str] | np.ndarray) -> CosineClassifier:
        """Zero-shot fit: each row of ``X`` is the prototype of the label in ``y`` (one row per class)."""
        return self.fit_prototypes(X, y)

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Cosine similarities, shape (n, n_classes)."""
        check_is_fitted(self, "prototypes_")
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise DataError(
                f"expected vectors of dim {self.n_features_in_}, found shape {X.shape}",
                fix="embed with the same encoder the classifier was fitted on",
            )
        return _unit(X) @ self.prototypes_.T

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return softmax(self.decision_function(X) / self.temperature_)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[np.argmax(self.decision_function(X), axis=1)]

    def calibrate(self, X_val: np.ndarray, y_val: np.ndarray) -> CosineClassifier:
        """Fit the softmax temperature on held-out vectors (labels unknown to the classifier are ignored)."""
        y_val = np.asarray(y_val, dtype=str)
        known = np.isin(y_val, self.classes_)
        if known.sum() >= 2:
            idx = np.searchsorted(self.classes_, y_val[known])
            self.temperature_ = fit_temperature(self.decision_function(np.asarray(X_val)[known]), idx)
        return self

    def save(self, path: Path) -> None:
        """``path/head.safetensors`` (prototypes) + ``path/head.json`` (format, classes, temperature, hash)."""
        check_is_fitted(self, "prototypes_")
        path.mkdir(parents=True, exist_ok=True)
        weights = path / "head.safetensors"
        save_file({"prototypes": np.ascontiguousarray(self.prototypes_)}, str(weights))
        write_json(
            path / "head.json",
            {
                "format": COSINE_FORMAT,
                "kind": "cosine",
                "classes": self.classes_.tolist(),
                "temperature": self.temperature_,
                "n_features_in": int(self.n_features_in_),
                "sha256": file_sha256(weights),
            },
        )

    @classmethod
    def load(cls, path: Path) -> CosineClassifier:
        meta = read_json(path / "head.json")
        check_format(path / "head.json", meta, COSINE_FORMAT, what="head format")
        weights = path / "head.safetensors"
        if file_sha256(weights) != meta["sha256"]:
            raise BundleError(f"{weights} is corrupt (hash mismatch)", fix="re-create the bundle")
        clf = cls(temperature=meta["temperature"])
        clf.fit_prototypes(load_file(str(weights))["prototypes"], meta["classes"])
        clf.temperature_ = float(meta["temperature"])
        return clf


class CentroidClassifier(CosineClassifier):
    """Cosine to the normalised mean training embedding of each class."""

    def fit(self, X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None) -> CentroidClassifier:
        """Args: X (n, dim) vectors; y (n,) labels; sample_weight (n,) weights of the rows in their class's mean."""
        X, y = _unit(np.asarray(X)), np.asarray(y, dtype=str)
        classes = np.unique(y)
        if sample_weight is None:
            centroids = np.stack([X[y == c].mean(axis=0) for c in classes])
        else:
            w = np.asarray(sample_weight, dtype=np.float64)
            centroids = np.stack([np.average(X[y == c], axis=0, weights=w[y == c] + 1e-12) for c in classes])
        return self.fit_prototypes(centroids, classes)


def balanced_sample_weight(y: np.ndarray, sample_weight: np.ndarray) -> np.ndarray:
    """scikit-learn's ``class_weight="balanced"`` folded into per-row weights, counting each class by its rows' total
    weight: ``w_i * W / (k * W_{y_i})``. Equal to ``"balanced"`` when every weight is 1."""
    y, w = np.asarray(y, dtype=str), np.asarray(sample_weight, dtype=np.float64)
    classes, idx = np.unique(y, return_inverse=True)
    totals = np.bincount(idx, weights=w, minlength=len(classes))
    return w * w.sum() / (len(classes) * np.maximum(totals[idx], 1e-12))


def tfidf_logreg(config: TfidfConfig, *, seed: int = 13, balanced: bool = True) -> Pipeline:
    """TF-IDF over word and character n-grams, then multinomial logistic regression.

    Character n-grams (within word boundaries) carry Polish/Danish inflection and compounds that word
    n-grams miss; sublinear TF keeps long boilerplate-heavy ads from dominating. ``balanced=False`` leaves the class
    weights to the caller's ``logreg__sample_weight`` (``balanced_sample_weight``).
    """
    features = FeatureUnion(
        [
            (
                "word",
                TfidfVectorizer(
                    analyzer="word",
                    ngram_range=tuple(config.word_ngrams),
                    sublinear_tf=True,
                    min_df=2,
                    max_features=config.max_features,
                    lowercase=True,
                ),
            ),
            (
                "char",
                TfidfVectorizer(
                    analyzer="char_wb",
                    ngram_range=tuple(config.char_ngrams),
                    sublinear_tf=True,
                    min_df=2,
                    max_features=config.max_features,
                    lowercase=True,
                ),
            ),
        ]
    )
    clf = LogisticRegression(
        C=config.C,
        max_iter=config.max_iter,
        tol=config.tol,
        class_weight="balanced" if balanced else None,
        random_state=seed,
    )
    return Pipeline([("tfidf", features), ("logreg", clf)])


def embedding_logreg(*, seed: int = 13, C: float = 10.0, balanced: bool = True) -> LogisticRegression:
    """Plain logistic regression on frozen embeddings: the reference an MLP head must beat.

    C=10 because unit-norm embeddings have small coordinates; the default C=1 over-regularises them.
    ``balanced=False``: the caller passes ``balanced_sample_weight`` to ``fit``.
    """
    return LogisticRegression(C=C, max_iter=3000, class_weight="balanced" if balanced else None, random_state=seed)
