"""Every command through Typer's CliRunner, on a tiny encoder and a synthetic labelled dataset."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from jobembed.cli import app
from tests.synthetic import make_ads, make_labels

runner = CliRunner()
STAGES = ("prepare", "embed", "head", "triplets", "finetune", "report", "bundle")


def invoke(*args):
    # A wide terminal, so that --help tables do not break a choice like "sqrt" over two lines.
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "250"})


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_encoder_dir):
    """A data file, a label file and a pipeline config that uses the tiny encoder; quick settings."""
    root = tmp_path_factory.mktemp("cli")
    make_ads(20, seed=3, rare={"61": 2}).to_csv(root / "ads.csv", index=False)
    make_labels().to_csv(root / "labels.csv", index=False)
    cfg = {
        "name": "tiny",
        "runs_dir": str(root / "runs"),
        "prepare": {
            "input": str(root / "ads.csv"),
            "text_col": "text",
            "label_col": "label",
            "id_col": "id",
            "min_class_count": 3,
            "rare_policy": "merge",
            "test_size": 0.25,
            "val_size": 0.15,
        },
        "embed": {"model": str(tiny_encoder_dir), "max_seq_length": 64, "batch_size": 16},
        "head": {"hidden_sizes": [32], "max_epochs": 30, "patience": 5},
        "report": {"cv_folds": 3, "bootstrap": 50, "tfidf": {"max_features": 2000}},
    }
    (root / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    (root / "empty.csv").write_text("")
    (root / "cp1250.csv").write_bytes("id,text,label\n1,Kierowca,83\n2,Ksi\u0119gowa,43\n".encode("cp1250"))
    (root / "dup.csv").write_text("id,text,label,text\n1,a,83,b\n")
    (root / "bad.yaml").write_text("name: [unclosed\n")
    (root / "cv-alone.yaml").write_text("name: cv\nreport:\n  finetune_cv: true\n")
    (root / "unset.yaml").write_text("name: x\nprepare:\n  input: ${JOBEMBED_TEST_UNSET_VAR}/ads.csv\n")
    (root / "afile").write_text("not a folder")
    pd.DataFrame({"text": np.arange(40), "label": ["a", "b"] * 20}).to_parquet(root / "numbers.parquet")
    pd.DataFrame({"code": ["11", "12"], "name": ["Chief executives", "Managers"]}).to_csv(
        root / "other_labels.csv", index=False
    )
    pd.DataFrame({"text": ["Programista Python", "Pielęgniarka na oddział"]}).to_csv(root / "new.csv", index=False)
    return root


@pytest.fixture(scope="module")
def finished_run(workspace):
    """`jobembed run` once for the module; returns the run folder."""
    result = invoke("run", "--config", workspace / "tiny.yaml", "--quiet")
    assert result.exit_code == 0, result.output
    return workspace / "runs" / "tiny"


def test_help_lists_every_command():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in (*STAGES, "classify", "run"):
        assert command in result.output


@pytest.mark.parametrize(
    ("command", "values"),
    [
        ("prepare", ["error", "drop", "merge"]),
        ("head", ["none", "balanced", "sqrt", "cuda:N"]),
        ("embed", ["auto", "fp16", "bf16", "cuda:N"]),
    ],
)
def test_help_lists_choices(command, values):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    for value in values:
        assert value in result.output


def test_run_writes_every_artifact(finished_run):
    for rel in (
        "config.yaml",
        "manifest.json",
        "prepare/train.parquet",
        "prepare/data_card.json",
        "clean/train.parquet",
        "clean/report.json",
        "embed/stage.json",
        "head/bundle.json",
        "report/report.md",
        "report/metrics.json",
        "report/figures/cv_macro_f1.png",
        "report/figures/coverage_accuracy.png",
        "report/figures/reliability.png",
        "report/winner/winner.json",
        "bundle/bundle.json",
    ):
        assert (finished_run / rel).is_file(), rel
    kind = json.loads((finished_run / "bundle" / "bundle.json").read_text())["head"]["kind"]
    weights = {"mlp": "head.safetensors", "cosine": "head.safetensors", "hybrid": "mlp/head.safetensors"}[kind]
    assert (finished_run / "bundle" / "head" / weights).is_file()
    (embed_dir,) = [p for p in (finished_run / "embed").iterdir() if p.is_dir()]
    assert {p.name for p in embed_dir.iterdir()} >= {"train.npy", "val.npy", "test.npy", "labels.npy"}
    metrics = json.loads((finished_run / "report" / "metrics.json").read_text())
    systems = {r["system"] for r in metrics["systems"].values()}
    assert systems == {"zeroshot", "centroid", "tfidf", "logreg", "mlp", "fusion"}
    assert metrics["winner"] == metrics["ranking"][0]
    assert len(next(iter(metrics["systems"].values()))["cv"]["folds"]) == 3
    report = (finished_run / "report" / "report.md").read_text()
    assert "## Answer" in report and "McNemar" in report
    assert "## Knowing when to abstain" in report and "## Parent level" in report
    assert "'other' has no parent" in metrics["hierarchy"]["note"]  # the merged rare class
    winner = json.loads((finished_run / "report" / "winner" / "winner.json").read_text())
    assert winner["selective"]["oof_curve"]["coverage"][-1] == 1.0
    bundle = json.loads((finished_run / "bundle" / "bundle.json").read_text())
    assert bundle["metrics"]["selective"]["oof_scores"] == winner["selective"]["oof_scores"]
    dev = metrics["data"]["train"] + metrics["data"]["val"]
    assert len(winner["selective"]["oof_scores"]["confidence"]) == dev  # every dev ad, answered out of fold


def test_classify_uses_the_threshold_the_report_printed(finished_run):
    """Reproduces: the report printed the exact validation threshold while classify and serve read one off 100
    sampled curve points: two thresholds for one target."""
    from jobembed import metrics as metrics_module
    from jobembed.bundle import load_bundle
    from jobembed.errors import JobembedError

    metrics = json.loads((finished_run / "report" / "metrics.json").read_text())
    sel = metrics["systems"][metrics["bundled"]]["selective"]
    bundle = load_bundle(finished_run / "bundle", device="cpu")
    if sel["threshold"] is None:
        with pytest.raises(JobembedError, match="no confidence threshold reached it"):
            bundle.threshold_for(sel["target_accuracy"])
    else:
        assert bundle.threshold_for(sel["target_accuracy"]) == sel["threshold"]
    scores = bundle.meta.metrics["selective"]["oof_scores"]
    thresholds, accuracy = metrics_module.accuracy_by_threshold(scores["confidence"], scores["correct"])
    i = len(thresholds) // 2
    assert bundle.threshold_for(float(accuracy[i])) <= thresholds[i]


def test_rerun_skips_up_to_date_stages_and_reruns_downstream_of_a_change(finished_run, workspace):
    result = invoke("run", "--config", workspace / "tiny.yaml", "--quiet")
    assert result.exit_code == 0, result.output
    # prepare, clean, embed, head, triplets, report, bundle; finetune is off in tiny.yaml
    assert result.output.count("up to date, skipped") == 7
    assert "finetune: off" in result.output and "embed-finetuned: off" in result.output
    cfg = yaml.safe_load((workspace / "tiny.yaml").read_text())
    cfg["report"]["systems"] = ["centroid", "mlp"]
    cfg["name"] = "tiny-changed"
    shutil.copytree(finished_run, workspace / "runs" / "tiny-changed")
    (workspace / "changed.yaml").write_text(yaml.safe_dump(cfg))
    result = invoke("run", "--config", workspace / "changed.yaml", "--quiet")
    assert result.exit_code == 0, result.output
    assert "report: running" in result.output and "bundle: running" in result.output
    assert result.output.count("up to date, skipped") == 5
    # the report folder is rebuilt whole: no per-class table of a system that is no longer compared
    tables = {p.name.split("@")[0] for p in (workspace / "runs" / "tiny-changed" / "report" / "per_class").iterdir()}
    assert tables == {"centroid", "mlp"}


def test_changed_triplets_leave_the_report_current_when_finetune_is_off(finished_run, workspace):
    """Reproduces: with finetune disabled, report still hung off triplets, so a triplets setting (or a
    new triplets version) re-ran the whole CV, and `report` ran triplets first."""
    cfg = yaml.safe_load((workspace / "tiny.yaml").read_text())
    cfg["name"] = "tiny-triplets"
    cfg.setdefault("triplets", {})["negatives_per_anchor"] = 2
    shutil.copytree(finished_run, workspace / "runs" / "tiny-triplets")
    (workspace / "triplets.yaml").write_text(yaml.safe_dump(cfg))
    result = invoke("report", workspace / "runs" / "tiny-triplets", "--config", workspace / "triplets.yaml")
    assert result.exit_code == 0, result.output
    assert "triplets:" not in result.output and "report: up to date" in result.output
    result = invoke("run", "--config", workspace / "triplets.yaml", "--quiet")
    assert result.exit_code == 0, result.output
    assert "triplets: running" in result.output
    for stage in ("report", "bundle"):
        assert f"{stage}: up to date" in result.output
    for stage in ("finetune", "embed-finetuned"):  # disabled: not run, and their folders are not read
        assert f"{stage}: off" in result.output


def test_a_new_stage_version_reruns_that_stage_and_what_reads_its_changed_files(finished_run, workspace, monkeypatch):
    """Reproduces: a code fix that changed what triplets keeps left older runs' triplets 'current' (the key
    held only config, inputs and identity); the stale stamp had to be deleted by hand. A re-run that reproduces its
    files does not cascade (issue 19: keys hold what the inputs produced)."""
    import dataclasses

    from jobembed import stages

    run = workspace / "runs" / "tiny-version"
    shutil.copytree(finished_run, run)
    cfg = yaml.safe_load((workspace / "tiny.yaml").read_text()) | {"name": "tiny-version"}
    (workspace / "version.yaml").write_text(yaml.safe_dump(cfg))
    bumped = stages.STAGES["embed"].version + 1
    monkeypatch.setitem(stages.STAGES, "embed", dataclasses.replace(stages.STAGES["embed"], version=bumped))
    result = invoke("run", "--config", workspace / "version.yaml", "--quiet")
    assert result.exit_code == 0, result.output
    assert "embed: running" in result.output and "prepare: up to date" in result.output
    # The run's vectors partly came from the session's cache, filled by other tests in other batches (float bits
    # differ), so this first re-run may cascade. A second version bump re-encodes what the first one made:
    bumped += 1
    monkeypatch.setitem(stages.STAGES, "embed", dataclasses.replace(stages.STAGES["embed"], version=bumped))
    result = invoke("run", "--config", workspace / "version.yaml", "--quiet")
    assert result.exit_code == 0, result.output
    assert "embed: running" in result.output
    # the new code reproduced the same vectors: what reads them keys on their digest, so it stays current
    for stage in ("prepare", "clean", "head", "triplets", "report", "bundle"):
        assert f"{stage}: up to date" in result.output, result.output
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["embed"]["version"] == bumped
    assert json.loads((run / "embed" / "stage.json").read_text())["version"] == bumped
    result = invoke("run", "--config", workspace / "version.yaml", "--quiet")
    assert result.exit_code == 0 and "running" not in result.output, result.output


def test_encoder_rebuilt_in_place_reruns_every_stage_that_used_it(workspace, tiny_encoder_dir, tmp_path):
    """Reproduces: stage keys used the model name, so new weights in the same folder left stale results 'current'."""
    from tests.conftest import build_tiny_encoder

    model = tmp_path / "encoder"
    shutil.copytree(tiny_encoder_dir, model)
    cfg = yaml.safe_load((workspace / "tiny.yaml").read_text())
    cfg.update(name="inplace", runs_dir=str(tmp_path / "runs"))
    cfg["embed"]["model"] = str(model)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert invoke("run", "-c", tmp_path / "c.yaml", "-q").exit_code == 0
    shutil.rmtree(model)
    build_tiny_encoder(model, seed=7)  # same path, other weights
    result = invoke("run", "-c", tmp_path / "c.yaml", "-q")
    assert result.exit_code == 0, result.output
    assert "prepare: up to date" in result.output
    disabled = {"finetune", "embed-finetuned"}  # finetune is off in tiny.yaml
    for stage in STAGES[1:]:
        assert f"{stage}: {'off' if stage in disabled else 'running'}" in result.output


def test_two_encoders_with_the_same_folder_name_get_unique_keys(workspace, tiny_encoder_dir, tmp_path):
    """Reproduces: runs/a/encoder and runs/b/encoder both became mlp@encoder and one overwrote the other."""
    from tests.conftest import build_tiny_encoder

    a, b = tmp_path / "a" / "encoder", tmp_path / "b" / "encoder"
    shutil.copytree(tiny_encoder_dir, a)
    build_tiny_encoder(b, seed=5)
    cfg = yaml.safe_load((workspace / "tiny.yaml").read_text())
    cfg.update(name="two", runs_dir=str(tmp_path / "runs"))
    cfg["embed"].update(model=str(a), extra_models=[str(b)])
    cfg["report"]["systems"] = ["centroid"]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    result = invoke("run", "-c", tmp_path / "c.yaml", "-q")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "runs" / "two" / "report" / "metrics.json").read_text())
    assert len(metrics["systems"]) == 2
    assert len({r["display"] for r in metrics["systems"].values()}) == 2
    assert len(list((tmp_path / "runs" / "two" / "report" / "per_class").iterdir())) == 2


def test_stage_commands_one_by_one(workspace, tiny_encoder_dir, monkeypatch):
    run_dir = workspace / "runs" / "manual"
    result = invoke(
        "prepare",
        run_dir,
        "--input",
        workspace / "ads.csv",
        "--label-col",
        "label",
        "--id-col",
        "id",
        "--labels",
        workspace / "labels.csv",
        "--labels-code-col",
        "code",
        "--rare-policy",
        "drop",
        "--min-class-count",
        "3",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    assert json.loads((run_dir / "prepare" / "data_card.json").read_text())["rows_kept"] > 0
    result = invoke("embed", run_dir, "--model", tiny_encoder_dir, "--max-seq-length", 64, "--quiet")
    assert result.exit_code == 0, result.output
    assert list((run_dir / "embed").glob("*/train.npy"))
    # head and report read the embed stage's vectors: they never load the encoder
    import jobembed.encoders

    monkeypatch.setattr(jobembed.encoders, "load_encoder", lambda *a, **k: pytest.fail("encoder loaded"))
    result = invoke("head", run_dir, "--hidden-sizes", "16", "--max-epochs", 20, "--quiet")
    assert result.exit_code == 0, result.output
    assert "validation accuracy" in result.output and "test accuracy" not in result.output
    result = invoke("report", run_dir, "--systems", "zeroshot,centroid,mlp", "--cv-folds", 2, "--quiet")
    assert result.exit_code == 0, result.output
    metrics = json.loads((run_dir / "report" / "metrics.json").read_text())
    assert {r["system"] for r in metrics["systems"].values()} == {"zeroshot", "centroid", "mlp"}
    result = invoke("bundle", run_dir, "--quiet")
    assert result.exit_code == 0, result.output
    assert (run_dir / "bundle" / "bundle.json").is_file()
    result = invoke("report", run_dir, "--quiet")
    assert "report: up to date" in result.output
    # the run's config.yaml carries the model forward: embed/head/report agree on it
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["embed"]["model"] == str(tiny_encoder_dir)


def test_classify_text_json_topk(finished_run):
    result = invoke(
        "classify",
        "Kierowca kat. C, transport międzynarodowy",
        "--bundle",
        finished_run / "bundle",
        "--json",
        "--top-k",
        2,
    )
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output.strip().splitlines()[-1])
    assert len(answer["top_k"]) == 2
    assert answer["top_k"][0]["probability"] >= answer["top_k"][1]["probability"]
    assert answer["label"] == answer["top_k"][0]["label"]


def test_classify_min_confidence_answers_uncertain(finished_run):
    result = invoke(
        "classify", "zupełnie inny tekst", "--bundle", finished_run / "bundle", "--json", "--min-confidence", 1.0
    )
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output.strip().splitlines()[-1])
    assert answer["label"] == "uncertain" and answer["uncertain"] is True


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_classify_file_with_default_bundle(finished_run, workspace, suffix):
    """Reproduces: --out x.parquet crashed after computing every prediction (an array in DataFrame.attrs)."""
    out = workspace / f"pred{suffix}"
    result = invoke("classify", "--input", workspace / "new.csv", "--out", out, "--runs-dir", workspace / "runs", "-q")
    assert result.exit_code == 0, result.output
    pred = {".csv": pd.read_csv, ".jsonl": lambda p: pd.read_json(p, lines=True), ".parquet": pd.read_parquet}[suffix](
        out
    )
    assert list(pred.columns[:1]) == ["text"] and {"label", "confidence", "top_k", "uncertain"} <= set(pred.columns)
    assert len(pred) == 2


def test_classify_threshold_comes_from_the_run_config(finished_run, workspace, tmp_path):
    cfg = yaml.safe_load((workspace / "tiny.yaml").read_text())
    cfg.update(name="strict", classify={"min_confidence": 1.0})
    runs = workspace / "runs"
    shutil.copytree(finished_run, runs / "strict")
    (tmp_path / "strict.yaml").write_text(yaml.safe_dump(cfg))
    result = invoke("run", "-c", tmp_path / "strict.yaml", "-q")
    assert result.exit_code == 0, result.output
    assert "bundle: running" in result.output and "report: up to date" in result.output
    answer = invoke("classify", "Kierowca", "--bundle", runs / "strict" / "bundle", "--json")
    assert json.loads(answer.output.strip().splitlines()[-1])["uncertain"] is True
    answer = invoke("classify", "Kierowca", "--bundle", runs / "strict" / "bundle", "--json", "--min-confidence", 0)
    assert json.loads(answer.output.strip().splitlines()[-1])["uncertain"] is False


def test_corrupt_manifest_loses_no_work(finished_run, workspace):
    """Reproduces: a corrupt run manifest.json crashed head after it had trained."""
    run = workspace / "runs" / "manifest-test"
    shutil.copytree(finished_run, run)
    (run / "manifest.json").write_text("{ truncated")
    result = invoke("head", run, "--force", "-q")
    assert result.exit_code == 0, result.output
    assert "head" in json.loads((run / "manifest.json").read_text())["stages"]
    assert list(run.glob("manifest.json.corrupt-*"))


def test_quiet_prints_no_progress(workspace, tiny_encoder_dir, tmp_path):
    cfg = yaml.safe_load((workspace / "tiny.yaml").read_text())
    cfg.update(name="quiet", runs_dir=str(tmp_path / "runs"))
    (tmp_path / "q.yaml").write_text(yaml.safe_dump(cfg))
    result = invoke("run", "-c", tmp_path / "q.yaml", "-q")
    assert result.exit_code == 0, result.output
    assert "it/s" not in result.output and "Loading weights" not in result.output  # transformers' bars
    assert not [line for line in result.output.splitlines() if "━" in line and "/" in line]  # rich bars (n/total)


def one_red_line(result):
    """Exit 1 and one error line (after the stage status lines, if a stage had started): no traceback."""
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    lines = [line for line in lines if not re.match(r"^[a-z-]+: (running|up to date)", line)]
    return (
        result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output
    )


BOTH_THRESHOLDS = ["--min-confidence", "0.5", "--target-accuracy", "0.9"]  # which would win? refused
BAD_INPUTS = [
    # files and tables
    (["prepare", "{ws}/runs/x", "--input", "{ws}/missing.csv"], "--input"),
    (["prepare", "{ws}/runs/x", "--input", "{ws}/ads.csv", "--text-col", "body"], "body"),
    (["prepare", "{ws}/runs/x", "--input", "{ws}/empty.csv"], "no rows"),
    (["prepare", "{ws}/runs/x", "--input", "{ws}/cp1250.csv"], "line 3"),
    (["prepare", "{ws}/runs/x", "--input", "{ws}/dup.csv"], "appears twice"),
    (["prepare", "{ws}/runs/x", "--input", "{ws}/numbers.parquet"], "not text"),
    (["prepare", "{ws}/runs/x", "--input", "{ws}/ads.csv", "--labels", "{ws}/other_labels.csv"], "label set"),
    (["prepare", "{ws}/runs/x", "--input", "{ws}/ads.csv", "--labels", "{ws}/nope.csv"], "--labels"),
    (["prepare", "{ws}/runs/x"], "prepare.input"),
    # issue 23: messages that misled
    (["prepare", "{ws}/runs/x", "--input", "{ws}/runs"], "is a folder"),  # said "not found"
    (["prepare", "{ws}/runs/x", "--input", "{ws}/ads.csv", "--text-col", "label"], "the same column"),
    (["classify", "Kierowca", "--bundle", "{ws}/runs/tiny/bundle/bundle.json"], "pass the folder"),
    (["classify", "Kierowca", "--bundle", "{ws}/runs/tiny/bundle", "--min-confidence", "nan"], "not a number"),
    (["classify", "Kierowca", "--bundle", "{ws}/runs/tiny/bundle", *BOTH_THRESHOLDS], "give one"),
    # flags and values
    (["prepare", "{ws}/runs/x", "--input", "{ws}/ads.csv", "--test-size", "0.9", "--val-size", "0.9"], "--test-size"),
    (["prepare", "{ws}/runs/x", "--input", "{ws}/ads.csv", "--rare-policy", "keep"], "--rare-policy"),
    (["prepare", "{ws}/runs/x", "--input", "{ws}/ads.csv", "--labels-filter", "level"], "--labels-filter"),
    (["head", "{ws}/runs/tiny", "--class-weight", "heavy"], "--class-weight"),
    (["head", "{ws}/runs/tiny", "--hidden-sizes", "a,b"], "--hidden-sizes"),
    (["embed", "{ws}/runs/tiny", "--device", "tpu"], "--device"),
    (["embed", "{ws}/runs/tiny", "--no-such-flag"], "--no-such-flag"),
    (["report", "{ws}/runs/tiny", "--systems", ""], "--systems"),
    (["report", "{ws}/runs/tiny", "--systems", "mlp,svm"], "--systems"),
    (["report", "{ws}/runs/tiny", "--cv-folds", "999"], "--cv-folds"),
    (["classify", "text", "--bundle", "{ws}/runs/tiny/bundle", "--top-k", "0"], "--top-k"),
    (["classify", "text", "--bundle", "{ws}/runs/tiny/bundle", "--top-k", "-1"], "--top-k"),
    (["classify", "text", "--bundle", "{ws}/runs/tiny/bundle", "--min-confidence", "1.5"], "--min-confidence"),
    (["classify", "text", "--bundle", "{ws}/runs/tiny/bundle", "--out", "{ws}/p.csv"], "--out needs --input"),
    (["classify", "--input", "{ws}/new.csv", "--bundle", "{ws}/runs/tiny/bundle", "--out", "{ws}"], "is a folder"),
    (["classify", "--input", "{ws}/new.csv", "--bundle", "{ws}/runs/tiny/bundle", "--text-col", "x"], "'x'"),
    # models
    (["embed", "{ws}/runs/never"], "no prepared splits"),
    # stages whose inputs' patterns name an encoder's folder: were a Hub lookup of the default model, before prepare
    (["report", "{ws}/runs/never"], "no prepared splits"),
    (["bundle", "{ws}/runs/never"], "no prepared splits"),
    (["triplets", "{ws}/runs/never"], "no prepared splits"),
    (["head", "{ws}/runs/never"], "no prepared splits"),
    (["report", "{ws}/runs/no/such/run"], "no prepared splits"),  # left no/such/ behind
    (["embed", "{ws}/runs/tiny", "--model", "builtin:nope"], "builtin"),
    (["embed", "{ws}/runs/tiny", "--model", "sentence-transformers/no-such-model-xyz"], "HF_HUB_OFFLINE"),
    # bundles
    (["classify", "text", "--bundle", "{ws}"], "not a jobembed bundle"),
    (["classify", "text", "--runs-dir", "{ws}/empty"], "no bundle found"),
    (["classify", "text", "--runs-dir", "{ws}/afile"], "--runs-dir"),
    # run folders and configs
    (["prepare", "{ws}/afile", "--input", "{ws}/ads.csv"], "is a file"),
    (["prepare", "{ws}/afile/run", "--input", "{ws}/ads.csv"], "is a file"),
    (["prepare", "/proc/jobembed-run", "--input", "{ws}/ads.csv"], "cannot write"),  # unwritable, even for root
    (["classify", "--input", "{ws}/new.csv", "--bundle", "{ws}/runs/tiny/bundle", "--out", "/proc/p.csv"], "--out"),
    (["run", "--config", "{ws}/nope.yaml"], "not found"),
    (["run", "--config", "{ws}/bad.yaml"], "not valid YAML"),
    (["run", "--config", "{ws}/unset.yaml"], "JOBEMBED_TEST_UNSET_VAR"),
    (["run", "{ws}/tiny.yaml"], "--config"),
    # look-only commands on a folder that holds no run: were a Hub lookup of the default models
    (["status", "{ws}/runs/never"], "holds no run"),
    (["report", "{ws}/runs/never", "--finetune-cv", "--dry-run"], "holds no run"),
    (["run", "--config", "{ws}/cv-alone.yaml"], "report.finetune_cv needs finetune.enabled"),  # said "field ''"
]


@pytest.mark.parametrize(("args", "needle"), BAD_INPUTS, ids=[f"{a[0]}-{n}" for a, n in BAD_INPUTS])
def test_bad_input_gives_one_clear_line_and_loses_nothing(finished_run, workspace, args, needle):
    watched = [finished_run / p for p in ("report/metrics.json", "bundle/bundle.json", "head/bundle.json")]
    before = {p: p.stat().st_mtime_ns for p in watched}
    args = [a.format(ws=workspace) for a in args]
    new_run = None  # the topmost folder of the run's path that does not exist yet
    if args[0] in STAGES:
        for folder in [Path(args[1]), *Path(args[1]).parents]:
            if folder.exists():
                break
            new_run = folder
    result = invoke(*args)
    assert one_red_line(result), result.output
    assert needle in result.output, result.output
    assert {p: p.stat().st_mtime_ns for p in watched} == before  # nothing finished was touched
    assert new_run is None or not new_run.exists()  # and no empty run folder (or its new parents) is left behind


def test_runs_dir_that_is_a_file(workspace):
    cfg = yaml.safe_load((workspace / "tiny.yaml").read_text())
    cfg["runs_dir"] = str(workspace / "afile")
    (workspace / "filedir.yaml").write_text(yaml.safe_dump(cfg))
    result = invoke("run", "-c", workspace / "filedir.yaml")
    assert one_red_line(result) and "is a file" in result.output, result.output


def test_corrupt_bundle_json_via_classify(finished_run, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(finished_run / "bundle", copy)
    text = (copy / "bundle.json").read_text()
    (copy / "bundle.json").write_text(text[: len(text) // 2])
    result = invoke("classify", "Kierowca", "--bundle", copy)
    assert one_red_line(result) and "not valid JSON" in result.output, result.output


def test_bundle_from_another_format_version_is_refused(finished_run, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(finished_run / "bundle", copy)
    meta = json.loads((copy / "bundle.json").read_text())
    meta["format"] = "jobembed-bundle/99"
    (copy / "bundle.json").write_text(json.dumps(meta))
    result = invoke("classify", "Kierowca", "--bundle", copy)
    assert one_red_line(result), result.output
    assert "jobembed-bundle/3" in result.output and "jobembed-bundle/99" in result.output


def test_config_typo_is_reported_with_field(workspace):
    cfg = yaml.safe_load((workspace / "tiny.yaml").read_text())
    cfg["head"]["hiden_sizes"] = [8]
    (workspace / "typo.yaml").write_text(yaml.safe_dump(cfg))
    result = invoke("run", "--config", workspace / "typo.yaml")
    assert one_red_line(result), result.output
    assert "head.hiden_sizes" in result.output


def test_labels_filter_keeps_the_rows_it_names(workspace, tmp_path):
    labels = make_labels()
    both = pd.concat([labels.assign(level="sub"), labels.assign(level="major", code="9" + labels["code"])])
    both.to_csv(tmp_path / "levels.csv", index=False)
    result = invoke(
        "prepare", tmp_path / "run", "--input", workspace / "ads.csv", "--id-col", "id", "--min-class-count", "3",
        "--labels", tmp_path / "levels.csv", "--labels-filter", "level=sub", "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    kept = json.loads((tmp_path / "run" / "prepare" / "labels.json").read_text())
    assert {row["label"] for row in kept} <= set(labels["code"]) | {"other"}


def _commands():
    import typer.main

    root = typer.main.get_command(app)
    for name, cmd in root.commands.items():
        if hasattr(cmd, "commands"):
            for sub, subcmd in cmd.commands.items():
                yield [name, sub], subcmd
        else:
            yield [name], cmd


@pytest.mark.parametrize(
    ("path", "command"), list(_commands()), ids=lambda x: " ".join(x) if isinstance(x, list) else ""
)
def test_every_value_a_flag_accepts_is_in_the_help(path, command):
    """Issue 19, section 4: every enum value a command's flags accept (systems, judges, losses, positives, backends,
    ...) appears in its --help."""
    import enum
    import typing

    from jobembed.sections import SystemName

    def enum_of(param):
        annotation = param.type_descriptor.annotation
        for t in (annotation, *typing.get_args(annotation)):
            if isinstance(t, type) and issubclass(t, enum.Enum):
                return t
        return None

    result = invoke(*path, "--help")
    assert result.exit_code == 0, result.output
    text = re.sub(r"\s+", " ", result.output)
    choices = {p.name: [e.value for e in enum_of(p)] for p in command.params if enum_of(p)}
    if any(p.name == "report__systems" for p in command.params):
        choices["report__systems"] = [s.value for s in SystemName]
    for flag, values in choices.items():
        for value in values:
            assert str(value) in text, f"{' '.join(path)}: {flag} accepts {value!r}, which --help does not name"


@pytest.mark.parametrize(
    ("path", "command"), list(_commands()), ids=lambda x: " ".join(x) if isinstance(x, list) else ""
)
def test_every_bracket_of_an_option_help_is_shown(path, command):
    """Reproduces: rich read "[default: 5]" or "[torch]" in an option's help as a markup tag and printed nothing of it
    ("the hinge's margin ."). Every bracketed or parenthesised part of an option's help appears in --help."""
    result = invoke(*path, "--help")
    assert result.exit_code == 0, result.output
    shown = " ".join(result.output.replace("│", " ").split())
    for param in command.params:
        for part in re.findall(r"\[[^\[\]]*\]|\([^()]*\)", " ".join((getattr(param, "help", None) or "").split())):
            assert part in shown, f"{' '.join(path)} {param.opts}: {part!r} is missing from --help"


@pytest.mark.parametrize("group", [[], ["clean"]], ids=["jobembed", "clean"])
def test_every_command_is_listed_by_its_summary_on_one_line(group):
    """Reproduces: the command list showed each docstring's first paragraph with the source's line breaks, so a long
    one broke mid-sentence over several rows. Each command is listed by its first paragraph, whole, on one line of an
    120-column terminal."""
    import inspect

    import typer.main

    cmd = typer.main.get_command(app)
    for name in group:
        cmd = cmd.commands[name]
    result = runner.invoke(app, [*group, "--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    lines = [" ".join(line.replace("│", " ").split()) for line in result.output.splitlines()]
    for name, sub in cmd.commands.items():
        if sub.hidden:
            continue
        summary = " ".join(inspect.cleandoc(sub.help).split("\n\n")[0].split())
        assert f"{name} {summary}" in lines, f"{name}: {summary!r} is not one line of the command list"


def test_a_text_with_nothing_to_read_is_uncertain_with_a_reason(finished_run):
    """Reproduces (issue 23): classify "😀🚀🔥💼" got a confident label (the head's prior), uncertain false."""
    result = invoke("classify", "😀🚀🔥💼", "--bundle", finished_run / "bundle", "--json", "--min-confidence", "0")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert answer["uncertain"] is True and answer["label"] == "uncertain" and "no letters" in answer["reason"]
    normal = json.loads(invoke("classify", "Kierowca kat. C", "--bundle", finished_run / "bundle", "--json").output)
    assert normal["reason"] is None


def _flags_by_command() -> dict[str, set[str]]:
    """command path -> every option name it takes (hidden former command names left out)."""
    import typer.main

    from jobembed.cli import FORMER_COMMANDS

    group = typer.main.get_command(app)
    out = {}
    todo = [("", group)]
    while todo:
        prefix, cmd = todo.pop()
        for name, sub in getattr(cmd, "commands", {}).items():
            if name in FORMER_COMMANDS:
                continue
            path = f"{prefix} {name}".strip()
            todo.append((path, sub))
            out[path] = {o for p in sub.params for o in p.opts + p.secondary_opts}
    return out


@pytest.mark.parametrize(
    ("flag", "commands"),
    [
        ("--text-col", {"prepare", "classify"}),  # a column of the table the command reads
        ("--text-column", {"embed", "report"}),  # which of the run's texts later stages read
        ("--base-model", {"finetune", "clean train"}),  # the model a training command starts from
        ("--encoder", {"bundle"}),  # frozen | finetuned
        ("--workers", {"serve"}),  # server processes
        ("--dataloader-workers", {"finetune"}),
    ],
)
def test_a_flag_means_one_thing_in_every_command(flag, commands):
    found = {path for path, flags in _flags_by_command().items() if flag in flags}
    assert found == commands


def test_the_former_command_names_run_the_renamed_stages():
    from jobembed.cli import FORMER_COMMANDS

    assert FORMER_COMMANDS == {
        "train-head": "head",
        "make-triplets": "triplets",
        "compare-report": "report",
    }
    result = runner.invoke(app, ["--help"])
    assert "compare-report" not in result.output and "report" in result.output  # hidden, still callable
