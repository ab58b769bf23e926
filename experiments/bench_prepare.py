"""Benchmark: `prepare` at a portal's scale. MinHash LSH repost grouping (jobembed.dedup, the default) vs the
first, exact all-pairs version, on synthetic portals made from pl-jobads.

    .venv/bin/python experiments/bench_prepare.py [--sizes 8000,50000,500000] [--old-up-to 50000]
    .venv/bin/python experiments/bench_prepare.py --jaccard     # why 32 bands of 4 rows (jobembed/dedup.py)

Synthetic ads: each original is a real pl-jobads title followed by 6-14 sentences drawn from real ads of the
same ISCO major group (so every original is new text in real Polish vacancy language); then 20% of the ads
are reposts of an earlier one with small edits (1-3 words replaced, a sentence dropped, a phone placeholder or
a city appended), in groups of 2-4, as on a real portal. Each run of `prepare` (read, validate, dedupe, group,
split, write) is one subprocess: wall time and its own peak memory (VmHWM). Where both versions ran, their
repost groups are compared (same partition of the ads; adjusted Rand index; pairs found by one only).
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from common import DATA, peak_rss_mb

CITIES = ["Warszawa", "Kraków", "Poznań", "Gdańsk", "Wrocław", "Łódź", "Lublin", "Katowice"]


def synthetic_ads(n: int, seed: int = 0) -> pd.DataFrame:
    """``n`` ads (``id, text, label``): 80% new compositions of real sentences, 20% edited reposts."""
    rng = np.random.default_rng(seed)
    real = pd.read_csv(DATA / "pl-jobads" / "ads.csv", dtype=str, keep_default_na=False)
    real = real[real["isco_major"] != ""]
    split = re.compile(r"(?<=[.!?])\s+|\n+")
    titles, pools = {}, {}
    for label, sub in real.groupby("isco_major"):
        titles[label] = [t.split("\n", 1)[0] for t in sub["text"]]
        pools[label] = [
            s.strip() for t in sub["text"] for s in split.split(t.split("\n", 1)[-1]) if len(s.strip()) > 20
        ]
    labels = list(pools)
    weights = np.array([len(titles[lb]) for lb in labels], dtype=float)
    weights /= weights.sum()
    n_orig = int(n * 0.8)
    rows = []
    for i in range(n_orig):
        label = labels[rng.choice(len(labels), p=weights)]
        pool = pools[label]
        body = [pool[j] for j in rng.integers(0, len(pool), rng.integers(6, 15))]
        title = titles[label][rng.integers(len(titles[label]))]
        rows.append((f"ad{i}", title + "\n" + " ".join(body), label))
    vocab = [w for t in real["text"].sample(500, random_state=seed) for w in t.split() if w.isalpha()]
    while len(rows) < n:
        _, text, label = rows[rng.integers(n_orig)]
        for _ in range(rng.integers(1, 4)):  # a group of 2-4: the original and 1-3 edited copies
            words = text.split(" ")
            for _ in range(rng.integers(1, 4)):
                words[rng.integers(len(words))] = vocab[rng.integers(len(vocab))]
            sentences = split.split(" ".join(words))
            if len(sentences) > 6 and rng.random() < 0.5:
                del sentences[rng.integers(1, len(sentences))]
            extra = rng.choice(["", " Tel. <<PHONE>>.", f" Miejsce pracy: {CITIES[rng.integers(len(CITIES))]}."])
            rows.append((f"ad{len(rows)}", " ".join(sentences) + extra, label))
            if len(rows) >= n:
                break
    frame = pd.DataFrame(rows, columns=["id", "text", "label"])
    return frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def run_prepare(csv: Path, out: Path, variant: str) -> dict:
    """In this (child) process: prepare with the LSH (new) or exact (old) grouping; time and peak memory."""
    from jobembed import data, dedup
    from jobembed.sections import PrepareConfig

    if variant == "old":
        data.near_duplicate_groups = dedup.near_duplicate_groups_exact
    config = PrepareConfig(input=csv, text_col="text", label_col="label", id_col="id", min_class_count=2)
    t0 = time.perf_counter()
    result = data.prepare(config=config, out_dir=out, progress=False)
    seconds = time.perf_counter() - t0
    groups = pd.concat([pd.read_parquet(p, columns=["id", "group"]) for p in result.splits.values()])
    groups.to_parquet(out / "groups.parquet", index=False)
    near = result.card["near_duplicates"]
    return {
        "variant": variant,
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb(),
        "rows_kept": result.card["rows_kept"],
        "groups": near["groups"],
        "rows_in_groups": near["rows_in_groups"],
        "largest": near["largest"],
    }


def agreement(a: Path, b: Path) -> dict:
    from sklearn.metrics import adjusted_rand_score

    ga = pd.read_parquet(a / "groups.parquet").set_index("id")["group"]
    gb = pd.read_parquet(b / "groups.parquet").set_index("id")["group"].reindex(ga.index)

    def pairs(g: pd.Series) -> set:
        out = set()
        for _, ids in g.groupby(g).groups.items():
            ids = sorted(ids)
            out.update((x, y) for i, x in enumerate(ids) for y in ids[i + 1 :])
        return out

    pa, pb = pairs(ga), pairs(gb)
    same = bool((pd.factorize(ga)[0] == pd.factorize(gb)[0]).all())
    return {
        "identical_partition": same,
        "ari": adjusted_rand_score(ga, gb),
        "pairs_old": len(pa),
        "pairs_new": len(pb),
        "pairs_only_old": len(pa - pb),
        "pairs_only_new": len(pb - pa),
    }


def jaccard_of_exact_pairs() -> None:
    """Word-bigram Jaccard of the pairs the exact search joins on pl-jobads vs random pairs, and the chance
    that 32 bands of 4 MinHash rows make each a candidate: the numbers behind jobembed.dedup's LSH setting."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    from jobembed.dedup import LSH_BANDS, LSH_ROWS, normalise_for_dedup

    texts = pd.read_csv(DATA / "pl-jobads" / "ads.csv", dtype=str, keep_default_na=False)["text"]
    norm = texts.map(normalise_for_dedup).drop_duplicates().tolist()
    x = TfidfVectorizer(ngram_range=(1, 2), token_pattern=r"(?u)\b\w+\b", lowercase=False).fit_transform(norm)
    sims = (x @ x.T).tocoo()
    keep = (sims.row < sims.col) & (sims.data >= 0.9 - 1e-6)
    token = re.compile(r"(?u)\b\w+\b")
    bigrams = [set(itertools.pairwise(t)) for t in (token.findall(s) for s in norm)]

    def jaccard(i: int, j: int) -> float:
        return len(bigrams[i] & bigrams[j]) / max(1, len(bigrams[i] | bigrams[j]))

    joined = np.array([jaccard(i, j) for i, j in zip(sims.row[keep], sims.col[keep], strict=True)])
    rng = np.random.default_rng(0)
    rand = np.array([jaccard(i, j) for i, j in rng.integers(0, len(norm), (20_000, 2)) if i != j])

    def p_candidate(j: np.ndarray) -> np.ndarray:
        return 1 - (1 - j**LSH_ROWS) ** LSH_BANDS

    q = [0, 0.001, 0.01, 0.05, 0.5]
    print(f"{len(norm)} distinct normalised ads; {keep.sum()} pairs with TF-IDF cosine >= 0.9")
    print("bigram Jaccard of those pairs, quantiles", dict(zip(q, np.quantile(joined, q).round(3), strict=True)))
    print(
        "bigram Jaccard of random pairs, quantiles",
        dict(zip([0.5, 0.99, 0.999], np.quantile(rand, [0.5, 0.99, 0.999]).round(4), strict=True)),
    )
    print(f"expected share of joined pairs that become candidates: {p_candidate(joined).mean():.4f}")
    print(f"expected candidates per random pair: {p_candidate(rand).mean():.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="8000,50000,500000")
    ap.add_argument("--old-up-to", type=int, default=50_000, help="run the exact version only up to this size")
    ap.add_argument("--jaccard", action="store_true", help="print the Jaccard numbers behind the LSH setting")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.jaccard:
        jaccard_of_exact_pairs()
        return
    if args.child:
        csv, out, variant = args.child
        print(json.dumps(run_prepare(Path(csv), Path(out), variant)))
        return
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            t0 = time.perf_counter()
            csv = Path(tmp) / f"ads-{n}.csv"
            synthetic_ads(n).to_csv(csv, index=False)
            print(f"{n} synthetic ads written in {time.perf_counter() - t0:.0f} s ({csv.stat().st_size / 1e6:.0f} MB)")
            outs = {}
            for variant in ("new", "old") if n <= args.old_up_to else ("new",):
                outs[variant] = Path(tmp) / f"out-{n}-{variant}"
                cmd = [sys.executable, __file__, "--child", str(csv), str(outs[variant]), variant]
                res = subprocess.run(cmd, capture_output=True, text=True, check=True)
                row = {"n": n, **json.loads(res.stdout.strip().splitlines()[-1])}
                table.append(row)
                print(json.dumps(row), flush=True)
            if len(outs) == 2:
                agree = agreement(outs["old"], outs["new"])
                table[-1]["agreement"] = agree
                print(f"agreement at {n}: {json.dumps(agree)}", flush=True)
            csv.unlink()
    print(
        "\n| ads | grouping | prepare (s) | peak memory (MB) | repost groups | rows in groups | same groups as exact |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in table:
        agree = r.get("agreement")
        same = "–" if agree is None else ("yes" if agree["identical_partition"] else f"ARI {agree['ari']:.4f}")
        name = "MinHash LSH (new)" if r["variant"] == "new" else "exact all pairs (old)"
        print(
            f"| {r['n']:,} | {name} | {r['seconds']:.0f} | {r['peak_rss_mb']:,.0f} | {r['groups']:,} | "
            f"{r['rows_in_groups']:,} | {same} |"
        )


if __name__ == "__main__":
    main()
