"""derta's Ray Serve application: generation, the refusal-position probe and an OpenAI-compatible API.

The package, one concern per module:

    protocol.py       request bodies (pydantic; they are the OpenAPI schema) and the errors models return
    engine.py         the HF engine: batched generate with per-row sampling/stops, tokenization, probe (no Ray)
    deployment.py     DertaModel, the Ray Serve model deployment: one Engine per replica, `@serve.batch`
    ingress.py        DertaIngress, the FastAPI app: API key, body limit, errors, /generate, /probe, /health ...
    openai_routes.py  /v1/models, /v1/completions, /v1/chat/completions
    errors.py         error responses and SSE framing
    app.py            (this module) building the application: `build_app` (the import path
                      serve/serve_config.yaml uses), `derta serve` (`run_local`)

Requests name models only from `serve.registry` or `serve.model_name`; no request field ever becomes a path.
"""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from ray import serve

from derta.config import REPO_ROOT, DertaConfig, load_config
from serve.deployment import DertaModel, deployment_name, model_deployment_options, model_sources
from serve.engine import GenerationJob, RowDecoder, run_generate  # noqa: F401  (re-exported)
from serve.ingress import DertaIngress, check_exposure, ingress_deployment_options
from serve.protocol import BuildArgs


def bind_app(cfg: DertaConfig, model: str | None = None):
    """The Serve application for `cfg`; `model` overrides `cfg.model.name_or_path` for the default name."""
    api_key = cfg.serve.api_key or os.environ.get("DERTA_API_KEY") or None
    cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"api_key": api_key})})
    config = cfg.model_dump(mode="json")
    options = model_deployment_options(cfg.serve)
    sources = model_sources(cfg, model)
    check_served_tokens(cfg, sources)
    handles = {name: DertaModel.options(name=deployment_name(name, cfg.serve.model_name), **options)
               .bind(config, name, source) for name, source in sources.items()}
    return DertaIngress.options(**ingress_deployment_options(cfg.serve, len(handles))).bind(handles, config)


def check_served_tokens(cfg: DertaConfig, sources: dict) -> None:
    """Refusal/probe strings against each served model's tokenizer, on the driver: a bad string is a ConfigError
    naming the field here, not a replica that never becomes healthy."""
    from derta.preflight import check_tokens, load_run_tokenizer
    from serve.deployment import resolve_source
    from serve.engine import tokenizer_source

    for source in sources.values():
        path = resolve_source(cfg, source)
        check_tokens(cfg, load_run_tokenizer(cfg, tokenizer_source(cfg, path, source.get("adapter"))))


def build_app(args: dict):
    """Serve import path `serve.app:build_app`; args: {config, model?, set?}."""
    parsed = BuildArgs.model_validate(args or {})
    config = parsed.config
    if config and not Path(config).exists() and (REPO_ROOT / config).exists():
        config = str(REPO_ROOT / config)  # `configs/tiny.yaml` from any working directory
    return bind_app(load_config(config, parsed.set), parsed.model)


def default_model_path(cfg: DertaConfig, runs_dir: Path | str | None = None) -> str:
    """The newest `runs/*/final` checkpoint; with none, train one with `cfg` first."""
    runs = Path(runs_dir) if runs_dir else REPO_ROOT / "runs"
    finals = [p for p in runs.glob("*/final")
              if (p / "config.json").exists() or (p / "adapter_config.json").exists()]
    if finals:
        return str(max(finals, key=lambda p: p.stat().st_mtime))
    from derta.trainer import run_training

    print(f"[derta] no checkpoint under {runs}/*/final; training one with the current config first", flush=True)
    return str(run_training(cfg))


# Ray Serve settings for the instance `derta serve` starts (its proxy and replicas inherit the environment; a
# running cluster keeps its own): the proxy's and ingress's handles route on their main event loop instead of a
# second thread (one thread hop less per request), and Serve's per-request access log lines go to the log files
# only, not also to stderr, from where Ray shipped each one to the driver's console. Both are part of Ray's
# RAY_SERVE_THROUGHPUT_OPTIMIZED profile; in bench_serve.py's overload burst they took the 503s' p50 from 76 to
# 68 ms (keep-alive clients, one run each, load ~60).
SERVE_PROCESS_ENV = {"RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0", "RAY_SERVE_LOG_TO_STDERR": "0"}


def start_local(cfg: DertaConfig, model: str, port: int | None = None) -> str:
    """Start Ray if needed, Serve's HTTP proxy on `serve.host` and the app at '/'; returns the base URL."""
    from derta.runtime import init_ray

    check_exposure(cfg.serve.host, cfg.serve.api_key or os.environ.get("DERTA_API_KEY"), cfg.serve.insecure)
    for key, value in SERVE_PROCESS_ENV.items():
        os.environ.setdefault(key, value)
    init_ray()
    port = port or cfg.serve.port
    serve.start(http_options={"host": cfg.serve.host, "port": port})
    serve.run(bind_app(cfg, model), name="derta", route_prefix="/", blocking=False)
    return f"http://{cfg.serve.host}:{port}"


def run_local(cfg: DertaConfig, model: str | None = None, port: int | None = None) -> None:
    """`derta serve`: serve `model` (default: the newest local checkpoint), block until SIGINT/SIGTERM."""
    model = model or default_model_path(cfg)
    url = start_local(cfg, model, port)
    print(f"[derta] serving {model} at {url} (Ctrl-C to stop)", flush=True)
    try:
        wait_for_signal()
    finally:
        serve.shutdown()


def wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM; the previous handlers are restored afterwards."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(1.0):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
