"""Helpers for the tests that run the Serve app over HTTP (tests/test_serve*.py)."""
from __future__ import annotations

import json
import socket
import time


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
