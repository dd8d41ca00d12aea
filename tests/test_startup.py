"""`derta train` as a user runs it: a fresh process that starts its own (lean) private Ray instance.

The lean instance (derta.runtime: no dashboard, no placement-group cleaner, no preemption watcher) is only ever
started by a `derta train` process of its own; the rest of the suite shares one full instance (`ray_session`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_train_cli_on_a_lean_private_instance_trains_and_prints_only_our_lines(tiny_config, tmp_path):
    env = dict(os.environ, DERTA_RAY_REUSE="0", DERTA_CACHE_DIR=str(tmp_path / "cache"), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.pop("RAY_ADDRESS", None)
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "derta.cli", "train", "--set", f"model.tiny_dir={tiny_config.model.tiny_dir}",
         "--set", "train.max_steps=2", "--set", "train.log_every=1", "--output", str(run)],
        env=env, capture_output=True, text=True, cwd=tmp_path, timeout=1200)
    console = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode == 0, "\n".join(console[-60:])
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert (run / "final" / "config.json").exists()
    # our lines, progress lines and the result only: nothing from Ray about its helper actors or the dashboard
    foreign = [line for line in console if line.strip() and not line.startswith(("[derta]", "final model:"))]
    assert not foreign, "\n".join(foreign)
