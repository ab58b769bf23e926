"""finetune-cv: the fine-tuning recipe inside every CV fold, its isolation, resume, and the fine-tuned rows of the CV
table (issue 20)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from jobembed.artifacts import PAUSE_ENV, read_json
from jobembed.cli import app
from jobembed.config import load_config
from jobembed.engine import STAGES, _nothing
from jobembed.errors import ConfigError
from jobembed.evaluate import cv_folds
from tests.synthetic import tiny_finetune_run

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "250"})


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory, tiny_encoder_dir) -> Path:
    """A finished tiny run with the recipe inside a 2-fold CV (`report --finetune-cv` turns finetune on too)."""
    root = tmp_path_factory.mktemp("finetune-cv")
    cfg = tiny_finetune_run(
        root,
        name="cv",
        model=tiny_encoder_dir,
        finetune={"epochs": 1, "batch_size": 8, "max_seq_length": 32, "evals_per_epoch": 1},
    )
    cfg["head"] = {"hidden_sizes": [16], "max_epochs": 10, "patience": 3}
    cfg["report"] = {"cv_folds": 2, "bootstrap": 20, "systems": ["centroid", "mlp", "tfidf"]}
    cfg["report"]["tfidf"] = {"max_features": 500}
    (root / "cv.yaml").write_text(yaml.safe_dump(cfg))
    run = root / "runs" / "cv"
    assert invoke("prepare", run, "-c", root / "cv.yaml", "-q").exit_code == 0
    result = invoke("report", run, "--finetune-cv", "-q")
    assert result.exit_code == 0, result.output
    assert invoke("bundle", run, "-q").exit_code == 0
    return run


def _dev(run: Path) -> pd.DataFrame:
    splits = {s: pd.read_parquet(run / "prepare" / f"{s}.parquet") for s in ("train", "val")}
    return pd.concat([splits["train"], splits["val"]], ignore_index=True)


def test_the_cv_table_has_the_fine_tuned_systems_with_their_tests(cv_run: Path):
    m = read_json(cv_run / "report" / "metrics.json")
    tuned = {k: r for k, r in m["systems"].items() if r.get("finetuned_cv")}
    assert {r["system"] for r in tuned.values()} == {"centroid", "mlp"}
    for key, r in tuned.items():
        assert key in m["ranking"]  # ranked with the frozen systems
        assert len(r["cv"]["folds"]) == 2 and r["test"]["accuracy"] >= 0
        frozen = r["frozen_key"]
        assert frozen in m["systems"] and not m["systems"][frozen].get("finetuned_cv")
        assert m["systems"][frozen]["system"] == r["system"]
        assert set(r["versus"]) == {frozen, "tfidf"}
        for v in r["versus"].values():
            assert {"cv_macro_f1_diff", "cv_macro_f1_ttest", "mcnemar_oof", "mcnemar_test"} <= set(v)
            # exact McNemar on the pooled out-of-fold answers: every dev ad is predicted once by each side
            assert v["mcnemar_oof"]["a_only"] + v["mcnemar_oof"]["b_only"] <= len(_dev(cv_run))
    assert "finetuned" not in m  # the test-only section is replaced by the CV rows
    assert m["finetune_cv"]["folds"] == 2 and "recipe" in m["finetune_cv"]["note"]
    text = (cv_run / "report" / "report.md").read_text()
    headline = text.split("## Answer", 1)[1].strip().split("\n", 1)[0]
    assert headline.startswith("**Use ") and "fine-tun" in headline.lower()  # the answer to the question, first
    assert "## Fine-tuned inside the CV" in text and "McNemar p (out-of-fold)" in text


def test_no_fold_encoder_sees_its_held_out_rows_or_their_reposts(cv_run: Path):
    """Groups, not only ids: reposts of a held-out ad have other ids. Checked on what each fold's triplets hold (the
    candidates, kept or not, of train and the inner validation slice), on the ads its encoder was trained on, and on
    the inner slice that picks its checkpoint."""
    from jobembed.stages.finetune_cv import inner_slice

    dev = _dev(cv_run)
    group_of = dict(zip(dev["id"].astype(str), dev["group"], strict=True))
    cfg = load_config(cv_run / "config.yaml")
    folds = cv_folds(dev, n_folds=2, seed=cfg.prepare.seed)
    for k, (train_idx, held_out) in enumerate(folds, 1):
        unit = cv_run / "finetune-cv" / "units" / f"fold-{k}"
        held_groups = set(dev["group"].iloc[held_out])
        seen = set()
        for split in ("train", "val"):
            frame = pd.read_parquet(unit / "triplets" / "candidates" / f"{split}.parquet")
            for role in ("anchor", "positive", "negative"):
                seen |= set(frame[f"{role}_id"].astype(str))
        seen |= set(map(str, read_json(unit / "finetune" / "ads_seen.json")))
        assert seen and not {group_of[i] for i in seen} & held_groups, f"fold {k} saw held-out groups"
        rest, inner = inner_slice(cfg, dev, train_idx)
        assert set(rest) | set(inner) == set(train_idx) and not set(rest) & set(inner)
        assert not set(dev["group"].iloc[inner]) & set(dev["group"].iloc[rest])  # reposts on one side
        assert not set(dev["group"].iloc[inner]) & held_groups
        assert read_json(unit / "fold.json")["rows"]["inner_slice"] == len(inner)


def test_fold_models_and_checkpoints_are_dropped_once_encoded(cv_run: Path):
    for k in (1, 2):
        unit = cv_run / "finetune-cv" / "units" / f"fold-{k}"
        assert (unit / "dev.npy").is_file() and not (unit / "finetune" / "model").exists()
        assert np.load(unit / "dev.npy").shape[0] == len(_dev(cv_run))
    assert not any((cv_run / "finetune-cv" / "checkpoints").glob("*"))


def _tuned_winner(cv_run: Path, run: Path, monkeypatch) -> None:
    """A copy of ``cv_run`` at ``run`` whose report ranks a fine-tuned system first.

    The tiny encoder barely moves in one epoch, so which side wins is a coin toss here: the report's own ranking is
    kept, and a fine-tuned first place is forced by scoring its CV a little higher."""
    from jobembed import evaluate
    from jobembed.stages import report as report_stage

    shutil.copytree(cv_run, run)
    real = evaluate.evaluate_systems

    def tuned_first(**kwargs):
        ev = real(**kwargs)
        m = ev.metrics
        for r in m["systems"].values():
            if r.get("finetuned_cv") and r["system"] == "centroid":
                r["cv"]["summary"]["macro_f1"]["mean"] = 2.0
        m["ranking"] = sorted(m["ranking"], key=lambda k: -m["systems"][k]["cv"]["summary"]["macro_f1"]["mean"])
        m["winner"] = m["ranking"][0]
        m["bundled"] = m["winner"]
        return ev

    monkeypatch.setattr(report_stage, "evaluate_systems", tuned_first)
    assert invoke("report", run, "--force", "-q").exit_code == 0


def test_a_fine_tuned_winner_is_bundled_with_its_encoder_and_classifies(cv_run: Path, tmp_path, monkeypatch):
    """When a fine-tuned system wins the ranking, bundle serves it by evidence: the finetune stage's model copied in."""
    run = tmp_path / "runs" / "won"
    _tuned_winner(cv_run, run, monkeypatch)
    winner = read_json(run / "report" / "winner" / "winner.json")
    assert winner["encoder"] == str(run / "finetune" / "model")
    result = invoke("bundle", run, "-q")
    assert result.exit_code == 0, result.output
    meta = json.loads((run / "bundle" / "bundle.json").read_text())
    assert meta["encoder"]["ref"] == "./encoder" and (run / "bundle" / "encoder").is_dir()
    shutil.rmtree(run / "finetune")  # the bundle stands alone
    result = invoke("classify", "kierowca ciężarówki, prawo jazdy C+E", "--bundle", run / "bundle", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["label"]


def test_a_moved_run_folder_bundles_its_own_fine_tuned_winner(cv_run: Path, tmp_path, monkeypatch):
    """The report records the encoder by the path the run was addressed through; moved, the run still bundles its own
    fine-tuned model (known by its fingerprint), with the report and every fine-tune kept."""
    _tuned_winner(cv_run, tmp_path / "old" / "won", monkeypatch)
    run = tmp_path / "moved" / "won"
    shutil.move(tmp_path / "old", tmp_path / "moved")
    assert read_json(run / "report" / "winner" / "winner.json")["encoder"] == str(tmp_path / "old/won/finetune/model")
    report = (run / "report" / "stage.json").stat().st_mtime_ns
    result = invoke("bundle", run, "-q")
    assert result.exit_code == 0, result.output
    assert (run / "report" / "stage.json").stat().st_mtime_ns == report  # nothing re-computed
    meta = json.loads((run / "bundle" / "bundle.json").read_text())
    assert meta["encoder"]["ref"] == "./encoder" and (run / "bundle" / "encoder").is_dir()
    result = invoke("classify", "kierowca ciężarówki, prawo jazdy C+E", "--bundle", run / "bundle", "--json")
    assert result.exit_code == 0, result.output


def test_a_bundle_that_points_at_a_copied_runs_original_is_not_up_to_date(cv_run: Path, tmp_path, monkeypatch):
    """Reproduces: a copy of a run bundled before the fine-tuned winner was recognised by fingerprint pointed at the
    original's model, and once the original was gone bundle still said "up to date": nothing in its key held that
    decision."""
    from jobembed.stages import bundle as bundle_stage

    _tuned_winner(cv_run, tmp_path / "first" / "won", monkeypatch)
    run = tmp_path / "copy" / "won"
    shutil.copytree(tmp_path / "first", tmp_path / "copy")
    with monkeypatch.context() as old_code:  # the code before the fix: the recorded path alone, nothing in the key
        old_code.setattr(bundle_stage, "_own_finetuned", lambda config, winner: False)
        old_code.setitem(STAGES, "bundle", dataclasses.replace(STAGES["bundle"], identity=_nothing))
        assert invoke("bundle", run, "-q").exit_code == 0
    original = str(tmp_path / "first/won/finetune/model")
    assert json.loads((run / "bundle" / "bundle.json").read_text())["encoder"]["ref"] == original
    shutil.rmtree(tmp_path / "first")
    result = invoke("bundle", run)
    assert result.exit_code == 0 and "bundle: up to date" not in result.output, result.output
    assert json.loads((run / "bundle" / "bundle.json").read_text())["encoder"]["ref"] == "./encoder"
    assert "bundle: up to date" in invoke("bundle", run).output  # and current from then on


def test_the_recipe_in_the_cv_needs_the_finetune_stage():
    with pytest.raises(ConfigError, match=r"finetune\.enabled"):
        load_config(None, {"report.finetune_cv": True})
    assert load_config(None, {"report.finetune_cv": True, "finetune.enabled": True}).report.finetune_cv


def test_a_report_killed_in_fold_2_resumes_with_fold_1_kept(cv_run: Path, tmp_path):
    run = tmp_path / "runs" / "killed"
    shutil.copytree(cv_run, run)
    shutil.rmtree(run / "finetune-cv")
    env = dict(os.environ, **{PAUSE_ENV: "finetune-cv:fold-2-mined"})
    cmd = [sys.executable, "-c", "from jobembed.cli import app; app()", "report", str(run), "-q"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        line = proc.stderr.readline()
        if "jobembed-test-paused: finetune-cv:fold-2-mined" in line:
            break
        if not line and proc.poll() is not None:
            pytest.fail(proc.stderr.read()[-2000:])
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    units = run / "finetune-cv" / "units"
    assert (units / "fold-1" / "stage.json").is_file() and not (units / "fold-2" / "stage.json").exists()
    stamp = (units / "fold-1" / "stage.json").stat().st_mtime_ns
    assert "1 to fine-tune and encode (1 kept)" in invoke("report", run, "--dry-run").output
    done = subprocess.run(cmd[:-1], env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "fold 1 of 2 up to date" in done.stderr and "fold 2 of 2: mining" in done.stderr
    assert (units / "fold-1" / "stage.json").stat().st_mtime_ns == stamp  # fold 1 was not fine-tuned again
    assert (units / "fold-2" / "stage.json").is_file() and (run / "report" / "metrics.json").is_file()


def test_dry_run_counts_the_folds_and_llm_calls_that_then_run(cv_run: Path, tmp_path, monkeypatch):
    """The dry run's fine-tunes and LLM calls (net of the call cache) are what the report then runs and sends, and
    an LLM judge pays for a call once across folds."""
    import re

    from tests.fake_llm import FakeLLM

    monkeypatch.setenv("JOBEMBED_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-key")
    run = tmp_path / "runs" / "llm"
    shutil.copytree(cv_run, run)
    server = FakeLLM().start()
    try:
        llm = {"base_url": server.url, "model": "judge-x", "backoff_base": 0.01}
        (tmp_path / "llm.yaml").write_text(yaml.safe_dump({"triplets": {"judge": "llm", "llm": llm}}))
        assert invoke("triplets", run, "-c", tmp_path / "llm.yaml", "-q").exit_code == 0  # the run's own triplets
        before = len(server.requests)
        dry = invoke("report", run, "--dry-run")
        assert dry.exit_code == 0, dry.output
        assert "2 to fine-tune and encode" in dry.output and "Nothing was run" in dry.output
        calls, cached, to_send = map(int, re.search(r"(\d+) calls, (\d+) cached, (\d+) to send", dry.output).groups())
        assert calls == cached + to_send and to_send > 0
        result = invoke("report", run, "-q")
        assert result.exit_code == 0, result.output
        sent = [key for key, _ in server.requests[before:]]
        assert len(sent) == to_send and len(set(sent)) == len(sent)  # each call once, across folds
        again = invoke("report", run, "--dry-run")
        assert "0 to fine-tune and encode (2 kept)" in again.output and "0 to send" in again.output
    finally:
        server.stop()


def test_max_new_folds_stops_with_one_line_and_the_next_command_goes_on(cv_run: Path, tmp_path):
    run = tmp_path / "runs" / "sittings"
    shutil.copytree(cv_run, run)
    shutil.rmtree(run / "finetune-cv")
    first = invoke("report", run, "--max-new-folds", "1", "-q")
    assert first.exit_code == 1 and "1 of 2 folds are done" in first.output, first.output
    errors = [line for line in first.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1  # one line, whatever the trainer logged before it
    assert "Traceback" not in first.output
    units = run / "finetune-cv" / "units"
    assert (units / "fold-1" / "stage.json").is_file() and not (units / "fold-2").exists()
    second = invoke("report", run, "--max-new-folds", "1")
    assert second.exit_code == 0, second.output
    assert (run / "report" / "metrics.json").is_file()


def test_seeds_beside_the_cv_score_the_bundled_model_and_the_other_seeds_on_test(cv_run: Path, tmp_path):
    """finetune.seeds with the recipe in the CV: seed 13's row is the CV rows' test figure (the finetune stage's
    model), seed 14 is a fine-tune of its own, and no fold is fine-tuned again."""
    run = tmp_path / "runs" / "seeds"
    shutil.copytree(cv_run, run)
    folds = (run / "finetune-cv" / "stage.json").stat().st_mtime_ns
    assert invoke("finetune", run, "--seeds", "13,14", "-q").exit_code == 0
    result = invoke("report", run, "-q")
    assert result.exit_code == 0, result.output
    assert (run / "finetune-cv" / "stage.json").stat().st_mtime_ns == folds
    m = read_json(run / "report" / "metrics.json")
    fs = m["finetune_seeds"]
    assert fs["seeds"] == [13, 14] and set(fs["systems"]) == {"centroid", "mlp"}
    for name, r in fs["systems"].items():
        tuned = next(e for e in m["systems"].values() if e.get("finetuned_cv") and e["system"] == name)
        assert r["macro_f1"]["values"][0] == tuned["test"]["macro_f1"]
        assert r["mcnemar_frozen"][0] == tuned["versus"][tuned["frozen_key"]]["mcnemar_test"]
    assert "## Fine-tuned encoder over 2 seeds" in (run / "report" / "report.md").read_text()
