"""Diagnostic behind bench_startup.py's "trainer start -> first step": where a warm `derta train` spends it.

    python bench/startup_timeline.py [--runs 2]

Starts a private `ray start --head` cluster (as bench_startup.py's warm scenario) and runs `derta train` on it
`--runs` times (the first fills the prepared-data cache: the later ones are the warm runs). While each run goes,
a sampler reads /proc every 0.1 s for every process of the cluster and of the run: when it was created, every
process title it had (Ray names a worker after the actor/task it runs: `ray::IDLE`, `ray::TrainController.run`,
`ray::RayTrainWorker.init_train_context`, ...) and its CPU seconds. After each run it prints that timeline, the
phase marks of bench_startup.py's child, and Ray Train's own debug lines (logs/train/ray-train-sys-*.log:
"[Worker Group Initialization] ... in N s"), all in seconds since the run was launched.
Not a benchmark (no baseline): it shows which processes start, in what order, and what each costs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # multinode_utils: a private `ray start --head` with free ports


def sample(sessions: set[int], launched: float, seen: dict, stop: threading.Event) -> None:
    from multinode_utils import pids_in_sessions

    while not stop.is_set():
        for pid in pids_in_sessions(sessions) + [c.pid for c in psutil.Process().children(recursive=True)]:
            try:
                proc = psutil.Process(pid)
                title, cpu = " ".join(proc.cmdline())[:80], sum(proc.cpu_times()[:2])
                created = proc.create_time() - launched
            except psutil.Error:
                continue
            record = seen.setdefault(pid, {"created": created, "titles": [], "cpu": 0.0})
            record["cpu"] = cpu
            if not record["titles"] or record["titles"][-1][1] != title:
                record["titles"].append((time.time() - launched, title))
        time.sleep(0.1)


def print_train_logs(head_temp: Path, launched: float, keep: Path) -> None:
    for log in sorted(head_temp.glob("session_2*/logs/train/ray-train-sys-*.log")):
        print(f"--- {log.name}")
        for line in log.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            print(f"  {entry['timestamp_ns'] / 1e9 - launched:7.2f} pid {entry['process']} {entry['message'][:160]!r}")
        shutil.move(str(log), str(keep / log.name))  # the next run's logs only, next time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    from multinode_utils import LocalCluster, pids_in_sessions

    workdir = Path(tempfile.mkdtemp(prefix="startup_timeline_"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])), HF_HUB_OFFLINE="1",
               DERTA_CACHE_DIR=str(workdir / "cache"), DERTA_RAY_REUSE="0", TOKENIZERS_PARALLELISM="false")
    env.setdefault("RAY_worker_niceness", "0")
    root = Path(tempfile.mkdtemp(prefix="rtl", dir="/tmp"))
    cluster = LocalCluster(root, workdir / "ray-logs", num_cpus=4)
    cluster.env["RAY_worker_niceness"] = env["RAY_worker_niceness"]
    try:
        head = cluster.start_head()
        env.update({k: v for k, v in cluster.env.items() if k.startswith("RAY_")}, RAY_ADDRESS=cluster.gcs_address)
        cluster_processes = set(pids_in_sessions(cluster.sessions))  # GCS, raylet, dashboard, agents
        for run in range(args.runs):
            seen: dict = {}
            stop = threading.Event()
            launched = time.time()
            sampler = threading.Thread(target=sample, args=(cluster.sessions, launched, seen, stop))
            sampler.start()
            record = workdir / f"marks-{run}.json"
            proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_startup.py"), "--child", "--steps",
                                   "2", "--output", str(workdir / f"run-{run}"), "--record", str(record)],
                                  env=dict(env, BENCH_LAUNCHED=str(launched)), capture_output=True, text=True,
                                  cwd=REPO)
            stop.set()
            sampler.join()
            print(f"=== run {run} ({'fills the data cache' if run == 0 else 'warm'}): exit {proc.returncode}, "
                  f"load average {os.getloadavg()[0]:.1f}")
            if proc.returncode:
                print(proc.stdout[-2000:], proc.stderr[-3000:])
            marks = json.loads(record.read_text()) if record.exists() else {}
            print("marks (s): " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(marks.items(), key=lambda kv: kv[1])))
            for pid, rec in sorted(seen.items(), key=lambda kv: kv[1]["created"]):
                if pid in cluster_processes or rec["created"] < 0 and "bench_startup" not in rec["titles"][0][1]:
                    continue  # the cluster's own processes, and actors an earlier run left (Ray Data's)
                print(f"  pid {pid}: created {rec['created']:6.2f}, {rec['cpu']:5.2f} CPU-s")
                for at, title in rec["titles"]:
                    print(f"      {at:6.2f} {title}")
            print_train_logs(head.temp_dir, launched, workdir)
    finally:
        cluster.shutdown()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
