"""Duplicate keys and repost groups for job ads.

- ``normalise_for_dedup``: a key under which cosmetic variants (case, whitespace, anonymisation
  placeholders, URLs, e-mails, phone numbers) of one ad coincide: exact and normalised duplicates.
- ``near_duplicate_groups``: edited reposts (TF-IDF cosine above a threshold) joined into groups, which
  the splitter keeps on one side so nothing leaks between train and test.
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np
import pandas as pd

_PLACEHOLDER = re.compile(r"<<\s*[^<>\s]{1,40}\s*>>|<[A-Z][A-Z0-9_\-]{1,40}>|\[[A-Z][A-Z0-9_\-]{1,40}\]")
_URL = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
_EMAIL = re.compile(r"[\w.+\-]+@[\w\-]+(?:\.[\w\-]+)+")
# 8+ digits with at most two separators between them: phone numbers (also dates such as 01.02.2023).
_PHONE = re.compile(r"\+?\d(?:[ \-./()]{0,2}\d){7,}")
_PUNCT = re.compile(r"[^\w\s]+")
_SPACE = re.compile(r"\s+")
_TOKEN = " _ph_ "


def normalise_for_dedup(text: str) -> str:
    """A key under which reposts with cosmetic differences look the same.

    Anonymisation placeholders (``<<PHONE>>``, ``<PHONE>``, ``<ORGANIZATION>``, ``[EMAIL]``), URLs, e-mail
    addresses and phone-number-like digit runs (8+ digits; dates too) all become one token ``_ph_``;
    then case is folded, punctuation runs become spaces and whitespace collapses. An anonymised copy and
    the original of an ad therefore share a key.
    """
    text = unicodedata.normalize("NFKC", text)
    text = _PLACEHOLDER.sub(_TOKEN, text)
    text = _URL.sub(_TOKEN, text)
    text = _EMAIL.sub(_TOKEN, text)
    text = _PHONE.sub(_TOKEN, text)
    text = _PUNCT.sub(" ", text.casefold())
    return _SPACE.sub(" ", text).strip()


def near_duplicate_groups(norm: list[str], threshold: float, *, progress: bool) -> np.ndarray:
    """Group ids (0..G-1, in order of first row) joining ads whose TF-IDF cosine is ≥ ``threshold``.

    TF-IDF over word 1-2-grams (L2-normalised, float32); rows are compared in chunks of up to 2000
    against all rows (``chunk @ X.T``, sparse), pairs above the threshold become edges and the
    connected components (union-find) become the groups. Time is O(N² · overlap) in the worst case
    (every pair that shares a term is scored, ~10 s for 8k ads on one core); memory is bounded by the
    chunk: the chunk shrinks as N grows so that ``chunk * N`` stays under 16M scores (~200 MB).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from sklearn.feature_extraction.text import TfidfVectorizer

    n = len(norm)
    if n < 2:
        return np.zeros(n, dtype=np.int64)
    try:
        x = TfidfVectorizer(
            ngram_range=(1, 2), token_pattern=r"(?u)\b\w+\b", lowercase=False, dtype=np.float32
        ).fit_transform(norm)
    except ValueError:  # empty vocabulary: every text is empty after normalisation
        return np.arange(n, dtype=np.int64)
    xt = x.T.tocsr()
    chunk = int(max(64, min(2000, 16_000_000 // n)))
    starts = range(0, n, chunk)
    src: list[np.ndarray] = []
    dst: list[np.ndarray] = []
    for start in progress_iter(starts, progress=progress, description="near-duplicates"):
        scores = (x[start : start + chunk] @ xt).tocsr()
        rows = np.repeat(np.arange(scores.shape[0]), np.diff(scores.indptr)) + start
        keep = (scores.data >= threshold - 1e-6) & (scores.indices > rows)
        src.append(rows[keep])
        dst.append(scores.indices[keep])
    a, b = np.concatenate(src), np.concatenate(dst)
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    return pd.factorize(comp)[0].astype(np.int64)


def progress_iter(items: range, *, progress: bool, description: str):
    if not progress:
        yield from items
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True
    ) as bar:
        task = bar.add_task(description, total=len(items))
        for item in items:
            yield item
            bar.advance(task)
