"""A real multi-node run on one machine: a head node and a second node (two `ray start` processes, two loopback
IPs), a `ray job submit` training job with one Ray Train worker per node that survives losing the second node, and
the Serve app with one DertaModel replica per node that keeps answering while that node dies and comes back.

This module never uses the session `ray_session` fixture and never calls `ray.init` in the pytest process: the
cluster, the job and Serve are driven through subprocesses only (see tests/multinode_utils.py for how the cluster
is isolated from any other Ray instance on the machine and how every process it starts is stopped by PID).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from multinode_utils import HEAD_IP, HEAD_RESOURCE, NODE2_IP, LocalCluster, free_ports, loopback_ok, tool

REPO = Path(__file__).resolve().parent.parent
TOTAL_STEPS = 20
CHECKPOINT_EVERY = 4
LOG_EVERY = 2
# generous bounds: on a 2-core machine at a load average of 50+, the first checkpoint came after more than 240 s
CHECKPOINT_WAIT_S, FINISH_WAIT_S = 900, 900
NODE_DOWN_S = 3  # the second node stays dead this long, plus as long as `ray start` takes to bring it back
OK_OR_FAILOVER = {200, 500, 502, 503, 504}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(2400),  # bounded by the waits inside; a loaded 2-core machine needs more than 900 s
    pytest.mark.skipif(tool("ray") is None or tool("serve") is None, reason="the `ray`/`serve` CLIs are not installed"),
    pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="a two-node cluster needs at least 2 CPU cores"),
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process cleanup reads /proc (Linux only)"),
    pytest.mark.skipif(not loopback_ok(HEAD_IP, NODE2_IP),
                       reason=f"cannot listen on {HEAD_IP}/{NODE2_IP} (loopback beyond 127.0.0.1 is Linux-only)"),
]

TRAINED: dict[str, Path] = {}  # the training test's final checkpoint, served by the Serve test


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head + second node, torn down (every PID they started) even when a test fails."""
    root = Path(tempfile.mkdtemp(prefix="rmn", dir="/tmp"))  # short: Ray's Unix socket paths live under it
    logs = tmp_path_factory.mktemp("multinode_logs")
    cluster = LocalCluster(root, logs)
    try:
        cluster.start_head()
        cluster.start_node2()
        yield cluster
    finally:
        survivors = cluster.shutdown()
        if not os.environ.get("DERTA_KEEP_RAY_TMP"):  # set it to keep the nodes' Ray logs for debugging
            shutil.rmtree(root, ignore_errors=True)
        assert not survivors, f"processes survived the cluster teardown: {survivors}"


def _metrics_steps(run: Path) -> list[int]:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    steps = []
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass  # a line being written right now
    return steps


def test_training_job_spans_two_nodes_and_resumes_after_node_loss(cluster, tiny_path, tmp_path):
    """`ray job submit` of jobs/train.py with 2 workers and STRICT_SPREAD: one worker per node. The second node's
    raylet is SIGKILLed after a checkpoint; the run can't be re-placed until the node returns, then resumes from
    the checkpoint and completes exactly the planned steps."""
    run = tmp_path / "run"
    submission_id = f"derta-multinode-{uuid.uuid4().hex[:8]}"
    overrides = {
        "model.name_or_path": tiny_path, "data.max_length": 128,
        "data.synthetic.n_helpful": 200, "data.synthetic.n_harmful": 60, "data.synthetic.n_lookalike": 20,
        "train.num_workers": 2, "train.placement_strategy": "STRICT_SPREAD", "train.max_steps": TOTAL_STEPS,
        "train.checkpoint_every": CHECKPOINT_EVERY, "train.log_every": LOG_EVERY, "train.max_failures": 2,
    }
    runtime_env = {
        "excludes": [".venv", "runs", ".git", "__pycache__", ".pytest_cache", "*.egg-info"],
        # Ray 2.60: Train's PlacementGroupCleaner calls the state API without an address; with a second Ray
        # instance on the machine (this test session's own) it raises "Found multiple active Ray instances".
        "env_vars": {"RAY_ADDRESS": cluster.gcs_address},
    }
    submit = [tool("ray"), "job", "submit", "--address", cluster.dashboard_url, "--submission-id", submission_id,
              "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--",
              "python", "jobs/train.py", "--config", "configs/tiny.yaml",
              *[a for key, value in overrides.items() for a in ("--set", f"{key}={value}")], "--output", str(run)]
    submit_log = tmp_path / "submit.log"
    job = cluster.popen(submit, submit_log)

    # kill the second node once a checkpoint is registered (the controller's snapshot exists) and at least one
    # logged step lies beyond it, so the resumed run must redo steps without duplicating them in metrics.jsonl
    deadline = time.time() + CHECKPOINT_WAIT_S
    with ThreadPoolExecutor(1) as pool:
        before = None
        while True:
            steps = _metrics_steps(run)
            if steps and before is None:
                before = pool.submit(cluster.state)  # training is under way: both workers are placed
            registered = (run / "checkpoints" / "derta" / "checkpoint_manager_snapshot.json").exists()
            if registered and steps and steps[-1] >= CHECKPOINT_EVERY + LOG_EVERY and before and before.done():
                break
            assert job.poll() is None, f"the job ended before the node was killed:\n{submit_log.read_text()[-4000:]}"
            assert time.time() < deadline, \
                f"no checkpoint after {CHECKPOINT_WAIT_S}s:\n{submit_log.read_text()[-4000:]}"
            time.sleep(0.2)
        before = before.result()
    head, lost = cluster.head.node_id, cluster.node2.node_id
    cluster.kill_node2()
    # read after the kill (training may have advanced since the loop's last look): with the second worker dead no
    # further step can complete, and a checkpoint's step is always logged before it is reported
    killed_at = max(_metrics_steps(run))
    assert killed_at < TOTAL_STEPS, "training finished before the node could be killed"
    time.sleep(NODE_DOWN_S)
    cluster.start_node2()

    try:
        job.wait(timeout=FINISH_WAIT_S)
    except Exception:
        pytest.fail(f"the job did not finish after the node returned:\n{submit_log.read_text()[-4000:]}")
    logs = cluster.run(tool("ray"), "job", "logs", "--address", cluster.dashboard_url, submission_id).stdout
    (tmp_path / "job.log").write_text(logs)
    assert job.returncode == 0 and "succeeded" in submit_log.read_text(), submit_log.read_text()[-4000:]

    # the run resumed from a checkpoint (not from scratch) and logged every planned step exactly once
    resumed = [int(s) for s in re.findall(r"\[derta\] resumed at step (\d+)", logs)]
    assert resumed and all(0 < s <= killed_at and s % CHECKPOINT_EVERY == 0 for s in resumed), (resumed, killed_at)
    assert _metrics_steps(run) == list(range(LOG_EVERY, TOTAL_STEPS + 1, LOG_EVERY))
    assert json.loads((run / "run.json").read_text())["total_steps"] == TOTAL_STEPS
    assert (run / "final" / "config.json").exists() and (run / "final" / "tokenizer.json").exists()
    assert list((run / "checkpoints").rglob("trainer_state.pt"))

    # placement: before the kill one worker per node; after it, the lost worker came back on the returned node
    first = [a["node_id"] for a in before["actors"] if a["class_name"] == "RayTrainWorker" and a["state"] == "ALIVE"]
    assert sorted(first) == sorted([head, lost]), (first, head, lost)
    # (how many attempts it took to re-place the group on a loaded machine is not part of the contract: only the
    # first attempt could use the lost node, and the attempt that finished had one worker on each live node)
    returned = cluster.node2.node_id
    workers = Counter(a["node_id"] for a in cluster.state()["actors"] if a["class_name"] == "RayTrainWorker")
    assert returned != lost and set(workers) == {head, lost, returned}, workers
    assert workers[lost] == 1 and workers[head] >= 2 and workers[returned] >= 1, workers
    TRAINED["final"] = run / "final"


class Load:
    """Client threads POSTing /generate in a loop; every request is recorded with its outcome. The client timeout is
    generous: a request that is slow because the machine is loaded is still answered; only a hung one is not."""

    def __init__(self, url: str, threads: int = 4, timeout: float = 120):
        self.url, self.timeout = url, timeout
        self.results: list[dict] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join(self.timeout + 5)

    def _loop(self, index: int) -> None:
        import httpx

        with httpx.Client(timeout=self.timeout) as client:
            n = 0
            while not self.stop.is_set():
                started = time.time()
                record = {"t": started}
                try:
                    response = client.post(self.url, json={"prompt": f"How do I bake bread? ({index}.{n})",
                                                           "max_new_tokens": 8})
                    record.update(status=response.status_code, retry_after=response.headers.get("retry-after"),
                                  detail=None if response.status_code == 200 else response.text[:200])
                except Exception as err:  # a hung (timeout) or dropped connection: never acceptable
                    record.update(status=None, retry_after=None, detail=repr(err)[:200])
                record["end"] = time.time()
                self.results.append(record)
                n += 1
                time.sleep(0.05)

    def between(self, start: float, end: float) -> list[dict]:
        """Requests sent in [start, end)."""
        return [r for r in self.results if start <= r["t"] < end]

    def wait_successes(self, count: int, since: float, timeout: float) -> float:
        """Wait until `count` requests sent after `since` succeeded; returns when the last of them was sent. Only
        successes are counted: an occasional 503 (a loaded replica shedding load) doesn't restart the count."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            ok = [r["t"] for r in list(self.results) if r["t"] >= since and r["status"] == 200]
            if len(ok) >= count:
                return sorted(ok)[count - 1]
            time.sleep(0.2)
        raise TimeoutError(f"fewer than {count} successes in {timeout:.0f}s; last: {self.results[-5:]}")


def _retry_after_ok(value: str | None) -> bool:
    """Retry-After is optional on our 503s; when present it must be delay-seconds (RFC 9110 10.2.3)."""
    return value is None or (value.strip().isdigit() and int(value) >= 0)


def _replicas(cluster: LocalCluster) -> list[str]:
    """Node ids of the ALIVE DertaModel replica actors."""
    return [a["node_id"] for a in cluster.state()["actors"]
            if a["class_name"].endswith(":DertaModel") and a["state"] == "ALIVE"]


class NodeLost(RuntimeError):
    """The second node died on its own while Serve was placing a replica on it."""


def _wait_serving(cluster: LocalCluster, timeout: float) -> dict:
    """Until Serve reports 2 RUNNING DertaModel replicas. Raises NodeLost when the GCS marks the second node DEAD
    meanwhile (nothing in the test killed it; Serve cannot place the replica anywhere else, so waiting is futile)."""
    deadline, node_id, checked = time.time() + timeout, cluster.node2.node_id, 0.0
    status = {}
    while time.time() < deadline:
        status = cluster.serve_status()
        app = (status.get("applications") or {}).get("derta") or {}
        states = ((app.get("deployments") or {}).get("DertaModel") or {}).get("replica_states") or {}
        if app.get("status") == "RUNNING" and states == {"RUNNING": 2}:
            return status
        if time.time() - checked > 10:  # the state API is slow on a loaded machine: look now and then
            checked = time.time()
            node = next((n for n in cluster.state()["nodes"] if n["node_id"] == node_id), {})
            if node.get("state") == "DEAD":
                raise NodeLost(f"node {cluster.node2.name} ({node_id}) died on its own: {json.dumps(node)[:1500]}")
        time.sleep(1)
    raise TimeoutError(f"Serve never had 2 RUNNING DertaModel replicas:\n{json.dumps(status, indent=1)}")


def _wait_serving_on_both_nodes(cluster: LocalCluster, timeout: float) -> dict:
    """`_wait_serving`; if the second node dies on its own meanwhile, start it again once. Seen once in CI on a
    loaded 2-core machine: a freshly started node's dashboard agent failed and its raylet fate-shared with it
    ("dashboard_agent failed and raylet fate-shares with it"), so the replica could never start. That is Ray's
    start-up under load, not the failover this test checks; a second death still fails the test."""
    try:
        return _wait_serving(cluster, timeout)
    except NodeLost as lost:
        print(f"{lost}; starting it again")
        cluster.start_node2()
        return _wait_serving(cluster, timeout)


def test_serve_replicas_on_both_nodes_survive_node_loss(cluster, tiny_path, tmp_path):
    """`serve deploy` of serve.app:build_app with 2 DertaModel replicas, max_replicas_per_node=1 (one per node).
    Requests keep being answered while the second node dies (5xx only around the loss, no hung or dropped
    request); when the node returns Serve re-creates the lost replica there and requests succeed again. Under
    heavy CPU contention a healthy replica may shed load with a 503 at any time, so 503 is accepted everywhere."""
    import httpx
    import yaml

    if cluster.node2.proc.poll() is not None:
        cluster.start_node2()  # the training test failed half-way with the node down
    model = TRAINED.get("final") or Path(tiny_path)
    (port,) = free_ports(1, HEAD_IP)
    config = {
        "proxy_location": "HeadOnly",  # one HTTP port per machine: proxies on both "nodes" would collide
        "http_options": {"host": HEAD_IP, "port": port},
        "applications": [{
            "name": "derta", "route_prefix": "/", "import_path": "serve.app:build_app",
            "args": {"config": str(REPO / "configs" / "tiny.yaml"), "model": str(model),
                     "set": [f"model.tiny_dir={Path(tiny_path).parent}", "serve.max_new_tokens=16",
                             "serve.max_input_tokens=256"]},
            "deployments": [
                # the ingress stays on the head (like the proxy) so this test isolates the model tier's failover
                {"name": "DertaIngress", "num_replicas": 1,
                 "ray_actor_options": {"num_cpus": 0, "resources": {HEAD_RESOURCE: 0.01}}},
                {"name": "DertaModel", "num_replicas": 2, "max_replicas_per_node": 1,
                 "ray_actor_options": {"num_cpus": 0.5}},
            ],
        }],
    }
    config_file = tmp_path / "serve_config.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    cluster.run(tool("serve"), "deploy", str(config_file), "--address", cluster.dashboard_url)
    _wait_serving_on_both_nodes(cluster, timeout=240)
    head, second = cluster.head.node_id, cluster.node2.node_id
    assert sorted(_replicas(cluster)) == sorted([head, second])

    base = f"http://{HEAD_IP}:{port}"
    with httpx.Client(base_url=base, timeout=30) as client:
        deadline = time.time() + 180
        while client.get("/ready").status_code != 200:
            assert time.time() < deadline, "the app never became ready"
            time.sleep(0.5)

    with Load(f"{base}/generate") as load:
        # /ready asks one replica; a RUNNING replica may still be loading its weights (HTTP 503 until then): the
        # steady state is enough successes to have gone through both replicas
        steady = load.wait_successes(30, since=0, timeout=180)
        killed = time.time()
        cluster.kill_node2()
        time.sleep(2)  # the node stays down (and for as long as `ray start` takes to bring it back): the lost
        cluster.start_node2()  # replica can't be re-placed meanwhile (max_replicas_per_node=1)
        returned = time.time()
        _wait_serving_on_both_nodes(cluster, timeout=240)
        serving = time.time()
        recovered = load.wait_successes(30, since=serving, timeout=180)
    results = load.results
    summary = {"requests": len(results), "statuses": Counter(str(r["status"]) for r in results),
               "max_latency_s": round(max(r["end"] - r["t"] for r in results), 2),
               "down_s": round(returned - killed, 1), "recovered_after_s": round(recovered - killed, 1),
               "non_200_by_second_after_kill": sorted(Counter(
                   (int(r["t"] - killed), r["status"], (r["detail"] or "")[:60])
                   for r in results if r["status"] != 200).items())}
    (tmp_path / "serve_failover.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))

    # What holds however loaded the machine is (no latency bound, no success ratio: a loaded replica may shed load
    # with a 503 at any time). Every request got an answer (no timeout, no dropped connection) ...
    assert all(r["status"] is not None for r in results), [r for r in results if r["status"] is None][:5]
    # ... failures are clear 5xx only, and every 503 that says when to retry says it in seconds
    assert {r["status"] for r in results} <= OK_OR_FAILOVER, summary
    assert all(_retry_after_ok(r["retry_after"]) for r in results if r["status"] == 503), summary
    # while both replicas were healthy (answered before the kill; sent once Serve reported both replicas RUNNING
    # again) the only failure is a 503
    healthy = [r for r in results if r["end"] < killed] + load.between(serving, recovered + 1e-6)
    assert {r["status"] for r in healthy} <= {200, 503}, summary
    # while the node was down the surviving replica kept serving: some request sent after the kill and before the
    # node came back succeeded
    assert any(r["status"] == 200 for r in load.between(killed, returned)), summary
    # recovery within a generous bound (the bounds of the waits above), both replicas back, one per node
    second_now = cluster.node2.node_id
    assert second_now != second and sorted(_replicas(cluster)) == sorted([head, second_now])
    assert steady < killed < returned <= serving <= recovered
