"""Helpers for the tests that run the Serve app over HTTP (tests/test_serve*.py)."""
from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def restored_environ():
    """os.environ as it was before, afterwards: `start_local` (what `derta serve` runs) sets Serve's and HAProxy's
    variables for the Ray instance it starts (serve/app.py set_serve_process_env), which in `derta serve` die with
    its process but in pytest would reach every later test and the subprocesses they start (tests/conftest.py
    `no_serve_env_leak` fails a module that leaks one)."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        os.environ.update(saved)


def wait_ready(client, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if client.get("/ready").status_code == 200:
            return
        time.sleep(0.2)
    raise TimeoutError("the app never became ready")


def sse_events(response) -> list:
    lines = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]
