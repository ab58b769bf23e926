"""finetune-seeds: the test-split protocol over fine-tuning seeds, one unit per seed besides finetune.seed
(issue 20)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from jobembed.artifacts import read_json
from jobembed.cli import app
from jobembed.config import load_config
from jobembed.engine import STAGES, Plan
from jobembed.finetune import CLASSIFIER_FILE, CLASSIFIER_META
from jobembed.stages.finetune_seeds import seeds_todo
from tests.synthetic import OCCUPATIONS, tiny_finetune_run

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "250"})


@pytest.fixture(scope="module")
def seeds_run(tmp_path_factory, tiny_encoder_dir) -> Path:
    """A finished tiny run fine-tuned with seeds 13 (the finetune stage's) and 14 (finetune-seeds), then reported."""
    root = tmp_path_factory.mktemp("finetune-seeds")
    cfg = tiny_finetune_run(
        root,
        name="seeds",
        model=tiny_encoder_dir,
        finetune={"epochs": 1, "batch_size": 8, "max_seq_length": 32, "evals_per_epoch": 1},
    )
    cfg["head"] = {"hidden_sizes": [16], "max_epochs": 10, "patience": 3}
    cfg["report"] = {"cv_folds": 2, "bootstrap": 20, "systems": ["centroid", "mlp", "tfidf"]}
    cfg["report"]["tfidf"] = {"max_features": 500}
    (root / "seeds.yaml").write_text(yaml.safe_dump(cfg))
    run = root / "runs" / "seeds"
    assert invoke("prepare", run, "-c", root / "seeds.yaml", "-q").exit_code == 0
    result = invoke("finetune", run, "--seeds", "13,14", "-q")
    assert result.exit_code == 0, result.output
    assert "seeds 14 as well" in result.output
    result = invoke("report", run, "-q")
    assert result.exit_code == 0, result.output
    assert "over seeds 13 / 14" in result.output
    return run


def test_the_report_shows_every_seed_with_mcnemar_per_seed(seeds_run: Path):
    m = read_json(seeds_run / "report" / "metrics.json")
    fs = m["finetune_seeds"]
    assert fs["seeds"] == [13, 14] and fs["bundled_seed"] == 13
    assert set(fs["systems"]) == {"centroid", "mlp"}
    for name, r in fs["systems"].items():
        assert len(r["macro_f1"]["values"]) == 2 and r["macro_f1"]["std"] >= 0
        # seed 13 is the finetune stage's model: its figure is the test-only section's
        main = next(e for e in m["finetuned"]["systems"].values() if e["system"] == name)
        assert r["macro_f1"]["values"][0] == main["test"]["macro_f1"]
        frozen = main["mcnemar_vs"]
        assert r["mcnemar_frozen"][0] == next(v for k, v in frozen.items() if k != "tfidf")
        assert all(t is not None and 0 <= t["p_value"] <= 1 for t in r["mcnemar_frozen"] + r["mcnemar_tfidf"])
        assert r["lift"]["mean"] == pytest.approx(r["macro_f1"]["mean"] - r["frozen_macro_f1"])
    text = (seeds_run / "report" / "report.md").read_text()
    assert "## Fine-tuned encoder over 2 seeds (test split)" in text
    assert "McNemar p vs frozen, seeds 13 / 14" in text
    assert "Over 2 fine-tuning seeds" in text.split("## All systems", 1)[0]  # in the answer


def test_a_seed_is_its_own_fine_tune_and_its_model_is_dropped(seeds_run: Path):
    unit = seeds_run / "finetune-seeds" / "units" / "seed-14"
    assert read_json(unit / "seed.json")["seed"] == 14 and not (unit / "finetune" / "model").exists()
    assert not any((seeds_run / "finetune-seeds" / "checkpoints").glob("*"))
    bundled = next((seeds_run / "embed-finetuned").glob("*/train.npy"))
    other = np.load(seeds_run / "finetune-seeds" / "seed-14" / "train.npy")
    assert other.shape == np.load(bundled).shape and not np.allclose(other, np.load(bundled))


def test_adding_a_seed_fine_tunes_that_seed_alone_and_dropping_one_keeps_it(seeds_run: Path, tmp_path):
    run = tmp_path / "runs" / "more"
    shutil.copytree(seeds_run, run)
    units = run / "finetune-seeds" / "units"
    bundled = (run / "finetune" / "stage.json").stat().st_mtime_ns
    kept = (units / "seed-14" / "stage.json").stat().st_mtime_ns
    (tmp_path / "more.yaml").write_text(yaml.safe_dump({"finetune": {"seeds": [13, 14, 15]}}))
    dry = invoke("report", run, "-c", tmp_path / "more.yaml", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "2 other seed(s) of finetune.seeds, 1 to fine-tune and encode (15)" in dry.output
    assert not (units / "seed-15").exists()  # nothing ran
    result = invoke("finetune", run, "--seeds", "13,14,15")
    assert result.exit_code == 0, result.output
    assert "0 to fine-tune" in invoke("report", run, "--dry-run").output
    assert "finetune: up to date" in result.output  # the bundled model is not fine-tuned again
    assert (run / "finetune" / "stage.json").stat().st_mtime_ns == bundled
    assert (units / "seed-14" / "stage.json").stat().st_mtime_ns == kept
    assert (units / "seed-15" / "stage.json").is_file()
    assert invoke("report", run, "-q").exit_code == 0
    assert read_json(run / "report" / "metrics.json")["finetune_seeds"]["seeds"] == [13, 14, 15]
    assert invoke("finetune", run, "--seeds", "14", "-q").exit_code == 0
    assert (units / "seed-15" / "stage.json").is_file()  # paid for: kept when left out of the list
    assert sorted(p.name for p in (run / "finetune-seeds").glob("seed-*")) == ["seed-14"]


def test_the_seed_list_is_in_no_other_stage_key(seeds_run: Path):
    cfg = load_config(seeds_run / "config.yaml")
    assert cfg.finetune.seeds == [13, 14]
    other = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"seeds": []})})
    for stage in ("finetune", "embed-finetuned", "finetune-cv"):
        assert Plan(cfg).key(stage) == Plan(other).key(stage), stage
    assert Plan(cfg).key("finetune-seeds") != Plan(other).key("finetune-seeds")


def test_seeds_that_are_not_integers_get_one_line(seeds_run: Path):
    result = invoke("finetune", seeds_run, "--seeds", "13,x")
    assert result.exit_code == 1 and "not a comma-separated list of integer seeds" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_a_new_stage_version_re_assembles_the_folder_without_fine_tuning_a_kept_seed(
    seeds_run: Path, tmp_path, monkeypatch
):
    """A fix to how the stage assembles its folder (its version) re-runs it, but a seed's unit is keyed by what the
    unit holds: the paid-for fine-tune is kept and only linked again."""
    run = tmp_path / "runs" / "bumped"
    shutil.copytree(seeds_run, run)
    config = load_config(run / "config.yaml").model_copy(update={"run_dir": run})
    before = Plan(config).key("finetune-seeds")
    stage = STAGES["finetune-seeds"]
    monkeypatch.setitem(STAGES, "finetune-seeds", dataclasses.replace(stage, version=stage.version + 1))
    assert Plan(config).key("finetune-seeds") != before and seeds_todo(config) == []
    kept = (run / "finetune-seeds" / "units" / "seed-14" / "stage.json").stat().st_mtime_ns
    result = invoke("finetune", run, "--seeds", "13,14")
    assert result.exit_code == 0, result.output
    assert "seed 14 (1 of 1) up to date (kept)" in result.output
    assert (run / "finetune-seeds" / "units" / "seed-14" / "stage.json").stat().st_mtime_ns == kept


def test_a_seed_brings_its_taxonomy_vectors_and_classifier_layer_to_the_report(tmp_path, tiny_encoder_dir):
    """Reproduces: finetune-seeds left taxonomy.npy and the classifier's layer in its units, so report stopped on a run
    with taxonomy rows ("no vectors of the taxonomy texts") after every seed was paid for, and no seed had e2e."""
    cfg = tiny_finetune_run(
        tmp_path,
        name="tax",
        model=tiny_encoder_dir,
        finetune={"epochs": 1, "batch_size": 8, "max_seq_length": 32, "evals_per_epoch": 1, "loss": "classifier"},
    )
    rows = [(code, word, "name") for code, (_, words) in OCCUPATIONS.items() for word in words[:2]]
    pd.DataFrame(rows, columns=["code", "text", "kind"]).to_csv(tmp_path / "tax.csv", index=False)
    cfg["prepare"]["taxonomy"] = {"path": str(tmp_path / "tax.csv")}
    cfg["head"] = {"hidden_sizes": [16], "max_epochs": 10, "patience": 3}
    cfg["report"] = {
        "cv_folds": 2,
        "bootstrap": 0,
        "systems": ["centroid", "tfidf", "e2e"],
        "tfidf": {"max_features": 500},
        "taxonomy_rows": {"weight": 0.5},
    }
    (tmp_path / "tax.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "runs" / "tax"
    assert invoke("prepare", run, "-c", tmp_path / "tax.yaml", "-q").exit_code == 0
    assert invoke("finetune", run, "--seeds", "13,14", "-q").exit_code == 0
    result = invoke("report", run, "-q")
    assert result.exit_code == 0, result.output
    seed = run / "finetune-seeds" / "seed-14"
    table = pd.read_parquet(run / "prepare" / "taxonomy.parquet")
    assert np.load(seed / "taxonomy.npy").shape[0] == len(table)
    assert (seed / CLASSIFIER_FILE).is_file() and (seed / CLASSIFIER_META).is_file()
    systems = read_json(run / "report" / "metrics.json")["finetune_seeds"]["systems"]
    assert {"centroid", "e2e"} <= set(systems) and len(systems["e2e"]["macro_f1"]["values"]) == 2
