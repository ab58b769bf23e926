"""Issue 21, levers 1, 3 and 5 on the frozen encoder: the taxonomy's texts as training rows, top-down, ensembles.

    .venv/bin/python experiments/levers.py                 # every unit not yet measured, then the tables
    .venv/bin/python experiments/levers.py --only rows     # one group: rows | topdown | ensemble
    .venv/bin/python experiments/levers.py --print         # the tables from the units already measured

pl-jobads `isco_submajor`, the run of experiments/finetune_cv.py (rules-cleaned text, builtin e5-small at 256 tokens,
the same seed-13 splits) plus `prepare.taxonomy` (experiments/common.py: pl_taxonomy(), the 10,787 texts of
../shared/data/pl-jobads/taxonomy/): the ads' vectors come from the cache, the taxonomy's texts are encoded once.
Every unit is the report's own code (``evaluate.cross_validate``) on the report's 3 repost-grouped CV folds of the
dev pool (train + val, 6,248 ads); the test split is not read. Per unit: CV macro-F1 and accuracy (mean ± sd over the
folds), the parent level (ISCO major group) read off the sub-major answer, and the pooled out-of-fold answers (every
dev ad predicted once) for exact McNemar against the unit's baseline and per-class F1 of the rare classes.

Units (each a JSON file in experiments/out/levers/units/, so a run that stops keeps what it finished):
- rows: fusion with no taxonomy rows, with every kind at weight 0.1, 0.3, 1.0, 3.0 and 10.0, and names only (kzis_name,
  occupation, esco_name, thesaurus, esco_alt) at 0.3 and 1.0; its parts (tfidf, mlp) without rows and at 1.0;
- topdown: the topdown system (fusion at both levels) without rows and with every kind at 1.0 and 3.0, beside fusion;
- ensemble: a log-linear pool of the calibrated out-of-fold probabilities of tfidf, mlp and logreg on e5 and of
  centroid cosine (weights chosen per fold on the fold's inner slice would need refits; here they are chosen on the
  other folds' out-of-fold answers, a cheap estimate that says whether more members are worth building).
"""

from __future__ import annotations

import argparse
import json
import time
from itertools import combinations, product
from pathlib import Path

import numpy as np
from common import OUT, pl_taxonomy
from finetune_cv import config_for as finetune_cv_config

from jobembed import metrics
from jobembed.config import load_config
from jobembed.evaluate import (
    EvalSettings,
    System,
    _fit_predict,
    cross_validate,
    cv_folds,
    dev_pool,
    extra_rows,
    predict_proba,
)
from jobembed.hierarchy import find_hierarchy
from jobembed.stages import pin_models, prepared, run_stages, run_vectors
from jobembed.stages._common import taxonomy_rows

FOLDS = 3
UNITS = OUT / "levers" / "units"
NAMES = ["kzis_name", "occupation", "esco_name", "thesaurus", "esco_alt"]
ROWS = {
    "none": None,
    "all-0.1": {"weight": 0.1},
    "all-0.3": {"weight": 0.3},
    "all-1.0": {"weight": 1.0},
    "all-3.0": {"weight": 3.0},
    "all-10.0": {"weight": 10.0},
    "names-0.3": {"kinds": NAMES, "weight": 0.3},
    "names-1.0": {"kinds": NAMES, "weight": 1.0},
}


def config_for(rows: dict | None = None, **report):
    """The finetune-cv run's settings with the taxonomy, in a run folder of its own (prepare's key changes)."""
    base = finetune_cv_config(None).model_dump(mode="json")
    base["name"] = "levers"
    base["prepare"]["taxonomy"] = {"path": str(pl_taxonomy())}
    base["report"] = {"cv_folds": FOLDS, "bootstrap": 0, "taxonomy_rows": rows, **report}
    base["finetune"] = {}
    base["triplets"] = {}
    return pin_models(load_config(None, base))


def _unit(name: str, system: str, rows_key: str, **report) -> dict:
    path = UNITS / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    config = config_for(ROWS[rows_key], **report)
    # with rows the embed stage encodes the taxonomy's texts too (its key changes; the ads' vectors are cache hits)
    run_stages(config, target="embed", progress=False)
    splits, labels = prepared(config)
    frozen = run_vectors(config, config.embed.model, splits, labels)
    dev = dev_pool(splits)
    folds = cv_folds(dev, n_folds=FOLDS, seed=config.prepare.seed)
    settings = EvalSettings.of(config, extra_rows(config, taxonomy_rows(config)))
    hierarchy = find_hierarchy(labels["label"].astype(str).tolist(), mode=config.report.hierarchy)
    started = time.perf_counter()
    fold_metrics, (conf, _), pred, _ = cross_validate(
        System(system, None if system == "tfidf" else frozen, "e5"),
        settings=settings, labels=labels, dev=dev, X_dev=np.concatenate([frozen.train, frozen.val]), folds=folds,
        hierarchy=hierarchy,
    )  # fmt: skip
    out = {
        "name": name,
        "system": system,
        "rows": rows_key,
        "report": report,
        "seconds": round(time.perf_counter() - started, 1),
        "folds": fold_metrics,
        "summary": metrics.summarize_folds(fold_metrics),
        "oof_pred": pred.tolist(),
        "oof_confidence": conf.tolist(),
    }
    UNITS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    print(f"{name}: CV macro-F1 {out['summary']['macro_f1']['mean']:.3f} ({out['seconds']:.0f} s)", flush=True)
    return out


def _proba_unit(name: str, system: str) -> Path:
    """Out-of-fold probabilities of one system (no rows), for the ensemble estimate."""
    path = UNITS / f"proba-{name}.npy"
    if path.is_file():
        return path
    config = config_for(None)
    splits, labels = prepared(config)
    frozen = run_vectors(config, config.embed.model, splits, labels)
    dev = dev_pool(splits)
    X = np.concatenate([frozen.train, frozen.val])
    classes = np.unique(dev["label"].to_numpy(dtype=str))
    out = np.full((len(dev), len(classes)), 1e-9)
    settings = EvalSettings.of(config)
    sys_ = System(system, None if system == "tfidf" else frozen, "e5")
    for tr, te in cv_folds(dev, n_folds=FOLDS, seed=config.prepare.seed):
        texts = dev[str(config.text_column)].iloc[te].tolist()
        _, model = _fit_predict(
            sys_, settings=settings, labels=labels, dev=dev, X_dev=X, train_idx=tr, val_idx=None, X_eval=X[te],
            texts_eval=texts,
        )  # fmt: skip
        out[np.ix_(te, np.searchsorted(classes, model.classes_))] = predict_proba(sys_, model, X[te], texts)
    UNITS.mkdir(parents=True, exist_ok=True)
    np.save(path, out)
    return path


def run_rows() -> None:
    # fusion first: the best system, and the one a default is chosen for; then its two parts
    for rows in ("none", "all-0.3", "all-1.0", "names-0.3", "all-0.1", "all-3.0", "names-1.0", "all-10.0"):
        _unit(f"fusion-{rows}", "fusion", rows)
    for system in ("mlp", "tfidf"):  # fusion's two parts, with and without the rows fusion does best with
        for rows in ("none", "all-1.0"):
            _unit(f"{system}-{rows}", system, rows)


def run_first() -> None:
    """The units a decision waits on, before the rest of the rows group."""
    for rows in ("none", "all-1.0", "all-3.0", "all-10.0"):
        _unit(f"fusion-{rows}", "fusion", rows)
    run_topdown()


def run_topdown() -> None:
    for rows in ("none", "all-1.0", "all-3.0"):
        _unit(f"topdown_fusion-{rows}", "topdown", rows, topdown_base="fusion")


def run_ensemble() -> None:
    for system in ("tfidf", "mlp", "logreg", "centroid"):
        _proba_unit(system, system)


def _dev():
    config = config_for(None)
    splits, labels = prepared(config)
    return dev_pool(splits), labels, config


def print_tables() -> None:
    dev, _, config = _dev()
    y = dev["label"].to_numpy(dtype=str)
    n_test = len(dev) // FOLDS
    units = {p.stem: json.loads(p.read_text()) for p in sorted(UNITS.glob("*.json"))}
    print("| unit | CV macro-F1 | CV macro-F1, classes with ≥ 5 held-out ads | CV accuracy | CV major accuracy |"
          " vs its no-rows baseline: macro-F1 diff, t-test p | McNemar p (pooled out-of-fold) | s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, u in units.items():
        s = u["summary"]
        base_name = name.split("-", 1)[0] + "-none" if not name.endswith("-none") else None
        if name.startswith("topdown"):  # against flat fusion with the same rows
            base_name = "fusion-" + name.split("-", 1)[1]
        vs = ""
        if base_name in units and base_name != name:
            b = units[base_name]
            t = metrics.corrected_paired_ttest(
                [f["macro_f1"] for f in u["folds"]], [f["macro_f1"] for f in b["folds"]],
                n_train=len(dev) - n_test, n_test=n_test,
            )  # fmt: skip
            mc = metrics.mcnemar(y, np.asarray(u["oof_pred"]), np.asarray(b["oof_pred"]))
            vs = f"{t['mean_diff']:+.3f}, p = {t['p_value']:.2g} vs {base_name} | {mc['p_value']:.2g}"
        else:
            vs = " | "
        ms = [f["macro_f1_min_support"] for f in u["folds"]]
        print(
            f"| {name} | {s['macro_f1']['mean']:.3f} ± {s['macro_f1']['std']:.3f} | {np.mean(ms):.3f} ± "
            f"{np.std(ms, ddof=1):.3f} | {s['accuracy']['mean']:.3f} ± "
            f"{s['accuracy']['std']:.3f} | {s.get('parent_accuracy', {}).get('mean', float('nan')):.3f} | {vs} | "
            f"{u['seconds']:.0f} |"
        )
    grid = {n: u for n, u in units.items() if n.startswith("fusion-")}
    chosen = None
    if grid:  # the rule: the rows setting with the highest CV macro-F1 of fusion, the best frozen system
        chosen = max(grid, key=lambda n: grid[n]["summary"]["macro_f1"]["mean"])
        print(f"\nChosen by CV macro-F1 of fusion: {chosen} ({grid[chosen]['summary']['macro_f1']['mean']:.3f})")
    counts = dev["label"].value_counts()
    rare = sorted(counts[counts <= 30].index, key=lambda c: counts[c])
    wanted = ("fusion-none", "fusion-all-1.0", chosen, "topdown_fusion-none", f"topdown_{chosen}")
    shown = [n for n in dict.fromkeys(wanted) if n in units]
    if shown:
        print("\nRare classes (≤ 30 dev ads), F1 over the pooled out-of-fold answers:\n")
        print("| class | dev ads | " + " | ".join(shown) + " |")
        print("|---|---|" + "---|" * len(shown))
        for c in rare:
            cells = []
            for n in shown:
                p = np.asarray(units[n]["oof_pred"])
                tp, fp, fn = ((p == c) & (y == c)).sum(), ((p == c) & (y != c)).sum(), ((p != c) & (y == c)).sum()
                cells.append(f"{2 * tp / max(1, 2 * tp + fp + fn):.2f}")
            print(f"| {c} | {counts[c]} | " + " | ".join(cells) + " |")
    probas = {p.stem.removeprefix("proba-"): np.load(p) for p in sorted(UNITS.glob("proba-*.npy"))}
    if len(probas) >= 2:
        ensemble_table(probas, dev, config)


def ensemble_table(probas: dict[str, np.ndarray], dev, config) -> None:
    """Log-linear pools of out-of-fold probabilities; each fold's weights chosen on the other folds' answers."""
    y = dev["label"].to_numpy(dtype=str)
    classes = np.unique(y)
    yi = np.searchsorted(classes, y)
    folds = cv_folds(dev, n_folds=FOLDS, seed=config.prepare.seed)
    names = list(probas)
    logs = {n: np.log(np.maximum(p, 1e-9)) for n, p in probas.items()}
    grid = [w for w in product(*[np.linspace(0, 1, 6)] * len(names)) if abs(sum(w) - 1) < 1e-9]
    print("\nEnsembles of out-of-fold probabilities (weights per fold from the other folds, lowest log-loss):\n")
    print("| members | CV macro-F1 | CV accuracy | mean weights |")
    print("|---|---|---|---|")
    for k in range(2, len(names) + 1):
        for members in combinations(names, k):
            f1s, accs, ws = [], [], []
            for _, te in folds:
                other = np.setdiff1d(np.arange(len(y)), te)

                def nll(w, rows, members=members):
                    z = sum(wi * logs[m][rows] for wi, m in zip(w, members, strict=True))
                    z = z - z.max(axis=1, keepdims=True)
                    return -(z[np.arange(len(rows)), yi[rows]] - np.log(np.exp(z).sum(axis=1))).mean()

                sub = [w for w in grid if all(w[names.index(n)] == 0 for n in names if n not in members)]
                best = min(sub, key=lambda w: nll([w[names.index(m)] for m in members], other))
                w = [best[names.index(m)] for m in members]
                z = sum(wi * logs[m][te] for wi, m in zip(w, members, strict=True))
                pred = classes[z.argmax(axis=1)]
                m = metrics.classification_metrics(y[te], pred, min_support=5)
                f1s.append(m["macro_f1"])
                accs.append(m["accuracy"])
                ws.append(w)
            print(
                f"| {' + '.join(members)} | {np.mean(f1s):.3f} ± {np.std(f1s, ddof=1):.3f} | {np.mean(accs):.3f} ± "
                f"{np.std(accs, ddof=1):.3f} | {np.round(np.mean(ws, axis=0), 2).tolist()} |"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["first", "rows", "topdown", "ensemble"], default=None)
    ap.add_argument("--print", action="store_true", help="print the tables from the units measured so far")
    args = ap.parse_args()
    if not args.print:
        run_stages(config_for(None), target="embed", progress=False)
        groups = (("first", run_first), ("rows", run_rows), ("topdown", run_topdown), ("ensemble", run_ensemble))
        for group, fn in groups:
            if args.only in (None, group) and not (args.only is None and group == "first"):
                fn()
    print_tables()


if __name__ == "__main__":
    main()
