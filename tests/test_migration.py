"""A run folder made by older jobembed keeps working: every stage it finished stays current, under the stage names
and commands it was made with and under today's.

The fixture ``tests/fixtures/run-0850fe2`` was made by the code of commit 0850fe2 (``tests/fixtures/make_old_run.py``
says how): prepare, clean (rules), embed (builtin all-MiniLM-L6-v2), train-head, make-triplets (model judge),
compare-report and bundle. Its input files are gone (their paths were in a temporary folder), as on a machine the
run was copied to: finished stages must not need them.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jobembed.artifacts import read_json
from jobembed.cli import app

FIXTURE = Path(__file__).parent / "fixtures" / "run-0850fe2"
runner = CliRunner()


@pytest.fixture
def old_run(tmp_path: Path) -> Path:
    target = tmp_path / "runs" / FIXTURE.name
    shutil.copytree(FIXTURE, target)
    return target


def _states(output: str) -> dict[str, str]:
    """stage -> "skip" | "run" | "off" from the progress lines of a stage command."""
    out = {}
    for m in re.finditer(r"^([a-z-]+): (up to date|off|running)", output, re.MULTILINE):
        out[m.group(1)] = {"up to date": "skip", "off": "off", "running": "run"}[m.group(2)]
    return out


@pytest.mark.parametrize(
    "command", ["train-head", "make-triplets", "compare-report", "head", "triplets", "report", "bundle"]
)
def test_every_finished_stage_of_an_old_run_is_current(old_run: Path, command: str):
    result = runner.invoke(app, [command, str(old_run), "-q"])
    assert result.exit_code == 0, result.output
    states = _states(result.output)
    assert states and set(states.values()) == {"skip"}, result.output
    assert not {"train-head", "make-triplets", "compare-report"} & set(states), "progress names the stages as now"


def test_a_changed_setting_re_runs_only_its_stage_on_an_old_run(old_run: Path):
    result = runner.invoke(app, ["compare-report", str(old_run), "-q", "--systems", "centroid,tfidf"])
    assert result.exit_code == 0, result.output
    states = _states(result.output)
    assert states.pop("report") == "run", result.output
    assert set(states.values()) == {"skip"}, result.output
    systems = {r["system"] for r in read_json(old_run / "report" / "metrics.json")["systems"].values()}
    assert systems == {"centroid", "tfidf"}
    manifest = read_json(old_run / "manifest.json")["stages"]
    assert "report" in manifest and "compare-report" not in manifest  # the entry that describes the stage now
    assert "make-triplets" in manifest  # not re-run: its entry stays as the old code wrote it


def test_the_new_names_run_what_the_old_names_ran(old_run: Path):
    """``head`` on an old run after a changed setting re-runs the stage the old code called train-head, in its
    folder."""
    before = read_json(old_run / "head" / "stage.json")["key"]
    result = runner.invoke(app, ["head", str(old_run), "-q", "--dropout", "0.3"])
    assert result.exit_code == 0, result.output
    assert _states(result.output)["head"] == "run"
    assert read_json(old_run / "head" / "stage.json")["key"] != before
    result = runner.invoke(app, ["train-head", str(old_run), "-q", "--dropout", "0.3"])
    assert _states(result.output)["head"] == "skip", result.output


def test_status_says_what_each_stage_would_do_and_runs_nothing(old_run: Path):
    """`jobembed status RUN` reads the stamps: the old run is current but for what a test removed, and nothing is
    written (it runs no stage, not even the one it says would run)."""
    (old_run / "report" / "metrics.json").unlink()
    before = {p: p.stat().st_mtime_ns for p in old_run.rglob("*")}
    result = runner.invoke(app, ["status", str(old_run)], terminal_width=200)
    assert result.exit_code == 0, result.output
    rows = {m.group(1): m.group(2) for m in re.finditer(r"│ ([a-z-]+) +│ ([a-z]+) +│", result.output)}
    assert rows == {
        "prepare": "current",
        "clean": "current",
        "embed": "current",
        "head": "current",
        "triplets": "current",
        "finetune": "off",
        "embed-finetuned": "off",
        "finetune-seeds": "off",
        "finetune-cv": "off",
        "report": "runs",
        "bundle": "waits",
    }, result.output
    assert "metrics.json" in result.output  # the reason report would run
    assert {p: p.stat().st_mtime_ns for p in old_run.rglob("*")} == before
