"""Every command through Typer's CliRunner, on a tiny encoder and a synthetic labelled dataset."""

import json
import shutil

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from jobembed.cli import app
from tests.synthetic import make_ads, make_labels

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


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
    pd.DataFrame({"code": ["11", "12"], "name": ["Chief executives", "Managers"]}).to_csv(
        root / "other_labels.csv", index=False
    )
    return root


@pytest.fixture(scope="module")
def finished_run(workspace):
    """`jobembed run` once for the module; returns the run folder."""
    result = invoke("run", workspace / "tiny.yaml", "--quiet")
    assert result.exit_code == 0, result.output
    return workspace / "runs" / "tiny"


def test_help_lists_every_command():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("prepare", "embed", "train-head", "compare-report", "classify", "run"):
        assert command in result.output


def test_run_writes_every_artifact(finished_run):
    for rel in (
        "config.yaml",
        "manifest.json",
        "prepare/train.parquet",
        "prepare/data_card.json",
        "head/bundle.json",
        "report/report.md",
        "report/metrics.json",
        "report/figures/cv_macro_f1.png",
        "bundle/bundle.json",
        "bundle/head/head.safetensors",
    ):
        assert (finished_run / rel).is_file(), rel
    metrics = json.loads((finished_run / "report" / "metrics.json").read_text())
    systems = {r["system"] for r in metrics["systems"].values()}
    assert systems == {"zeroshot", "centroid", "tfidf", "logreg", "mlp"}
    assert metrics["winner"] == metrics["ranking"][0]
    assert len(next(iter(metrics["systems"].values()))["cv"]["folds"]) == 3
    report = (finished_run / "report" / "report.md").read_text()
    assert "## Answer" in report and "McNemar" in report
    manifest = json.loads((finished_run / "manifest.json").read_text())
    assert {"prepare", "embed", "train-head", "compare-report"} <= set(manifest["stages"])


def test_rerun_skips_up_to_date_stages_and_reruns_downstream_of_a_change(finished_run, workspace):
    result = invoke("run", workspace / "tiny.yaml", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.output.count("up to date, skipped") == 4
    cfg = yaml.safe_load((workspace / "tiny.yaml").read_text())
    cfg["report"]["systems"] = ["centroid", "mlp"]
    (workspace / "changed.yaml").write_text(yaml.safe_dump(cfg))
    result = invoke("run", workspace / "changed.yaml", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.output.count("up to date, skipped") == 3  # only compare-report re-runs


def test_stage_commands_one_by_one(workspace, tiny_encoder_dir):
    run_dir = workspace / "runs" / "manual"
    result = invoke(
        "prepare",
        workspace / "ads.csv",
        "--out",
        run_dir,
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
    card = json.loads((run_dir / "prepare" / "data_card.json").read_text())
    assert card  # the data card exists and is JSON
    result = invoke("embed", run_dir, "--model", tiny_encoder_dir, "--max-seq-length", 64, "--quiet")
    assert result.exit_code == 0, result.output
    assert list((run_dir / "embed").glob("*/train.npy"))
    result = invoke("train-head", run_dir, "--hidden-sizes", "16", "--max-epochs", 20, "--quiet")
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output
    result = invoke("compare-report", run_dir, "--systems", "zeroshot,centroid,mlp", "--cv-folds", 2, "--quiet")
    assert result.exit_code == 0, result.output
    metrics = json.loads((run_dir / "report" / "metrics.json").read_text())
    assert {r["system"] for r in metrics["systems"].values()} == {"zeroshot", "centroid", "mlp"}
    # the run's config.yaml carries the model forward: embed/train-head/compare-report agree on it
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
    assert json.loads(result.output.strip().splitlines()[-1])["label"] == "uncertain"


def test_classify_file_to_csv_with_default_bundle(finished_run, workspace):
    pd.DataFrame({"text": ["Programista Python", "Pielęgniarka na oddział"]}).to_csv(workspace / "new.csv", index=False)
    out = workspace / "pred.csv"
    result = invoke("classify", "--file", workspace / "new.csv", "--out", out, "--runs-dir", workspace / "runs")
    assert result.exit_code == 0, result.output
    pred = pd.read_csv(out)
    assert list(pred.columns[:1]) == ["text"] and {"label", "confidence", "top_k"} <= set(pred.columns)
    assert len(pred) == 2


def one_red_line(result):
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    return (
        result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["prepare", "{ws}/missing.csv", "--out", "{ws}/runs/x"], "not found"),
        (["prepare", "{ws}/ads.csv", "--out", "{ws}/runs/x", "--text-col", "body"], "body"),
        (["prepare", "{ws}/empty.csv", "--out", "{ws}/runs/x"], "no rows"),
        (["prepare", "{ws}/cp1250.csv", "--out", "{ws}/runs/x"], "line 3"),
        (["prepare", "{ws}/ads.csv", "--out", "{ws}/runs/x", "--labels", "{ws}/other_labels.csv"], "label set"),
        (["embed", "{ws}/runs/never"], "no prepared splits"),
        (["embed", "{ws}/runs/tiny", "--model", "builtin:nope"], "builtin"),
        (["classify", "text", "--bundle", "{ws}"], "not a jobembed bundle"),
        (["classify", "text", "--runs-dir", "{ws}/empty"], "no bundle found"),
        (["run", "{ws}/nope.yaml"], "not found"),
    ],
)
def test_bad_input_gives_one_clear_line(finished_run, workspace, args, needle):
    result = invoke(*[a.format(ws=workspace) for a in args])
    assert one_red_line(result), result.output
    assert needle in result.output


def test_bundle_from_another_format_version_is_refused(finished_run, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(finished_run / "bundle", copy)
    meta = json.loads((copy / "bundle.json").read_text())
    meta["format"] = "jobembed-bundle/99"
    (copy / "bundle.json").write_text(json.dumps(meta))
    result = invoke("classify", "Kierowca", "--bundle", copy)
    assert one_red_line(result), result.output
    assert "jobembed-bundle/1" in result.output and "jobembed-bundle/99" in result.output


def test_config_typo_is_reported_with_field(workspace):
    cfg = yaml.safe_load((workspace / "tiny.yaml").read_text())
    cfg["head"]["hiden_sizes"] = [8]
    (workspace / "typo.yaml").write_text(yaml.safe_dump(cfg))
    result = invoke("run", workspace / "typo.yaml")
    assert one_red_line(result), result.output
    assert "head.hiden_sizes" in result.output
