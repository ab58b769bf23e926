"""Duplicate keys and repost groups for job ads.

- ``normalise_for_dedup``: a key under which cosmetic variants (case, whitespace, anonymisation
  placeholders, URLs, e-mails, phone numbers) of one ad coincide: exact and normalised duplicates.
- ``near_duplicate_groups``: edited reposts (TF-IDF cosine above a threshold) joined into groups, which
  the splitter keeps on one side so nothing leaks between train and test. MinHash LSH finds the candidate
  pairs in about linear time (a portal's 458k ads), the exact cosine decides; ``near_duplicate_groups_exact``
  is the quadratic reference it is measured against.
"""

from __future__ import annotations

import contextlib
import re
import unicodedata
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix

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
    # Each pattern only where its first characters occur: a 1,500-character ad costs ~100 µs instead of ~280 µs,
    # which is minutes at 500k ads (the output is the same; tests/test_data.py checks it on every real ad).
    if "<" in text or "[" in text:
        text = _PLACEHOLDER.sub(_TOKEN, text)
    low = text.lower()
    if "http" in low or "www." in low:
        text = _URL.sub(_TOKEN, text)
    if "@" in text:
        text = _EMAIL.sub(_TOKEN, text)
    text = _PHONE.sub(_TOKEN, text)
    return " ".join(_PUNCT.sub(" ", text.casefold()).split())


def _normalise_reference(text: str) -> str:
    """The plain version of ``normalise_for_dedup`` (every pattern on every text), for tests."""
    text = unicodedata.normalize("NFKC", text)
    for pattern in (_PLACEHOLDER, _URL, _EMAIL, _PHONE):
        text = pattern.sub(_TOKEN, text)
    text = _PUNCT.sub(" ", text.casefold())
    return _SPACE.sub(" ", text).strip()


# MinHash LSH: 32 bands of 4 rows over word-bigram shingles. A pair with shingle Jaccard J becomes a candidate
# with probability 1 - (1 - J^4)^32: 0.95 at J = 0.55, 0.999 at J = 0.7. On pl-jobads the pairs the exact
# method joins (TF-IDF cosine >= 0.9) have bigram Jaccard >= 0.57 (1% below 0.71), while half of all random
# pairs share under 1% of their bigrams, so candidates stay few and every candidate is then checked with the
# exact cosine. experiments/bench_prepare.py measures the agreement with the exact method.
LSH_BANDS = 32
LSH_ROWS = 4
# Buckets up to this size give all their pairs (vectorised); larger ones (one agency's template) are
# checked with one small matrix product each.
_SMALL_BUCKET = 64
_N_FEATURES = 1 << 24


def near_duplicate_groups(
    norm: Sequence[str] | pd.Series, threshold: float, *, progress: bool, seed: int = 13
) -> np.ndarray:
    """Group ids (0..G-1, in order of first row) joining ads whose TF-IDF cosine is >= ``threshold``.

    Work grows about linearly with the number of ads: MinHash signatures over each ad's word bigrams,
    locality-sensitive hashing into ``LSH_BANDS`` bands to find candidate pairs, then the exact cosine of
    the candidates' TF-IDF vectors (word 1-2-grams, hashed into 2^24 features, L2-normalised) decides; the
    connected components of the pairs that pass become the groups. A pair of near-copies is missed only when
    no band of their signatures collides (probability ~0.1% at bigram Jaccard 0.7), and even then they are
    usually joined through a third copy.

    Args:
        norm: texts already normalised (``normalise_for_dedup``); a pandas Series is read in chunks, so 500k
            ads are never all Python strings at once.
        threshold: cosine at or above which two ads are one repost group.
        progress: a bar over the stages of the search.
        seed: seeds the MinHash permutations (groups do not depend on it in practice).
    """
    from scipy.sparse.csgraph import connected_components

    n = len(norm)
    if n < 2:
        return np.zeros(n, dtype=np.int64)
    with _steps(progress, total=4) as step:
        tfidf, signatures = _features(norm, n_perm=LSH_BANDS * LSH_ROWS, seed=seed)
        step("near-duplicates: candidate pairs")
        a, b, big = lsh_candidates(signatures, bands=LSH_BANDS, rows=LSH_ROWS)
        del signatures
        step("near-duplicates: exact cosine")
        keep = pair_cosine(tfidf, a, b) >= threshold - 1e-6
        src, dst = [a[keep]], [b[keep]]
        for members in big:
            block = (tfidf[members] @ tfidf[members].T).tocoo()
            m = (block.row < block.col) & (block.data >= threshold - 1e-6)
            src.append(members[block.row[m]])
            dst.append(members[block.col[m]])
        step("near-duplicates: groups")
    a, b = np.concatenate(src), np.concatenate(dst)
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    return pd.factorize(comp)[0].astype(np.int64)


def _features(norm: Sequence[str] | pd.Series, *, n_perm: int, seed: int):
    """(L2-normalised TF-IDF of word 1-2-grams as CSR, MinHash signatures of word-bigram sets ``(n, n_perm)``).

    Both hashed, so no vocabulary is held in memory at 500k ads. Chunks of texts are tokenised and signed in
    parallel processes (tokenising is most of the grouping's time at a portal's scale); each process returns
    its chunk's counts and signatures only, and the counts are copied into one matrix chunk by chunk, so the
    peak is one matrix and one chunk, not two matrices.
    """
    from joblib import Parallel, delayed
    from scipy.sparse import csr_matrix
    from sklearn.feature_extraction.text import TfidfTransformer

    step = 20_000
    take = norm.iloc if isinstance(norm, pd.Series) else norm
    chunks = [take[i : i + step] for i in range(0, len(norm), step)]
    jobs = 1 if len(chunks) == 1 else -1
    parts = Parallel(n_jobs=jobs, backend="loky")(
        delayed(_vectorise)(chunk, n_perm=n_perm, seed=seed, offset=i * step) for i, chunk in enumerate(chunks)
    )
    signatures = np.concatenate([p[1] for p in parts])
    nnz = sum(p[0].nnz for p in parts)
    data, indices = np.empty(nnz, dtype=np.float32), np.empty(nnz, dtype=np.int32)
    indptr, row, at = np.zeros(len(norm) + 1, dtype=np.int64), 0, 0
    for i in range(len(parts)):
        counts = parts[i][0]
        parts[i] = None  # free each chunk as soon as it is copied
        data[at : at + counts.nnz], indices[at : at + counts.nnz] = counts.data, counts.indices
        indptr[row + 1 : row + 1 + counts.shape[0]] = counts.indptr[1:] + at
        row, at = row + counts.shape[0], at + counts.nnz
    counts = csr_matrix((data, indices, indptr), shape=(len(norm), _N_FEATURES))
    return TfidfTransformer().fit(counts).transform(counts, copy=False), signatures  # float32, in place


def _vectorise(texts: Sequence[str], *, n_perm: int, seed: int, offset: int):
    """One chunk: hashed word 1-2-gram counts (CSR) and MinHash signatures of its word-bigram sets."""
    from sklearn.feature_extraction.text import HashingVectorizer

    common = {"token_pattern": r"(?u)\b\w+\b", "lowercase": False, "alternate_sign": False, "norm": None}
    counts = HashingVectorizer(ngram_range=(1, 2), n_features=_N_FEATURES, dtype=np.float32, **common)
    shingles = HashingVectorizer(ngram_range=(2, 2), n_features=(1 << 31) - 1, binary=True, dtype=np.float32, **common)
    sets = shingles.transform(texts)
    signatures = minhash_signatures(sets.indptr, sets.indices, n_perm=n_perm, seed=seed, row_offset=offset)
    return counts.transform(texts), signatures


def minhash_signatures(
    indptr: np.ndarray, indices: np.ndarray, *, n_perm: int, seed: int = 13, row_offset: int = 0
) -> np.ndarray:
    """MinHash signatures ``(n, n_perm)`` (uint32) of n sets given in CSR form (row i holds the shingle ids
    ``indices[indptr[i]:indptr[i + 1]]``).

    Permutation p maps a shingle id x to the top 32 bits of ``a_p * x + b_p`` in 64-bit arithmetic (multiply-
    shift hashing: a universal family without the slow modulo); a row's signature is the minimum over its
    shingles. Rows without shingles (a one-word ad) get random signatures (seeded by their row number, so a
    chunked run signs them as a whole one does): a chance collision only adds a candidate the exact cosine
    then rejects.
    """
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, n_perm, dtype=np.uint64) | np.uint64(1)  # odd multipliers
    b = rng.integers(0, 2**63, n_perm, dtype=np.uint64)
    shift = np.uint64(32)
    n = len(indptr) - 1
    out = np.empty((n, n_perm), dtype=np.uint32)
    nonempty = np.diff(indptr) > 0
    ids = indices.astype(np.uint64)
    if len(ids):
        starts = np.asarray(indptr[:-1], dtype=np.int64)[nonempty]
        for p in range(n_perm):
            out[nonempty, p] = np.minimum.reduceat((a[p] * ids + b[p]) >> shift, starts)
    for row in np.flatnonzero(~nonempty):
        out[row] = np.random.default_rng([seed, row_offset + int(row)]).integers(0, 2**32, n_perm, dtype=np.uint32)
    return out


def lsh_candidates(signatures: np.ndarray, *, bands: int, rows: int) -> tuple[np.ndarray, np.ndarray, list]:
    """Pairs of rows whose signatures agree on all ``rows`` values of at least one band.

    Returns:
        ``(a, b, big)``: unique pairs with ``a < b`` from buckets of at most ``_SMALL_BUCKET`` rows, and the
        member arrays of larger buckets (checked as blocks by the caller).
    """
    n = len(signatures)
    codes: list[np.ndarray] = []
    big: dict[bytes, np.ndarray] = {}
    for band in range(bands):
        cols = signatures[:, band * rows : (band + 1) * rows]
        # One 64-bit key per band: a polynomial hash of its values (collisions only add candidates to check).
        key = np.zeros(n, dtype=np.uint64)
        for c in range(rows):
            key = key * np.uint64(1_000_003) + cols[:, c]
        order = np.argsort(key, kind="stable")
        sk = key[order]
        new_run = np.concatenate([[True], sk[1:] != sk[:-1]])
        run_id = np.cumsum(new_run) - 1
        run_len = np.bincount(run_id)
        pos_len = run_len[run_id]
        for big_run in np.flatnonzero(run_len > _SMALL_BUCKET):
            members = np.sort(order[run_id == big_run])
            big.setdefault(members.tobytes(), members)
        small = (pos_len >= 2) & (pos_len <= _SMALL_BUCKET)
        for d in range(1, int(min(_SMALL_BUCKET, pos_len[small].max(initial=1)))):
            i = np.flatnonzero(small[:-d] & (run_id[:-d] == run_id[d:]))
            if len(i) == 0:
                break
            x, y = order[i], order[i + d]
            lo, hi = np.minimum(x, y).astype(np.int64), np.maximum(x, y).astype(np.int64)
            codes.append(lo * n + hi)
    code = np.unique(np.concatenate(codes)) if codes else np.zeros(0, dtype=np.int64)
    return code // n, code % n, list(big.values())


def pair_cosine(x, a: np.ndarray, b: np.ndarray, *, chunk: int = 10_000) -> np.ndarray:
    """Row-wise dot products ``x[a[i]] . x[b[i]]`` of an L2-normalised CSR matrix (cosines), in chunks."""
    out = np.empty(len(a), dtype=np.float32)
    for start in range(0, len(a), chunk):
        sa, sb = a[start : start + chunk], b[start : start + chunk]
        out[start : start + len(sa)] = np.asarray(x[sa].multiply(x[sb]).sum(axis=1)).ravel()
    return out


def near_duplicate_groups_exact(norm: list[str], threshold: float, *, progress: bool) -> np.ndarray:
    """The first, exact version of ``near_duplicate_groups``, kept as the reference the LSH version is measured
    against (``experiments/bench_prepare.py``, tests); quadratic in the worst case, so not used by ``prepare``.

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


@contextlib.contextmanager
def _steps(progress: bool, *, total: int) -> Iterator[Callable[[str], None]]:
    from jobembed import ui

    if not progress:
        yield lambda _name: None
        return
    with ui.steps("near-duplicates: tf-idf", total=total) as advance:
        yield lambda name: advance(name.split(": ", 1)[-1])


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
