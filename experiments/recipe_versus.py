"""Issue 21: two fine-tuning recipes of the quality CV against each other, system by system, on the same folds.

    .venv/bin/python experiments/recipe_versus.py                                   # quality-cv-2ep vs quality-cv-prior
    .venv/bin/python experiments/recipe_versus.py --first quality-cv-prior --second quality-cv-2ep

Both run folders come from experiments/quality_cv.py with the same prepare, clean, frozen vectors and 3 repost-grouped
folds of the dev pool (the second made from a copy of the first's folder, e.g. `cp -a experiments/out/quality-cv
experiments/out/quality-cv-2ep`, then `quality_cv.py --name quality-cv-2ep --epochs 2 --prior-power 0.4 --folds 3`);
only the fine-tuning recipe differs (there: the classifier for two epochs instead of one), inside every fold and on
the train split. Each system of the second report is matched with the same system of the first on the same kind of
encoder (frozen or fine-tuned); the frozen ones must come out identical (a check that the folds and vectors are the
same). Printed per system: CV macro-F1 per fold first → second, the mean difference with the corrected resampled
t-test over the folds, exact McNemar on the pooled out-of-fold answers (with each side's pooled accuracy), and each
report's own one reading of the test split.

The rule, fixed before the second recipe's CV was read (the report's own rule): the recipe whose best system has the
higher CV macro-F1 is the CV-chosen one, and its test reading is the one reported; the test columns are shown beside,
never used to choose. Nothing here reads the test split: both reports already did, once each.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from common import OUT, dev_rows
from quality_cv import config_for

from jobembed import metrics
from jobembed.evaluate import dev_pool
from jobembed.stages import prepared


def kind(system: dict) -> str:
    """``fine-tuned`` for a system on a fine-tuned encoder (it has CV fine-tuning figures), else ``frozen``."""
    return "fine-tuned" if "finetuned_cv" in system else "frozen"


def compare(first_name: str, second_name: str, *, ids: np.ndarray, y: np.ndarray) -> None:
    """Print the table and the CV's choice for run folders ``first_name`` and ``second_name`` under
    experiments/out; ``ids``, ``y``: the dev pool's ids and labels, in the order the out-of-fold rows are read."""
    reports = [OUT / name / "report" for name in (first_name, second_name)]
    for report in reports:
        if not (report / "metrics.json").is_file():
            raise SystemExit(f"{report / 'metrics.json'} not found: finish experiments/quality_cv.py for it first")
    first, second = (json.loads((r / "metrics.json").read_text()) for r in reports)
    files = [json.loads((r / "oof" / "oof.json").read_text())["systems"] for r in reports]
    by_kind = {(s["system"], kind(s)): key for key, s in first["systems"].items()}
    print(f"{second_name} against {first_name}: the same folds of {len(ids)} dev ads\n")
    print(
        "| system | encoder | CV macro-F1 per fold, first → second | diff | corrected t p | McNemar p, pooled OOF "
        "(accuracy first → second) | test accuracy, first → second | test macro-F1, first → second | test major "
        "accuracy |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    warnings = []
    for key2 in second["ranking"]:
        s2 = second["systems"][key2]
        key1 = by_kind.get((s2["system"], kind(s2)))
        if key1 is None:
            continue
        s1 = first["systems"][key1]
        a = [f["macro_f1"] for f in s1["cv"]["folds"]]
        b = [f["macro_f1"] for f in s2["cv"]["folds"]]
        o1, o2 = (dev_rows(r / "oof" / f[k]["file"], ids) for r, f, k in zip(reports, files, (key1, key2), strict=True))
        p1, p2 = o1.classes[o1.probs.argmax(1)], o2.classes[o2.probs.argmax(1)]
        n_test = len(ids) / len(a)  # a fold's share of the dev pool, as the report's own tests
        t = metrics.corrected_paired_ttest(b, a, n_train=n_test * (len(a) - 1), n_test=n_test)
        mc = metrics.mcnemar(y, p2, p1)
        if kind(s2) == "frozen" and not np.array_equal(p1, p2):
            warnings.append(f"the frozen {s2['system']} answers differently in the two runs: their folds, vectors or "
                            "report settings (e.g. fusion's prior correction) differ")  # fmt: skip
        major = [(s.get("test_parent") or {}).get("accuracy", np.nan) for s in (s1, s2)]
        folds = ", ".join(f"{x:.3f} → {z:.3f}" for x, z in zip(a, b, strict=True))
        print(
            f"| {s2['system']} | {kind(s2)} | {folds} | {t['mean_diff']:+.3f} | {t['p_value']:.2f} | "
            f"{mc['p_value']:.2g} ({np.mean(p1 == y):.3f} → {np.mean(p2 == y):.3f}) | {s1['test']['accuracy']:.3f} → "
            f"{s2['test']['accuracy']:.3f} | {s1['test']['macro_f1']:.3f} → {s2['test']['macro_f1']:.3f} | "
            f"{major[0]:.3f} → {major[1]:.3f} |"
        )
    for line in warnings:
        print(f"\nwarning: {line}")
    best = [m["systems"][m["winner"]] for m in (first, second)]
    cv = [b["cv"]["summary"]["macro_f1"]["mean"] for b in best]
    chosen = second_name if cv[1] > cv[0] else first_name
    print(
        f"\nCV winners: {first_name} {best[0]['display']} {cv[0]:.3f}, {second_name} {best[1]['display']} "
        f"{cv[1]:.3f}: the CV chooses {chosen}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--first", default="quality-cv-prior", help="the run folder of the recipe in place")
    ap.add_argument("--second", default="quality-cv-2ep", help="the run folder of the recipe measured against it")
    args = ap.parse_args()
    run = argparse.Namespace(loss="classifier", epochs=1.0, rows_weight=3.0, rows_kinds=None, topdown=False,
                             prior_power=0.0, name=args.first)  # fmt: skip
    dev = dev_pool(prepared(config_for(run, None))[0])  # the first run's prepared splits: the dev pool
    compare(args.first, args.second, ids=dev["id"].to_numpy(dtype=str), y=dev["label"].to_numpy(dtype=str))


if __name__ == "__main__":
    main()
