"""``jobembed serve``: the real server on loopback (subprocess), its errors, faults, batching, ONNX and the page.

One tiny bundle (tiny encoder, rules cleaner, MLP head) is built per module; each server is a real
``jobembed serve`` process on a free port, stopped at the end of its test or module.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from jobembed.bundle import load_bundle, save_bundle
from jobembed.config import PipelineConfig
from jobembed.embed import Embedder
from jobembed.head import MLPHead
from jobembed.sections import ServeConfig
from jobembed.serve import ApiError, MicroBatcher, parse_request
from tests.conftest import encoder_info
from tests.synthetic import make_ads, make_labels

LIMITS = {"max_texts": 4, "max_chars": 2000, "max_body_bytes": 4096}
AD = "Kierowca kat. C+E, transport międzynarodowy, prawo jazdy, tel. 600 100 200"
# Out-of-fold answers: 20 at confidence 0.5 (19 right), 20 at 0.3 (13 right), 60 at 0.0 (18 right): accuracy 0.95,
# 0.8 and 0.5 from the top, so a 0.9 target gives threshold 0.5 and 0.99 none.
OOF_SCORES = {
    "confidence": [0.5] * 20 + [0.3] * 20 + [0.0] * 60,
    "correct": [True] * 19 + [False] + [True] * 13 + [False] * 7 + [True] * 18 + [False] * 42,
}


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, tiny_encoder_dir) -> Path:
    """A bundle on cleaned text (rules cleaner) with an MLP head and out-of-fold answers for --target-accuracy."""
    root = tmp_path_factory.mktemp("serve")
    config = PipelineConfig.model_validate(
        {
            "text_column": "clean_text",
            "clean": {"backend": "rules", "language": "pl"},
            "embed": {"model": str(tiny_encoder_dir), "max_seq_length": 64},
        }
    )
    from jobembed.clean.core import Cleaner

    ads = make_ads(15, seed=4)
    embedder = Embedder(config.embed, prompt=None)
    X = embedder.encode(Cleaner(config.clean).clean(ads["text"].tolist()).texts)
    head = MLPHead(hidden_sizes=(16,), max_epochs=40).fit(X, ads["label"].astype(str).to_numpy())
    info = encoder_info(embedder, str(tiny_encoder_dir))
    return save_bundle(
        root / "bundle",
        model=head,
        system="mlp",
        encoder=info,
        config=config,
        labels=make_labels().rename(columns={"code": "label"}),
        metrics={"selective": {"oof_scores": OOF_SCORES}},
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``jobembed serve`` in a subprocess on a free loopback port; ``log()`` is what it printed so far."""

    def __init__(self, bundle: Path, tmp: Path, *args: str, env: dict[str, str] | None = None, limits=LIMITS) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = tmp / f"serve-{self.port}.yaml"
        cfg.write_text(yaml.safe_dump({"serve": limits}))
        self.log_path = tmp / f"server-{self.port}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jobembed", "serve", "--bundle", str(bundle), "--port", str(self.port),
             "--config", str(cfg), *args],
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )  # fmt: skip

    def wait_ready(self, timeout: float = 120, workers: int = 1) -> Server:
        """Until every worker loaded its bundle (the log says "ready" once per worker) and /readyz answers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.log()}")
            try:
                up = httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                up = False
            if up and self.log().count("jobembed.serve: ready") >= workers:
                return self
            time.sleep(0.3)
        raise AssertionError(f"server not ready in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def server(bundle_dir, tmp_path_factory):
    srv = Server(bundle_dir, tmp_path_factory.mktemp("srv")).wait_ready()
    yield srv
    srv.stop()


def _body_bytes(body) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


def _classify(url: str, body, headers: dict[str, str] | None = None) -> httpx.Response:
    content = _body_bytes(body)
    headers = {"Content-Type": "application/json", **(headers or {})}
    return httpx.post(f"{url}/v1/classify", content=content, headers=headers, timeout=60)


# ------------------------------------------------------------------------------------------------ answers


def test_classify_answers_like_the_bundle(server, bundle_dir):
    texts = [AD, "Magazynier z uprawnieniami na wózek widłowy", "Pielęgniarka, szpital, dyżury"]
    r = _classify(server.url, {"texts": texts, "top_k": 2, "explain": True})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = load_bundle(bundle_dir).predict(texts)
    assert [p["label"] for p in body["predictions"]] == [p.label for p in expected]
    first = body["predictions"][0]
    assert len(first["top_k"]) == 2 and first["top_k"][0]["probability"] >= first["top_k"][1]["probability"]
    # the head read the cleaned text: the phone number is gone
    assert first["input"]["cleaned"] is True and "600 100 200" not in first["input"]["text"]
    assert body["bundle"]["system"] == "mlp" and body["bundle"]["classes"] == 6


def test_texts_with_nothing_to_read_are_uncertain_with_a_reason(server):
    """Reproduces (issue 23): "😀🚀🔥" got the same confident label as any empty text, uncertain false."""
    r = _classify(server.url, {"texts": ["😀🚀🔥", AD], "min_confidence": 0})
    assert r.status_code == 200, r.text
    empty, ad = r.json()["predictions"]
    assert empty["uncertain"] is True and empty["reason"] and ad["reason"] is None


def test_thresholds_from_the_request_and_the_bundle(server):
    sure = _classify(server.url, {"texts": [AD], "min_confidence": 0.99}).json()["predictions"][0]
    assert sure["uncertain"] is True and sure["label"] == "uncertain" and sure["top_k"]
    # target_accuracy 0.9 -> the bundle's out-of-fold answers give 0.5
    r = _classify(server.url, {"texts": [AD], "target_accuracy": 0.9}).json()
    assert r["min_confidence"] == 0.5
    never = _classify(server.url, {"texts": [AD], "target_accuracy": 0.99})
    assert never.status_code == 422 and never.json()["error"]["field"] == "target_accuracy"


def test_labels_health_ready_metrics_and_docs(server):
    labels = httpx.get(f"{server.url}/v1/labels").json()["labels"]
    assert {row["label"] for row in labels} == {"83", "22", "25", "93", "43", "51"}
    assert httpx.get(f"{server.url}/healthz").json()["status"] == "ok"
    assert httpx.get(f"{server.url}/readyz").json() == {"status": "ready"}
    _classify(server.url, {"texts": [AD, AD]})
    metrics = httpx.get(f"{server.url}/metrics").text
    for name in (
        "jobembed_requests_total",
        "jobembed_request_seconds_bucket",
        "jobembed_texts_total",
        "jobembed_batch_texts_bucket",
        "jobembed_cache_hits_total",
        "jobembed_predicted_total",
        "jobembed_confidence_bucket",
    ):
        assert name in metrics, name
    schema = httpx.get(f"{server.url}/openapi.json").json()
    body = schema["paths"]["/v1/classify"]["post"]["requestBody"]["content"]["application/json"]
    assert "texts" in body["schema"]["properties"] and body["example"]["texts"]


def test_repeated_texts_come_from_the_cache(server):
    text = "Programista Python w zespole danych, praca zdalna " + str(time.time())
    _classify(server.url, {"texts": [text]})

    def hits() -> float:
        lines = httpx.get(f"{server.url}/metrics").text.splitlines()
        return float(next(x.split()[-1] for x in lines if x.startswith("jobembed_cache_hits_total")))

    before = hits()
    _classify(server.url, {"texts": [text]})
    assert hits() == before + 1


# ------------------------------------------------------------------------------------------------ errors

TOO_LONG = "x" * (LIMITS["max_chars"] + 1)


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (b'{"texts": ["a"', 422, "body"),  # malformed JSON
        (b'\xff\xfe{"texts": ["a"]}', 422, "body"),  # not UTF-8
        (b"[1, 2]", 422, "body"),  # not an object
        ({"texts": "one ad"}, 422, "texts"),  # wrong type
        ({"texts": ["ok", 3]}, 422, "texts[1]"),
        ({"texts": []}, 422, "texts"),
        ({"texts": ["ok", "   "]}, 422, "texts[1]"),  # empty text
        ({"texts": [TOO_LONG]}, 422, "texts[0]"),
        ({"texts": ["a"] * (LIMITS["max_texts"] + 1)}, 422, "texts"),
        ({"texts": ["a"], "top_k": 0}, 422, "top_k"),
        ({"texts": ["a"], "top_k": "3"}, 422, "top_k"),
        ({"texts": ["a"], "min_confidence": 2}, 422, "min_confidence"),
        ({"texts": ["a"], "colour": "red"}, 422, "colour"),
        (b'{"texts": ["\\ud800"]}', 422, "texts[0]"),  # an unpaired surrogate
        ({"texts": ["y" * 1500] * 3}, 413, "body"),  # over max_body_bytes
        # issue 23: 4,000 nested [ gave 500 and a RecursionError traceback in the log
        (b'{"texts": ' + b"[" * 4000, 422, "body"),
        (b'{"texts": ["a"], "min_confidence": NaN}', 422, "min_confidence"),  # said "should be <= 1"
        ({"texts": ["a"], "min_confidence": 0.5, "target_accuracy": 0.9}, 422, "min_confidence"),  # which wins?
    ],
)
def test_bad_requests_name_the_field(server, body, status, field):
    r = _classify(server.url, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["status"] == status and error["field"] == field and error["message"] and error["fix"]
    if b"NaN" in _body_bytes(body):
        assert "not a number" in error["message"]  # it said "should be less than or equal to 1"
    assert "Traceback" not in server.log()


def test_a_streamed_body_over_the_limit_is_refused(server):
    def chunks():
        for _ in range(10):
            yield b" " * 1000

    r = httpx.post(f"{server.url}/v1/classify", content=chunks(), timeout=30)
    assert r.status_code == 413 and r.json()["error"]["field"] == "body"


def test_unknown_paths_and_methods_are_json_errors(server):
    r = httpx.get(f"{server.url}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["status"] == 404
    assert httpx.get(f"{server.url}/v1/classify").status_code == 405


def test_api_keys(bundle_dir, tmp_path):
    srv = Server(bundle_dir, tmp_path, env={"JOBEMBED_API_KEYS": "alpha-key, beta-key"}).wait_ready()
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "alpha-key"}):
            r = _classify(srv.url, {"texts": [AD]}, headers)
            assert r.status_code == 401 and r.json()["error"]["field"] == "Authorization"
            assert r.headers["www-authenticate"] == "Bearer"
        ok = httpx.post(
            f"{srv.url}/v1/classify", json={"texts": [AD]}, headers={"Authorization": "Bearer beta-key"}, timeout=60
        )
        assert ok.status_code == 200
        assert httpx.get(f"{srv.url}/metrics").status_code == 401
        assert httpx.get(f"{srv.url}/healthz").status_code == 200  # probes need no key
    finally:
        srv.stop()
    assert "alpha-key" not in srv.log() and "beta-key" not in srv.log()


@pytest.mark.parametrize("keys", [" , ", ",", " "], ids=["comma-space", "comma", "space"])
def test_an_api_key_list_with_no_key_refuses_to_start(bundle_dir, keys):
    """Reproduces (issue 23): JOBEMBED_API_KEYS=" , " printed "API keys on" and served without any key."""
    if not keys.strip():  # blank: the same as unset, keys off; the server would start, so it is not run here
        from jobembed.serve import api_keys_from_env

        os.environ["JOBEMBED_API_KEYS"] = keys
        try:
            assert api_keys_from_env() == []
        finally:
            del os.environ["JOBEMBED_API_KEYS"]
        return
    done = subprocess.run(
        [sys.executable, "-m", "jobembed", "serve", "--bundle", str(bundle_dir), "--port", str(_free_port())],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JOBEMBED_API_KEYS": keys},
    )
    lines = [x for x in (done.stdout + done.stderr).splitlines() if x.strip()]
    assert done.returncode == 1 and len(lines) == 1 and "holds no key" in lines[0], lines


def test_an_internal_error_is_counted_in_requests_total(bundle_dir, monkeypatch):
    """Reproduces (issue 23): a 500 was counted in jobembed_errors_total but not in jobembed_requests_total."""
    from fastapi.testclient import TestClient

    from jobembed.bundle import Bundle
    from jobembed.serve import create_app

    app = create_app(bundle_dir, ServeConfig(cache=False), api_keys=[])
    with TestClient(app, raise_server_exceptions=False) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)

        def broken(self, texts, **kw):
            raise RuntimeError("boom")

        monkeypatch.setattr(Bundle, "predict_proba_explained", broken)
        r = client.post("/v1/classify", json={"texts": [AD]})
        assert r.status_code == 500 and r.json()["error"]["status"] == 500
        metrics = client.get("/metrics").text
    counted = [x for x in metrics.splitlines() if x.startswith("jobembed_requests_total") and 'status="500"' in x]
    assert counted and float(counted[0].split()[-1]) == 1, metrics


def test_a_slow_answer_times_out_with_504(bundle_dir):
    from fastapi.testclient import TestClient

    from jobembed.serve import create_app

    app = create_app(bundle_dir, ServeConfig(request_timeout_s=1e-4, cache=False), api_keys=[])
    with TestClient(app) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        r = client.post("/v1/classify", json={"texts": [AD + " " + str(i) for i in range(3)]})
    assert r.status_code == 504 and r.json()["error"]["message"].startswith("no answer within")


@pytest.mark.parametrize("origins", [[], ["https://portal.example"]])
def test_cors_is_off_unless_origins_are_listed(bundle_dir, origins):
    from fastapi.testclient import TestClient

    from jobembed.serve import create_app

    app = create_app(bundle_dir, ServeConfig(cors_origins=origins), api_keys=[])
    with TestClient(app) as client:
        r = client.options(
            "/v1/classify",
            headers={"Origin": "https://portal.example", "Access-Control-Request-Method": "POST"},
        )
    allowed = r.headers.get("access-control-allow-origin")
    assert allowed == ("https://portal.example" if origins else None)


def test_parse_request_accepts_a_valid_body():
    req = parse_request(b'{"texts": ["Kierowca"], "top_k": 2, "min_confidence": 0}', ServeConfig())
    assert req.texts == ["Kierowca"] and req.top_k == 2 and req.min_confidence == 0.0
    with pytest.raises(ApiError) as e:
        parse_request(b'{"texts": null}', ServeConfig())
    assert e.value.field == "texts"


# ------------------------------------------------------------------------------------------------ batching


def test_batcher_groups_concurrent_requests_and_splits_the_answers():
    calls: list[int] = []

    def run(texts):
        calls.append(len(texts))
        time.sleep(0.05)
        return np.array([[float(t)] for t in texts]), None

    async def main():
        b = MicroBatcher(run, enabled=True, wait_s=0.02, max_texts=8, on_batch=lambda n: None)
        b.start()
        results = await asyncio.gather(*(b.submit([str(i), str(i + 100)]) for i in range(10)))
        await b.stop()
        return results

    results = asyncio.run(main())
    assert [r.proba[:, 0].tolist() for r in results] == [[i, i + 100] for i in range(10)]
    assert sum(calls) == 20 and len(calls) < 10 and max(calls) <= 8


def test_batcher_does_not_hold_a_lone_request_and_can_be_off():
    calls: list[int] = []

    def run(texts):
        calls.append(len(texts))
        return np.zeros((len(texts), 1)), None

    async def lone(enabled: bool) -> float:
        b = MicroBatcher(run, enabled=enabled, wait_s=2.0, max_texts=64)
        b.start()
        start = time.perf_counter()
        await b.submit(["one"])
        took = time.perf_counter() - start
        await asyncio.gather(*(b.submit(["x"]) for _ in range(5)))
        await b.stop()
        return took

    assert asyncio.run(lone(True)) < 1.0  # far below the 2 s wait: nothing else was in flight
    calls.clear()
    asyncio.run(lone(False))
    assert calls == [1] * 6  # off: one call per request


@pytest.mark.parametrize(
    ("settings", "batch", "wait"),
    [
        ({"device": "cpu"}, 1, 0.0),  # CPU: one text per forward pass, no waiting
        ({"device": "cpu", "backend": "onnx-int8"}, 1, 0.0),
        ({"device": "cpu", "encode_batch_size": 16, "batch_wait_ms": 2}, 16, 0.002),
    ],
)
def test_cpu_defaults_for_batching(settings, batch, wait):
    from jobembed.serve import batch_wait_s, encode_batch_size

    config = ServeConfig(**settings)
    assert encode_batch_size(config) == batch and batch_wait_s(config) == wait


def test_concurrent_clients_all_get_their_own_answers(server, bundle_dir):
    texts = [f"Kierowca kat. C numer {i}, transport krajowy" for i in range(24)]
    expected = {t: p.label for t, p in zip(texts, load_bundle(bundle_dir).predict(texts), strict=True)}

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            rs = await asyncio.gather(*(client.post("/v1/classify", json={"texts": [t]}) for t in texts))
        return rs

    responses = asyncio.run(main())
    assert all(r.status_code == 200 for r in responses)
    assert {t: r.json()["predictions"][0]["label"] for t, r in zip(texts, responses, strict=True)} == expected


# ------------------------------------------------------------------------------------------------ faults


def _copy(bundle_dir: Path, tmp: Path) -> Path:
    target = tmp / "bundle-copy"
    shutil.copytree(bundle_dir, target)
    return target


def test_a_killed_worker_gives_an_error_not_a_hang_and_the_others_serve(bundle_dir, tmp_path):
    psutil = pytest.importorskip("psutil")
    srv = Server(bundle_dir, tmp_path, "--workers", "2").wait_ready(workers=2)
    try:
        # a request the worker has accepted and is still reading: headers sent, body not finished
        client = socket.create_connection(("127.0.0.1", srv.port))
        client.sendall(
            b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        )
        local = client.getsockname()[1]
        owner = None
        deadline = time.monotonic() + 10
        while owner is None and time.monotonic() < deadline:
            for child in psutil.Process(srv.proc.pid).children(recursive=True):
                try:
                    conns = child.net_connections(kind="tcp")
                except psutil.Error:
                    continue
                if any(c.raddr and c.raddr.port == local for c in conns):
                    owner = child
            time.sleep(0.1)
        assert owner is not None, "no worker holds the connection"
        owner.kill()
        client.settimeout(10)
        try:
            got = client.recv(1024)
        except ConnectionResetError:
            got = b""
        assert got == b""  # the connection is closed: the client sees an error at once, it does not hang
        client.close()
        for _ in range(6):
            assert _classify(srv.url, {"texts": [AD]}).status_code == 200
        # /metrics sums the workers (Prometheus multiprocess mode)
        metrics = httpx.get(f"{srv.url}/metrics").text
        texts = next(x for x in metrics.splitlines() if x.startswith("jobembed_texts_total"))
        assert float(texts.split()[-1]) >= 6
        # uvicorn starts a new worker in place of the dead one
        srv.wait_ready(workers=3)
        alive = [p for p in psutil.Process(srv.proc.pid).children() if p.pid != owner.pid and p.is_running()]
        assert owner.pid not in {p.pid for p in alive} and len(alive) >= 2
    finally:
        srv.stop()


def test_an_edited_bundle_changes_nothing_and_a_restart_refuses_it(bundle_dir, tmp_path):
    copy = _copy(bundle_dir, tmp_path)
    srv = Server(copy, tmp_path).wait_ready()
    try:
        before = _classify(srv.url, {"texts": [AD], "top_k": 6}).json()["predictions"][0]
        head = next((copy / "head").glob("*.safetensors"))
        data = bytearray(head.read_bytes())
        data[-64:] = bytes(64)  # zero the last weights
        head.write_bytes(bytes(data))
        labels = json.loads((copy / "labels.json").read_text())
        labels[0]["name"] = "EDITED"
        (copy / "labels.json").write_text(json.dumps(labels))
        after = _classify(srv.url, {"texts": [AD], "top_k": 6}).json()["predictions"][0]
        assert after == before
    finally:
        srv.stop()
    restart = subprocess.run(
        [sys.executable, "-m", "jobembed", "serve", "--bundle", str(copy), "--port", str(_free_port())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert restart.returncode == 1
    lines = [x for x in restart.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "changed since the bundle was made" in lines[0] and "Traceback" not in restart.stderr


def _mount_tmpfs(folder: Path, options: str) -> str | None:
    """Mount a tmpfs (root only); the error text where that is not allowed."""
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    return None if done.returncode == 0 else (done.stderr.decode().strip() or "mount failed")


@pytest.fixture
def read_only_cache(tmp_path):
    """A cache folder this process cannot write: chmod 0555, or for root (who writes anyway) a read-only tmpfs."""
    cache = tmp_path / "ro-cache"
    cache.mkdir()
    cache.chmod(0o555)
    mounted = False
    if os.access(cache, os.W_OK):
        err = _mount_tmpfs(cache, "size=1m,ro")
        if err:
            pytest.skip(f"root can write a 0555 folder and cannot mount a read-only tmpfs ({err})")
        mounted = True
    yield cache
    if mounted:
        subprocess.run(["umount", "-l", str(cache)], check=False)
    cache.chmod(0o755)


def test_a_read_only_cache_still_answers(bundle_dir, tmp_path, read_only_cache):
    srv = Server(bundle_dir, tmp_path, env={"JOBEMBED_CACHE": str(read_only_cache)}).wait_ready()
    try:
        for i in range(2):
            r = _classify(srv.url, {"texts": [f"{AD} read-only {i}"]})
            assert r.status_code == 200 and r.json()["predictions"][0]["label"]
        assert "Traceback" not in srv.log()
    finally:
        srv.stop()


def _stored_vectors(cache: Path) -> int:
    import sqlite3

    db = cache / "store.sqlite3"
    if not db.exists():
        return 0
    with sqlite3.connect(db) as con:
        return con.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]


def test_the_server_keeps_a_bounded_memory_cache_and_writes_no_vector(bundle_dir, tmp_path):
    """Reproduces (issue 19): every text a server answered was written to the on-disk store, which grew without end
    (store.py said serving "neither grows files")."""
    cache = tmp_path / "fresh-cache"
    srv = Server(bundle_dir, tmp_path, env={"JOBEMBED_CACHE": str(cache)}, limits=LIMITS | {"cache_size": 2})
    srv.wait_ready()

    def hits() -> float:
        lines = httpx.get(f"{srv.url}/metrics").text.splitlines()
        return float(next(x.split()[-1] for x in lines if x.startswith("jobembed_cache_hits_total")))

    try:
        texts = [f"{AD} nowa oferta {i}" for i in range(4)]
        for text in texts:
            assert _classify(srv.url, {"texts": [text]}).status_code == 200
        before = hits()
        assert _classify(srv.url, {"texts": [texts[-1]]}).status_code == 200  # the newest is kept
        assert hits() == before + 1
        assert _classify(srv.url, {"texts": [texts[0]]}).status_code == 200  # the oldest was evicted (2 kept)
        assert hits() == before + 1
        assert _stored_vectors(cache) == 0
    finally:
        srv.stop()


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs (root only); skipped where mounting is not allowed."""
    mount = tmp_path / "small"
    mount.mkdir()
    err = _mount_tmpfs(mount, "size=2m")
    if err:
        pytest.skip(f"cannot mount a small tmpfs to fill ({err})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_cache_disk_still_answers(bundle_dir, tmp_path, small_disk):
    srv = Server(bundle_dir, tmp_path, env={"JOBEMBED_CACHE": str(small_disk)}).wait_ready()
    try:
        filler = small_disk / "filler"
        with filler.open("wb") as f:  # fill the disk to the last byte
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        for i in range(6):
            r = _classify(srv.url, {"texts": [f"{AD} pełny dysk {i} " + "słowo " * 40]})
            assert r.status_code == 200, r.text
        assert "Traceback" not in srv.log()
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------------------ ONNX


def test_onnx_int8_encoder_matches_torch_and_has_its_own_cache(tiny_encoder_dir, tmp_path):
    from jobembed.sections import EmbedConfig

    cfg = EmbedConfig(model=str(tiny_encoder_dir), max_seq_length=64, cache_dir=tmp_path / "cache")
    texts = [AD, "Magazynier, wózek widłowy", "Registered nurse, night shifts", "Programista Java"]
    torch_vecs = Embedder(cfg).encode(texts)
    onnx = Embedder(cfg, backend="onnx-int8")
    onnx_vecs = onnx.encode(texts)
    assert onnx_vecs.shape == torch_vecs.shape and onnx_vecs.dtype == np.float32
    assert np.allclose(np.linalg.norm(onnx_vecs, axis=1), 1, atol=1e-5)
    assert (onnx_vecs * torch_vecs).sum(axis=1).min() > 0.95
    assert onnx.last_stats.n_encoded == 4  # the torch vectors were not reused: another namespace
    assert list((tmp_path / "cache" / "onnx").glob("*-int8.onnx"))


def test_onnx_backend_serves(bundle_dir, tmp_path):
    srv = Server(bundle_dir, tmp_path, "--backend", "onnx-int8").wait_ready()
    try:
        r = _classify(srv.url, {"texts": [AD, "Pielęgniarka, szpital"], "top_k": 3})
        assert r.status_code == 200
        assert all(len(p["top_k"]) == 3 for p in r.json()["predictions"])
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------------------ page


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None
    )
    return (browser, driver) if browser and driver else None


def test_the_page_classifies_a_pasted_ad_in_a_real_browser(server):
    found = _chromium()
    if found is None:
        pytest.skip("Debian's chromium and chromium-driver are not installed (make test installs them as root)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    # the system chromedriver: Selenium Manager would try to download one
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=found[1]))
    try:
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: "categories" in d.find_element(By.ID, "bundle").text)
        assert "mlp" in driver.find_element(By.ID, "bundle").text
        driver.find_element(By.ID, "ad").send_keys(AD)
        topk = driver.find_element(By.ID, "topk")
        topk.clear()
        topk.send_keys("4")
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: d.find_element(By.ID, "answer").text.strip())
        rows = driver.find_elements(By.CSS_SELECTOR, "#topk-table tbody tr")
        assert len(rows) == 4
        expected = _classify(server.url, {"texts": [AD], "top_k": 4}).json()["predictions"][0]
        assert [r.find_elements(By.TAG_NAME, "td")[1].text for r in rows] == [t["label"] for t in expected["top_k"]]
        read = driver.find_element(By.ID, "read-text").text
        assert "Kierowca" in read and "600 100 200" not in read  # what the model read: the cleaned ad
        assert "cleaned text" in driver.find_element(By.ID, "read-note").text
        # an error is shown, not swallowed
        driver.find_element(By.ID, "ad").clear()
        driver.find_element(By.ID, "ad").send_keys("x" * (LIMITS["max_chars"] + 1))
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: "texts[0]" in d.find_element(By.ID, "error").text)
    finally:
        driver.quit()


def test_serve_refuses_a_missing_bundle_in_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "jobembed", "serve", "--bundle", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "not a jobembed bundle" in done.stderr and "Traceback" not in done.stderr
