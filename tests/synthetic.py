"""Small, seeded, in-memory job-ad datasets for tests (no real data, no network)."""

from __future__ import annotations

import numpy as np
import pandas as pd

OCCUPATIONS: dict[str, tuple[str, list[str]]] = {
    "83": ("Drivers", ["kierowca kat. C", "truck driver", "transport międzynarodowy", "prawo jazdy", "delivery van"]),
    "22": ("Health professionals", ["pielęgniarka", "nurse", "szpital", "oddział", "care home night shifts"]),
    "25": ("ICT professionals", ["programista Python", "software developer", "Java Spring", "web applications"]),
    "93": ("Labourers", ["magazynier", "warehouse worker", "wózek widłowy", "picking and packing"]),
    "43": ("Recording clerks", ["księgowa", "accountant", "faktury VAT", "payroll and invoices"]),
    "51": ("Personal services", ["kucharz", "cook", "restauracja", "hotel kitchen", "pomoc kuchenna"]),
}
GENERIC = [
    "oferujemy stabilne zatrudnienie",
    "we offer training",
    "praca w Krakowie",
    "apply with your CV",
    "umowa o pracę",
    "premie i benefity",
    "<<PHONE>>",
    "kontakt <<EMAIL>>",
]


def make_ads(n_per_class: int = 20, *, seed: int = 0, rare: dict[str, int] | None = None) -> pd.DataFrame:
    """A frame with columns ``id``, ``text``, ``label`` (ISCO-like codes as strings), ``portal``.

    Args:
        n_per_class: ads per occupation.
        rare: extra classes with a handful of ads, e.g. ``{"61": 2}``.
    """
    rng = np.random.default_rng(seed)
    rows = []
    classes = {k: n_per_class for k in OCCUPATIONS} | (rare or {})
    for label, n in classes.items():
        words = OCCUPATIONS.get(label, ("Farmers", ["rolnik", "farm worker", "gospodarstwo"]))[1]
        for _ in range(n):
            parts = list(rng.choice(words, size=3)) + list(rng.choice(GENERIC, size=2))
            rng.shuffle(parts)
            text = f"{parts[0].capitalize()}. " + ", ".join(parts[1:]) + f". Nr {int(rng.integers(1, 10**6))}"
            rows.append({"id": f"ad-{len(rows)}", "text": text, "label": label, "portal": "test"})
    return pd.DataFrame(rows).sample(frac=1.0, random_state=seed).reset_index(drop=True)


def make_labels() -> pd.DataFrame:
    """A label-set frame (``code``, ``name``, ``description``) for the classes of ``make_ads``."""
    return pd.DataFrame(
        [
            {"code": k, "name": name, "description": "Workers: " + ", ".join(words)}
            for k, (name, words) in OCCUPATIONS.items()
        ]
        + [{"code": "61", "name": "Farmers", "description": "Workers: rolnik, farm worker"}]
    )


def tiny_finetune_run(root, *, name: str, model, finetune: dict) -> dict:
    """Write ``root/ads.csv`` and ``root/labels.csv`` and return a pipeline config of a tiny run on them whose
    fine-tune reads ``model`` and mines triplets without a judge; ``finetune`` sets that section."""
    make_ads(16, seed=7).to_csv(root / "ads.csv", index=False)
    make_labels().to_csv(root / "labels.csv", index=False)
    return {
        "name": name,
        "runs_dir": str(root / "runs"),
        "prepare": {
            "input": str(root / "ads.csv"),
            "id_col": "id",
            "test_size": 0.25,
            "val_size": 0.2,
            "min_class_count": 3,
            "labels": {"path": str(root / "labels.csv")},
        },
        "embed": {"model": str(model), "max_seq_length": 32, "batch_size": 16},
        "triplets": {"judge": "none", "min_anchors_per_class": 2, "relative_margin": 1.0},
        "finetune": finetune,
    }
