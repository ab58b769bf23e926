"""Top-down classification over nested codes: first the parent group, then the class within it.

The recipe of the published reference on pl-jobads (Beręsewicz et al., arXiv 2411.03779: the 1-digit ISCO group
first, then the 2-digit code within it, probabilities multiplied):

    P(class) = P_parent(parent(class)) * P_class(class) / sum of P_class over the classes of that parent

``P_parent`` is a model of the same kind trained on the parent labels (sub-major summed into major: every ad of
a group pooled, so a rare class's parent still has many examples); ``P_class`` is the flat model, read only
within the parent (the reference trains one model per parent; the flat model sees every other class as a
negative, which 5k ads cannot afford to give up). The ``hier`` system of report trains one MLP with a second,
parent-level loss instead; this one keeps two models and multiplies.

Data contract: ``fit(X, y, texts=..., parents=...)`` with ``X`` ``(n, d)`` embeddings, ``y`` the class labels,
``parents`` a class -> parent map (a class missing from it is its own parent); ``predict_proba(X, texts=...)``
``(m, k)`` in ``classes_`` order. ``base`` is ``mlp`` (texts unused) or ``fusion`` (TF-IDF + MLP, texts read).

Saved as ``topdown.json`` plus ``class/`` and ``parent/`` (each ``MLPHead.save`` or ``HybridHead.save``): no pickle.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from jobembed.artifacts import check_format, read_json, write_json
from jobembed.errors import BundleError, DataError
from jobembed.head import MLPHead, holdout_split
from jobembed.hybrid import HybridHead
from jobembed.sections import HeadConfig, HybridConfig, TfidfConfig

TOPDOWN_FORMAT = "jobembed-topdown/1"
TOPDOWN_BASES = ("mlp", "fusion")


class TopDownHead(ClassifierMixin, BaseEstimator):
    """A parent-level model times the class model renormalised within each parent (see the module docstring).

    Args:
        base: ``"mlp"`` or ``"fusion"``: the kind of both models.
        head, tfidf, hybrid: the MLP, TF-IDF + LR and fusion settings of the base models.

    Attributes:
        classes_: ``(k,)`` sorted str labels.
        parents_: class -> parent, for every class.
        class_model_: the flat model on the classes.
        parent_model_: the model on the parents.
    """

    reads_texts = True  # with base "fusion"; texts are ignored by an MLP base

    def __init__(
        self,
        *,
        base: str = "fusion",
        head: HeadConfig | None = None,
        tfidf: TfidfConfig | None = None,
        hybrid: HybridConfig | None = None,
    ) -> None:
        self.base = base
        self.head = head
        self.tfidf = tfidf
        self.hybrid = hybrid

    def _model(self) -> MLPHead | HybridHead:
        if self.base == "mlp":
            return MLPHead.from_config(self.head or HeadConfig())
        # Without the prior correction: its class prior would be the parent's or the group's, a correction nobody
        # measured, and the product of two corrected levels is not the flat one.
        hybrid = (self.hybrid or HybridConfig()).model_copy(update={"prior_power": 0.0})
        return HybridHead(mode="fusion", head=self.head, tfidf=self.tfidf, hybrid=hybrid)

    def _fit_one(self, model, X, y, texts, X_val, y_val, texts_val, sample_weight):
        if isinstance(model, MLPHead):
            return model.fit(X, y, X_val=X_val, y_val=y_val, sample_weight=sample_weight)
        return model.fit(X, y, texts=texts, X_val=X_val, y_val=y_val, texts_val=texts_val, sample_weight=sample_weight)

    def fit(
        self,
        X: np.ndarray,
        y: Sequence[str],
        *,
        texts: Sequence[str],
        parents: Mapping[str, str],
        X_val: np.ndarray | None = None,
        y_val: Sequence[str] | None = None,
        texts_val: Sequence[str] | None = None,
        groups: Sequence[Any] | None = None,
        sample_weight: Sequence[float] | None = None,
    ) -> TopDownHead:
        """Fit the class model and the parent model on the same rows, both stopped early (and calibrated, and for
        fusion weighted) on the same validation rows: given, or one stratified, repost-grouped slice held out here.

        Args:
            X: ``(n, d)`` embeddings; y: ``(n,)`` labels; texts: the ``n`` texts.
            parents: class -> parent class.
            X_val, y_val, texts_val: validation rows, all three or none.
            groups: ``(n,)`` repost groups, for the held-out slice.
            sample_weight: ``(n,)`` row weights (needs validation rows given).
        """
        if self.base not in TOPDOWN_BASES:
            raise DataError(f"TopDownHead base={self.base!r}", expected=" | ".join(TOPDOWN_BASES))
        X, y, texts = np.asarray(X, dtype=np.float32), np.asarray(y, dtype=str), list(texts)
        if not (len(X) == len(y) == len(texts)):
            raise DataError(f"X, y and texts differ in length ({len(X)}, {len(y)}, {len(texts)})")
        if X_val is None:
            head = self.head or HeadConfig()
            if sample_weight is not None:
                raise DataError("TopDownHead takes sample_weight only with validation rows given")
            tr, va = holdout_split(
                np.unique(y, return_inverse=True)[1],
                fraction=head.validation_fraction,
                seed=head.seed,
                groups=np.arange(len(y)) if groups is None else np.asarray(groups),
            )
            X_val, y_val, texts_val = X[va], y[va], [texts[i] for i in va]
            X, y, texts = X[tr], y[tr], [texts[i] for i in tr]
        y_val = np.asarray(y_val, dtype=str)
        texts_val = list(texts_val) if texts_val is not None else [""] * len(y_val)
        self.classes_ = np.unique(y)
        self.parents_ = {str(c): str(parents.get(str(c), c)) for c in self.classes_}
        up = np.vectorize(lambda c: self.parents_.get(str(c), str(c)), otypes=[str])
        self.class_model_ = self._fit_one(self._model(), X, y, texts, X_val, y_val, texts_val, sample_weight)
        self.parent_model_ = self._fit_one(self._model(), X, up(y), texts, X_val, up(y_val), texts_val, sample_weight)
        return self

    def _proba(self, model, X: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        if isinstance(model, HybridHead):
            return model.predict_proba(X, texts=texts)
        return model.predict_proba(X)

    def predict_proba(self, X: np.ndarray, *, texts: Sequence[str]) -> np.ndarray:
        """``(n, k)`` probabilities in ``classes_`` order: the parent's probability times the class's share of it."""
        check_is_fitted(self, "parent_model_")
        X, texts = np.asarray(X, dtype=np.float32), list(texts)
        p_class = self._proba(self.class_model_, X, texts)
        p_parent = self._proba(self.parent_model_, X, texts)
        parent_classes = np.asarray(self.parent_model_.classes_, dtype=str)
        column = np.searchsorted(parent_classes, [self.parents_[str(c)] for c in self.classes_])
        members = np.zeros((len(self.classes_), len(parent_classes)))
        members[np.arange(len(self.classes_)), column] = 1.0
        within = p_class @ members  # (n, p): the class model's mass on each parent
        share = p_class / np.maximum(within[:, column], 1e-12)
        out = share * p_parent[:, column]
        return out / np.maximum(out.sum(axis=1, keepdims=True), 1e-12)

    def predict(self, X: np.ndarray, *, texts: Sequence[str]) -> np.ndarray:
        return self.classes_[self.predict_proba(X, texts=texts).argmax(axis=1)]

    def save(self, path: Path) -> None:
        """``path/topdown.json`` + ``path/class/`` + ``path/parent/``."""
        check_is_fitted(self, "parent_model_")
        path = Path(path)
        self.class_model_.save(path / "class")
        self.parent_model_.save(path / "parent")
        write_json(
            path / "topdown.json",
            {
                "format": TOPDOWN_FORMAT,
                "base": self.base,
                "classes": self.classes_.tolist(),
                "parents": self.parents_,
            },
        )

    @classmethod
    def load(cls, path: Path, *, device: str = "auto") -> TopDownHead:
        path = Path(path)
        if not (path / "topdown.json").is_file():
            raise BundleError(f"{path / 'topdown.json'} not found", fix="re-create the bundle")
        meta = read_json(path / "topdown.json")
        check_format(path / "topdown.json", meta, TOPDOWN_FORMAT)
        model = cls(base=meta["base"])
        loader = MLPHead.load if meta["base"] == "mlp" else HybridHead.load
        model.class_model_ = loader(path / "class", device=device)
        model.parent_model_ = loader(path / "parent", device=device)
        model.classes_ = np.asarray(meta["classes"], dtype=str)
        model.parents_ = {str(k): str(v) for k, v in meta["parents"].items()}
        return model
