"""``jobembed serve``: a bundle as an HTTP API (FastAPI + uvicorn), with micro-batching, metrics and a page.

Endpoints (``docs`` at ``/docs``):

- ``POST /v1/classify`` ``{"texts": [...], "top_k": 3, "min_confidence": 0.4, "target_accuracy": 0.9,
  "explain": false}`` -> ``{"predictions": [{"label", "name", "confidence", "uncertain", "top_k": [...],
  "input": {...}}], "min_confidence": ..., "bundle": {...}}``. ``input`` (with ``explain``) is what the head
  read: the cleaned text and the spans the extractor found, when the bundle was built on cleaned text.
- ``GET /v1/labels``, ``GET /v1/info``; ``GET /healthz`` (the process answers), ``GET /readyz`` (bundle verified,
  encoder loaded, one warm-up text done); ``GET /metrics`` (Prometheus; multiprocess mode with several workers).
- ``GET /``: a page to paste an ad and see its categories and what the model read.

Every error is JSON ``{"error": {"status", "field", "message", "fix"}}``: 413 for a body over
``serve.max_body_bytes``, 422 for a body that is not UTF-8 or not JSON, a field of the wrong type, an empty text,
too many texts or too long a text, 401 without a valid API key (``JOBEMBED_API_KEYS``, comma-separated,
``Authorization: Bearer KEY``), 503 while loading, 504 past ``serve.request_timeout_s``.

The encoder runs in one thread per worker. Requests are queued; the batcher takes every request already waiting
(up to ``serve.max_batch_texts`` texts) into one encode call, and under load (the last batch held more than one
request) waits ``serve.batch_wait_ms`` for more (5 ms on an accelerator, 0 on CPU), so a lone request on an idle
server is never held back. Inside a call the encoder takes ``serve.encode_batch_size`` texts per forward pass (1 on
CPU, where padding costs more than batching saves; docs/benchmarks.md#serve).
The bundle is read once at start; editing its files later changes nothing until a restart, which verifies them
again and refuses a changed bundle.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from jobembed import encoders
from jobembed.bundle import REPORT_PAGE, Bundle, load_bundle
from jobembed.errors import BundleError, ConfigError, JobembedError
from jobembed.report_page import CSP
from jobembed.sections import ClassifyConfig, ServeConfig

logger = logging.getLogger(__name__)

ENV_BUNDLE, ENV_CONFIG, ENV_KEYS = "JOBEMBED_SERVE_BUNDLE", "JOBEMBED_SERVE_CONFIG", "JOBEMBED_API_KEYS"
WARMUP_TEXT = "Warm-up: kierowca kat. C+E, transport międzynarodowy."
_EXAMPLE = {
    "texts": ["Kierowca kat. C+E do transportu międzynarodowego. Wymagamy prawa jazdy kat. C+E i karty kierowcy."],
    "top_k": 3,
}


class ClassifyRequest(BaseModel):
    """The body of ``POST /v1/classify``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [_EXAMPLE]})

    texts: list[str] = Field(description="Vacancy texts, raw; the bundle's cleaner (if any) is applied.")
    top_k: int | None = Field(None, ge=1, description="Labels to list per text [bundle's classify.top_k].")
    min_confidence: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Below this top probability the label is 'uncertain' [bundle's]. Not with target_accuracy.",
    )
    target_accuracy: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Instead of min_confidence: the threshold at which the bundled system's out-of-fold answers "
        "reached this accuracy.",
    )
    explain: bool = Field(False, description="Also return what the head read (cleaned text and extracted spans).")

    @field_validator("min_confidence", "target_accuracy", mode="before")
    @classmethod
    def _a_number(cls, v: Any) -> Any:
        if isinstance(v, float) and math.isnan(v):  # JSON's NaN: named, not "should be less than or equal to 1"
            raise ValueError("not a number (NaN); send a value from 0 to 1")
        return v


class ApiError(Exception):
    """An error answer: status, the request field it is about, and how to fix it."""

    def __init__(self, status: int, field: str | None, message: str, fix: str | None = None) -> None:
        super().__init__(message)
        self.status, self.field, self.message, self.fix = status, field, message, fix

    def body(self) -> dict[str, Any]:
        return {"error": {"status": self.status, "field": self.field, "message": self.message, "fix": self.fix}}


# ------------------------------------------------------------------------------------------------ batching


@dataclass
class _Job:
    texts: list[str]
    future: asyncio.Future


@dataclass
class BatchResult:
    """One request's share of a batch: probabilities and what the head read (None for raw-text bundles)."""

    proba: np.ndarray
    clean_texts: list[str] | None
    spans: list[list[dict[str, Any]]] | None


class MicroBatcher:
    """Gathers concurrent requests into one ``run(texts)`` call in a single worker thread.

    Args:
        run: texts -> (probabilities (n, n_classes), cleaner result or None); runs in the worker thread.
        enabled: False runs every request on its own (one encode call per request).
        wait_s: under load, how long to wait for more requests before encoding.
        max_texts: most texts in one call (a request is never split; a bigger one runs alone).
        on_batch: called with the number of texts of every call (metrics).
    """

    def __init__(
        self,
        run: Callable[[list[str]], tuple[np.ndarray, Any]],
        *,
        enabled: bool,
        wait_s: float,
        max_texts: int,
        on_batch: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.run, self.enabled, self.wait_s, self.max_texts, self.on_batch = run, enabled, wait_s, max_texts, on_batch
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jobembed-encode")
        self._carry: _Job | None = None
        self._busy = False  # the last batch held more than one request: the server is under load
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, texts: list[str]) -> BatchResult:
        job = _Job(texts, asyncio.get_running_loop().create_future())
        await self.queue.put(job)
        return await job.future

    async def _next(self) -> _Job:
        if self._carry is not None:
            job, self._carry = self._carry, None
            return job
        return await self.queue.get()

    async def _gather(self, first: _Job) -> list[_Job]:
        jobs, n = [first], len(first.texts)
        if not self.enabled:
            return jobs
        deadline = asyncio.get_running_loop().time() + (self.wait_s if self._busy else 0.0)
        while n < self.max_texts:
            try:
                job = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self.queue.get(), left)
                except TimeoutError:
                    break
            if job.future.done():
                continue  # timed out while queued
            if n + len(job.texts) > self.max_texts:
                self._carry = job
                break
            jobs.append(job)
            n += len(job.texts)
        return jobs

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next()
            if first.future.done():
                continue
            jobs = await self._gather(first)
            self._busy = len(jobs) > 1 or not self.queue.empty()
            texts = [t for j in jobs for t in j.texts]
            self.on_batch(len(texts))
            try:
                proba, cleaned = await loop.run_in_executor(self.executor, self.run, texts)
            except Exception as e:  # every waiting request gets the error, the loop keeps serving
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            start = 0
            for j in jobs:
                end = start + len(j.texts)
                if not j.future.done():
                    j.future.set_result(
                        BatchResult(
                            proba[start:end],
                            None if cleaned is None else cleaned.texts[start:end],
                            None if cleaned is None else [_spans(s) for s in cleaned.spans[start:end]],
                        )
                    )
                start = end


def _spans(spans: list[Any]) -> list[dict[str, Any]]:
    return [{"label": s.label, "text": s.text, "score": round(float(s.score), 3)} for s in spans]


# ------------------------------------------------------------------------------------------------ metrics


class Metrics:
    """Prometheus metrics of one worker; with ``PROMETHEUS_MULTIPROC_DIR`` set, ``/metrics`` sums all workers."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "jobembed_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "jobembed_request_seconds",
            "Request latency by endpoint",
            ["endpoint"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.texts = Counter("jobembed_texts", "Texts classified", registry=r)
        self.batch = Histogram(
            "jobembed_batch_texts", "Texts per encode call", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r
        )
        self.errors = Counter("jobembed_errors", "Error answers by kind", ["kind"], registry=r)
        self.cache_hits = Counter("jobembed_cache_hits", "Texts answered from the embedding cache", registry=r)
        self.cache_misses = Counter("jobembed_cache_misses", "Texts encoded", registry=r)
        self.predicted = Counter("jobembed_predicted", "Answers by predicted label (drift)", ["label"], registry=r)
        self.confidence = Histogram(
            "jobembed_confidence",
            "Top probability of each answer (drift)",
            buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0),
            registry=r,
        )

    def render(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest, multiprocess

        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


# ------------------------------------------------------------------------------------------------ service


class Service:
    """One worker's state: the bundle (loaded in the background at start), the batcher and the metrics."""

    def __init__(self, bundle_path: Path, config: ServeConfig, *, api_keys: list[str]) -> None:
        self.path, self.config = Path(bundle_path), config
        self.keys = [k.encode() for k in api_keys]
        self.metrics = Metrics()
        self.bundle: Bundle | None = None
        self.error: str | None = None
        self.batcher = MicroBatcher(
            self._run,
            enabled=config.batching,
            wait_s=batch_wait_s(config),
            max_texts=config.max_batch_texts,
            on_batch=self.metrics.batch.observe,
        )

    def load(self) -> None:
        """Verify and load the bundle, load the encoder (and cleaner) and run one warm-up text."""
        try:
            bundle = load_bundle(
                self.path,
                device=self.config.device,
                backend=None if self.config.backend is None else str(self.config.backend),
                cache=self.config.cache,
                memory_cache=self.config.cache_size,
                batch_size=encode_batch_size(self.config),
            )
            bundle.predict_proba_explained([WARMUP_TEXT])
            self.bundle = bundle
            logger.info("ready: bundle %s (%s, %s backend)", self.path, bundle.meta.system, bundle.backend)
        except JobembedError as e:
            self.error = str(e)
            logger.error("cannot serve %s: %s", self.path, e)
        except Exception as e:  # a worker must report, not die silently, so /readyz can say why
            self.error = f"{type(e).__name__}: {e}"
            logger.exception("cannot serve %s", self.path)

    def _run(self, texts: list[str]) -> tuple[np.ndarray, Any]:
        assert self.bundle is not None
        proba, cleaned = self.bundle.predict_proba_explained(texts)
        stats = self.bundle.embedder.last_stats
        self.metrics.cache_hits.inc(stats.n_cached)
        self.metrics.cache_misses.inc(stats.n_encoded)
        return proba, cleaned

    def authorize(self, header: str | None) -> None:
        if not self.keys:
            return
        scheme, _, token = (header or "").partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        ok = False
        for key in self.keys:  # compare with every key, so the time does not tell which one nearly matched
            ok |= hmac.compare_digest(given, key)
        if not ok:
            raise ApiError(
                401, "Authorization", "missing or wrong API key", fix="send the header Authorization: Bearer <key>"
            )

    def require_ready(self) -> Bundle:
        if self.bundle is None:
            raise ApiError(503, None, self.error or "the bundle is still loading", fix="retry when /readyz answers 200")
        return self.bundle

    def classify_config(self, req: ClassifyRequest) -> ClassifyConfig:
        if req.min_confidence is not None and req.target_accuracy is not None:
            raise ApiError(
                422,
                "min_confidence",
                "min_confidence and target_accuracy both set a confidence threshold",
                fix="send one of them",
            )
        try:
            return self.require_ready().classify_config(
                top_k=req.top_k, min_confidence=req.min_confidence, target_accuracy=req.target_accuracy
            )
        except JobembedError as e:
            raise ApiError(422, "target_accuracy", str(e).split(". Fix: ")[0], fix="send min_confidence") from None


def _on_cpu(config: ServeConfig) -> bool:
    return config.backend == "onnx-int8" or encoders.pick_device(config.device) == "cpu"  # ONNX runs on the CPU


def encode_batch_size(config: ServeConfig) -> int | None:
    """``serve.encode_batch_size``, or 1 on CPU and the bundle's own batch size on an accelerator."""
    if config.encode_batch_size is not None:
        return config.encode_batch_size
    return 1 if _on_cpu(config) else None


def batch_wait_s(config: ServeConfig) -> float:
    """``serve.batch_wait_ms`` in seconds, or 0 on CPU and 5 ms on an accelerator."""
    if config.batch_wait_ms is not None:
        return config.batch_wait_ms / 1000
    return 0.0 if _on_cpu(config) else 0.005


def parse_request(body: bytes, config: ServeConfig) -> ClassifyRequest:
    """The validated request, or an ApiError naming the field (UTF-8, JSON, types, limits, empty texts)."""
    try:
        raw = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(422, "body", f"not UTF-8 (byte {e.start})", fix="encode the JSON body as UTF-8") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ApiError(
            422, "body", f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})", fix="send a JSON object"
        ) from None
    except RecursionError:  # thousands of nested [ or {: the parser's stack ends before the body does
        raise ApiError(422, "body", "JSON nested too deeply", fix='send {"texts": [...]}, a list of strings') from None
    if not isinstance(data, dict):
        raise ApiError(422, "body", f"expected a JSON object, found {type(data).__name__}", fix='send {"texts": [...]}')
    try:
        req = ClassifyRequest.model_validate(data, strict=True)
    except ValidationError as e:
        err = e.errors()[0]
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".") or "body"
        raise ApiError(422, loc, err["msg"], fix="see the schema at /docs") from None
    if not req.texts:
        raise ApiError(422, "texts", "no texts", fix="send at least one text")
    if len(req.texts) > config.max_texts:
        raise ApiError(
            422, "texts", f"{len(req.texts)} texts, more than {config.max_texts}", fix="split the request into batches"
        )
    for i, text in enumerate(req.texts):
        if not text.strip():
            raise ApiError(422, f"texts[{i}]", "the text is empty", fix="send the vacancy text")
        if len(text) > config.max_chars:
            raise ApiError(
                422,
                f"texts[{i}]",
                f"{len(text)} characters, more than {config.max_chars}",
                fix="send the ad's text only",
            )
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(
                422, f"texts[{i}]", "holds an unpaired surrogate escape", fix="send valid Unicode text"
            ) from None
    return req


async def read_body(request: Any, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes (announced or streamed)."""
    announced = request.headers.get("content-length")
    if announced and announced.isdigit() and int(announced) > limit:
        raise ApiError(413, "body", f"{announced} bytes, more than {limit}", fix="send fewer or shorter texts")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, "body", f"more than {limit} bytes", fix="send fewer or shorter texts")
    return bytes(body)


# ------------------------------------------------------------------------------------------------ app


def api_keys_from_env() -> list[str]:
    """``JOBEMBED_API_KEYS``, comma-separated; unset or empty: no keys (the API is open).

    Raises:
        ConfigError: the variable is set but holds no key (``" , "``): serving it open would be a silent hole.
    """
    raw = os.environ.get(ENV_KEYS, "")
    keys = [k.strip() for k in raw.split(",") if k.strip()]
    if raw.strip() and not keys:
        raise ConfigError(
            f"{ENV_KEYS} is set ({raw!r}) but holds no key, so the API would answer without one",
            fix=f"set {ENV_KEYS} to comma-separated keys (e.g. key-one,key-two), or unset it to serve without keys",
        )
    return keys


def create_app(bundle_path: Path, config: ServeConfig | None = None, *, api_keys: list[str] | None = None) -> FastAPI:
    """The FastAPI app for one worker. ``api_keys`` default: ``JOBEMBED_API_KEYS`` (``api_keys_from_env``)."""
    config = config or ServeConfig()
    if api_keys is None:
        api_keys = api_keys_from_env()
    service = Service(bundle_path, config, api_keys=api_keys)
    _log_to_stderr()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        service.batcher.start()
        loader = asyncio.get_running_loop().run_in_executor(None, service.load)
        yield
        await service.batcher.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(loader, 1)

    app = FastAPI(
        title="jobembed",
        summary="Job-category predictions for vacancy texts from a jobembed bundle.",
        version="1",
        lifespan=lifespan,
    )
    app.state.service = service
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=config.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )

    @app.middleware("http")
    async def observe(request: Request, call_next: Callable) -> Response:
        start = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:
            # An unhandled error passes this middleware on its way to the 500 handler: count it here, so that
            # jobembed_requests_total holds the 500s that jobembed_errors_total counts.
            status = "500"
            raise
        else:
            status = str(response.status_code)
        finally:
            route = request.scope.get("route")
            endpoint = getattr(route, "path", "other")
            service.metrics.requests.labels(endpoint, status).inc()
            service.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        service.metrics.errors.labels(str(exc.status)).inc()
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        return await api_error(request, ApiError(422, where, err["msg"], fix="see the schema at /docs"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return await api_error(request, ApiError(exc.status_code, None, str(exc.detail)))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error on %s", request.url.path)
        return await api_error(request, ApiError(500, None, "internal error (see the server log)"))

    body_doc = {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": ClassifyRequest.model_json_schema(), "example": _EXAMPLE}},
        }
    }

    @app.post("/v1/classify", openapi_extra=body_doc, summary="Classify vacancy texts")
    async def classify(request: Request) -> dict[str, Any]:
        """Top-k categories with probabilities per text; 'uncertain' below the confidence threshold."""
        service.authorize(request.headers.get("authorization"))
        req = parse_request(await read_body(request, config.max_body_bytes), config)
        bundle = service.require_ready()
        cfg = service.classify_config(req)
        try:
            result = await asyncio.wait_for(service.batcher.submit(req.texts), config.request_timeout_s)
        except TimeoutError:
            raise ApiError(
                504, None, f"no answer within {config.request_timeout_s:g} s", fix="retry, or send fewer texts"
            ) from None
        predictions = bundle.decide(req.texts, result.proba, config=cfg, seen=result.clean_texts)
        out = []
        for i, p in enumerate(predictions):
            item = p.as_dict()
            if req.explain:
                item["input"] = {
                    "cleaned": result.clean_texts is not None,
                    "text": req.texts[i] if result.clean_texts is None else result.clean_texts[i],
                    "spans": [] if result.spans is None else result.spans[i],
                }
            out.append(item)
            service.metrics.predicted.labels(p.label).inc()
            service.metrics.confidence.observe(p.confidence)
        service.metrics.texts.inc(len(req.texts))
        return {"predictions": out, "min_confidence": cfg.min_confidence, "bundle": _bundle_info(bundle)}

    @app.get("/v1/labels", summary="The categories the bundle predicts")
    async def labels(request: Request) -> dict[str, Any]:
        service.authorize(request.headers.get("authorization"))
        bundle = service.require_ready()
        return {"labels": bundle.labels[bundle.labels["label"].isin(bundle.meta.classes)].to_dict(orient="records")}

    @app.get("/v1/info", summary="The bundle and the server's settings")
    async def info(request: Request) -> dict[str, Any]:
        service.authorize(request.headers.get("authorization"))
        bundle = service.require_ready()
        return {"bundle": _bundle_info(bundle), "serve": config.model_dump(mode="json")}

    @app.get("/healthz", summary="The process answers")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "pid": os.getpid()}

    @app.get("/readyz", summary="Bundle verified, encoder loaded, warm-up done")
    async def readyz() -> JSONResponse:
        if service.bundle is not None:
            return JSONResponse({"status": "ready"})
        detail = service.error or "loading"
        return JSONResponse({"status": "failed" if service.error else "loading", "detail": detail}, status_code=503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics(request: Request) -> Response:
        service.authorize(request.headers.get("authorization"))
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    page_html = resources.files("jobembed").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(page_html)

    if config.report:

        @app.get("/report", response_class=HTMLResponse, summary="The report the bundle was chosen by")
        async def report(request: Request) -> HTMLResponse:
            """The bundle's report page (figures and tables; no ad text), behind the API key. The page allows itself
            no request (its Content-Security-Policy), so the header repeats that policy."""
            service.authorize(request.headers.get("authorization"))
            bundle = service.require_ready()  # verified: report.html is among the hash-checked files
            page = (bundle.path / REPORT_PAGE).read_text(encoding="utf-8")
            return HTMLResponse(page, headers={"Content-Security-Policy": CSP})

    return app


def _bundle_info(bundle: Bundle) -> dict[str, Any]:
    m = bundle.meta
    return {
        "system": m.system,
        "created": m.created,
        "encoder": m.encoder.source_ref,
        "text_column": m.text_column,
        "classes": len(m.classes),
        "cleaner": m.cleaner.config.get("backend") if m.cleaner and m.text_column == "clean_text" else None,
    }


def _log_to_stderr() -> None:
    """jobembed's warnings (a read-only cache, a failed load) in the server log, next to uvicorn's lines."""
    root = logging.getLogger("jobembed")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     [%(process)d] %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)


def app_from_env() -> Any:
    """The uvicorn factory for each worker: the bundle and settings come from the environment the CLI set."""
    config = ServeConfig.model_validate_json(os.environ.get(ENV_CONFIG, "{}"))
    return create_app(Path(os.environ[ENV_BUNDLE]), config)


def check_bundle(path: Path, config: ServeConfig) -> Bundle:
    """Everything the workers will check, once, before any starts: format, file hashes, encoder fingerprint,
    cleaner. Raises BundleError (one line) on a bad bundle."""
    backend = None if config.backend is None else str(config.backend)
    bundle = load_bundle(path, device=config.device, backend=backend, cache=config.cache)
    bundle.embedder  # noqa: B018 - checks the encoder's fingerprint
    bundle.cleaner  # noqa: B018 - checks the cleaner's files
    if config.report and not (Path(path) / REPORT_PAGE).is_file():
        raise BundleError(
            f"serve.report is on, but the bundle {path} holds no report page",
            fix="bundle with `jobembed bundle RUN --report-page`, or serve without --report",
        )
    return bundle


def run_server(path: Path, config: ServeConfig) -> None:
    """Run uvicorn with ``config.workers`` workers (each loads the bundle) until interrupted."""
    import uvicorn

    os.environ[ENV_BUNDLE] = str(Path(path).resolve())
    os.environ[ENV_CONFIG] = config.model_dump_json()
    metrics_dir = None
    if config.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        metrics_dir = tempfile.TemporaryDirectory(prefix="jobembed-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir.name
    try:
        uvicorn.run(
            "jobembed.serve:app_from_env",
            factory=True,
            host=config.host,
            port=config.port,
            workers=config.workers,
            log_level="info",
            timeout_graceful_shutdown=10,
        )
    finally:
        if metrics_dir is not None:
            metrics_dir.cleanup()
