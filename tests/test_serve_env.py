"""Serve's environment stays with the test that set it: tests/conftest.py `no_serve_env_leak` fails a module that
leaves a Serve/HAProxy variable set (after putting it back), and tests/serve_utils.py `restored_environ`, around an
in-process Serve start, leaves nothing behind.

A pytest of its own in a subprocess on a copy of those two files, with modules that call the real
`set_serve_process_env` (what `start_local` / `derta serve` call before Ray starts); no Ray or Serve is started.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import SERVE_ENV_PREFIXES

TESTS = Path(__file__).resolve().parent
SETS_SERVE_ENV = """
from derta.config import load_config
from serve.app import set_serve_process_env
"""


def test_a_module_that_leaks_serve_variables_fails_and_later_modules_start_clean(tmp_path):
    for name in ("conftest.py", "serve_utils.py"):
        shutil.copy(TESTS / name, tmp_path / name)
    (tmp_path / "test_1_leaks.py").write_text(SETS_SERVE_ENV + """
def test_sets_them():
    set_serve_process_env(load_config("tiny"))
""")
    (tmp_path / "test_2_restores.py").write_text(SETS_SERVE_ENV + """
import os
from serve_utils import restored_environ

def test_starts_clean_and_leaves_nothing():
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in os.environ  # the guard put back what test_1 left
    with restored_environ():
        set_serve_process_env(load_config("tiny"))
        assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
""")
    (tmp_path / "test_3_after.py").write_text("""
import os

def test_clean():
    assert not any(key.startswith("RAY_SERVE_") for key in os.environ)
""")
    env = {key: value for key, value in os.environ.items() if not key.startswith(SERVE_ENV_PREFIXES)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS.parent), env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:warnings",
                          str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert "3 passed, 1 error" in out, out  # test_1 passes itself; its module's teardown is the error
    assert "test_1_leaks left Serve's environment changed" in out and "RAY_SERVE_ENABLE_HA_PROXY='1'" in out, out
    assert "RAY_SERVE_HAPROXY_BINARY_PATH" in out and "test_2_restores left" not in out, out
