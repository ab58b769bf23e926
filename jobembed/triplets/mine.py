"""Candidate triplets from labels and frozen embeddings: anchors per class, positives, positive-aware negatives.

Everything here is pure: a ``Pool`` (one split's ids, labels, repost groups and unit vectors) in, a frame of
candidates out. A pool is one split, so training candidates come from the training split only and the
validation triplets from the validation split only; the test split never reaches this module.

- **Anchors**: per class at most ``max_anchors_per_class`` ads, at least ``min_anchors_per_class`` (a class
  with fewer ads reuses them, with its next positive where it has another), chosen at random with the seed.
- **Positives**: another ad of the anchor's class from another repost group (a repost would be a trivial
  positive), the ``nearest``, a ``random`` one or the ``farthest`` (the hardest); or ``label``: the category's
  own name and description, which trains ads to land on their category.
- **Negatives**: ads of the classes the frozen encoder confuses most with the anchor's class, ranked by
  similarity to the anchor, keeping only those below ``relative_margin`` x the similarity of the anchor's
  nearest same-class ad (NV-Retriever's TopK-PercPos with the nearest positive: closer ones are too often
  unlabelled positives), from other repost groups.

Retrieval is ``sentence_transformers.util.semantic_search`` over the precomputed vectors, one call per
anchor class with the corpus restricted to that class's confused classes. ``util.mine_hard_negatives`` is
not used: it encodes the texts again with a model and ignores labels, so same-class ads would come back as
negatives.

Output columns (one row per anchor x negative): ``slot`` (one anchor use), ``anchor_id``, ``anchor_label``,
``positive_id`` (``label:<code>`` for category positives), ``positive_label``, ``positive_score``,
``negative_id``, ``negative_label``, ``negative_score``, ``negative_rank`` (0 = hardest kept).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from sentence_transformers import util

from jobembed.sections import PositiveStrategy, TripletsConfig

LABEL_PREFIX = "label:"
COLUMNS = [
    "slot",
    "anchor_id",
    "anchor_label",
    "positive_id",
    "positive_label",
    "positive_score",
    "negative_id",
    "negative_label",
    "negative_score",
    "negative_rank",
]


@dataclass
class Pool:
    """One split's ads: ``ids``, ``labels`` (str), repost ``groups`` (int) and ``vectors`` (n x d, any norm)."""

    ids: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    vectors: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.ids)
        assert len(self.labels) == len(self.groups) == len(self.vectors) == n, "pool arrays differ in length"
        self.ids = np.asarray(self.ids).astype(str)
        self.labels = np.asarray(self.labels).astype(str)
        self.groups = np.asarray(self.groups)
        norms = np.linalg.norm(self.vectors, axis=1, keepdims=True)
        self.vectors = (np.asarray(self.vectors, dtype=np.float32) / np.maximum(norms, 1e-12)).astype(np.float32)


def confused_classes(pool: Pool, *, top: int) -> dict[str, list[str]]:
    """For each class, the ``top`` other classes the frozen encoder confuses it with most (0: all others).

    Confusions are counted with a leave-one-out nearest-centroid classifier on the pool (each ad against its
    own class's centroid without itself), in both directions; ties, and classes never confused, are ordered
    by centroid cosine similarity.
    """
    classes = np.unique(pool.labels)
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[c] for c in pool.labels])
    k = len(classes)
    sums = np.zeros((k, pool.vectors.shape[1]), dtype=np.float64)
    np.add.at(sums, y, pool.vectors)
    counts = np.bincount(y, minlength=k).astype(np.float64)
    centroids = sums / counts[:, None]
    unit = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    scores = pool.vectors @ unit.T
    # Leave-one-out for the ad's own class (a one-ad class has no centroid without the ad: it cannot win).
    own = sums[y] - pool.vectors
    own_norm = np.linalg.norm(own, axis=1)
    scores[np.arange(len(y)), y] = np.where(
        counts[y] > 1, np.einsum("ij,ij->i", pool.vectors, own) / np.maximum(own_norm, 1e-12), -np.inf
    )
    predicted = scores.argmax(axis=1)
    confusion = np.zeros((k, k))
    np.add.at(confusion, (y, predicted), 1)
    both = confusion + confusion.T
    similarity = unit @ unit.T
    out = {}
    for i, c in enumerate(classes):
        others = [j for j in range(k) if j != i]
        others.sort(key=lambda j: (-both[i, j], -similarity[i, j]))
        out[str(c)] = [str(classes[j]) for j in (others[:top] if top else others)]
    return out


def _anchor_slots(members: np.ndarray, *, cap: int, floor: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """``(ad index, use number)`` for one class: up to ``cap`` distinct ads; ads reused up to ``floor`` slots."""
    order = rng.permutation(members)
    take = min(cap, len(order))
    slots = [(int(i), 0) for i in order[:take]]
    use = 1
    while len(slots) < floor and len(order) > 0:
        slots.extend((int(i), use) for i in order[: floor - len(slots)])
        use += 1
    return slots


def mine_candidates(
    pool: Pool,
    *,
    config: TripletsConfig,
    max_anchors_per_class: int,
    min_anchors_per_class: int,
    label_vectors: dict[str, np.ndarray] | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Mine candidate triplets in one pool.

    Args:
        pool: one split's ads.
        config: the ``triplets`` section (positive strategy, negatives, margin, confused classes, seed).
        max_anchors_per_class / min_anchors_per_class: cap and floor of anchor slots per class.
        label_vectors: category code -> vector of its name/description (needed for ``positive: label``).

    Returns:
        ``(candidates, stats)``: the frame of ``COLUMNS`` and counts for the report (anchors without a
        positive, slots with fewer negatives than asked, the confused classes used).
    """
    # One generator for the anchors, another for random positives: drawing positives must not move which ads of
    # the next classes become anchors, or comparing positive strategies would compare other anchors too.
    rng = np.random.default_rng(config.seed)
    positive_rng = np.random.default_rng([config.seed, 1])
    strategy = PositiveStrategy(config.positive)
    if strategy is PositiveStrategy.label and not label_vectors:
        raise ValueError("positive: label needs the category vectors")
    confused = confused_classes(pool, top=config.confused_classes)
    by_class = {c: np.flatnonzero(pool.labels == c) for c in np.unique(pool.labels)}
    rows: list[tuple] = []
    stats = {"anchor_slots": 0, "no_positive": 0, "short_of_negatives": 0, "no_negative": 0, "confused": confused}
    slot = 0
    for cls, members in by_class.items():
        slots = _anchor_slots(members, cap=max_anchors_per_class, floor=min_anchors_per_class, rng=rng)
        # Per anchor class: one retrieval over the confused classes' ads.
        corpus_idx = np.flatnonzero(np.isin(pool.labels, confused[cls]))
        anchors = np.array([a for a, _ in slots], dtype=int)
        found: list[list[dict]] = [[] for _ in slots]
        if len(corpus_idx) and len(anchors):
            top_k = min(len(corpus_idx), 8 * config.negatives_per_anchor + 8)
            found = util.semantic_search(
                torch.from_numpy(pool.vectors[anchors]),
                torch.from_numpy(pool.vectors[corpus_idx]),
                top_k=top_k,
                query_chunk_size=256,
                corpus_chunk_size=50_000,
            )
        for (anchor, use), hits in zip(slots, found, strict=True):
            stats["anchor_slots"] += 1
            positive = _positive(
                pool, anchor, use, members, strategy=strategy, rng=positive_rng, label_vectors=label_vectors
            )
            if positive is None:
                stats["no_positive"] += 1
                continue
            positive_id, positive_score = positive
            # The positive-aware margin guards against unlabelled positives: a negative closer to the anchor than
            # (a share of) its nearest same-class ad is suspect. The bar is that ad's score whatever positive is
            # trained on: a category text sits farther from every ad than ads do from each other, and a random or
            # farthest positive scores low, and either as the bar rejected most negatives (0 triplets with label
            # positives, 73 of ~600 with random ones on pl-jobads). A reused anchor trains on its next-nearest ad,
            # but the bar stays its nearest one.
            bar = positive_score
            if strategy is not PositiveStrategy.nearest or use:
                nearest = _positive(
                    pool, anchor, 0, members, strategy=PositiveStrategy.nearest, rng=positive_rng, label_vectors=None
                )
                bar = nearest[1] if nearest is not None else float("inf")
            negatives = []
            for hit in hits:
                j = int(corpus_idx[hit["corpus_id"]])
                if pool.groups[j] == pool.groups[anchor]:
                    continue  # a repost of the anchor filed under another class: a label conflict, not a negative
                if hit["score"] >= config.relative_margin * bar:
                    continue
                negatives.append((j, float(hit["score"])))
                if len(negatives) == config.negatives_per_anchor:
                    break
            if not negatives:
                stats["no_negative"] += 1
                continue
            if len(negatives) < config.negatives_per_anchor:
                stats["short_of_negatives"] += 1
            for rank, (j, score) in enumerate(negatives):
                rows.append(
                    (
                        slot,
                        pool.ids[anchor],
                        cls,
                        positive_id,
                        cls,
                        round(positive_score, 6),
                        pool.ids[j],
                        pool.labels[j],
                        round(score, 6),
                        rank,
                    )
                )
            slot += 1
    return pd.DataFrame(rows, columns=COLUMNS), stats


def _positive(
    pool: Pool,
    anchor: int,
    use: int,
    members: np.ndarray,
    *,
    strategy: PositiveStrategy,
    rng: np.random.Generator,
    label_vectors: dict[str, np.ndarray] | None,
) -> tuple[str, float] | None:
    """``(positive id, cosine to the anchor)``; the ``use``-th choice for an anchor used again; None if none."""
    cls = pool.labels[anchor]
    if strategy is PositiveStrategy.label:
        vector = np.asarray(label_vectors[cls], dtype=np.float32)  # type: ignore[index]
        vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
        return f"{LABEL_PREFIX}{cls}", float(pool.vectors[anchor] @ vector)
    others = members[pool.groups[members] != pool.groups[anchor]]
    if len(others) == 0:
        return None
    scores = pool.vectors[others] @ pool.vectors[anchor]
    if strategy is PositiveStrategy.random:
        pick = int(rng.integers(len(others)))
    else:
        order = np.argsort(-scores if strategy is PositiveStrategy.nearest else scores, kind="stable")
        pick = int(order[use % len(order)])
    return str(pool.ids[others[pick]]), float(scores[pick])
