"""A first look at what `jobembed finetune` does on pl-jobads, on the validation split only (exploration, not the
issue's final comparison: that one needs 3 seeds and report's test-split protocol).

    .venv/bin/python experiments/finetune_probe.py          # ~45 min on 2 CPU cores

prepare -> clean (rules) -> embed (builtin e5-small, 256 tokens) -> triplets (model judge) -> finetune (1,728
triplets, 1 epoch, 128 tokens, batch 32, lr 3e-5: the floor's budget) -> the train and val ads embedded with the
fine-tuned encoder at 256 tokens. Then logistic regression and centroid cosine, fit on train, scored on val, with the
frozen and the fine-tuned vectors. The fine-tuned encoder never saw a val ad's label in its training triplets (the
val triplets and val centroids picked its checkpoint, so its val figures are slightly optimistic).
"""

from __future__ import annotations

import json
import time

from common import OUT, pl_jobads
from sklearn.metrics import accuracy_score, f1_score

from jobembed import encoders
from jobembed.baselines import CentroidClassifier, embedding_logreg
from jobembed.config import load_config
from jobembed.data import load_splits
from jobembed.embed import Embedder
from jobembed.stages import pin_models, run_stages, triplet_inputs


def scores(X_train, y_train, X_val, y_val) -> dict[str, float]:
    out = {}
    for name, model in (("logreg", embedding_logreg(seed=13)), ("centroid", CentroidClassifier())):
        predicted = model.fit(X_train, y_train).predict(X_val)
        out[f"{name}_macro_f1"] = round(float(f1_score(y_val, predicted, average="macro", zero_division=0)), 4)
        out[f"{name}_accuracy"] = round(float(accuracy_score(y_val, predicted)), 4)
    return out


def main() -> None:
    overrides = {
        "name": "finetune-probe",
        "runs_dir": str(OUT),
        "prepare": pl_jobads("isco_submajor"),
        "clean": {"backend": "rules", "language": "pl"},
        "embed": {"model": "builtin:multilingual-e5-small", "max_seq_length": 256},
        "finetune": {
            "max_triplets": 1728,
            "max_seq_length": 128,
            "batch_size": 32,
            "epochs": 1,
            "eval_train_ads": 1000,
        },
    }
    config = pin_models(load_config(None, overrides))
    started = time.perf_counter()
    run_stages(config, target="finetune", progress=False)
    info = json.loads((config.run_dir / "finetune" / "finetune.json").read_text())
    inputs = triplet_inputs(config)
    splits = load_splits(config.run_dir / "prepare")
    y_train, y_val = splits["train"]["label"].to_numpy(str), splits["val"]["label"].to_numpy(str)
    # The prompt the encoder was fine-tuned with (its base family's: e5 -> "query: "); a folder path names no family.
    prompt, _ = encoders.resolve_prompts(config.embed.model, config.embed.text_prompt, config.embed.label_prompt)
    tuned = Embedder(config.embed, prompt=prompt, model=str(config.run_dir / "finetune" / "model"))
    t0 = time.perf_counter()
    X_train = tuned.encode(inputs.texts["train"].tolist())
    X_val = tuned.encode(inputs.texts["val"].tolist())
    encode_seconds = time.perf_counter() - t0
    result = {
        "finetune": {k: info[k] for k in ("loss", "class_aware", "steps", "seconds", "val")}
        | {
            "triplets": info["triplets"]["rows"],
            "judge": info["triplets"]["judge"],
        },
        "frozen": scores(inputs.vectors["train"], y_train, inputs.vectors["val"], y_val),
        "fine_tuned": scores(X_train, y_train, X_val, y_val),
        "encode_seconds": round(encode_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    result["lift"] = {k: round(result["fine_tuned"][k] - result["frozen"][k], 4) for k in result["frozen"]}
    (OUT / "finetune_probe.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
