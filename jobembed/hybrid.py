"""Lexical + semantic heads: TF-IDF + logistic regression and the MLP head on embeddings, combined.

TF-IDF + LR and the embedding MLP see different things (word and character n-grams of the ad vs a dense
summary of its first tokens), and on pl-jobads they disagree on about a quarter of the ads. Two ways to
combine them, both fit on the same training rows as every other system:

- ``fusion``: late fusion of calibrated probabilities, ``log p = w log p_tfidf + (1 - w) log p_mlp`` (a
  weighted geometric pool), renormalised and re-calibrated; ``w`` is chosen on validation by log-loss. With
  ``hybrid.prior_power`` a > 0 the result is divided by the training ads' class shares to the power a
  (logit adjustment), so rare classes win ads the frequent ones took.
- ``stack``: out-of-fold TF-IDF + LR log-probabilities appended to the embedding as MLP inputs; the MLP
  learns per class when to trust the lexical model. Out-of-fold, so no training row's extra features come
  from a model that saw its label.

Data contract: ``fit(X, y, texts=...)`` with ``X`` ``(n, d)`` embeddings and ``texts`` the ``n`` texts the
embeddings were made from; ``predict_proba(X, texts=...)`` ``(m, k)`` in ``classes_`` order.

Saved as ``hybrid.json`` plus ``tfidf/`` (vocabularies in JSON, idf and LR weights in safetensors) and
``mlp/`` (``MLPHead.save``): a server loads it without pickle. ``hybrid.json`` is format 1 without a prior
correction (as before it existed) and format 2 with one, so a jobembed that predates it refuses the head instead of
answering without the correction.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from safetensors.numpy import load_file, save_file
from scipy.special import log_softmax, softmax
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics import f1_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.utils.validation import check_is_fitted

from jobembed.artifacts import check_format, file_sha256, read_json, write_json
from jobembed.baselines import balanced_sample_weight, tfidf_logreg
from jobembed.errors import BundleError, DataError
from jobembed.head import MLPHead, holdout_split
from jobembed.metrics import fit_temperature, nll
from jobembed.sections import HeadConfig, HybridConfig, TfidfConfig

TFIDF_FORMAT = "jobembed-tfidf/1"
HYBRID_FORMAT = "jobembed-hybrid/1"
HYBRID_PRIOR_FORMAT = "jobembed-hybrid/2"  # with prior_power > 0: class_prior and prior_power in hybrid.json
HYBRID_MODES = ("fusion", "stack")
# Floor of a probability before its log: an LR probability of exactly 0 would make a log-feature of -inf.
_EPS = 1e-6
_TEMPERATURE_BOUNDS = (0.05, 20.0)
# Vectorizer settings that travel in tfidf.json; everything else is the scikit-learn default.
# Fitted TF-IDF + LR parts by (texts, labels, settings, seed), for this process: report fits the same one for fusion
# and stack on every encoder of a fold (the frozen one, the fine-tuned one, each seed), ~26 s a fit on 5.5k ads. The
# fitted parts are never changed in place (calibrate sets the wrapper's own temperature), so hits share them. Enough
# entries for 5 CV folds and the test fit of two systems; ~50 MB each at 2 x 50k features and 39 classes.
_FITS: OrderedDict[str, tuple[Any, ...]] = OrderedDict()
_FITS_KEPT = 12


def _fit_key(texts: list[str], y: np.ndarray, config: TfidfConfig, seed: int, weights: np.ndarray | None = None) -> str:
    h = hashlib.sha1()
    w = "" if weights is None else weights.astype(np.float64).tobytes().hex()
    for part in (config.model_dump_json(), str(seed), "\x1e".join(texts), "\x1e".join(y.tolist()), w):
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\x1d")
    return h.hexdigest()


_VECTORIZER_PARAMS = ("analyzer", "ngram_range", "lowercase", "sublinear_tf", "norm", "use_idf", "smooth_idf")


class TfidfLogReg(ClassifierMixin, BaseEstimator):
    """Word + char n-gram TF-IDF into logistic regression (``baselines.tfidf_logreg``), savable without pickle.

    Args:
        config: the TF-IDF settings (n-gram ranges, features per vectorizer, C, iterations, tolerance).
        random_state: the LR's seed.

    Attributes:
        classes_: ``(k,)`` sorted str labels.
        vectorizers_: the fitted word and char vectorizers.
        coef_: ``(k, f)`` LR weights (binary problems are expanded to two rows); intercept_: ``(k,)``.
        temperature_: softmax temperature (``calibrate``; 1.0 until then).
    """

    def __init__(self, *, config: TfidfConfig | None = None, random_state: int = 13) -> None:
        self.config = config
        self.random_state = random_state

    def fit(self, texts: Sequence[str], y: Sequence[str], sample_weight: Sequence[float] | None = None) -> TfidfLogReg:
        """Fit on ``texts`` and their labels; the same inputs and settings fitted before in this process are not
        fitted again (a deterministic fit: same seed, same result). ``sample_weight``: per-row weights (rows that are
        not ads weigh less); the classes stay balanced, each counted by its rows' total weight."""
        config, texts, y = self.config or TfidfConfig(), list(texts), np.asarray(y, dtype=str)
        weights = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        key = _fit_key(texts, y, config, self.random_state, weights)
        if key in _FITS:
            _FITS.move_to_end(key)
        else:
            _FITS[key] = self._fit_parts(texts, y, config, weights)
            while len(_FITS) > _FITS_KEPT:
                _FITS.popitem(last=False)
        self.vectorizers_, self.coef_, self.intercept_, self.classes_ = _FITS[key]
        self.temperature_ = 1.0
        return self

    def _fit_parts(
        self, texts: list[str], y: np.ndarray, config: TfidfConfig, weights: np.ndarray | None = None
    ) -> tuple[Any, ...]:
        pipe = tfidf_logreg(config, seed=self.random_state, balanced=weights is None)
        if weights is None:
            pipe.fit(texts, y)
        else:
            pipe.fit(texts, y, logreg__sample_weight=balanced_sample_weight(y, weights))
        lr = pipe.named_steps["logreg"]
        coef, intercept = lr.coef_.astype(np.float64), lr.intercept_.astype(np.float64)
        if coef.shape[0] == 1:  # binary: sigmoid(z) == softmax([-z/2, z/2])
            coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
        for array in (coef, intercept):
            array.setflags(write=False)  # shared by every later fit on the same inputs
        vectorizers = [v for _, v in pipe.named_steps["tfidf"].transformer_list]
        return vectorizers, coef, intercept, np.asarray(lr.classes_, dtype=str)

    def _features(self, texts: Sequence[str]) -> sp.csr_matrix:
        return sp.hstack([v.transform(list(texts)) for v in self.vectorizers_], format="csr")

    def decision_function(self, texts: Sequence[str]) -> np.ndarray:
        """``(n, k)`` logits; ``softmax`` of them is scikit-learn's multinomial ``predict_proba``."""
        check_is_fitted(self, "coef_")
        return np.asarray(self._features(texts) @ self.coef_.T) + self.intercept_

    def predict_log_proba(self, texts: Sequence[str]) -> np.ndarray:
        return log_softmax(self.decision_function(texts) / self.temperature_, axis=1)

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        return softmax(self.decision_function(texts) / self.temperature_, axis=1)

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        return self.classes_[self.decision_function(texts).argmax(axis=1)]

    def calibrate(self, texts: Sequence[str], y: Sequence[str]) -> TfidfLogReg:
        """Fit the softmax temperature on held-out rows (labels unknown to the model are skipped)."""
        y = np.asarray(y, dtype=str)
        known = np.isin(y, self.classes_)
        if known.sum() >= 2:
            logits = self.decision_function([t for t, k in zip(texts, known, strict=True) if k])
            self.temperature_ = fit_temperature(logits, np.searchsorted(self.classes_, y[known]))
        return self

    def save(self, path: Path) -> None:
        """``path/tfidf.json`` (format, vectorizer settings and vocabularies, classes) + ``tfidf.safetensors``."""
        check_is_fitted(self, "coef_")
        path.mkdir(parents=True, exist_ok=True)
        tensors = {"coef": np.ascontiguousarray(self.coef_), "intercept": np.ascontiguousarray(self.intercept_)}
        vectorizers = []
        for i, v in enumerate(self.vectorizers_):
            tensors[f"idf_{i}"] = np.ascontiguousarray(v.idf_)
            params = {k: v.get_params()[k] for k in _VECTORIZER_PARAMS}
            params["ngram_range"] = list(params["ngram_range"])
            vocab = [""] * len(v.vocabulary_)
            for term, j in v.vocabulary_.items():
                vocab[j] = term
            vectorizers.append({"params": params, "vocabulary": vocab})
        save_file(tensors, str(path / "tfidf.safetensors"))
        write_json(
            path / "tfidf.json",
            {
                "format": TFIDF_FORMAT,
                "classes": self.classes_.tolist(),
                "temperature": self.temperature_,
                "vectorizers": vectorizers,
                "sha256": file_sha256(path / "tfidf.safetensors"),
            },
        )

    @classmethod
    def load(cls, path: Path) -> TfidfLogReg:
        meta = read_json(path / "tfidf.json")
        check_format(path / "tfidf.json", meta, TFIDF_FORMAT)
        weights = path / "tfidf.safetensors"
        if file_sha256(weights) != meta["sha256"]:
            raise BundleError(f"{weights} is corrupt (hash mismatch)", fix="re-create the bundle")
        tensors = load_file(str(weights))
        model = cls()
        model.vectorizers_ = []
        for i, spec in enumerate(meta["vectorizers"]):
            params = {**spec["params"], "ngram_range": tuple(spec["params"]["ngram_range"])}
            v = TfidfVectorizer(**params)
            v.vocabulary_ = {term: j for j, term in enumerate(spec["vocabulary"])}
            v.idf_ = tensors[f"idf_{i}"]
            model.vectorizers_.append(v)
        model.coef_, model.intercept_ = tensors["coef"], tensors["intercept"]
        model.classes_ = np.asarray(meta["classes"], dtype=str)
        model.temperature_ = float(meta["temperature"])
        return model


def _aligned_log_proba(model: TfidfLogReg, texts: Sequence[str], classes: np.ndarray) -> np.ndarray:
    """``(n, len(classes))`` log-probabilities; a class the model never saw gets log(_EPS)."""
    out = np.full((len(texts), len(classes)), np.log(_EPS))
    out[:, np.searchsorted(classes, model.classes_)] = np.maximum(model.predict_log_proba(texts), np.log(_EPS))
    return out


class HybridHead(ClassifierMixin, BaseEstimator):
    """TF-IDF + LR and the MLP head together (see the module docstring for the two modes).

    Args:
        mode: ``"fusion"`` or ``"stack"``.
        head: the MLP's hyperparameters.
        tfidf: the TF-IDF + LR settings.
        hybrid: the fusion weight grid and the number of stacking folds.

    Attributes:
        classes_: ``(k,)`` sorted str labels.
        tfidf_: the fitted ``TfidfLogReg`` (on all training rows).
        mlp_: the fitted ``MLPHead`` (on the embedding, plus the TF-IDF log-probabilities when stacking).
        weight_: fusion weight of TF-IDF (``fusion``; None when stacking).
        temperature_: temperature of the fused distribution (``fusion``; 1.0 when stacking).
        fusion_curve_: per grid weight, validation log-loss and macro-F1 (``fusion``).
        prior_power_: the fitted fusion's ``hybrid.prior_power`` (0.0 when stacking).
        class_prior_: ``(k,)`` the training ads' class shares, add-one smoothed (``fusion``), that
            ``predict_proba`` divides by to the power ``prior_power_``.
    """

    def __init__(
        self,
        *,
        mode: str = "fusion",
        head: HeadConfig | None = None,
        tfidf: TfidfConfig | None = None,
        hybrid: HybridConfig | None = None,
    ) -> None:
        self.mode = mode
        self.head = head
        self.tfidf = tfidf
        self.hybrid = hybrid

    def fit(
        self,
        X: np.ndarray,
        y: Sequence[str],
        *,
        texts: Sequence[str],
        X_val: np.ndarray | None = None,
        y_val: Sequence[str] | None = None,
        texts_val: Sequence[str] | None = None,
        groups: Sequence[Any] | None = None,
        sample_weight: Sequence[float] | None = None,
        prior_rows: Sequence[bool] | None = None,
    ) -> HybridHead:
        """Fit both parts; validation rows (given, or held out stratified and repost-grouped) stop the MLP early,
        calibrate, and choose the fusion weight.

        Args:
            X: ``(n, d)`` embeddings; y: ``(n,)`` labels; texts: the ``n`` texts.
            X_val, y_val, texts_val: validation rows, all three or none.
            groups: ``(n,)`` repost groups, for the held-out rows and the stacking folds.
            sample_weight: ``(n,)`` row weights for both parts (``fusion`` only, and only with validation rows
                given: rows that are not ads are never held out).
            prior_rows: ``(n,)`` True for the rows whose labels make the class prior of ``hybrid.prior_power``:
                the ads, not taxonomy rows (their shares are the taxonomy's, not the portal's). None: every row.
        """
        if self.mode not in HYBRID_MODES:
            raise DataError(f"HybridHead mode={self.mode!r}", expected=" | ".join(HYBRID_MODES))
        head, hybrid = self.head or HeadConfig(), self.hybrid or HybridConfig()
        X, y, texts = np.asarray(X, dtype=np.float32), np.asarray(y, dtype=str), list(texts)
        if not (len(X) == len(y) == len(texts)):
            raise DataError(f"X, y and texts differ in length ({len(X)}, {len(y)}, {len(texts)})")
        groups = np.arange(len(y)) if groups is None else np.asarray(groups)
        prior_rows = np.ones(len(y), dtype=bool) if prior_rows is None else np.asarray(prior_rows, dtype=bool)
        if len(prior_rows) != len(y):
            raise DataError(f"prior_rows has {len(prior_rows)} entries for {len(y)} training rows")
        if sample_weight is not None and (self.mode != "fusion" or X_val is None):
            raise DataError("HybridHead takes sample_weight in fusion mode with validation rows given")
        if X_val is None:
            y_idx = np.unique(y, return_inverse=True)[1]
            tr, va = holdout_split(y_idx, fraction=head.validation_fraction, seed=head.seed, groups=groups)
            X_val, y_val, texts_val = X[va], y[va], [texts[i] for i in va]
            X, y, texts, groups, prior_rows = X[tr], y[tr], [texts[i] for i in tr], groups[tr], prior_rows[tr]
        y_val = np.asarray(y_val, dtype=str)
        known = np.isin(y_val, np.unique(y))
        X_val, y_val = np.asarray(X_val, dtype=np.float32)[known], y_val[known]
        texts_val = [t for t, k in zip(texts_val, known, strict=True) if k]
        self.classes_ = np.unique(y)
        self.tfidf_ = TfidfLogReg(config=self.tfidf, random_state=head.seed).fit(texts, y, sample_weight=sample_weight)
        if self.mode == "stack":
            oof = self._out_of_fold(texts, y, groups, folds=hybrid.stack_folds, seed=head.seed)
            val_feats = _aligned_log_proba(self.tfidf_, texts_val, self.classes_)
            self.mlp_ = MLPHead.from_config(head).fit(
                np.hstack([X, oof]).astype(np.float32),
                y,
                X_val=np.hstack([X_val, val_feats]).astype(np.float32),
                y_val=y_val,
            )
            self.weight_, self.temperature_, self.fusion_curve_ = None, 1.0, []
            self.prior_power_, self.class_prior_ = 0.0, None
            return self
        self.mlp_ = MLPHead.from_config(head).fit(X, y, X_val=X_val, y_val=y_val, sample_weight=sample_weight)
        self.tfidf_.calibrate(texts_val, y_val)
        lt, lm = self._parts(X_val, texts_val)
        y_idx = np.searchsorted(self.classes_, y_val)
        self.fusion_curve_ = []
        for w in hybrid.fusion_weights:
            z = w * lt + (1 - w) * lm
            t = fit_temperature(z, y_idx, bounds=_TEMPERATURE_BOUNDS)
            f1 = f1_score(y_idx, z.argmax(axis=1), average="macro", labels=np.unique(y_idx), zero_division=0)
            self.fusion_curve_.append({"weight": w, "val_nll": nll(z, y_idx, t), "val_macro_f1": float(f1), "t": t})
        best = min(self.fusion_curve_, key=lambda r: (r["val_nll"], abs(r["weight"] - 0.5)))
        self.weight_, self.temperature_ = float(best["weight"]), float(best["t"])
        # Add-one: a class with taxonomy rows but no ad in this fit still gets a finite, small share.
        counts = (y[prior_rows][:, None] == self.classes_[None, :]).sum(axis=0) + 1.0
        self.prior_power_, self.class_prior_ = float(hybrid.prior_power), counts / counts.sum()
        return self

    def _out_of_fold(self, texts: list[str], y: np.ndarray, groups: np.ndarray, *, folds: int, seed: int) -> np.ndarray:
        """``(n, k)`` TF-IDF + LR log-probabilities of each training row from a model that did not see it."""
        out = np.full((len(y), len(self.classes_)), np.log(_EPS))
        n_splits = max(2, min(folds, len(np.unique(groups))))
        with warnings.catch_warnings():  # rare classes have fewer rows than folds: expected
            warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
            splits = StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed).split(texts, y, groups)
            for tr, te in splits:
                if len(np.unique(y[tr])) < 2:
                    continue
                part = TfidfLogReg(config=self.tfidf, random_state=seed).fit([texts[i] for i in tr], y[tr])
                out[te] = _aligned_log_proba(part, [texts[i] for i in te], self.classes_)
        return out

    def _parts(self, X: np.ndarray, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated log-probabilities of TF-IDF + LR and of the MLP, both ``(n, k)``."""
        lt = _aligned_log_proba(self.tfidf_, texts, self.classes_)
        lm = np.log(np.maximum(self.mlp_.predict_proba(np.asarray(X, dtype=np.float32)), _EPS))
        return lt, lm

    def predict_proba(self, X: np.ndarray, *, texts: Sequence[str]) -> np.ndarray:
        """``(n, k)`` probabilities in ``classes_`` order."""
        check_is_fitted(self, "mlp_")
        X, texts = np.asarray(X, dtype=np.float32), list(texts)
        if len(X) != len(texts):
            raise DataError(f"X has {len(X)} rows but {len(texts)} texts were given")
        if self.mode == "stack":
            feats = _aligned_log_proba(self.tfidf_, texts, self.classes_)
            return self.mlp_.predict_proba(np.hstack([X, feats]).astype(np.float32))
        lt, lm = self._parts(X, texts)
        z = (self.weight_ * lt + (1 - self.weight_) * lm) / self.temperature_
        if self.prior_power_:
            z = z - self.prior_power_ * np.log(self.class_prior_)
        return softmax(z, axis=1)

    def predict(self, X: np.ndarray, *, texts: Sequence[str]) -> np.ndarray:
        return self.classes_[self.predict_proba(X, texts=texts).argmax(axis=1)]

    def save(self, path: Path) -> None:
        """``path/hybrid.json`` + ``path/tfidf/`` + ``path/mlp/``; no pickle anywhere."""
        check_is_fitted(self, "mlp_")
        path = Path(path)
        self.tfidf_.save(path / "tfidf")
        self.mlp_.save(path / "mlp")
        meta = {
            "format": HYBRID_FORMAT,
            "mode": self.mode,
            "classes": self.classes_.tolist(),
            "weight": self.weight_,
            "temperature": self.temperature_,
            "fusion_curve": self.fusion_curve_,
        }
        if self.prior_power_:  # without one, the file is byte for byte what it was before the correction existed
            meta |= {
                "format": HYBRID_PRIOR_FORMAT,
                "prior_power": self.prior_power_,
                "class_prior": [float(p) for p in self.class_prior_],
            }
        write_json(path / "hybrid.json", meta)

    @classmethod
    def load(cls, path: Path, *, device: str = "auto") -> HybridHead:
        path = Path(path)
        if not (path / "hybrid.json").is_file():
            raise BundleError(f"{path / 'hybrid.json'} not found", fix="re-create the bundle")
        meta = read_json(path / "hybrid.json")
        prior = meta.get("format") == HYBRID_PRIOR_FORMAT
        check_format(path / "hybrid.json", meta, HYBRID_PRIOR_FORMAT if prior else HYBRID_FORMAT)
        if prior and len(meta.get("class_prior") or []) != len(meta["classes"]):
            raise BundleError(f"{path / 'hybrid.json'}: class_prior does not match classes", fix="re-create the bundle")
        model = cls(mode=meta["mode"])
        model.tfidf_ = TfidfLogReg.load(path / "tfidf")
        model.mlp_ = MLPHead.load(path / "mlp", device=device)
        model.classes_ = np.asarray(meta["classes"], dtype=str)
        model.weight_, model.temperature_ = meta["weight"], float(meta["temperature"])
        model.fusion_curve_ = meta.get("fusion_curve", [])
        model.prior_power_ = float(meta["prior_power"]) if prior else 0.0
        model.class_prior_ = np.asarray(meta["class_prior"], dtype=np.float64) if prior else None
        return model
