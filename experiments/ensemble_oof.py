"""Issue 21, lever 5 with a second encoder: is a frozen + fine-tuned ensemble worth building? An estimate from the
quality CV's out-of-fold probabilities.

    .venv/bin/python experiments/ensemble_oof.py     # seconds; needs experiments/quality_cv.py's report first

Reads experiments/out/quality-cv/report/oof/ (every CV system's out-of-fold probabilities of the 6,248 dev ads,
written by the report) and pools members log-linearly, as experiments/levers.py's ensemble table does: each fold's
weights are the ones with the lowest log-loss on the other folds' out-of-fold answers (a grid in steps of 0.2), so no
fold scores weights chosen on itself. Members: fusion and the MLP on the frozen and on the fine-tuned encoder, and the
fine-tuned classifier's own layer (e2e) when the quality CV fine-tuned with the classifier loss. The test split is not
read. A cheap estimate: a real N-member system would choose its weights inside each fold's training side.
"""

from __future__ import annotations

import json

from common import OUT, dev_rows
from levers import ensemble_table
from quality_cv import config_for

from jobembed.evaluate import dev_pool
from jobembed.stages import prepared

REPORT = OUT / "quality-cv" / "report"
MEMBERS = ("fusion", "mlp", "e2e")


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loss", default="classifier")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--rows-weight", type=float, default=3.0)
    ap.add_argument("--rows-kinds", nargs="*", default=None)
    ap.add_argument("--topdown", action="store_true")
    ap.add_argument("--name", default="quality-cv")
    args = ap.parse_args()
    oof_meta = REPORT / "oof" / "oof.json"
    if not oof_meta.is_file():
        raise SystemExit(f"{oof_meta} not found: run experiments/quality_cv.py --folds 3 first")
    systems = json.loads((REPORT / "metrics.json").read_text())["systems"]
    files = json.loads(oof_meta.read_text())["systems"]
    config = config_for(args, None)
    splits, _ = prepared(config)
    dev = dev_pool(splits)
    probas = {}
    for key, entry in files.items():
        s = systems[key]
        if s["system"] not in MEMBERS:
            continue
        tuned = "finetune" in str(s["encoder"])
        oof = dev_rows(REPORT / "oof" / entry["file"], dev["id"].to_numpy(dtype=str))
        probas[f"{s['system']}-{'tuned' if tuned else 'frozen'}"] = oof.probs
    print("members:", ", ".join(f"{k} (CV macro-F1 {systems_cv(systems, files, k):.3f})" for k in probas))
    ensemble_table(probas, dev, config)


def systems_cv(systems: dict, files: dict, member: str) -> float:
    name, which = member.rsplit("-", 1)
    for key in files:
        s = systems[key]
        if s["system"] == name and ("finetune" in str(s["encoder"])) == (which == "tuned"):
            return s["cv"]["summary"]["macro_f1"]["mean"]
    return float("nan")


if __name__ == "__main__":
    main()
