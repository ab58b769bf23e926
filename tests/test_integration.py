"""End to end on a real subset of pl-jobads with the builtin multilingual-e5-small (slow: ~2 min on 2 cores).

Skipped with a reason where ../shared/data (or $JOBEMBED_DATA) is absent. Builds the builtin model in the
user cache (~/.cache/jobembed or $JOBEMBED_CACHE) once; later runs reuse it.
"""

import json
import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from jobembed.cli import app

DATA = Path(os.environ.get("JOBEMBED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
ADS = DATA / "pl-jobads" / "ads.csv"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not ADS.is_file(), reason=f"real data not found at {ADS} (set JOBEMBED_DATA)"),
]


def test_pipeline_on_real_ads_with_builtin_e5(tmp_path, real_cache, monkeypatch):
    monkeypatch.setenv("JOBEMBED_CACHE", str(real_cache))
    cfg = {
        "name": "real",
        "runs_dir": str(tmp_path / "runs"),
        "prepare": {
            "input": str(ADS),
            "text_col": "text",
            "label_col": "isco_major",
            "id_col": "id",
            "labels": {
                "path": str(DATA / "pl-jobads" / "labels.csv"),
                "code_col": "code",
                "name_col": "name_en",
                "description_col": "description_en",
                "filter": {"level": "isco_major"},
            },
            "max_rows": 600,
            "min_class_count": 5,
            "seed": 13,
        },
        "embed": {"model": "builtin:multilingual-e5-small", "max_seq_length": 128},
        "head": {"max_epochs": 100},
        "report": {"cv_folds": 3, "bootstrap": 200, "tfidf": {"max_features": 20000}},
    }
    (tmp_path / "real.yaml").write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["run", "--config", str(tmp_path / "real.yaml"), "--quiet"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "runs" / "real" / "report" / "metrics.json").read_text())
    cv = {r["system"]: r["cv"]["summary"]["macro_f1"]["mean"] for r in metrics["systems"].values()}
    # A trained head on real ads must beat the zero-shot cosine to category descriptions by a margin.
    assert cv["mlp"] > cv["zeroshot"] + 0.1
    assert metrics["systems"][next(k for k in metrics["systems"] if k.startswith("mlp"))]["test"]["accuracy"] > 0.5
    out = CliRunner().invoke(
        app,
        [
            "classify",
            "Kierowca kat. C+E w transporcie międzynarodowym, karta kierowcy.",
            "--bundle",
            str(tmp_path / "runs" / "real" / "bundle"),
            "--json",
        ],
    )
    assert out.exit_code == 0, out.output
    answer = json.loads(out.output.strip().splitlines()[-1])
    assert answer["top_k"][0]["label"] == "8"  # ISCO 8: plant and machine operators and assemblers (drivers)
