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

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("JOBEMBED_DATA", ROOT.parent / "shared" / "data"))
ADS = DATA / "pl-jobads" / "ads.csv"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not ADS.is_file(), reason=f"real data not found at {ADS} (set JOBEMBED_DATA)"),
]


def test_pipeline_on_real_ads_with_builtin_e5(tmp_path, real_cache, monkeypatch):
    monkeypatch.setenv("JOBEMBED_CACHE", str(real_cache))
    # The demo config (configs/demo.yaml), at the 9 ISCO major groups and on 600 ads, with quick settings.
    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    demo["prepare"].update(input=str(ADS), label_col="isco_major", max_rows=600, min_class_count=5)
    demo["prepare"]["labels"].update(path=str(DATA / "pl-jobads" / "labels.csv"), filter={"level": "isco_major"})
    demo.update(name="real", runs_dir=str(tmp_path / "runs"))
    demo["head"]["max_epochs"] = 100
    demo["report"].update(cv_folds=3, bootstrap=200, tfidf={"max_features": 20000})
    (tmp_path / "real.yaml").write_text(yaml.safe_dump(demo))
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
