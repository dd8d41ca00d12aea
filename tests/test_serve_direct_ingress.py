"""`derta serve` with `serve.direct_ingress` (the default): the ingress replica serves HTTP on its own port, HAProxy
on `--port` forwards to it (no Python proxy hop), and overload on either ends in 503 + Retry-After, never another
5xx.

Its own Ray instance (direct ingress is read when Serve's controller and replicas start), so a subprocess.
Deterministic: admitted requests are held by a long batch wait, never by timing; only invariants are asserted."""
from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.serve_utils import free_port, sse_events, wait_ready

REPO = Path(__file__).resolve().parent.parent
CAPACITY = 4  # max_ongoing_requests 2 + max_queued_requests 2
HOLD_S = 20  # batch wait: admitted requests sit in one open batch while the burst arrives


def read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)


def haproxy_config(root_pid: int) -> str:
    """The config file of the HAProxy running under process `root_pid` (`-f CONFIG` on its command line)."""
    import psutil

    for child in psutil.Process(root_pid).children(recursive=True):
        try:
            args = child.cmdline()
        except psutil.Error:
            continue
        if "-f" in args and Path(args[0]).name in ("haproxy", "haproxy_503.sh"):
            return Path(args[args.index("-f") + 1]).read_text()
    raise AssertionError(f"no HAProxy under process {root_pid}")


@pytest.mark.slow
def test_direct_ingress_serves_without_the_proxy_and_rejects_overload_with_retry_after(tiny_config, tiny_path,
                                                                                        tmp_path):
    import httpx

    from derta.config import ServeConfig

    port = free_port()
    env = dict(os.environ, DERTA_RAY_REUSE="0", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.pop("RAY_ADDRESS", None)
    env.pop("DERTA_HAPROXY_POOL_PURGE_DELAY", None)  # the script's default
    sets = [f"model.tiny_dir={tiny_config.model.tiny_dir}",  # serve.direct_ingress: on by default
            "serve.max_ongoing_requests=2", "serve.max_queued_requests=2", "serve.max_batch_size=64",
            f"serve.batch_wait_timeout_s={HOLD_S}", "serve.batch_fill_fraction=0"]
    command = [sys.executable, "-m", "derta.cli", "serve", "--model", tiny_path, "--port", str(port)]
    for item in sets:
        command += ["--set", item]
    proc = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=read_lines, args=(proc.stdout, lines), daemon=True).start()
    console, direct = [], None
    try:
        deadline = time.monotonic() + 900
        while direct is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                line = lines.get(timeout=5)
            except queue.Empty:
                continue
            console.append(line)
            match = re.search(r"direct ingress \(no proxy hop\): (\S+)", line)
            direct = match[1] if match else None
        assert direct, "no direct ingress URL printed:\n" + "".join(console[-40:])
        assert not direct.endswith(f":{port}")  # its own port, not the proxy's

        with httpx.Client(base_url=direct, timeout=600) as http:
            wait_ready(http, timeout=600)
            health = http.get("/health")
            assert health.status_code == 200 and health.headers.get("x-request-id")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            assert http.get("/health").status_code == 200  # the proxy still routes to the same app
        # the HAProxy Ray started for it (a descendant: driver -> raylet -> HAProxy manager actor -> haproxy) runs
        # with derta's keep-alive (Serve's http_options, which the replicas' HTTP servers also get) and purge delay
        haproxy = haproxy_config(proc.pid)
        keep_alive = ServeConfig().keep_alive_timeout_s
        assert f"timeout http-keep-alive {keep_alive}s" in haproxy and "pool-purge-delay 60s" in haproxy, haproxy

        for base in (f"http://127.0.0.1:{port}", direct):  # --port (HAProxy in front), then the replica's own
            def one(i: int, base=base):
                with httpx.Client(base_url=base, timeout=600) as http:
                    return http.post("/generate", json={"prompt": f"question {i}", "max_new_tokens": 2})

            with ThreadPoolExecutor(4 * CAPACITY) as pool:
                responses = list(pool.map(one, range(4 * CAPACITY)))
            statuses = [r.status_code for r in responses]
            assert set(statuses) <= {200, 503}, (base, statuses)  # no other 5xx
            assert 1 <= statuses.count(200) <= CAPACITY, (base, statuses)
            for rejected in (r for r in responses if r.status_code == 503):
                assert rejected.headers.get("retry-after"), rejected.headers
                assert set(rejected.json()["error"]) == {"message", "type", "param", "code"}
            with httpx.Client(base_url=base, timeout=600) as http:  # healthy afterwards
                assert http.get("/health").status_code == 200
                info = http.get("/info").json()
                assert info["admission_capacity"] in (None, CAPACITY)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as http:  # a stream through HAProxy
            response = http.post("/generate", json={"prompt": "question", "max_new_tokens": 3, "stream": True})
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
            assert response.headers.get("x-request-id")
            events = sse_events(response)
            assert events[0]["type"] == "start" and events[-1]["type"] == "final", events
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_direct_ingress_is_set_for_the_instance_derta_serve_starts_and_its_absence_is_said(monkeypatch):
    import logging

    from ray.serve._private import constants

    from derta.config import load_config
    from serve.app import CHOSEN_PORTS_ENV, DIRECT_INGRESS_ENV, HA_PROXY_ENV, HAPROXY_PORT_ENVS, set_serve_process_env
    from serve.ingress import warn_without_direct_ingress

    # a private copy of the environment: nothing set here may reach a Ray instance started later in this session
    ours = (DIRECT_INGRESS_ENV, HA_PROXY_ENV, CHOSEN_PORTS_ENV, *HAPROXY_PORT_ENVS,
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S")
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in ours})
    set_serve_process_env(load_config("tiny", ["serve.direct_ingress=false"]))  # the off switch
    assert DIRECT_INGRESS_ENV not in os.environ and HA_PROXY_ENV not in os.environ
    set_serve_process_env(load_config("tiny"))  # on by default: HAProxy on --port in front of the ingress replicas
    assert os.environ[DIRECT_INGRESS_ENV] == "1" and os.environ[HA_PROXY_ENV] == "1"
    assert float(os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"]) < 30  # Ctrl-C needs no 30 s drain
    first = [int(os.environ[key]) for key in HAPROXY_PORT_ENVS]
    assert len(set(first)) == len(HAPROXY_PORT_ENVS) and not {8404, 9101, 8500, 9500} & set(first)  # not the defaults
    set_serve_process_env(load_config("tiny"))  # the next instance (or a child `derta serve`) gets its own ports
    second = [int(os.environ[key]) for key in HAPROXY_PORT_ENVS]
    assert all(port > 0 for port in second) and sorted(os.environ[CHOSEN_PORTS_ENV].split(",")) == sorted(
        HAPROXY_PORT_ENVS)
    os.environ[CHOSEN_PORTS_ENV], os.environ[HAPROXY_PORT_ENVS[0]] = "", "18404"  # set by the user: kept
    set_serve_process_env(load_config("tiny"))
    assert os.environ[HAPROXY_PORT_ENVS[0]] == "18404"

    monkeypatch.setattr(constants, "RAY_SERVE_ENABLE_DIRECT_INGRESS", False)
    assert not warn_without_direct_ingress(False)
    # capture the call itself: Serve started in this process earlier in the session may have raised the level of
    # (or disabled) its logger, so a handler would see nothing when this test runs after other Serve tests
    warnings: list[str] = []
    monkeypatch.setattr(logging.getLogger("ray.serve"), "warning",
                        lambda message, *args, **kwargs: warnings.append(message % args if args else message))
    assert warn_without_direct_ingress(True)
    assert any(DIRECT_INGRESS_ENV in message for message in warnings), warnings
    monkeypatch.setattr(constants, "RAY_SERVE_ENABLE_DIRECT_INGRESS", True)
    assert not warn_without_direct_ingress(True)
