"""``jobembed serve``, and the same command alone as ``jobembed-serve``: it imports the server and the bundle, not the
training stages, so it runs in an image without PyTorch (dockerfiles/serve.Dockerfile: an int8 ONNX encoder in the
bundle, NumPy heads)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from jobembed.cli.base import DeviceOpt, OneLineErrors, console, friendly, overrides
from jobembed.config import load_section
from jobembed.sections import ServeBackend, ServeConfig


@friendly
def serve_command(
    ctx: typer.Context,
    bundle: Annotated[
        Path | None, typer.Option("--bundle", help="Bundle folder (default: newest under --runs-dir).")
    ] = None,
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="Where to look for the newest bundle.")] = Path("runs"),
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML with a serve: section (see configs/serve.yaml).")
    ] = None,
    serve__host: Annotated[
        str | None, typer.Option("--host", help="Address to listen on (default: 127.0.0.1).")
    ] = None,
    serve__port: Annotated[int | None, typer.Option("--port", min=0, max=65535, help="Port (default: 8000).")] = None,
    serve__workers: Annotated[
        int | None, typer.Option("--workers", min=1, help="Worker processes, each with its own model (default: 1).")
    ] = None,
    serve__backend: Annotated[
        ServeBackend | None,
        typer.Option(
            "--backend",
            help="torch, or onnx-int8: the encoder exported to int8 ONNX, faster on CPU (default: the bundle's).",
        ),
    ] = None,
    serve__batching: Annotated[
        bool | None, typer.Option("--batching/--no-batching", help="Micro-batch concurrent requests (default: on).")
    ] = None,
    serve__batch_wait_ms: Annotated[
        float | None,
        typer.Option("--batch-wait-ms", min=0, help="Under load, wait for more requests (default: GPU 5, CPU 0)."),
    ] = None,
    serve__cache: Annotated[
        bool | None,
        typer.Option("--cache/--no-cache", help="Answer repeated texts from the embedding cache (default: on)."),
    ] = None,
    serve__device: DeviceOpt = None,
    serve__report: Annotated[
        bool | None,
        typer.Option("--report/--no-report", help="Show the bundle's report page at /report (bundle --report-page)."),
    ] = None,
) -> None:
    """Serve a bundle over HTTP (FastAPI): classify, labels, health, metrics and a page to paste an ad.

    Endpoints: POST /v1/classify, GET /v1/labels, /v1/info, /healthz, /readyz, /metrics, a page at / to paste an ad, and
    with --report the bundle's report page at /report (behind the API key). The bundle is verified first (format, the
    hash of every file and of bundle.json's answer-changing fields, encoder fingerprint); API keys come from
    JOBEMBED_API_KEYS (comma-separated; a list with no key in it refuses to start). With --cache, repeated texts are
    answered from a bounded in-memory cache of vectors (serve.cache_size texts); nothing is written to disk."""
    from jobembed.bundle import find_latest_bundle
    from jobembed.serve import api_keys_from_env, check_bundle, run_server

    values, flags = overrides(dict(locals()), ctx)
    cfg = load_section(config, "serve", ServeConfig, values, flags=flags)
    keys = f"on ({len(api_keys_from_env())})" if api_keys_from_env() else "off"
    path = bundle or find_latest_bundle(runs_dir)
    meta = check_bundle(path, cfg).meta
    console.print(
        f"[green]serving[/] {path}: {meta.system} on {meta.encoder.source_ref}, {len(meta.classes)} categories, "
        f"{cfg.backend or meta.encoder.backend} backend, {cfg.workers} worker(s), API keys {keys}: http://{cfg.host}:{cfg.port}/"
    )
    run_server(path, cfg)


app = typer.Typer(
    cls=OneLineErrors,
    add_completion=False,
    help="Serve a jobembed bundle over HTTP (the `jobembed serve` command alone, without the training stack).",
)
app.command()(serve_command)  # one command: `jobembed-serve --bundle DIR`, no subcommand to type

if __name__ == "__main__":
    app()
