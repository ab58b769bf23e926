"""An MLP classification head on sentence embeddings: scikit-learn conventions, PyTorch inside.

``MLPHead`` is what SetFit calls a differentiable head: a small feed-forward network trained with
cross-entropy on frozen (or fine-tuned) sentence vectors. It follows scikit-learn's estimator contract
(``__init__`` only stores hyperparameters, learned attributes end in ``_``, ``clone`` and
``check_is_fitted`` work), stops early on validation macro-F1 and calibrates its probabilities with a
single temperature. A fitted head is saved as ``head.safetensors`` (weights, never pickle) plus a
``head.json`` sidecar (hyperparameters, classes, temperature, checksum).
"""

from __future__ import annotations

import math
import secrets
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import erf, softmax
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.metrics import f1_score
from sklearn.utils.validation import check_is_fitted

try:
    import torch
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save
    from torch import nn
except ImportError:  # a slim serving install (dockerfiles/serve.Dockerfile): heads load and predict in NumPy
    torch = nn = None  # type: ignore[assignment]

from jobembed import __version__, ui
from jobembed.artifacts import atomic_write_bytes, file_sha256, read_json, write_json
from jobembed.encoders import pick_device
from jobembed.errors import BundleError, ConfigError, DataError
from jobembed.metrics import expected_calibration_error, fit_temperature, nll
from jobembed.sections import HeadConfig

HEAD_FORMAT = "jobembed-head/1"
WEIGHTS_FILE = "head.safetensors"
META_FILE = "head.json"
CLASS_WEIGHT_MODES = ("none", "balanced", "sqrt")
_TEMPERATURE_BOUNDS = (0.05, 20.0)
# Rows per forward pass at predict time: bounds memory on large tables without slowing small ones.
_PREDICT_CHUNK = 65_536


class HeadInputError(DataError, ValueError):
    """Bad ``X``/``y`` for the head. A ``ValueError`` too, as scikit-learn code expects."""


def class_weights(counts: np.ndarray, mode: str | None) -> np.ndarray:
    """Per-class loss weights from training counts.

    Args:
        counts: ``(k,)`` number of training examples per class; zeros are allowed (weight 0).
        mode: ``"none"`` (uniform), ``"balanced"`` (``n / (k_present * count)``, scikit-learn's formula) or
            ``"sqrt"`` (square root of balanced, normalised to mean 1 over present classes).

    Returns:
        ``(k,)`` float64 weights. Only their ratios matter: the loss is a weighted mean.
    """
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    if mode in (None, "none"):
        weights[present] = 1.0
        return weights
    if mode not in CLASS_WEIGHT_MODES:
        raise ConfigError(f"unknown class_weight {mode!r}", expected=" | ".join(CLASS_WEIGHT_MODES))
    weights[present] = counts.sum() / (present.sum() * counts[present])
    if mode == "sqrt":
        weights[present] = np.sqrt(weights[present])
        weights[present] /= weights[present].mean()
    return weights


def _resolve_device(name: str) -> torch.device:
    if torch is None:
        raise ConfigError("training a head needs PyTorch, which is not installed here", fix="pip install torch")
    return torch.device(pick_device(name))


if torch is not None:

    class _Standardize(nn.Module):
        """``(x - mean) / scale`` with the training statistics as buffers, so they travel in the safetensors."""

        def __init__(self, n_features: int) -> None:
            super().__init__()
            self.register_buffer("mean", torch.zeros(n_features))
            self.register_buffer("scale", torch.ones(n_features))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x - self.mean) / self.scale


class NumpyMLP:
    """A saved head's forward pass in NumPy (``standardize -> [Linear -> GELU] * h -> Linear``), for a server
    without PyTorch; the same weights, the same logits up to float rounding. Inference only."""

    def __init__(self, state: Mapping[str, np.ndarray]) -> None:
        self.mean = np.asarray(state["0.mean"], dtype=np.float32)
        self.scale = np.asarray(state["0.scale"], dtype=np.float32)
        linear = sorted({int(k.split(".")[0]) for k in state if k.endswith(".weight")})
        self.layers = [(np.asarray(state[f"{i}.weight"]), np.asarray(state[f"{i}.bias"])) for i in linear]

    def logits(self, X: np.ndarray) -> np.ndarray:
        h = (np.asarray(X, dtype=np.float32) - self.mean) / self.scale
        for i, (w, b) in enumerate(self.layers):
            h = h @ w.T + b
            if i < len(self.layers) - 1:
                h = 0.5 * h * (1.0 + erf(h / np.sqrt(2.0)))  # exact GELU, as torch's nn.GELU()
        return h.astype(np.float64)


def _build_mlp(n_features: int, hidden_sizes: Sequence[int], n_classes: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = [_Standardize(n_features)]
    width = n_features
    for size in hidden_sizes:
        layers += [nn.Linear(width, size), nn.GELU(), nn.Dropout(dropout)]
        width = size
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


def _check_X(X: Any, what: str = "X") -> np.ndarray:
    """``X`` as a C-contiguous ``(n, d)`` float32 array of finite numbers, with n, d ≥ 1."""
    try:
        arr = np.asarray(X, dtype=np.float32)
    except (TypeError, ValueError):
        raise HeadInputError(f"{what} must be a numeric (n, d) array of embeddings") from None
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise HeadInputError(f"{what} must be a non-empty 2-D array (n, d)", found=f"shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise HeadInputError(f"{what} contains NaN or infinite values", fix="re-embed the affected rows")
    return np.ascontiguousarray(arr)


def _check_y(y: Any, n_rows: int, what: str = "y") -> np.ndarray:
    """``y`` as a ``(n,)`` array of ``str`` labels matching ``n_rows``."""
    arr = np.asarray(y, dtype=object)
    if arr.ndim != 1:
        raise HeadInputError(f"{what} must be 1-D (one label per row)", found=f"shape {arr.shape}")
    if len(arr) != n_rows:
        raise HeadInputError(f"{what} has {len(arr)} labels but X has {n_rows} rows", expected="one label per row")
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in arr):
        raise HeadInputError(f"{what} has missing labels (None/NaN)", fix="drop or label those rows")
    return arr.astype(str)


def holdout_split(
    y_idx: np.ndarray, *, fraction: float, seed: int, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Train/validation row indices: stratified by class and, with ``groups``, reposts on one side.

    Classes with one example (or one group) stay in training; a class the split leaves only in validation
    goes back to training whole, so every validation label is one a model fit on the training rows can predict.

    Args:
        y_idx: ``(n,)`` integer class indices.
        fraction: the share to hold out (one fold of ``round(1 / fraction)``).
        seed: the split's seed.
        groups: ``(n,)`` repost-group ids, or None (every row its own group).

    Raises:
        DataError: too few rows or groups to hold anything out.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    n = len(y_idx)
    groups = np.arange(n) if groups is None else pd.factorize(np.asarray(groups))[0]
    # Fewer folds when even the largest class is smaller than the fold count (tiny data, CV folds of it):
    # a bigger validation share beats no early stopping at all.
    n_splits = max(2, min(round(1 / fraction), int(np.bincount(y_idx).max())))
    if len(np.unique(groups)) < n_splits:
        raise DataError(
            f"too few examples ({n} rows in {len(np.unique(groups))} repost groups) to hold out a validation set",
            fix="pass X_val/y_val to fit or add labelled ads",
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the least populated class has only k members"
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed % (2**32))
        tr, va = next(splitter.split(np.zeros(n), y_idx, groups))
    orphan_groups = np.unique(groups[va][~np.isin(y_idx[va], y_idx[tr])])
    back = np.isin(groups, orphan_groups)
    tr, va = np.flatnonzero(~np.isin(np.arange(n), va) | back), np.flatnonzero(np.isin(np.arange(n), va) & ~back)
    if len(va) == 0 or len(tr) == 0:
        raise DataError(
            f"too few examples per class ({n} rows) to hold out a validation set",
            fix="pass X_val/y_val to fit or add labelled ads",
        )
    return tr, va


def parent_log_mask(classes: np.ndarray, parents: Mapping[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """``(parent_classes, mask)``: mask ``(k, p)`` is 0 where class i belongs to parent j, -inf elsewhere.

    A class missing from ``parents`` is its own parent (a merged "other" class has none).
    """
    of = [str(parents.get(str(c), str(c))) for c in classes]
    parent_classes = np.asarray(sorted(set(of)), dtype=str)
    mask = np.full((len(classes), len(parent_classes)), -np.inf, dtype=np.float32)
    mask[np.arange(len(classes)), np.searchsorted(parent_classes, of)] = 0.0
    return parent_classes, mask


class MLPHead(ClassifierMixin, BaseEstimator):
    """Feed-forward classifier on ``(n, d)`` embeddings.

    ``standardize → [Linear → GELU → Dropout] × len(hidden_sizes) → Linear``.

    Labels are stored as strings (``classes_`` sorted), so the head round-trips through ``head.json``.

    Args:
        hidden_sizes: Widths of the hidden layers; empty gives multinomial logistic regression.
        dropout: Dropout after each hidden layer, in [0, 1).
        weight_decay: AdamW decoupled weight decay.
        learning_rate: AdamW learning rate.
        batch_size: Minibatch size.
        max_epochs: Upper bound on training epochs.
        patience: Epochs without a better validation macro-F1 before stopping.
        class_weight: ``"none"``, ``"balanced"`` or ``"sqrt"``; see ``class_weights``.
        calibrate: Fit a softmax temperature on the validation set after training.
        standardize: z-score each input coordinate with the training rows' mean and std (kept in the weights).
        validation_fraction: Share of the training data held out when ``fit`` gets no ``X_val``/``y_val``.
        device: ``"auto"`` (cuda, else mps, else cpu) or a torch device string.
        random_state: Seed for the holdout split, initialisation, shuffling and dropout; None draws one.
        verbose: 0 silent, 1 a progress bar over epochs, 2 one line per epoch on stderr.
        parent_weight: Weight of a second loss on the parent level (the hierarchy head): the class
            probabilities summed within each parent of ``fit``'s ``parents``, scored by NLL against the true
            parent. 0 trains a flat head.

    Attributes:
        classes_: ``(k,)`` sorted str labels; column order of ``predict_proba``.
        n_features_in_: Embedding dimension ``d`` seen in ``fit``.
        model_: The trained ``nn.Sequential`` (best epoch's weights, eval mode).
        temperature_: Softmax temperature (1.0 when ``calibrate=False``).
        best_epoch_: 1-based epoch whose weights were kept.
        best_val_score_: Validation macro-F1 at ``best_epoch_``.
        history_: One dict per epoch: ``epoch``, ``train_loss``, ``val_macro_f1``, ``val_loss``.
        n_iter_: Epochs actually run.
        calibration_: ``ece_before``, ``ece_after``, ``nll_before``, ``nll_after``, ``n_val``.
        class_weights_: ``(k,)`` loss weights used in training.
        device_: Device the head runs on, as a string.
        parents_: ``{class: parent}`` the head was trained with (empty for a flat head).
    """

    def __init__(
        self,
        *,
        hidden_sizes: Sequence[int] = (512,),
        dropout: float = 0.5,
        weight_decay: float = 1e-4,
        learning_rate: float = 3e-4,
        batch_size: int = 64,
        max_epochs: int = 200,
        patience: int = 20,
        class_weight: str | None = "sqrt",
        calibrate: bool = True,
        standardize: bool = True,
        validation_fraction: float = 0.1,
        device: str = "auto",
        random_state: int | None = 13,
        verbose: int = 0,
        parent_weight: float = 0.0,
    ) -> None:
        self.hidden_sizes = hidden_sizes
        self.dropout = dropout
        self.weight_decay = weight_decay
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.class_weight = class_weight
        self.calibrate = calibrate
        self.standardize = standardize
        self.validation_fraction = validation_fraction
        self.device = device
        self.random_state = random_state
        self.verbose = verbose
        self.parent_weight = parent_weight

    @classmethod
    def from_config(cls, cfg: HeadConfig) -> MLPHead:
        """A head with the hyperparameters of a ``HeadConfig`` (``seed`` becomes ``random_state``)."""
        return cls(
            hidden_sizes=tuple(cfg.hidden_sizes),
            dropout=cfg.dropout,
            weight_decay=cfg.weight_decay,
            learning_rate=cfg.learning_rate,
            batch_size=cfg.batch_size,
            max_epochs=cfg.max_epochs,
            patience=cfg.patience,
            class_weight=str(cfg.class_weight),
            calibrate=cfg.calibrate,
            standardize=cfg.standardize,
            validation_fraction=cfg.validation_fraction,
            device=cfg.device,
            random_state=cfg.seed,
            parent_weight=cfg.parent_weight,
        )

    @classmethod
    def from_linear(cls, weight: np.ndarray, bias: np.ndarray, classes: Sequence[str], *, device: str = "auto"):
        """A head that is one trained linear layer (``logits = X @ weight.T + bias``), e.g. the end-to-end
        classifier's layer from ``jobembed finetune --loss classifier``: nothing is fitted; ``calibrate`` sets its
        temperature. ``classes`` are the layer's rows; ``classes_`` come out sorted, as every head's."""
        weight, bias = np.asarray(weight, dtype=np.float32), np.asarray(bias, dtype=np.float32)
        order = np.argsort(np.asarray(classes, dtype=str))
        head = cls(hidden_sizes=(), dropout=0.0, standardize=False, calibrate=True, device=device)
        dev = _resolve_device(device)
        model = _build_mlp(weight.shape[1], (), len(order), 0.0)
        with torch.no_grad():
            model[-1].weight.copy_(torch.from_numpy(weight[order]))
            model[-1].bias.copy_(torch.from_numpy(bias[order]))
        head.model_ = model.to(dev).eval()
        head.classes_ = np.asarray(classes, dtype=str)[order]
        head.n_features_in_ = int(weight.shape[1])
        head.temperature_ = 1.0
        head.best_epoch_, head.best_val_score_, head.n_iter_ = None, None, 0
        head.calibration_, head.history_, head.parents_ = {}, [], {}
        head.class_weights_ = np.ones(len(order))
        head.device_ = str(dev)
        return head

    def calibrate_on(self, X_val: Any, y_val: Any) -> MLPHead:
        """Fit the softmax temperature on held-out rows (labels the head does not know are skipped)."""
        check_is_fitted(self, "model_")
        y = np.asarray(y_val, dtype=str)
        known = np.isin(y, self.classes_)
        if known.sum() >= 2:
            logits = self._logits(_check_X(X_val, "X_val")[known])
            idx = np.searchsorted(self.classes_, y[known])
            before = nll(logits, idx)
            self.temperature_ = fit_temperature(logits, idx, bounds=_TEMPERATURE_BOUNDS)
            self.calibration_ = {
                "ece_before": expected_calibration_error(softmax(logits, axis=1), idx),
                "ece_after": expected_calibration_error(softmax(logits / self.temperature_, axis=1), idx),
                "nll_before": before,
                "nll_after": nll(logits, idx, self.temperature_),
                "n_val": int(known.sum()),
            }
        return self

    # ----------------------------------------------------------------------------------------- fit

    def _validate_params(self) -> tuple[int, ...]:
        """Check hyperparameters (scikit-learn defers this to ``fit``); returns ``hidden_sizes`` as a tuple."""

        def bad(name: str, expected: str) -> ConfigError:
            return ConfigError(f"MLPHead {name}={getattr(self, name)!r} is invalid", expected=expected)

        def is_int(v: Any) -> bool:
            return isinstance(v, int | np.integer) and not isinstance(v, bool)

        try:
            hidden = tuple(self.hidden_sizes)
        except TypeError:
            raise bad("hidden_sizes", "a list of positive integers") from None
        if not all(is_int(h) and h > 0 for h in hidden):
            raise bad("hidden_sizes", "a list of positive integers")
        if not 0 <= self.dropout < 1:
            raise bad("dropout", "a value in [0, 1)")
        if not self.weight_decay >= 0:
            raise bad("weight_decay", ">= 0")
        if not self.learning_rate > 0:
            raise bad("learning_rate", "> 0")
        for name in ("batch_size", "max_epochs", "patience"):
            if not (is_int(getattr(self, name)) and getattr(self, name) >= 1):
                raise bad(name, "an integer >= 1")
        if self.class_weight not in (*CLASS_WEIGHT_MODES, None):
            raise bad("class_weight", " | ".join(CLASS_WEIGHT_MODES))
        if not 0 < self.validation_fraction < 1:
            raise bad("validation_fraction", "a value in (0, 1)")
        if not self.parent_weight >= 0:
            raise bad("parent_weight", ">= 0")
        if self.random_state is not None and not (is_int(self.random_state) and self.random_state >= 0):
            raise bad("random_state", "a non-negative integer or None")
        return tuple(int(h) for h in hidden)

    def _holdout(self, y_idx: np.ndarray, seed: int, groups: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        return holdout_split(y_idx, fraction=self.validation_fraction, seed=seed, groups=groups)

    def fit(
        self,
        X: Any,
        y: Any,
        *,
        X_val: Any = None,
        y_val: Any = None,
        groups: Any = None,
        parents: Mapping[str, str] | None = None,
        sample_weight: Any = None,
    ) -> MLPHead:
        """Train on embeddings, stop early on validation macro-F1, then calibrate the temperature.

        Args:
            X: ``(n, d)`` float embeddings.
            y: ``(n,)`` labels (stored as str).
            X_val: ``(m, d)`` validation embeddings; when None, ``validation_fraction`` of ``X`` is held out,
                stratified by class and grouped by ``groups``.
            y_val: ``(m,)`` validation labels; labels not in ``y`` are dropped with a warning.
            groups: ``(n,)`` repost-group ids of ``X``'s rows (``prepare``'s ``group`` column): the held-out
                rows never share a group with the training rows, so early stopping is not fooled by copies.
            parents: ``{class: parent class}`` for the parent-level loss (``parent_weight`` > 0); classes
                missing from it are their own parent. Ignored when ``parent_weight`` is 0.
            sample_weight: ``(n,)`` non-negative weights of ``X``'s rows in the loss, the class weights and the
                standardisation (rows that are not ads, such as taxonomy texts, weigh less than an ad). Needs
                ``X_val``: rows of another kind must not be held out for early stopping.

        Returns:
            ``self``.
        """
        hidden = self._validate_params()
        device = _resolve_device(self.device)
        X = _check_X(X)
        y = _check_y(y, X.shape[0])
        classes, y_idx = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise HeadInputError(f"y has a single class {classes[0]!r}", expected="at least 2 classes")
        seed = self.random_state if self.random_state is not None else secrets.randbits(63)

        if (X_val is None) != (y_val is None):
            raise HeadInputError("pass both X_val and y_val, or neither")
        if groups is not None and len(groups) != X.shape[0]:
            raise HeadInputError(f"groups has {len(groups)} entries but X has {X.shape[0]} rows")
        weights = None
        if sample_weight is not None:
            weights = np.asarray(sample_weight, dtype=np.float64)
            if weights.shape != (X.shape[0],) or not np.isfinite(weights).all() or (weights < 0).any():
                raise HeadInputError(
                    f"sample_weight must be {X.shape[0]} finite non-negative numbers, found shape {weights.shape}"
                )
            if X_val is None:
                raise HeadInputError("sample_weight needs X_val and y_val", fix="hold out validation rows yourself")
        if X_val is None:
            tr, va = self._holdout(y_idx, seed, None if groups is None else np.asarray(groups))
            X_tr, y_tr, X_va, y_va = X[tr], y_idx[tr], X[va], y_idx[va]
        else:
            X_va = _check_X(X_val, "X_val")
            if X_va.shape[1] != X.shape[1]:
                raise HeadInputError(f"X_val has {X_va.shape[1]} features but X has {X.shape[1]}")
            yv = _check_y(y_val, X_va.shape[0], "y_val")
            known = np.isin(yv, classes)
            if not known.all():
                unseen = sorted(set(yv[~known]))
                warnings.warn(
                    f"y_val: {int((~known).sum())} rows with labels not in y are ignored: {unseen[:5]}",
                    UserWarning,
                    stacklevel=2,
                )
            if not known.any():
                raise HeadInputError("no y_val label occurs in y", fix="validate on the same label set")
            X_tr, y_tr, X_va, y_va = X, y_idx, X_va[known], np.searchsorted(classes, yv[known])

        self.classes_ = classes
        # No mapping (a flat label set): a flat head, not one that counts each class twice.
        self.parents_ = {str(c): str(parents.get(str(c), c)) for c in classes} if self.parent_weight and parents else {}
        self.n_features_in_ = X.shape[1]
        self.device_ = str(device)
        # With sample weights a class's count is its rows' total weight (what the loss sees of it).
        counts = np.bincount(y_tr, weights=weights, minlength=len(classes))
        self.class_weights_ = class_weights(counts, self.class_weight)
        # A private RNG scope: seeding must not disturb the caller's global torch state.
        if device.type == "cuda":
            fork = torch.random.fork_rng(devices=[device.index or torch.cuda.current_device()], device_type="cuda")
        else:
            fork = torch.random.fork_rng(devices=[])
        with fork:
            torch.manual_seed(seed)
            self.model_ = _build_mlp(X.shape[1], hidden, len(classes), self.dropout).to(device)
            if self.standardize:
                # Unit-norm sentence embeddings have tiny, unevenly scaled coordinates; z-scoring them on the
                # training rows helps the first layer (5-fold CV on the dev pool: experiments/head_ablation.py).
                stats = self.model_[0]
                if weights is None:
                    mean, std = X_tr.mean(axis=0), X_tr.std(axis=0)
                else:
                    mean = np.average(X_tr, axis=0, weights=weights).astype(np.float32)
                    std = np.sqrt(np.average((X_tr - mean) ** 2, axis=0, weights=weights)).astype(np.float32)
                stats.mean.copy_(torch.from_numpy(mean).to(device))
                stats.scale.copy_(torch.from_numpy(std + 1e-6).to(device))
            self._train(X_tr, y_tr, X_va, y_va, device, seed, weights)
        self.model_.eval()

        val_logits = self._logits(X_va)
        nll_before = nll(val_logits, y_va)
        self.temperature_ = fit_temperature(val_logits, y_va, bounds=_TEMPERATURE_BOUNDS) if self.calibrate else 1.0
        self.calibration_ = {
            "ece_before": expected_calibration_error(softmax(val_logits, axis=1), y_va),
            "ece_after": expected_calibration_error(softmax(val_logits / self.temperature_, axis=1), y_va),
            "nll_before": nll_before,
            "nll_after": nll(val_logits, y_va, self.temperature_),
            "n_val": len(y_va),
        }
        return self

    def _train(
        self,
        X_tr: np.ndarray,
        y_tr: np.ndarray,
        X_va: np.ndarray,
        y_va: np.ndarray,
        device: torch.device,
        seed: int,
        sample_weight: np.ndarray | None = None,
    ) -> None:
        model = self.model_
        opt = torch.optim.AdamW(model.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay)
        weight = torch.tensor(self.class_weights_, dtype=torch.float32, device=device)
        ce_mean = nn.CrossEntropyLoss(weight=weight)
        rows_w = None if sample_weight is None else torch.from_numpy(sample_weight.astype(np.float32)).to(device)

        def ce(logits: torch.Tensor, target: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
            if w is None:
                return ce_mean(logits, target)
            # the class-weighted mean, each row also counted w times (as CrossEntropyLoss(weight=...) normalises)
            per_row = nn.functional.cross_entropy(logits, target, weight=weight, reduction="none")
            return (per_row * w).sum() / (weight[target] * w).sum().clamp_min(1e-12)

        if self.parent_weight and self.parents_:
            # The parent's log-probability is the logsumexp of its children's: consistent with the class
            # probabilities by construction, so "sub-major summed into major" is what the loss trains.
            _, mask = parent_log_mask(self.classes_, self.parents_)
            log_mask = torch.from_numpy(mask).to(device)
            y_parent = torch.from_numpy(np.argmax(mask == 0, axis=1)).to(device)

            def loss_fn(logits: torch.Tensor, target: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
                logp = torch.log_softmax(logits, dim=1)
                parent_logp = torch.logsumexp(logp.unsqueeze(2) + log_mask.unsqueeze(0), dim=1)
                parent_nll = nn.functional.nll_loss(parent_logp, y_parent[target], reduction="none")
                parent_nll = parent_nll.mean() if w is None else (parent_nll * w).sum() / w.sum().clamp_min(1e-12)
                return ce(logits, target, w) + self.parent_weight * parent_nll
        else:
            loss_fn = ce
        Xt, yt = torch.from_numpy(X_tr).to(device), torch.from_numpy(y_tr.astype(np.int64)).to(device)
        Xv, yv = torch.from_numpy(X_va).to(device), torch.from_numpy(y_va.astype(np.int64)).to(device)
        # Macro-F1 over the classes that have validation examples; others would count as 0 for nothing.
        val_labels = np.unique(y_va)
        # Shuffling on a CPU generator gives the same order on every device.
        gen = torch.Generator().manual_seed(seed)
        n = len(yt)

        best: tuple[float, float] = (-1.0, math.inf)
        best_state: dict[str, torch.Tensor] = {}
        self.history_ = []
        since_better_f1 = 0
        with ui.bar(enabled=self.verbose == 1) as bar:
            task = bar.add_task("MLP head", total=self.max_epochs)
            for epoch in range(1, self.max_epochs + 1):
                model.train()
                total = 0.0
                perm = torch.randperm(n, generator=gen).to(device)
                for start in range(0, n, self.batch_size):
                    idx = perm[start : start + self.batch_size]
                    loss = loss_fn(model(Xt[idx]), yt[idx], None if rows_w is None else rows_w[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += loss.item() * len(idx)
                model.eval()
                with torch.no_grad():
                    logits = model(Xv)
                    val_loss = nn.functional.cross_entropy(logits, yv).item()
                    pred = logits.argmax(dim=1).cpu().numpy()
                f1 = float(f1_score(y_va, pred, labels=val_labels, average="macro", zero_division=0))
                self.history_.append(
                    {"epoch": epoch, "train_loss": total / n, "val_macro_f1": f1, "val_loss": val_loss}
                )
                if self.verbose >= 2:
                    print(
                        f"epoch {epoch:4d}  train_loss {total / n:.4f}  val_loss {val_loss:.4f}  val_f1 {f1:.4f}",
                        file=sys.stderr,
                    )
                # Patience counts epochs without a better F1; an equal F1 with lower loss still replaces the kept
                # weights (less overconfident), but does not extend training.
                since_better_f1 = 0 if f1 > best[0] else since_better_f1 + 1
                if f1 > best[0] or (f1 == best[0] and val_loss < best[1]):
                    best = (f1, val_loss)
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    self.best_epoch_ = epoch
                bar.update(task, advance=1, description=f"MLP head: epoch {epoch}, best val macro-F1 {best[0]:.3f}")
                if since_better_f1 >= self.patience:
                    break
        self.n_iter_ = epoch
        self.best_val_score_ = best[0]
        model.load_state_dict(best_state)

    # ------------------------------------------------------------------------------------- predict

    def _logits(self, X: np.ndarray) -> np.ndarray:
        """``(n, k)`` float64 logits of an already checked ``(n, d)`` float32 array."""
        if isinstance(self.model_, NumpyMLP):
            return self.model_.logits(X)
        device = next(self.model_.parameters()).device
        self.model_.eval()
        out = []
        with torch.no_grad():
            for start in range(0, len(X), _PREDICT_CHUNK):
                chunk = torch.from_numpy(X[start : start + _PREDICT_CHUNK]).to(device)
                out.append(self.model_(chunk).cpu().numpy())
        return np.concatenate(out).astype(np.float64)

    def _check_predict_X(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "model_")
        X = _check_X(X)
        if X.shape[1] != self.n_features_in_:
            raise HeadInputError(
                f"X has {X.shape[1]} features but this head was fitted on {self.n_features_in_}",
                fix="embed with the same encoder the head was trained on",
            )
        return X

    def decision_function(self, X: Any) -> np.ndarray:
        """Raw logits (before temperature), ``(n, k)`` float64, columns ordered as ``classes_``."""
        return self._logits(self._check_predict_X(X))

    def predict_proba(self, X: Any) -> np.ndarray:
        """Calibrated probabilities ``softmax(logits / temperature_)``, ``(n, k)`` float64, rows sum to 1."""
        return softmax(self.decision_function(X) / self.temperature_, axis=1)

    def predict(self, X: Any) -> np.ndarray:
        """``(n,)`` str labels from ``classes_``; temperature does not change the argmax."""
        logits = self.decision_function(X)  # first: it raises NotFittedError before classes_ is touched
        return self.classes_[logits.argmax(axis=1)]

    # ------------------------------------------------------------------------------- persistence

    def save(self, path: Path) -> None:
        """Write ``path/head.safetensors`` (weights as CPU tensors) and ``path/head.json`` (everything else)."""
        check_is_fitted(self, "model_")
        path = Path(path)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.model_.state_dict().items()}
        atomic_write_bytes(path / WEIGHTS_FILE, st_save(tensors, metadata={"format": HEAD_FORMAT}))
        # NumPy scalars would reach the JSON as strings and fail validation after load.
        params = {k: v.item() if isinstance(v, np.generic) else v for k, v in self.get_params().items()}
        params["hidden_sizes"] = [int(h) for h in params["hidden_sizes"]]
        meta = {
            "format": HEAD_FORMAT,
            "jobembed_version": __version__,
            **params,
            "classes": [str(c) for c in self.classes_],
            "n_features_in": int(self.n_features_in_),
            "temperature": self.temperature_,
            "best_epoch": self.best_epoch_,
            "best_val_score": self.best_val_score_,
            "n_iter": self.n_iter_,
            "calibration": self.calibration_,
            "class_weights": [float(w) for w in self.class_weights_],
            "parents": getattr(self, "parents_", {}),
            "history": self.history_,
            "sha256": file_sha256(path / WEIGHTS_FILE),
        }
        write_json(path / META_FILE, meta)

    @classmethod
    def load(cls, path: Path, *, device: str = "auto") -> MLPHead:
        """Rebuild a head saved by ``save``; checks the format tag and the weights' checksum.

        Raises:
            BundleError: missing files, another format version, checksum mismatch or weights that do not fit.
        """
        path = Path(path)
        meta_path, weights_path = path / META_FILE, path / WEIGHTS_FILE
        for p in (meta_path, weights_path):
            if not p.is_file():
                raise BundleError(f"head file {p} not found", fix="point at a folder written by MLPHead.save")
        try:
            meta = read_json(meta_path)
        except ValueError:
            raise BundleError(f"{meta_path} is not valid JSON (corrupt)", fix="retrain or restore the head") from None
        found = str(meta.get("format"))
        name, _, version = found.partition("/")
        exp_name, _, exp_version = HEAD_FORMAT.partition("/")
        if name != exp_name or version.split(".")[0] != exp_version:
            raise BundleError(
                f"{meta_path}: unsupported head format",
                expected=HEAD_FORMAT,
                found=found,
                fix="retrain with this jobembed version",
            )
        if file_sha256(weights_path) != meta.get("sha256"):
            raise BundleError(f"{weights_path} is corrupt (sha256 does not match head.json)", fix="retrain the head")
        params = {k: meta[k] for k in cls._get_param_names() if k in meta}
        params["hidden_sizes"] = tuple(params.get("hidden_sizes", ()))
        head = cls(**{**params, "device": device})
        if torch is None:  # no PyTorch here: the same weights, a NumPy forward pass
            from safetensors.numpy import load as np_load

            try:
                head.model_ = NumpyMLP(np_load(weights_path.read_bytes()))
                first, last = head.model_.layers[0][0], head.model_.layers[-1][0]
                if first.shape[1] != meta["n_features_in"] or last.shape[0] != len(meta["classes"]):
                    raise ValueError(f"layers {first.shape} ... {last.shape}")
            except (KeyError, ValueError) as e:
                raise BundleError(f"{weights_path}: weights do not fit head.json ({e})", fix="retrain") from None
            dev = "cpu"
        else:
            dev = _resolve_device(device)
            try:
                state = st_load(weights_path.read_bytes())
                model = _build_mlp(meta["n_features_in"], head.hidden_sizes, len(meta["classes"]), head.dropout)
                model.load_state_dict(state, strict=True)
            except (RuntimeError, KeyError, ValueError) as e:
                raise BundleError(f"{weights_path}: weights do not fit head.json ({e})", fix="retrain") from None
            head.model_ = model.to(dev).eval()
        head.classes_ = np.asarray(meta["classes"], dtype=str)
        head.n_features_in_ = int(meta["n_features_in"])
        head.temperature_ = float(meta["temperature"])
        head.best_epoch_ = meta.get("best_epoch")
        head.best_val_score_ = meta.get("best_val_score")
        head.n_iter_ = meta.get("n_iter")
        head.calibration_ = meta.get("calibration", {})
        head.class_weights_ = np.asarray(meta.get("class_weights", []), dtype=np.float64)
        head.history_ = meta.get("history", [])
        head.parents_ = meta.get("parents", {})
        head.device_ = str(dev)
        return head
