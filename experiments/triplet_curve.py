"""Issue 21, lever 4: the curve (triplets, epochs) -> validation macro-F1 of today's recipe, on CPU.

    .venv/bin/python experiments/triplet_curve.py                 # every point not yet measured, then the table
    .venv/bin/python experiments/triplet_curve.py --only 6600x1   # one point
    .venv/bin/python experiments/triplet_curve.py --print         # the table from what was measured
    .venv/bin/python experiments/triplet_curve.py --max-rows 600 --points 32x1   # a smoke run (~3.5 min)

pl-jobads `isco_submajor`, the settings of experiments/objectives.py (rules-cleaned text, builtin e5-small, vectors
at 256 tokens, the seed-13 splits; the recipe of experiments/finetune_cv.py: class-aware MNRL, 128 tokens, batch 32,
lr 3e-5, one evaluation at the end of training). Today's default mines at most 64 anchors per class (~1,650
triplets after the model judge); the curve mines with up to 256 anchors per class (the same model judge; classes
with fewer training ads give fewer, so the pool is smaller than 4x; "trained on" in the table says what each point
got) and caps what each point trains on with `finetune.max_triplets` (the class-aware sampler keeps the classes'
shares). Points: 825, 1,650, 3,300 and 6,600
triplets at one epoch, and 1,650 at two. On 2 CPU cores (measured alone) a step of 32 triplets takes ~20 s at 128
tokens with the final evaluation: 825 x 1 trained 721 s and 3,300 x 1 2,179 s, plus ~8 minutes per point to encode
every split; ~3.5 h for every point.

Each point fine-tunes in a run folder of its own (`curve-<triplets>x<epochs>`; prepare, clean, embed and the judged
triplets are cache hits after the first), encodes every split with its encoder and fits centroid, MLP and fusion on
the train split, scored on val (782 ads); the test split is not read. Each point writes
experiments/out/triplet_curve/<point>.json when done, so a run that stops keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import time

from common import OUT
from finetune_cv import RECIPE
from objectives import COMMON, _score
from objectives import config_for as objectives_config

from jobembed.config import load_config
from jobembed.stages import finetuned_vectors, pin_models, prepared, run_stages

RESULTS = OUT / "triplet_curve"
POINTS = ["825x1", "1650x1", "3300x1", "6600x1", "1650x2"]
SYSTEMS = ("centroid", "mlp", "fusion")
ANCHORS_PER_CLASS = 256  # 4x today's 64: enough judged triplets (~6,600) for the largest point


def config_for(point: str, *, max_rows: int | None = None):
    triplets, epochs = (int(x) for x in point.split("x"))
    base = objectives_config(None).model_dump(mode="json")
    base["name"] = f"curve-{point}" + (f"-{max_rows}" if max_rows else "")
    base["runs_dir"] = str(RESULTS / "runs")
    base["prepare"]["max_rows"] = max_rows
    base["triplets"] = {**base["triplets"], "max_anchors_per_class": ANCHORS_PER_CLASS}
    base["finetune"] = {
        **RECIPE,
        **COMMON,
        "enabled": True,
        "epochs": epochs,
        "max_triplets": triplets,
        "eval_train_ads": 1000,
    }
    return pin_models(load_config(None, base))


def unit(point: str, *, max_rows: int | None = None) -> dict:
    path = RESULTS / (f"{point}.json" if not max_rows else f"smoke-{point}-{max_rows}.json")
    if path.is_file():
        return json.loads(path.read_text())
    config = config_for(point, max_rows=max_rows)
    started = time.perf_counter()
    run_stages(config, target="embed-finetuned", progress=False)
    splits, labels = prepared(config)
    info = json.loads((config.run_dir / "finetune" / "finetune.json").read_text())
    result = {
        "point": point,
        "systems": _score(config, finetuned_vectors(config, splits, labels), SYSTEMS),
        "finetune": {k: info[k] for k in ("steps", "seconds", "val")} | {"rows": info["triplets"]["rows"]},
        "seconds": round(time.perf_counter() - started, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"{point}: {result['systems']} ({result['seconds']:.0f} s)", flush=True)
    return result


def print_table() -> None:
    frozen_path = OUT / "objectives" / "frozen.json"  # experiments/objectives.py --only frozen: the same fits, frozen
    frozen = json.loads(frozen_path.read_text())["systems"] if frozen_path.is_file() else {}
    print(
        "| triplets x epochs | trained on | steps | fine-tune s | "
        + " | ".join(f"val macro-F1 {s}" for s in SYSTEMS)
        + " |"
    )
    print("|---|---|---|---|" + "---|" * len(SYSTEMS))
    if frozen:
        print("| frozen | – | – | – | " + " | ".join(f"{frozen[s]['macro_f1']:.3f}" for s in SYSTEMS) + " |")
    for point in POINTS:
        path = RESULTS / f"{point}.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        f = r["finetune"]
        cells = [
            f"{r['systems'][s]['macro_f1']:.3f}"
            + (f" ({r['systems'][s]['macro_f1'] - frozen[s]['macro_f1']:+.3f})" if s in frozen else "")
            for s in SYSTEMS
        ]
        print(f"| {point} | {f['rows']} | {f['steps']} | {f['seconds']:.0f} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=POINTS, default=None)
    ap.add_argument("--points", nargs="+", default=None, help="other points, TRIPLETSxEPOCHS (a smoke run)")
    ap.add_argument("--max-rows", type=int, default=None, help="a stratified sample of the ads (a smoke run)")
    ap.add_argument("--print", action="store_true")
    args = ap.parse_args()
    if not args.print:
        for point in args.points or [p for p in POINTS if args.only in (None, p)]:
            unit(point, max_rows=args.max_rows)
    print_table()


if __name__ == "__main__":
    main()
