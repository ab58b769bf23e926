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


@pytest.mark.parametrize("command", ["train-head", "make-triplets", "compare-report", "bundle"])
def test_every_finished_stage_of_an_old_run_is_current(old_run: Path, command: str):
    result = runner.invoke(app, [command, str(old_run), "-q"])
    assert result.exit_code == 0, result.output
    states = _states(result.output)
    assert states and set(states.values()) == {"skip"}, result.output


def test_a_changed_setting_re_runs_only_its_stage_on_an_old_run(old_run: Path):
    result = runner.invoke(app, ["compare-report", str(old_run), "-q", "--systems", "centroid,tfidf"])
    assert result.exit_code == 0, result.output
    states = _states(result.output)
    assert states.pop("compare-report") == "run", result.output
    assert set(states.values()) == {"skip"}, result.output
    systems = {r["system"] for r in read_json(old_run / "report" / "metrics.json")["systems"].values()}
    assert systems == {"centroid", "tfidf"}
