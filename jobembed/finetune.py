"""The finetune stage's core: an encoder trained with ``SentenceTransformerTrainer`` on triplets' kept triplets, or
on every training ad with its label.

Input: a triplet table with ``anchor, positive, negative`` (triplets' ``train.parquet``, or any Parquet with
those columns) and, when present, ``anchor_label`` / ``negative_label``. Only the three text columns and one integer
``label`` reach the trainer: the trainer tokenises every other column as text, and passes only ``label`` to the
loss. ``label`` packs the anchor's and the negative's class (``anchor * n_classes + negative``) for the
class-aware loss.

- Losses (``finetune.loss``): on triplets, ``mnrl`` (MultipleNegativesRankingLoss with the hard negative; class-aware
  by default: candidates of the anchor's class are not in-batch negatives), ``cached_mnrl`` (large effective batches
  in little memory), ``gist`` (GISTEmbedLoss, the frozen encoder as guide), ``triplet``; on labelled ads
  (``labelled_rows``: ``text, label``), ``classifier`` (the plain end-to-end classifier: a linear layer on the
  sentence embedding, class-weighted cross-entropy; the layer is saved beside the model, ``write_classifier``),
  ``batch_hard`` / ``batch_all`` (sentence-transformers' BatchHard/BatchAllTripletLoss over batches from
  GroupByLabelBatchSampler); optionally wrapped in MatryoshkaLoss.
- Prompts: the encoder family's (e5: ``query: ``) through the trainer's ``prompts``, as ``embed`` uses them.
- Evaluation on the validation split during training: ``TripletEvaluator`` on triplets' val triplets and a
  ``CentroidEvaluator`` (centroid-cosine macro-F1 of the val ads against train centroids). The kept checkpoint is the
  one that classifies val best, not the one with the lowest loss.
- Speed (``speed_settings``): every distinct text tokenised once up front (identical batches, padded to a multiple
  of 8 on CUDA), optionally length-grouped batches and torch.compile; experiments/bench_finetune.py measures each.
- Several processes (torchrun / accelerate launch): the trainer does DDP from the launcher's environment; rank 0
  alone writes the folder, the log and the sidecars (see ``jobembed.distributed``).
- Checkpoints go to ``<out>/checkpoints`` (or the caller's ``checkpoint_dir``); a run started again resumes from the
  newest complete one.
- Output: ``<out>/model`` (a SentenceTransformer folder with its model card, ``jobembed-prompts.json`` and
  ``jobembed-ads-seen.json``: the ids of the ads its triplets held), ``<out>/finetune.json`` (format tag,
  base model and fingerprint, triplet source, validation metrics), ``<out>/log.jsonl`` (the trainer's log).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from jobembed import distributed, encoders, tracking
from jobembed.artifacts import atomic_write_text, write_json
from jobembed.config import default_cache_dir
from jobembed.errors import DataError
from jobembed.sections import FinetuneConfig, FinetuneLoss

logger = logging.getLogger(__name__)

FINETUNE_FORMAT = "jobembed-finetune/1"
TEXT_COLUMNS = ("anchor", "positive", "negative")
PRIMARY_METRIC = "eval_val-centroid_macro_f1"


# ------------------------------------------------------------------------------------------ data


@dataclass
class Triplets:
    """Training rows for the trainer (``anchor, positive, negative, label``), the class list behind ``label``, and
    where they came from (for the model card and report)."""

    frame: pd.DataFrame
    classes: list[str]
    source: dict[str, Any]


def load_triplets(
    path: Path, *, classes: list[str] | None = None, limit: int | None = None, seed: int = 13
) -> Triplets:
    """Read a triplet Parquet; checks the text columns and packs the class columns into ``label``.

    Raises:
        DataError: the file is missing, holds fewer than 2 triplets, lacks a text column, or has an empty text
            (row named).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"triplet file {path} not found", fix="run `jobembed triplets RUN` first, or pass --triplets")
    frame = pd.read_parquet(path)
    missing = [c for c in TEXT_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(
            f"{path} lacks the columns {', '.join(missing)}",
            found="columns " + ", ".join(map(str, frame.columns)),
            fix="pass a table with anchor, positive and negative text columns",
        )
    if len(frame) < 2:
        raise DataError(
            f"{path} holds {len(frame)} triplets: too few to fine-tune on",
            fix="see triplets' report.md for why candidates were dropped (loosen --margin, raise "
            "--max-anchors-per-class, or try --judge none), or pass another --triplets file",
        )
    for column in TEXT_COLUMNS:
        empty = frame[column].isna() | (frame[column].astype(str).str.strip() == "")
        if empty.any():
            row = int(np.flatnonzero(empty.to_numpy())[0])
            raise DataError(f"{path} row {row}: {column} is empty", fix="drop the row or fill the text")
    if limit is not None and len(frame) > limit:
        frame = frame.sample(n=limit, random_state=seed).sort_index()
    labelled = {"anchor_label", "negative_label"} <= set(frame.columns)
    if labelled:
        found = sorted(set(frame["anchor_label"].astype(str)) | set(frame["negative_label"].astype(str)))
        classes = sorted(set(classes or []) | set(found))
        index = {c: i for i, c in enumerate(classes)}
        label = frame["anchor_label"].astype(str).map(index) * len(classes) + frame["negative_label"].astype(str).map(
            index
        )
    else:
        classes = []
        label = pd.Series(-1, index=frame.index)
    out = pd.DataFrame({c: frame[c].astype(str).to_numpy() for c in TEXT_COLUMNS})
    out["label"] = label.astype(np.int64).to_numpy()
    ids = "\n".join(frame.get("anchor_id", pd.Series(dtype=str)).astype(str))
    source = {
        "path": str(path),
        "rows": len(out),
        "judge": str(frame["judge"].iloc[0]) if "judge" in frame.columns and len(frame) else "unknown",
        "anchor_ids_sha1": hashlib.sha1(ids.encode()).hexdigest(),
        "ads_seen": sorted(
            set().union(*(set(frame[c].astype(str)) for c in ("anchor_id", "positive_id", "negative_id") if c in frame))
        ),
    }
    return Triplets(out, classes, source)


@dataclass
class LabelledRows:
    """Training rows of a loss on labels (``text``, integer ``label``), the class list behind ``label``, and where
    they came from. Same role as ``Triplets`` (``source`` carries ``rows``, ``judge`` and ``ads_seen``)."""

    frame: pd.DataFrame
    classes: list[str]
    source: dict[str, Any]


def labelled_rows(
    texts: list[str],
    labels: list[str],
    *,
    classes: list[str],
    ids: list[str],
    what: str,
    limit: int | None = None,
    seed: int = 13,
) -> LabelledRows:
    """Every training ad with its class index, for ``classifier``, ``batch_hard`` and ``batch_all``.

    Args:
        classes: the run's label set (``label`` indexes it; labels outside it are added at the end).
        ids: the ads' ids (the fine-tuned model records whose labels it learned).
        what: where the rows come from, for finetune.json and the model card.
        limit: at most this many rows, a stratified sample (``finetune.max_triplets``).

    Ads with an empty text (cleaning left nothing) are left out and counted (``source["empty_left_out"]``).

    Raises:
        DataError: fewer than 2 rows or fewer than 2 classes left.
    """
    frame = pd.DataFrame({"text": [str(t) for t in texts], "label_name": [str(x) for x in labels], "id": ids})
    # An ad that cleaning emptied (nothing but contact lines and boilerplate) has nothing to learn from.
    empty = frame["text"].str.strip() == ""
    frame = frame[~empty.to_numpy()]
    if limit is not None and len(frame) > limit:
        share = limit / len(frame)
        keep = [
            i
            for _, g in frame.groupby("label_name")
            for i in g.sample(n=max(1, round(len(g) * share)), random_state=seed).index
        ]
        frame = frame.loc[sorted(keep)]
    if len(frame) < 2 or frame["label_name"].nunique() < 2:
        raise DataError(
            f"{what}: {len(frame)} ads of {frame['label_name'].nunique()} classes: too few to fine-tune on",
            fix="prepare more data, or raise finetune.max_triplets",
        )
    classes = list(classes) + sorted(set(frame["label_name"]) - set(classes))
    index = {c: i for i, c in enumerate(classes)}
    out = pd.DataFrame({"text": frame["text"].to_numpy(), "label": frame["label_name"].map(index).astype(np.int64)})
    source = {
        "path": what,
        "rows": len(out),
        "empty_left_out": int(empty.sum()),
        "judge": "none (labels)",
        "ads_seen": sorted(set(frame["id"])),
    }
    return LabelledRows(out.reset_index(drop=True), classes, source)


# ------------------------------------------------------------------------------------------ loss


def _mnrl_class():
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    return MultipleNegativesRankingLoss


def class_aware_mnrl(model, *, n_classes: int, scale: float = 20.0):
    """MultipleNegativesRankingLoss whose in-batch negatives leave out candidates of the anchor's class.

    ``labels`` (one per row) pack ``anchor_class * n_classes + negative_class``; a row with label -1 (no classes
    known) masks nothing. Each anchor's own positive is always its target.
    """
    base = _mnrl_class()

    class ClassAwareMNRL(base):
        def __init__(self) -> None:
            super().__init__(model, scale=scale)
            self.n_classes = n_classes

        def compute_loss_from_embeddings(self, embeddings: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
            anchors, candidates = embeddings[0], torch.cat(embeddings[1:])
            scores = self.similarity_fct(anchors, candidates) * self.scale
            rows = torch.arange(len(anchors), device=scores.device)
            if labels is not None and len(labels) == len(anchors) and bool((labels >= 0).all()):
                anchor_cls = labels // self.n_classes
                negative_cls = labels % self.n_classes
                candidate_cls = torch.cat([anchor_cls] + [negative_cls] * (len(embeddings) - 2))
                mask = candidate_cls[None, :] == anchor_cls[:, None]
                mask[rows, rows] = False  # the anchor's own positive stays the target
                scores = scores.masked_fill(mask, float("-inf"))
            return F.cross_entropy(scores, rows)

    return ClassAwareMNRL()


CLASSIFIER_FILE = "jobembed-classifier.safetensors"
CLASSIFIER_META = "jobembed-classifier.json"
CLASSIFIER_FORMAT = "jobembed-classifier/1"


def classifier_loss(model, *, n_classes: int, class_weights: np.ndarray):
    """The plain end-to-end classifier as a sentence-transformers loss: a linear layer on the sentence embedding,
    cross-entropy with class weights; the trainer updates the layer with the encoder (``learning_rate_mapping``
    gives it its own rate). The embedding is normalised to unit length (the vectors ``embed`` writes and the layer is
    applied to) and scaled by sqrt(dim) (coordinates of unit scale, as the MLP head standardises); ``linear()`` folds
    the scale into the weights."""
    from torch import nn

    dim = model.get_embedding_dimension()

    class LinearClassifierLoss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.scale = float(np.sqrt(dim))
            self.classifier = nn.Linear(dim, n_classes)
            self.register_buffer("class_weights", torch.tensor(class_weights, dtype=torch.float32))

        def forward(self, sentence_features, labels: torch.Tensor) -> torch.Tensor:
            embeddings = self.model(sentence_features[0])["sentence_embedding"]
            # unit length, as `embed` writes every vector (normalize_embeddings=True), whether or not the model ends
            # in a Normalize module: the layer is trained on the vectors it will be applied to
            embeddings = F.normalize(embeddings.to(self.classifier.weight.dtype), dim=-1)
            logits = self.classifier(embeddings * self.scale)
            return F.cross_entropy(logits, labels, weight=self.class_weights.to(logits.dtype))

        def linear(self) -> tuple[np.ndarray, np.ndarray]:
            """(weight (k, d), bias (k,)) acting on the unit-length embedding."""
            w = self.classifier.weight.detach().float().cpu().numpy() * self.scale
            return w, self.classifier.bias.detach().float().cpu().numpy()

    return LinearClassifierLoss()


def build_loss(model, *, config: FinetuneConfig, n_classes: int, guide=None, class_counts: np.ndarray | None = None):
    """The ``finetune.loss`` module; ``matryoshka_dims`` wraps any but ``classifier`` (whose layer reads the full
    vector) in MatryoshkaLoss."""
    from sentence_transformers.sentence_transformer import losses

    kind = FinetuneLoss(config.loss)
    if kind is FinetuneLoss.classifier:
        from jobembed.head import class_weights

        assert class_counts is not None
        return classifier_loss(
            model, n_classes=n_classes, class_weights=class_weights(class_counts, str(config.class_weight))
        )
    margin = {} if config.triplet_margin is None else {"margin": config.triplet_margin}
    if kind is FinetuneLoss.batch_hard:
        loss = losses.BatchHardTripletLoss(model, **margin)
    elif kind is FinetuneLoss.batch_all:
        loss = losses.BatchAllTripletLoss(model, **margin)
    elif kind is FinetuneLoss.mnrl:
        loss = (
            class_aware_mnrl(model, n_classes=n_classes)
            if config.class_aware and n_classes
            else losses.MultipleNegativesRankingLoss(model)
        )
    elif kind is FinetuneLoss.cached_mnrl:
        loss = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=config.mini_batch_size)
    elif kind is FinetuneLoss.gist:
        loss = losses.GISTEmbedLoss(model, guide=guide)
    else:
        loss = losses.TripletLoss(model, **({"triplet_margin": config.triplet_margin} if margin else {}))
    if config.matryoshka_dims:
        loss = losses.MatryoshkaLoss(model, loss, matryoshka_dims=config.matryoshka_dims)
    return loss


# ------------------------------------------------------------------------------------------ evaluation


def centroid_evaluator(
    *,
    train_texts: list[str],
    train_labels: list[str],
    val_texts: list[str],
    val_labels: list[str],
    prompt: str | None,
    batch_size: int = 64,
    name: str = "val-centroid",
):
    """An evaluator: macro-F1 and accuracy of centroid cosine, val ads against the train ads' class centroids."""
    from sentence_transformers.sentence_transformer.evaluation import SentenceEvaluator
    from sklearn.metrics import accuracy_score, f1_score

    class CentroidEvaluator(SentenceEvaluator):
        def __init__(self) -> None:
            super().__init__()
            self.name = name
            self.primary_metric = "macro_f1"
            self.greater_is_better = True

        def __call__(self, model, output_path=None, epoch: int = -1, steps: int = -1) -> dict[str, float]:
            def encode(texts: list[str]) -> np.ndarray:
                return model.encode(
                    texts, prompt=prompt, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True
                )

            train_vectors, val_vectors = encode(train_texts), encode(val_texts)
            classes = sorted(set(train_labels))
            y = np.asarray(train_labels)
            centroids = np.stack([train_vectors[y == c].mean(axis=0) for c in classes])
            centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
            predicted = np.asarray(classes)[(val_vectors @ centroids.T).argmax(axis=1)]
            metrics = {
                "macro_f1": float(f1_score(val_labels, predicted, average="macro", zero_division=0)),
                "accuracy": float(accuracy_score(val_labels, predicted)),
            }
            metrics = self.prefix_name_to_metrics(metrics, self.name)
            self.store_metrics_in_model_card_data(model, metrics, epoch, steps)
            return metrics

    return CentroidEvaluator()


# ------------------------------------------------------------------------------------------ training


# ------------------------------------------------------------------------------------------ speed


def token_table(model, texts: list[str], *, prompt: str | None, chunk: int = 512) -> tuple[dict[str, list[int]], dict]:
    """Every distinct text tokenised once, exactly as ``model.preprocess`` does it per batch (prompt, truncation).

    Returns:
        ``(text -> token ids without padding, the per-column extras preprocess adds: modality, prompt_length, and
        whether the model takes token_type_ids)``
    """
    table: dict[str, list[int]] = {}
    extra: dict[str, Any] = {}
    distinct = list(dict.fromkeys(texts))
    left = getattr(model.tokenizer, "padding_side", "right") == "left"
    for start in range(0, len(distinct), chunk):
        part = distinct[start : start + chunk]
        enc = model.preprocess(part, prompt=prompt) if prompt else model.preprocess(part)
        lengths = enc["attention_mask"].sum(dim=1).tolist()
        for text, row, n in zip(part, enc["input_ids"].tolist(), lengths, strict=True):
            table[text] = row[len(row) - n :] if left else row[:n]
        extra = {k: v for k, v in enc.items() if not isinstance(v, torch.Tensor)}
        extra["token_type_ids"] = "token_type_ids" in enc
    return table, extra


def pretokenized_collator(model, table: dict[str, list[int]], extra: dict[str, Any], *, multiple_of: int | None):
    """A collator that pads token ids looked up in ``table`` instead of tokenising every batch's texts again.

    Its batches equal sentence-transformers' own collator's (``{column}_input_ids``, ``_attention_mask``, ...);
    ``multiple_of`` pads each batch to a multiple of that many tokens (8 suits GPU tensor cores). A batch holding a
    text the table lacks falls back to tokenising.
    """
    from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator

    pad_id = model.tokenizer.pad_token_id or 0
    left = getattr(model.tokenizer, "padding_side", "right") == "left"

    class PretokenizedCollator(SentenceTransformerDataCollator):
        def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
            columns = [c for c in features[0] if c not in self.valid_label_columns and c != "dataset_name"]
            if not features or any(f[c] not in table for f in features for c in columns):
                return super().__call__(features)
            batch: dict[str, Any] = {}
            for label in self.valid_label_columns:
                if label in features[0]:
                    batch["label"] = torch.tensor([f[label] for f in features])
                    break
            for column in columns:
                rows = [table[f[column]] for f in features]
                width = max(map(len, rows))
                if multiple_of:
                    width = -(-width // multiple_of) * multiple_of
                ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for i, row in enumerate(rows):
                    span = slice(width - len(row), width) if left else slice(0, len(row))
                    ids[i, span] = torch.tensor(row, dtype=torch.long)
                    mask[i, span] = 1
                batch[f"{column}_input_ids"], batch[f"{column}_attention_mask"] = ids, mask
                if extra.get("token_type_ids"):
                    batch[f"{column}_token_type_ids"] = torch.zeros_like(ids)
                for key in ("modality", "prompt_length"):
                    if key in extra:
                        batch[f"{column}_{key}"] = extra[key]
            return batch

    return PretokenizedCollator(preprocess_fn=model.preprocess)


class LengthGroupedBatchSampler(torch.utils.data.BatchSampler):
    """Batches of similar-length rows: each epoch shuffles the rows (seeded by ``seed + epoch``), sorts them by
    length inside windows of ``window`` batches, cuts batches and shuffles their order (as transformers'
    ``LengthGroupedSampler``). Module-level so the trainer can pickle it with its arguments."""

    def __init__(
        self,
        dataset,
        batch_size,
        drop_last,
        valid_label_columns=None,
        generator=None,
        seed=0,
        *,
        lengths: list[int],
        window: int = 50,
    ) -> None:
        super().__init__(range(len(dataset)), batch_size=batch_size, drop_last=drop_last)
        self.lengths, self.window, self.seed, self.epoch = list(lengths), window, int(seed), 0
        self.n = len(dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + int(self.epoch))
        order = torch.randperm(self.n, generator=g).tolist()
        span = self.batch_size * self.window
        batches = []
        for start in range(0, self.n, span):
            chunk = sorted(order[start : start + span], key=lambda i: -self.lengths[i])
            batches += [chunk[k : k + self.batch_size] for k in range(0, len(chunk), self.batch_size)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        yield from (batches[i] for i in torch.randperm(len(batches), generator=g).tolist())

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)


def length_grouped_batches(lengths: list[int], *, window: int = 50):
    """The trainer's ``batch_sampler`` for ads of similar length sharing a batch (less padding).

    It changes which ads are in-batch negatives of each other (similar-length ads), so it is a choice, off by
    default.
    """
    return functools.partial(LengthGroupedBatchSampler, lengths=lengths, window=window)


def speed_settings(model, frame: pd.DataFrame, *, config: FinetuneConfig, device: str, text_prompt: str | None):
    """What the speed levers change in the trainer (``finetune`` and experiments/bench_finetune.py both use it).

    Args:
        frame: the training rows: triplets (``anchor, positive, negative``) or labelled ads (``text``), and ``label``.

    Returns:
        ``{"data_collator", "batch_sampler", "prompts", "torch_compile"}``: None where the trainer's default stays.
    """
    out: dict[str, Any] = {
        "data_collator": None,
        "batch_sampler": None,
        "prompts": text_prompt or None,
        "torch_compile": bool(config.compile),
    }
    if not (config.pretokenize or config.group_by_length):
        return out
    columns = [c for c in frame.columns if c != "label"]  # anchor, positive, negative; or text (a loss on labels)
    table, extra = token_table(model, [t for c in columns for t in frame[c]], prompt=text_prompt)
    if config.pretokenize:
        collator = pretokenized_collator(model, table, extra, multiple_of=8 if str(device).startswith("cuda") else None)
        collator.prompts = text_prompt or {}  # only for a text the table lacks
        out |= {"data_collator": collator, "prompts": None}  # the table's ids carry the prompt already
    if config.group_by_length:
        lengths = [sum(len(table[t]) for t in row) for row in frame[columns].itertuples(index=False)]
        out["batch_sampler"] = length_grouped_batches(lengths)
    return out


def _checkpointing(args_cls: type, enabled: bool) -> dict[str, bool]:
    """transformers 5 renamed ``gradient_checkpointing`` to ``activation_checkpointing``; 4.x knows the old name."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(args_cls)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": enabled}


def _warmup(ratio: float) -> dict[str, float]:
    """transformers 5 takes the warmup ratio as a float ``warmup_steps`` (``warmup_ratio`` is deprecated there)."""
    import transformers

    return {"warmup_steps": ratio} if int(transformers.__version__.split(".")[0]) >= 5 else {"warmup_ratio": ratio}


def _precision_flags(precision: str) -> dict[str, bool]:
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def last_complete_checkpoint(folder: Path, *, require: str | None = None) -> str | None:
    """The newest ``checkpoint-N`` in ``folder`` that a run can resume from, or None.

    The Trainer writes ``trainer_state.json`` last, so a run killed while saving leaves a newer checkpoint without
    it (or with half of it); resuming from that one would fail, so it is skipped (not deleted: the resumed run
    saves that step again over it).
    """
    if not folder.is_dir():
        return None
    found = [(int(p.name.split("-")[1]), p) for p in folder.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    for _, path in sorted(found, reverse=True):
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        if require is not None and not (path / require).is_file():
            continue  # the classifier layer is written after the trainer's files: killed in between
        return str(path)
    return None


class _ClassifierCheckpoints:
    """Keeps the classifier loss's linear layer with the trainer's checkpoints: the trainer saves and reloads only the
    model, so without this the best checkpoint's encoder would be served with the last step's layer, and a resumed
    run would start the layer from scratch."""

    def __init__(self, loss) -> None:
        self.loss = loss

    def save(self, folder: Path) -> None:
        """Atomically: a run killed while writing leaves no half file (the checkpoint is then not resumable)."""
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in self.loss.classifier.state_dict().items()}
        tmp = Path(folder) / f".{CLASSIFIER_FILE}.tmp"
        save_file(state, str(tmp))
        os.replace(tmp, Path(folder) / CLASSIFIER_FILE)

    def load(self, folder: str | Path | None) -> bool:
        from safetensors.torch import load_file

        path = Path(folder) / CLASSIFIER_FILE if folder else None
        if path is None or not path.is_file():
            return False
        state = load_file(str(path))
        self.loss.classifier.load_state_dict({k: v.to(self.loss.classifier.weight.device) for k, v in state.items()})
        return True

    def callback(self):
        from transformers import TrainerCallback

        keeper = self

        class SaveClassifier(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if state.is_world_process_zero and folder.is_dir():
                    keeper.save(folder)

        return SaveClassifier()


def write_classifier(folder: Path, *, weight: np.ndarray, bias: np.ndarray, classes: list[str]) -> None:
    """The end-to-end classifier's linear layer beside the encoder it was trained with (``model/``): weights in
    safetensors, classes and a checksum in JSON. ``evaluate``'s ``e2e`` system reads it (``read_classifier``)."""
    from safetensors.numpy import save_file

    from jobembed.artifacts import file_sha256

    save_file(
        {"weight": np.ascontiguousarray(weight, dtype=np.float32), "bias": np.ascontiguousarray(bias, np.float32)},
        str(folder / CLASSIFIER_FILE),
    )
    meta = {"format": CLASSIFIER_FORMAT, "classes": list(classes), "sha256": file_sha256(folder / CLASSIFIER_FILE)}
    write_json(folder / CLASSIFIER_META, meta)


def read_classifier(folder: Path) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    """(weight (k, d), bias (k,), classes) of a fine-tuned folder trained with the classifier loss; None otherwise.

    Raises:
        DataError: the files are there but corrupt.
    """
    from safetensors.numpy import load_file

    from jobembed.artifacts import check_format, file_sha256, read_json

    meta_path = Path(folder) / CLASSIFIER_META
    if not meta_path.is_file():
        return None
    meta = read_json(meta_path)
    check_format(meta_path, meta, CLASSIFIER_FORMAT)
    if file_sha256(Path(folder) / CLASSIFIER_FILE) != meta["sha256"]:
        raise DataError(f"{Path(folder) / CLASSIFIER_FILE} is corrupt (hash mismatch)", fix="fine-tune again")
    tensors = load_file(str(Path(folder) / CLASSIFIER_FILE))
    return tensors["weight"], tensors["bias"], [str(c) for c in meta["classes"]]


def _batch_sampler(kind: FinetuneLoss, custom, classes_known: bool, config: FinetuneConfig, samplers):
    if kind in (FinetuneLoss.batch_hard, FinetuneLoss.batch_all):
        return samplers.GROUP_BY_LABEL
    if custom is not None:
        return custom
    if kind is FinetuneLoss.classifier or (kind is FinetuneLoss.mnrl and config.class_aware and classes_known):
        return samplers.BATCH_SAMPLER
    return samplers.NO_DUPLICATES


def finetune(
    *,
    triplets: Triplets | LabelledRows,
    val_triplets: Triplets | None,
    centroid_data: dict[str, list[str]] | None,
    config: FinetuneConfig,
    model_ref: str,
    text_prompt: str | None,
    out_dir: Path,
    label_prompt: str | None = None,
    checkpoint_dir: Path | None = None,
    final_dir: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune ``model_ref`` on ``triplets``; write ``out_dir`` (see the module docstring); return finetune.json.

    Args:
        out_dir: where the outputs are written.
        checkpoint_dir: the trainer's checkpoints (default ``out_dir/checkpoints``, dropped at the end unless
            ``keep_checkpoints``); a run started again with the same folder resumes from its newest complete one. A
            caller that passes its own folder owns it (the pipeline keeps it outside the outputs it swaps in).
        final_dir: where ``out_dir`` will live once the caller moves it there (``model_dir`` in finetune.json names
            it); default ``out_dir``.
        triplets / val_triplets: from ``load_triplets``; val ones feed the TripletEvaluator. With a loss on labels
            (``classifier``, ``batch_hard``, ``batch_all``), ``triplets`` is ``labelled_rows``' ads instead.
        centroid_data: ``{train_texts, train_labels, val_texts, val_labels}`` for the CentroidEvaluator.
        text_prompt: the prefix every text gets (the encoder family's, as in ``embed``); written with
            ``label_prompt`` into the model folder's ``jobembed-prompts.json``.
    """
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import SequentialEvaluator, TripletEvaluator
    from sentence_transformers.sentence_transformer.trainer import SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.training_args import (
        BatchSamplers,
        SentenceTransformerTrainingArguments,
    )

    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    resolved = encoders.resolve(model_ref, cache_dir=cache_dir)
    fingerprint = encoders.fingerprint_of(resolved)
    device = encoders.pick_device(config.device)
    precision = encoders.resolve_precision(str(config.precision), device)
    torch.manual_seed(config.seed)
    model = SentenceTransformer(str(resolved.location), device=device)
    model.max_seq_length = config.max_seq_length
    guide = SentenceTransformer(str(resolved.location), device=device) if config.loss == FinetuneLoss.gist else None
    kind = FinetuneLoss(config.loss)
    on_labels = isinstance(triplets, LabelledRows)
    if kind.on_labels != on_labels:
        raise DataError(
            f"finetune.loss {kind} trains on {'labelled ads' if kind.on_labels else 'triplets'}, but "
            f"{'triplets' if not on_labels else 'labelled ads'} were given",
            fix="pick a triplet loss (mnrl, cached_mnrl, gist, triplet) for triplets, or classifier, batch_hard, "
            "batch_all for labelled ads",
        )
    counts = np.bincount(triplets.frame["label"], minlength=len(triplets.classes)) if on_labels else None
    loss = build_loss(model, config=config, n_classes=len(triplets.classes), guide=guide, class_counts=counts)
    classifier = _ClassifierCheckpoints(loss) if kind is FinetuneLoss.classifier else None
    if classifier is not None and distributed.world_size() > 1:
        # the layer lives in the loss, outside the model DDP wraps: each process would train a layer of its own
        raise DataError(
            "finetune.loss classifier runs in one process: its linear layer is not synchronised across processes",
            fix="run it without torchrun/accelerate (one GPU), or use batch_hard / batch_all / mnrl under a launcher",
        )

    train = Dataset.from_pandas(triplets.frame, preserve_index=False)
    speed = speed_settings(model, triplets.frame, config=config, device=device, text_prompt=text_prompt)
    evaluators = []
    if val_triplets is not None and len(val_triplets.frame):
        v = val_triplets.frame
        evaluators.append(
            TripletEvaluator(
                anchors=[(text_prompt or "") + t for t in v["anchor"]],
                positives=[(text_prompt or "") + t for t in v["positive"]],
                negatives=[(text_prompt or "") + t for t in v["negative"]],
                name="val-triplets",
                batch_size=config.batch_size,
            )
        )
    if centroid_data is not None:
        evaluators.append(
            centroid_evaluator(**centroid_data, prompt=text_prompt, batch_size=max(config.batch_size, 32))
        )
    steps_per_epoch = max(1, len(train) // config.batch_size)
    eval_steps = max(1, steps_per_epoch // config.evals_per_epoch)
    own_checkpoints = checkpoint_dir is None
    checkpoints = out_dir / "checkpoints" if checkpoint_dir is None else Path(checkpoint_dir)
    has_centroid = centroid_data is not None
    args = SentenceTransformerTrainingArguments(
        output_dir=str(checkpoints),
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        eval_strategy="steps" if evaluators else "no",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=eval_steps,
        save_total_limit=2,
        load_best_model_at_end=has_centroid,
        metric_for_best_model=PRIMARY_METRIC if has_centroid else None,
        greater_is_better=True,
        logging_steps=max(1, eval_steps // 2),
        seed=config.seed,
        data_seed=config.seed,
        # the tracker of the stage that runs this (tracking.backend), so losses and evaluations stream into its run
        report_to=tracking.report_to(None),
        disable_tqdm=not progress,
        dataloader_num_workers=config.dataloader_workers,
        prompts=speed["prompts"],
        # Class-aware MNRL masks same-class in-batch negatives itself; the other triplet losses need batches free of
        # repeats; the label-based triplet losses need several ads of a class in a batch (GroupByLabelBatchSampler).
        batch_sampler=_batch_sampler(kind, speed["batch_sampler"], bool(triplets.classes), config, BatchSamplers),
        learning_rate_mapping={r"^classifier\.": config.head_learning_rate} if classifier else None,
        torch_compile=speed["torch_compile"],
        use_cpu=device == "cpu",
        **_precision_flags(precision),
        **_checkpointing(SentenceTransformerTrainingArguments, config.gradient_checkpointing),
        **_warmup(config.warmup_ratio),
    )
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=train,
        loss=loss,
        evaluator=SequentialEvaluator(evaluators) if evaluators else None,
        data_collator=speed["data_collator"],
        callbacks=[classifier.callback()] if classifier else None,
    )
    last = last_complete_checkpoint(checkpoints, require=CLASSIFIER_FILE if classifier is not None else None)
    if classifier is not None and last is not None:
        classifier.load(last)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=last)
    seconds = time.perf_counter() - started
    best = trainer.state.best_model_checkpoint if has_centroid else None
    # the layer of the checkpoint whose encoder the trainer reloaded: never the last step's with the best encoder
    if classifier is not None and best and not classifier.load(best):
        raise DataError(
            f"the best checkpoint {trainer.state.best_model_checkpoint} lacks its classifier layer",
            fix="run the fine-tune again (its checkpoints are kept until it finishes)",
        )
    # The kept checkpoint's evaluation, from the log (evaluating again would cost a full pass over the val ads).
    evals = [row for row in trainer.state.log_history if PRIMARY_METRIC in row or "eval_sequential_score" in row]
    key = PRIMARY_METRIC if has_centroid else "eval_sequential_score"
    final_metrics = max(evals, key=lambda row: row.get(key, float("-inf"))) if evals else {}
    model_dir = out_dir / "model"
    if trainer.is_world_process_zero():
        tmp = out_dir / ".model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(str(tmp))
        # The prompts it was trained with: `embed` and `classify` give every text the same prefix (the folder's name
        # names no model family).
        write_json(tmp / encoders.PROMPTS_SIDECAR, {"text_prompt": text_prompt, "label_prompt": label_prompt})
        # The ads whose labels it learned, inside the folder: a run that loads it as an ordinary encoder can refuse
        # to cross-validate it over them (pipeline.refuse_leaky_encoders).
        write_json(tmp / encoders.SEEN_SIDECAR, triplets.source.get("ads_seen", []))
        if classifier is not None:
            weight, bias = loss.linear()
            write_classifier(tmp, weight=weight, bias=bias, classes=triplets.classes)
        shutil.rmtree(model_dir, ignore_errors=True)
        tmp.replace(model_dir)
        log = [json.dumps(row) for row in trainer.state.log_history]
        atomic_write_text(out_dir / "log.jsonl", "".join(line + "\n" for line in log))
        if own_checkpoints and not config.keep_checkpoints:
            shutil.rmtree(checkpoints, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()  # the other ranks read the saved folder's fingerprint below
    info = {
        "format": FINETUNE_FORMAT,
        "base_model": resolved.ref,
        "base_fingerprint": fingerprint,
        "model_dir": str(Path(final_dir or out_dir) / "model"),
        "fingerprint": encoders.model_fingerprint(str(model_dir), cache_dir=cache_dir) if model_dir.is_dir() else None,
        "loss": str(config.loss),
        "data": "labels" if on_labels else "triplets",
        "classifier": classifier is not None,
        "class_aware": bool(config.class_aware and triplets.classes and config.loss == FinetuneLoss.mnrl),
        "triplets": {k: v for k, v in triplets.source.items() if k != "ads_seen"},
        "ads_seen": len(triplets.source.get("ads_seen", [])),
        "resumed_from": Path(last).name if last else None,
        "device": device,
        "precision": precision,
        "steps": int(trainer.state.global_step),
        "seconds": round(seconds, 1),
        "triplets_per_second": round(len(train) * config.epochs / max(seconds, 1e-9), 2),
        # Validation figures only: the test split is scored once, by report.
        "val": {k: round(float(v), 4) for k, v in final_metrics.items() if isinstance(v, int | float)},
        "best_checkpoint_metric": PRIMARY_METRIC if has_centroid else None,
    }
    if trainer.is_world_process_zero():
        write_json(out_dir / "finetune.json", info)
        write_json(out_dir / "ads_seen.json", triplets.source.get("ads_seen", []))
        card = model_dir / "README.md"
        text = card.read_text(encoding="utf-8") if card.is_file() else ""
        atomic_write_text(card, text.rstrip() + "\n\n" + card_section(info, config) + "\n")
    return info


def card_section(info: dict[str, Any], config: FinetuneConfig) -> str:
    """What jobembed adds to sentence-transformers' model card: data, loss, settings, validation result."""
    t = info["triplets"]
    val = info["val"]
    data = (
        f"- Training rows: {t['rows']} labelled ads ({t['path']})."
        if info.get("data") == "labels"
        else f"- Triplets: {t['rows']} from `{t['path']}`, judged by `{t['judge']}` (triplets)."
    )
    lines = [
        "## jobembed",
        "",
        f"Fine-tuned from `{info['base_model']}` (fingerprint {info['base_fingerprint']}) by `jobembed finetune`.",
        "",
        data,
        f"- Loss: {info['loss']}"
        + (" (class-aware in-batch negatives)" if info["class_aware"] else "")
        + (f", Matryoshka {config.matryoshka_dims}" if config.matryoshka_dims and not info.get("classifier") else "")
        + (f"; its linear layer is in `{CLASSIFIER_FILE}`" if info.get("classifier") else "")
        + ".",
        f"- Settings: {config.epochs:g} epoch(s), batch {config.batch_size}, lr {config.learning_rate:g}, warmup "
        f"{config.warmup_ratio:g}, max length {config.max_seq_length}, {info['precision']} on {info['device']}, "
        f"seed {config.seed}; {info['steps']} steps in {info['seconds']} s.",
        "",
        "Validation (the test split is scored by `jobembed report`, not here):",
        "",
        "| metric | value |",
        "|---|---:|",
    ]
    lines += [
        f"| {k.removeprefix('eval_')} | {v} |" for k, v in val.items() if "runtime" not in k and "per_second" not in k
    ]
    return "\n".join(lines)
