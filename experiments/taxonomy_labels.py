"""Zero-shot cosine on pl-jobads `isco_submajor` with the taxonomy's Polish texts as category texts (issue 21, lever 1).

    .venv/bin/python experiments/taxonomy_labels.py

Reads the frozen vectors of experiments/finetune_cv.py's run (rules-cleaned text, builtin e5-small at 256 tokens; run
that first, or any run with the same config), and scores every dev-pool ad (train + val: zero-shot fits nothing, so
the whole pool is held out; the test split is not read) against one vector per class made from:

- `en` — the run's label set today: ESCO's English name + description (`embed.label_text: name_description`);
- `pl_name`, `pl_name_synthesis`, `pl_name_synthesis_tasks` — the class's own KZiS texts in Polish
  (`prepare.taxonomy` with `label_kinds`, `embed.label_text: taxonomy`);
- `pl_names_mean` — the mean of the embeddings of every name the taxonomy rolls up into the class (its KZiS names at
  every level below it, the 2,552 occupation names, ESCO's Polish names): a prototype from many short texts.

Prints macro-F1 and accuracy on the dev pool, and the classes with no Polish text of their own.
"""

from __future__ import annotations

import json
import time

import numpy as np
from common import pl_taxonomy
from finetune_cv import config_for
from sklearn.metrics import accuracy_score, f1_score

from jobembed.data import label_texts
from jobembed.embed import label_vectors, make_embedders
from jobembed.evaluate import dev_pool
from jobembed.sections import TaxonomyConfig
from jobembed.stages import prepared, run_vectors
from jobembed.taxonomy import label_text, label_texts_all, load_taxonomy, roll_up

VARIANTS = {
    "pl_name": ["kzis_name"],
    "pl_name_synthesis": ["kzis_name", "kzis_synthesis"],
    "pl_name_synthesis_tasks": ["kzis_name", "kzis_synthesis", "kzis_tasks"],
}
NAME_KINDS = ("kzis_name", "occupation", "esco_name")


def _normed(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)


def main() -> None:
    config = config_for(None)
    splits, labels = prepared(config)
    frozen = run_vectors(config, config.embed.model, splits, labels)
    dev = dev_pool(splits)
    X = _normed(np.concatenate([frozen.train, frozen.val]))
    y = dev["label"].to_numpy(dtype=str)
    codes = labels["label"].astype(str).tolist()
    seen = sorted(set(y))
    tax, card = roll_up(
        load_taxonomy(TaxonomyConfig(path=pl_taxonomy())), labels=codes, config=TaxonomyConfig(path=pl_taxonomy()),
        merged={}, dropped=set(),
    )  # fmt: skip
    _, label_embedder = make_embedders(config.embed)
    prototypes = {"en": frozen.labels}
    missing = {}
    for name, kinds in VARIANTS.items():  # what prepare.taxonomy.label_kinds + embed.label_text: taxonomy make
        with_tax = labels.assign(taxonomy=[label_text(tax, c, kinds) for c in codes], taxonomy_texts="")
        missing[name] = [c for c in codes if not label_text(tax, c, kinds)]
        prototypes[name] = label_vectors(label_embedder, label_texts(with_tax, "taxonomy"), mode="taxonomy")
    t0 = time.perf_counter()  # prototype_kinds + embed.label_text: taxonomy_mean
    with_tax = labels.assign(taxonomy="", taxonomy_texts=[label_texts_all(tax, c, list(NAME_KINDS)) for c in codes])
    names = label_texts(with_tax, "taxonomy_mean")
    prototypes["pl_names_mean"] = label_vectors(label_embedder, names, mode="taxonomy_mean")
    missing["pl_names_mean"] = [c for c in codes if not label_texts_all(tax, c, list(NAME_KINDS))]
    n_names = sum(len(t.split("\n")) for t in names)
    print(f"encoded {n_names} taxonomy names in {time.perf_counter() - t0:.0f} s (cached after the first run)")
    print(f"\ndev pool: {len(dev)} ads, {len(seen)} classes with ads; taxonomy rows {card['rows']}, left out "
          f"{card['left_out']}\n")  # fmt: skip
    print("| category texts | dev macro-F1 | dev accuracy | classes without an own Polish text |")
    print("|---|---|---|---|")
    results = {}
    for name, P in prototypes.items():
        pred = np.asarray(codes)[(X @ _normed(P).T).argmax(axis=1)]
        f1 = f1_score(y, pred, average="macro", labels=seen, zero_division=0)
        acc = accuracy_score(y, pred)
        results[name] = {"macro_f1": f1, "accuracy": acc, "missing": missing.get(name)}
        gap = ", ".join(missing.get(name) or []) or "–"
        print(f"| {name} | {f1:.3f} | {acc:.3f} | {gap} |")
    out = config.run_dir / "taxonomy_labels.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"\nraw: {out}")


if __name__ == "__main__":
    main()
