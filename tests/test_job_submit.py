"""The README's `ray job submit` path, as documented, against a fresh private head with Ray 2.60 token auth:

    export RAY_AUTH_MODE=token
    ray get-auth-token --generate        # creates ~/.ray/auth_token if there is none
    ray start --head
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/prepare.py ...   (train, eval)

The only differences from the README are what isolation needs: HOME is a temp dir (the token file lands there,
never in the user's ~/.ray) and the head has a private --temp-dir, loopback IP and free ports (tests/multinode_utils).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from multinode_utils import HEAD_IP, LocalCluster, loopback_ok, tool

REPO = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(2400),  # bounded by the waits inside; a loaded 2-core machine needs more than 900 s
    pytest.mark.skipif(tool("ray") is None, reason="the `ray` CLI is not installed"),
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process cleanup reads /proc (Linux only)"),
    pytest.mark.skipif(not loopback_ok(HEAD_IP), reason=f"cannot listen on {HEAD_IP}"),
]


def test_documented_ray_job_submit_runs_prepare_train_eval(tiny_path, tmp_path_factory):
    root = Path(tempfile.mkdtemp(prefix="rjs", dir="/tmp"))  # short: Ray's Unix socket paths live under it
    out = tmp_path_factory.mktemp("job_submit")
    # 4 logical CPUs as in `derta`'s local instance: 2 train workers and a Ray Data stage fit side by side
    cluster = LocalCluster(root, out / "logs", num_cpus=4, home=out / "home")
    try:
        cluster.start_head()
        small = ["--set", f"model.name_or_path={tiny_path}", "--set", "data.synthetic.n_helpful=120",
                 "--set", "data.synthetic.n_harmful=40", "--set", "data.synthetic.n_lookalike=10",
                 "--set", "data.max_length=128"]
        jobs = {
            "prepare": ["jobs/prepare.py", *small, "--output", str(out / "prepared")],
            "train": ["jobs/train.py", "--config", "configs/tiny.yaml", *small, "--set", "train.max_steps=2",
                      "--set", "train.log_every=1", "--output", str(out / "run")],
            "eval": ["jobs/eval.py", "--model", str(out / "run" / "final"), "--suite", "synthetic_prefill",
                     *small, "--set", "eval.limit=2", "--set", "eval.prefill_ks=[0]",
                     "--set", "eval.max_new_tokens=8", "--output", str(out / "eval")],
        }
        for name, args in jobs.items():
            # exactly the README's command line, run from the repository root
            proc = cluster.run(tool("ray"), "job", "submit", "--address", cluster.dashboard_url,
                               "--working-dir", ".", "--", "python", *args, timeout=600, check=False, cwd=REPO)
            log = proc.stdout + proc.stderr
            (out / f"{name}.log").write_text(log)
            assert proc.returncode == 0 and "succeeded" in log, f"`ray job submit` {name} failed:\n{log[-4000:]}"
            assert "Authentication required" not in log
    finally:
        survivors = cluster.shutdown()
        shutil.rmtree(root, ignore_errors=True)
        assert not survivors, f"processes survived the cluster teardown: {survivors}"

    stats = json.loads((out / "prepared" / "stats.json").read_text())
    assert stats["source_rows"] > 0 and sum(stats["examples_by_kind"].values()) > 0
    assert json.loads((out / "run" / "run.json").read_text())["total_steps"] == 2
    assert (out / "run" / "final" / "config.json").exists()
    assert any((out / "eval").iterdir())
