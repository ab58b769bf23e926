"""The engine: nothing stale is ever "up to date" (interrupts, forced re-runs, keys, checkpoints, layered configs).

Every test here reproduces a defect of the engine at 92af2b3 (issue 19); interrupts are real signals sent to a
subprocess paused at a named step (``JOBEMBED_TEST_PAUSE_AT``), not mocks.
"""

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
import pytest
import yaml
from typer.testing import CliRunner

from jobembed import engine
from jobembed.artifacts import PAUSE_ENV
from jobembed.cli import app
from jobembed.sections import CleanBackend
from tests.synthetic import tiny_finetune_run

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "250"})


def ran(output: str) -> set[str]:
    """The stages a command's progress lines say ran."""
    return {line.split(":")[0].strip() for line in output.splitlines() if ": running" in line}


def current(output: str) -> set[str]:
    return {line.split(":")[0].strip() for line in output.splitlines() if ": up to date" in line}


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_encoder_dir):
    """A finished run with the fine-tune on (tiny settings); tests work on copies of it."""
    root = tmp_path_factory.mktemp("engine")
    cfg = tiny_finetune_run(
        root,
        name="base",
        model=tiny_encoder_dir,
        finetune={"enabled": True, "epochs": 1, "batch_size": 8, "max_seq_length": 32, "evals_per_epoch": 1},
    )
    cfg["head"] = {"hidden_sizes": [16], "max_epochs": 10, "patience": 3}
    cfg["report"] = {"cv_folds": 2, "bootstrap": 20, "systems": ["centroid", "mlp"], "tfidf": {"max_features": 500}}
    (root / "base.yaml").write_text(yaml.safe_dump(cfg))
    result = invoke("run", "-c", root / "base.yaml", "-q")
    assert result.exit_code == 0, result.output
    return root


def copy_run(base: Path, name: str) -> Path:
    run = base / "runs" / name
    shutil.copytree(base / "runs" / "base", run)
    return run


def cli(*args: str, pause: str | None = None) -> subprocess.Popen:
    env = dict(os.environ)
    if pause:
        env[PAUSE_ENV] = pause
    cmd = [sys.executable, "-c", "from jobembed.cli import app; app()", *map(str, args)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_paused(proc: subprocess.Popen, point: str, timeout: float = 240) -> None:
    """Block until the subprocess prints the pause marker (it then sleeps until a signal arrives)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stderr.readline()
        if f"jobembed-test-paused: {point}" in line:
            return
        if not line and proc.poll() is not None:
            break
    proc.kill()
    out, err = proc.communicate()
    pytest.fail(f"never paused at {point}: {out[-1500:]} {err[-1500:]}")


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------- interrupts


@pytest.mark.parametrize(
    ("sig", "point"),
    [(signal.SIGINT, "embed:split-written"), (signal.SIGKILL, "embed:split-written"), (signal.SIGKILL, "engine:swap")],
    ids=["sigint-mid-stage", "sigkill-mid-stage", "sigkill-mid-swap"],
)
def test_an_interrupted_embed_leaves_the_old_vectors_and_a_consistent_report(base, sig, point):
    """Reproduces: Ctrl-C during `embed --max-seq-length N` left a new train.npy beside old val/test files and the
    old stamp, and the next report said "up to date" and trained on one setting and tested on another."""
    run = copy_run(base, f"interrupted-{sig.name}-{point.replace(':', '-')}")
    before = files_of(run / "embed")
    proc = cli("embed", run, "--max-seq-length", "24", "-q", pause=point)
    wait_paused(proc, point)
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert proc.returncode == 130
        assert not (run / ".embed.tmp").exists()  # cleaned up on the way out
    again = invoke("report", run)
    assert again.exit_code == 0, again.output
    assert files_of(run / "embed") == before  # the old vectors, stamp and all: never a mix
    assert "report: up to date" in again.output and not ran(again.output)
    assert yaml.safe_load((run / "config.yaml").read_text())["embed"]["max_seq_length"] == 32
    assert not [p.name for p in run.iterdir() if p.name.endswith((".tmp", ".old"))]


def test_a_second_process_on_a_running_stage_gets_one_line(base):
    run = copy_run(base, "locked")
    proc = cli("embed", run, "--force", "-q", pause="embed:split-written")
    try:
        wait_paused(proc, "embed:split-written")
        result = invoke("embed", run, "--force", "-q")
        assert result.exit_code == 1
        assert f"another jobembed process (pid {proc.pid}) is running embed" in result.output
        assert result.output.count("error:") == 1 and "another jobembed" in result.output.strip().splitlines()[-1]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    assert invoke("embed", run, "-q").exit_code == 0  # the lock went with the process


# ------------------------------------------------------------------------------------------- keys


def test_a_forced_finetune_with_new_weights_reruns_what_reads_them(base, monkeypatch):
    """Reproduces: after `finetune --force` (new weights, same key) report kept the old encoder's numbers,
    because a stage counted as current unless an upstream stage ran in the same call."""
    from jobembed import stages

    run = copy_run(base, "forced")
    real = stages.STAGES["finetune"].run

    def other_weights(ctx):  # a GPU re-run is not bit-for-bit the same: the same settings give new weights
        summary = real(ctx)
        weights = next((ctx.out / "model").rglob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:-8] + b"\x00" * 8)
        return summary

    monkeypatch.setitem(stages.STAGES, "finetune", dataclasses.replace(stages.STAGES["finetune"], run=other_weights))
    result = invoke("finetune", run, "--force", "-q")
    assert result.exit_code == 0, result.output
    result = invoke("report", run, "-q")
    assert result.exit_code == 0, result.output
    assert ran(result.output) == {"embed-finetuned", "report"}, result.output


def test_a_forced_rerun_that_reproduces_its_files_leaves_later_stages_current(base):
    run = copy_run(base, "reproduced")
    assert invoke("embed", run, "--force", "-q").exit_code == 0
    result = invoke("run", "-c", base / "base.yaml", "--name", "reproduced", "-q")
    assert result.exit_code == 0, result.output
    assert not ran(result.output), result.output  # same vectors: no re-mined triplets, no new fine-tune


def test_an_extra_encoder_reruns_embed_and_the_report_and_nothing_else(base, tmp_path):
    """Reproduces: finetune and triplets hashed the whole embed section, so adding an encoder to compare
    re-mined, re-judged and re-fine-tuned."""
    from tests.conftest import build_tiny_encoder

    run = copy_run(base, "extra")
    other = build_tiny_encoder(tmp_path / "other", seed=5)
    result = invoke("report", run, "--extra-model", other, "-q")
    assert result.exit_code == 0, result.output
    assert ran(result.output) == {"embed", "report"}, result.output
    result = invoke("run", "-c", base / "base.yaml", "--name", "extra", "-q")  # the file does not name extra_models
    assert result.exit_code == 0, result.output
    assert ran(result.output) <= {"bundle"}, result.output  # the bundle only if the winner changed


def test_a_finetune_with_other_settings_never_resumes_old_checkpoints(base, tmp_path):
    """Reproduces: finetune resumed from whatever sat in finetune/checkpoints, whatever the settings: after a kept
    (or killed) run and a changed lr, the old weights and step count came back and nothing was trained."""
    run = copy_run(base, "checkpoints")
    (tmp_path / "keep.yaml").write_text(yaml.safe_dump({"finetune": {"keep_checkpoints": True}}))
    result = invoke("finetune", run, "-c", tmp_path / "keep.yaml", "--force", "-q")
    assert result.exit_code == 0, result.output
    assert list((run / "finetune" / "checkpoints").glob("*/checkpoint-*"))
    result = invoke("finetune", run, "--learning-rate", "1e-4", "-q")
    assert result.exit_code == 0, result.output
    info = json.loads((run / "finetune" / "finetune.json").read_text())
    assert info["resumed_from"] is None and info["steps"] > 0


def test_a_killed_finetune_resumes_from_its_own_checkpoints(base):
    run = copy_run(base, "killed-finetune")
    proc = cli("finetune", run, "--epochs", "3", "-q", pause="finetune:before-commit")
    # 3 epochs in a subprocess: on 2 shared cores (CI beside another job) that once took past the 240 s default
    wait_paused(proc, "finetune:before-commit", timeout=600)  # trained, checkpoints saved, outputs not yet swapped in
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    before = json.loads((run / "finetune" / "finetune.json").read_text())
    assert before["steps"] > 0 and list((run / "finetune" / "checkpoints").glob("*/checkpoint-*"))
    result = invoke("finetune", run, "--epochs", "3", "-q")
    assert result.exit_code == 0, result.output
    info = json.loads((run / "finetune" / "finetune.json").read_text())
    assert info["resumed_from"] is not None and info["resumed_from"].startswith("checkpoint-")
    assert not (run / "finetune" / "checkpoints").exists()  # dropped once the model is in place


# ------------------------------------------------------------------------------------------- configs


def test_run_with_another_file_layers_it_and_keeps_the_fine_tune(base, tmp_path):
    """Reproduces: `run -c other.yaml` replaced the run's config, and a file without finetune.enabled deleted the
    fine-tuned model, finetune.json, ads_seen.json and the fine-tuned vectors."""
    run = copy_run(base, "layered")
    made = files_of(run / "finetune") | {f"v/{k}": v for k, v in files_of(run / "embed-finetuned").items()}
    cfg = yaml.safe_load((base / "base.yaml").read_text())
    cfg.pop("finetune")
    cfg["name"] = "layered"
    cfg["report"]["bootstrap"] = 30
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(cfg))
    result = invoke("run", "-c", tmp_path / "other.yaml", "-q")
    assert result.exit_code == 0, result.output
    assert {"finetune", "embed-finetuned"} <= current(result.output)
    assert yaml.safe_load((run / "config.yaml").read_text())["finetune"]["enabled"] is True
    cfg["finetune"] = {"enabled": False}
    (tmp_path / "off.yaml").write_text(yaml.safe_dump(cfg))
    result = invoke("run", "-c", tmp_path / "off.yaml", "-q")
    assert result.exit_code == 0, result.output
    assert "finetune: off (" in result.output and "embed-finetuned: off (" in result.output
    assert "finetuned" not in json.loads((run / "report" / "metrics.json").read_text())
    now = files_of(run / "finetune") | {f"v/{k}": v for k, v in files_of(run / "embed-finetuned").items()}
    assert now == made  # off: not read, and left as it was


def test_a_run_whose_config_file_is_gone_says_so(base):
    run = copy_run(base, "no-config")
    (run / "config.yaml").unlink()
    result = invoke("report", run, "-q")
    assert result.exit_code == 1
    assert "config.yaml is missing" in result.output and len(result.output.strip().splitlines()) == 1
    assert (run / "report" / "metrics.json").is_file()


def test_clean_alone_pins_its_model_before_its_key(base, monkeypatch):
    """Reproduces: with a gliner2 Hub model, clean's key was hashed before pinning rewrote clean.model (and `clean
    run` alone never pinned), so the next command re-ran clean and everything after it."""
    from jobembed import stages

    run = copy_run(base, "pinned")
    from jobembed.stages import clean

    real_canon = clean.canon
    hub = {"org/x": "org/x@abc", "org/x@abc": "org/x@abc"}  # a Hub id and its pin to a commit, offline
    monkeypatch.setattr(clean, "canon", lambda ref, cache_dir=None: hub.get(ref) or real_canon(ref, cache_dir))

    real_clean = stages.STAGES["clean"].run

    def fake_clean(ctx):  # no GLiNER2 weights offline: the rules clean instead (the cleaning is not under test)
        rules = ctx.config.clean.model_copy(update={"backend": CleanBackend.rules})
        return real_clean(dataclasses.replace(ctx, config=ctx.config.model_copy(update={"clean": rules})))

    stage = dataclasses.replace(stages.STAGES["clean"], run=fake_clean, identity=lambda c: {"model": c.clean.model})
    monkeypatch.setitem(stages.STAGES, "clean", stage)
    result = invoke("clean", "run", run, "--backend", "gliner2", "--model", "org/x", "-q")
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((run / "config.yaml").read_text())["clean"]["model"] == "org/x@abc"
    result = invoke("clean", "run", run, "-q")
    assert result.exit_code == 0 and "clean: up to date" in result.output, result.output


# ------------------------------------------------------------------------------------------- damaged outputs


@pytest.mark.parametrize(
    ("damage", "stage"),
    [
        (lambda run: (run / "prepare" / "train.parquet").unlink(), "prepare"),
        (lambda run: (run / "clean" / "val.parquet").write_bytes(b"PAR1"), "clean"),
        (lambda run: np.save(next((run / "embed").glob("*/train.npy")), np.zeros((2, 2), np.float32)), "embed"),
    ],
    ids=["removed", "truncated", "overwritten"],
)
def test_a_damaged_output_reruns_the_stage_that_made_it_and_nothing_more(base, damage, stage):
    run = copy_run(base, f"damaged-{stage}")
    damage(run)
    result = invoke("report", run, "-q")
    assert result.exit_code == 0, result.output
    assert ran(result.output) == {stage}, result.output  # it writes the same files again: the rest stays current
    assert f"{stage}/" in result.output.split(f"{stage}: running")[1].splitlines()[0]


# ------------------------------------------------------------------------------------------- the engine alone


@pytest.fixture
def graph(monkeypatch, tmp_path):
    """An empty stage graph (the pipeline's is set aside) and a bare config object."""
    monkeypatch.setattr(engine, "STAGES", {})
    monkeypatch.setattr(engine, "_PINS", [])
    monkeypatch.setattr(engine, "write_resolved", lambda config, folder: None)

    @dataclasses.dataclass
    class Config:
        run_dir: Path
        size: int = 3

    return Config(tmp_path / "run")


def test_a_failed_stage_keeps_its_old_folder_and_finished_units(graph):
    """Units (cross-validation folds, say) have their own stamps: a stage killed after two of three resumes with
    those two, and its folder keeps the old outputs until the new ones are whole."""
    calls: list[int] = []
    fail_at: list[int] = []

    def folds(ctx):
        for i in range(ctx.config.size):
            unit = ctx.unit(f"fold-{i}", {"i": i})
            if not unit.current:
                if i in fail_at:
                    raise KeyboardInterrupt
                calls.append(i)
                with unit.build() as out:
                    (out / "score.txt").write_text(str(i))
            (ctx.out / f"fold-{i}.txt").write_text((unit.folder / "score.txt").read_text())
        return {}

    engine.register(engine.Stage("folds", run=folds, reads=("size",)))
    assert engine.run_stages(graph, progress=False) == {"folds": "ran"}
    old = files_of(graph.run_dir / "folds")
    graph.size, fail_at[:] = 4, [3]
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        engine.run_stages(graph, progress=False)
    assert calls == [] and files_of(graph.run_dir / "folds") == old  # units 0-2 current; the old outputs intact
    fail_at.clear()
    assert engine.run_stages(graph, progress=False) == {"folds": "ran"}
    assert calls == [3] and (graph.run_dir / "folds" / "fold-3.txt").read_text() == "3"
    assert engine.run_stages(graph, progress=False) == {"folds": "skipped"}


def test_a_disabled_stage_is_off_and_keeps_its_folder(graph):
    seen: list[str] = []
    engine.register(engine.Stage("a", run=lambda ctx: (ctx.out / "a.txt").write_text("a") and None))
    engine.register(
        engine.Stage(
            "b",
            inputs=("a",),
            run=lambda ctx: (ctx.out / "b.txt").write_text("b") and None,
            enabled=lambda config: config.size > 2,
            off_reason=lambda config: "size is 2 or less",
        )
    )
    engine.register(engine.Stage("c", inputs=("a", "b"), run=lambda ctx: seen.append("c") or None))
    engine.run_stages(graph, progress=False)
    graph.size = 1
    lines: list[tuple[str, str, str]] = []
    status = engine.run_stages(graph, progress=False, on_stage=lambda *a: lines.append(a))
    assert status == {"a": "skipped", "b": "off", "c": "ran"} and seen == ["c", "c"]
    assert ("b", "off", "size is 2 or less") in lines
    assert (graph.run_dir / "b" / "b.txt").read_text() == "b"
    assert [r["state"] for r in engine.describe(graph)] == ["current", "off", "current"]


def test_ranks_checking_one_new_run_folder_at_once_do_not_trip_over_each_other(tmp_path):
    """Reproduces: under torchrun both ranks wrote and removed the same probe file in a new run folder, and the
    slower one failed with 'cannot write into the run folder ... (No such file or directory)'."""
    import threading

    errors = []

    def check(folder):
        try:
            engine.check_run_dir(folder)
        except Exception as e:  # collected for the assertion
            errors.append(e)

    for i in range(40):
        threads = [threading.Thread(target=check, args=(tmp_path / f"run-{i}",)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    assert not [p for p in tmp_path.rglob(".jobembed-write-test*")]


def test_a_setting_only_a_later_stage_reads_sticks_when_the_target_is_current(graph, monkeypatch):
    """`jobembed finetune RUN --seeds 13,14,15` with finetune current: no stage it runs reads the new field, yet the
    run's config must keep it for the command that does (before, config.yaml was written only after a stage ran)."""
    written: list[int] = []
    monkeypatch.setattr(engine, "write_resolved", lambda config, folder: written.append(config.size))
    engine.register(engine.Stage("a", run=lambda ctx: None))
    engine.register(engine.Stage("b", inputs=("a",), reads=("size",), run=lambda ctx: None))
    engine.run_stages(graph, target="a", progress=False)
    graph.size, written[:] = 7, []
    assert engine.run_stages(graph, target="a", progress=False) == {"a": "skipped"}
    assert written == [7]
