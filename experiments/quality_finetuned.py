"""The quality issue's systems on the fine-tuned encoder: hybrid and hierarchy heads, test split, 3 seeds.

    .venv/bin/python experiments/finetune_quality.py --only main   # first: the 3 fine-tunes (~30 min each)
    .venv/bin/python experiments/quality_finetuned.py              # then this (~15 min on 2 CPU cores)

The fine-tuned encoder saw the labels of training ads through its triplets, so its systems follow the finetune
issue's protocol: fit on train (validation for early stopping, calibration, the fusion weight and the abstention
threshold), scored once on the 1,560 test ads, one row per fine-tuning seed, exact McNemar against TF-IDF + LR
and against the same system on the frozen encoder. No cross-validation.

Each seed's vectors are read from the shared embedding cache, where finetune_quality.py's re-embedding left them
(namespaces of the run's fine-tuned model at 256 tokens, in the order the seeds ran); the script checks the
mapping by reproducing each seed's stored MLP test macro-F1 from finetune_quality/main-s<seed>.json exactly.
Prints the table of docs/results.md#quality; raw numbers in experiments/out/quality_finetuned.json.
"""

from __future__ import annotations

import json
import sqlite3

import numpy as np
from common import OUT
from finetune_quality import RESULTS, SEEDS, config_for

from jobembed import metrics
from jobembed.config import default_cache_dir
from jobembed.embed import RunVectors, text_key
from jobembed.evaluate import EvalSettings, System, _test_scores, fit_on_train, predict_proba, selective_scores
from jobembed.hierarchy import find_hierarchy
from jobembed.stages import prepared, run_vectors
from jobembed.store import open_store

SYSTEMS = ("mlp", "fusion", "stack", "hier")


def seed_namespaces(model_dir: str) -> list[tuple[str, dict]]:
    """(namespace, info) of the fine-tuned model's 256-token vectors, oldest first."""
    db = default_cache_dir() / "store.sqlite3"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT id, name, info FROM namespaces ORDER BY id").fetchall()
    out = []
    for _, name, info in rows:
        meta = json.loads(info)
        if meta.get("model") == model_dir and meta.get("max_seq_length") == 256:
            out.append((name, meta))
    return out


def main() -> None:
    config = config_for(seed=SEEDS[0])
    config = config.model_copy(
        update={
            "report": config.report.model_copy(update={"systems": ["tfidf", *SYSTEMS], "hybrid": config.report.hybrid})
        }
    )
    splits, labels = prepared(config)
    col = config.text_column
    test, y_test = splits["test"], splits["test"]["label"].to_numpy(str)
    frozen = run_vectors(config, config.embed.model, splits, labels)
    hierarchy = find_hierarchy(labels["label"].astype(str).tolist(), mode=config.report.hierarchy)
    spaces = seed_namespaces(str(config.run_dir / "finetune" / "model"))
    if len(spaces) != len(SEEDS):
        raise SystemExit(
            f"expected {len(SEEDS)} fine-tuned vector sets in the cache, found {len(spaces)}: run "
            "experiments/finetune_quality.py --only main first"
        )
    store = open_store(default_cache_dir())

    def fit(name: str, vectors: RunVectors | None):
        system = System(name, vectors, "x", "x")
        pred, model = fit_on_train(
            system, settings=EvalSettings.of(config), labels=labels, splits=splits, hierarchy=hierarchy
        )
        # No out-of-fold answers here (a one-split protocol), so no abstention threshold: the coverage columns read 0.
        # The fine-tuned rows of docs/results.md were made before thresholds moved to out-of-fold answers.
        sel = selective_scores(
            classes=np.asarray(model.classes_, dtype=str),
            oof=None,
            proba_val=predict_proba(
                system, model, None if vectors is None else vectors.val, splits["val"][col].tolist()
            ),
            y_val=splits["val"]["label"].to_numpy(str),
            proba_test=predict_proba(system, model, None if vectors is None else vectors.test, test[col].tolist()),
            y_test=y_test,
            target=config.report.target_accuracy,
        )
        return pred, sel

    def summary(pred, sel) -> dict:
        s = _test_scores(y_test, pred, groups=test["group"].to_numpy(), n_boot=200, min_support=5)
        return {
            "macro_f1": s["test"]["macro_f1"],
            "accuracy": s["test"]["accuracy"],
            "parent_macro_f1": metrics.macro_f1(hierarchy.parent_of(y_test), hierarchy.parent_of(pred)),
            "coverage_at_target": sel["test"]["coverage"],
            "accuracy_at_target": sel["test"]["accuracy"],
        }

    out: dict = {"frozen": {}, "seeds": {}}
    base_preds = {}
    for name in ("tfidf", *SYSTEMS):
        pred, sel = fit(name, None if name == "tfidf" else frozen)
        base_preds[name] = pred
        out["frozen"][name] = summary(pred, sel)
        print(f"frozen {name}: {out['frozen'][name]}", flush=True)
    for seed, (ns, info) in zip(SEEDS, spaces, strict=True):
        table = store.vectors(ns, info=info)
        vec = {k: table.get([text_key(t) for t in splits[k][col].tolist()]) for k in ("train", "val", "test")}
        tuned = RunVectors(info["model"], info["fingerprint"], "fp32", "query: ", **vec, labels=frozen.labels)
        stored = json.loads((RESULTS / f"main-s{seed}.json").read_text())["systems"]["mlp"]["macro_f1"]
        rows = {}
        for name in SYSTEMS:
            pred, sel = fit(name, tuned)
            rows[name] = summary(pred, sel) | {
                "vs_tfidf": metrics.mcnemar(y_test, pred, base_preds["tfidf"]),
                "vs_frozen": metrics.mcnemar(y_test, pred, base_preds[name]),
            }
            if name == "mlp" and round(rows[name]["macro_f1"], 4) != stored:
                raise SystemExit(
                    f"seed {seed}: MLP macro-F1 {rows[name]['macro_f1']:.4f} != stored {stored}: "
                    "the cache's vector sets are not the seeds' (re-run finetune_quality.py)"
                )
            print(f"seed {seed} {name}: {rows[name]['macro_f1']:.3f}", flush=True)
        out["seeds"][seed] = rows
    (OUT / "quality_finetuned.json").write_text(json.dumps(out, indent=2))
    print_table(out)


def print_table(out: dict) -> None:
    print(
        "\n| system | encoder | test macro-F1 (seeds 13/14/15) | mean ± sd | test accuracy (mean) | parent macro-F1 | "
        "coverage at 0.9 (test accuracy) | McNemar p vs TF-IDF + LR | vs same system, frozen |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in out["frozen"].items():
        print(
            f"| {name} | frozen | {r['macro_f1']:.3f} | | {r['accuracy']:.3f} | {r['parent_macro_f1']:.3f} | "
            f"{r['coverage_at_target']:.2f} ({r['accuracy_at_target']:.3f}) | | |"
        )
    for name in SYSTEMS:
        rows = [out["seeds"][s][name] for s in out["seeds"]]
        f1 = np.array([r["macro_f1"] for r in rows])
        p_tfidf = " / ".join(f"{r['vs_tfidf']['p_value']:.2g}" for r in rows)
        p_frozen = " / ".join(f"{r['vs_frozen']['p_value']:.2g}" for r in rows)
        print(
            f"| {name} | fine-tuned | {' / '.join(f'{x:.3f}' for x in f1)} | {f1.mean():.3f} ± {f1.std(ddof=1):.3f} | "
            f"{np.mean([r['accuracy'] for r in rows]):.3f} | {np.mean([r['parent_macro_f1'] for r in rows]):.3f} | "
            f"{np.mean([r['coverage_at_target'] for r in rows]):.2f} "
            f"({np.mean([r['accuracy_at_target'] for r in rows]):.3f}) | "
            f"{p_tfidf} | {p_frozen} |"
        )


if __name__ == "__main__":
    main()
