"""Time to the first logged training step of `derta train` on the tiny preset, phase by phase, vs plain torchrun.

    python bench/bench_startup.py [--steps 2] [--skip-torchrun]

Scenarios, each a fresh `derta train --set train.max_steps=STEPS --set train.log_every=1` process (the real CLI:
typer -> run_training), timed from the moment it is launched:
  cold        private local Ray (DERTA_RAY_REUSE=0), empty prepared-data cache: what a first run pays
  warm-first  a running Ray cluster (a private `ray start --head` this bench starts, given as RAY_ADDRESS) and the
              prepared data cached by the cold run, as the cluster's first job: Ray still finishes its own start-up
              (dashboard modules) and prestarts idle workers for a cluster's first driver meanwhile
  warm        the same command again on that cluster: what every later iteration pays (the <= 15 s target)
  torchrun    (baseline) `torchrun --standalone --nproc_per_node 2` of the same loop without Ray: tiny model, DeRTa
              examples of the same synthetic corpus tokenized in-process, DDP (gloo), derta_loss, AdamW
Each derta phase ends when the function that does it returns (the bench wraps them; nothing in derta is changed):
imports+config, init_ray + preflight (tokenizer/tiny model; run_training overlaps them: the phase ends when both
have), data (prepare + quarantine + mix), trainer start -> first step (Ray Train controller, worker group, process
group, model load, dataset ingest, first step), rest of the run (remaining steps, checkpoints, final export),
shutdown (after run_training until the process exits).
Prints the breakdown per scenario, the load average around each, and `ratio <scenario>/torchrun` of the time to
the first logged step.
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # multinode_utils: a private `ray start --head` with free ports
PHASES = ["imports+config", "init_ray + preflight", "data", "trainer start -> first step", "rest of the run",
          "shutdown"]


# ------------------------------------------------------------------------------------------------ child
def child(args) -> None:
    """Run `derta train` in this process with the phase functions wrapped; write the timestamps to args.record."""
    launched = float(os.environ["BENCH_LAUNCHED"])
    marks: dict[str, float] = {}
    run = Path(args.output)

    def mark(name):
        marks.setdefault(name, time.time() - launched)

    def wrap(module, name, label):
        original = getattr(module, name)

        def timed(*a, **kw):
            result = original(*a, **kw)
            mark(label)
            return result
        setattr(module, name, timed)

    def watch_first_step():
        while "first step" not in marks:
            if (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().strip():
                mark("first step")
            time.sleep(0.05)

    from derta import cli, runtime, trainer  # noqa: F401 - what the `derta` console script imports

    mark("imports+config")
    wrap(runtime, "init_ray", "init_ray")
    wrap(trainer, "preflight", "preflight")
    # the data step (whatever derta calls it) ends when the trainer class is asked for, just before it starts
    # (patching TorchTrainer.fit would import torch here, ahead of the phases that import it)
    wrap(runtime, "trainer_class", "data")
    threading.Thread(target=watch_first_step, daemon=True).start()
    try:
        cli.app(["train", "--set", f"train.max_steps={args.steps}", "--set", "train.log_every=1",
                 "--output", str(run)], standalone_mode=False)
    finally:
        mark("run_training returned")
        Path(args.record).write_text(json.dumps(marks))


# ------------------------------------------------------------------------------------------------ parent
def timed_child(name: str, steps: int, workdir: Path, env: dict) -> dict:
    run, record = workdir / f"run-{name}", workdir / f"{name}.json"
    load = [os.getloadavg()[0]]
    launched = time.time()
    proc = subprocess.run([sys.executable, __file__, "--child", "--steps", str(steps), "--output", str(run),
                           "--record", str(record)], env=dict(env, BENCH_LAUNCHED=str(launched)),
                          capture_output=True, text=True, cwd=REPO)
    ended = time.time() - launched
    load.append(os.getloadavg()[0])
    if proc.returncode != 0 or not record.exists():
        sys.exit(f"{name}: `derta train` failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    marks = json.loads(record.read_text())
    points = [marks["imports+config"], max(marks["init_ray"], marks["preflight"]), marks["data"], marks["first step"],
              marks["run_training returned"], ended]
    phases = dict(zip(PHASES, [b - a for a, b in zip([0.0] + points[:-1], points)]))
    return {"phases": phases, "first_step_s": marks["first step"], "total_s": ended,
            "init_ray_done_s": marks["init_ray"], "preflight_done_s": marks["preflight"], "load": load,
            "console_lines": len((proc.stdout + proc.stderr).splitlines())}


def torchrun_baseline(steps: int, workdir: Path, env: dict) -> dict:
    torchrun = Path(sys.executable).parent / "torchrun"
    record = workdir / "torchrun.json"
    launched = time.time()
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2",
                           str(REPO / "bench" / "startup_torchrun_loop.py"), "--steps", str(steps),
                           "--record", str(record)], env=dict(env, BENCH_LAUNCHED=str(launched)),
                          capture_output=True, text=True, cwd=REPO)
    ended = time.time() - launched
    if proc.returncode != 0:
        sys.exit(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    marks = json.loads(record.read_text())
    return {"phases": marks, "first_step_s": marks["first step"], "total_s": ended}


def share_autogroup_priority(pid: int) -> None:
    """Give the session of `pid` this process's autogroup nice value. The warm cluster's `ray start` runs in a session
    of its own (start_new_session), so `echo -20 > /proc/self/autogroup` around the bench (bench/README.md) covered
    the cold run's Ray workers but not the warm cluster's: they competed with every other session on the box."""
    try:
        nice = int(Path("/proc/self/autogroup").read_text().split("nice")[1])
        if nice:
            Path(f"/proc/{pid}/autogroup").write_text(str(nice))
            print(f"warm cluster's autogroup set to nice {nice}, like this bench's")
    except (OSError, IndexError, ValueError):
        pass  # no autogroup scheduling here (or not allowed): nothing to share


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--skip-torchrun", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--record", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    from multinode_utils import LocalCluster

    workdir = Path(tempfile.mkdtemp(prefix="bench_startup_"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])), HF_HUB_OFFLINE="1",
               DERTA_CACHE_DIR=str(workdir / "cache"), DERTA_RAY_REUSE="0", TOKENIZERS_PARALLELISM="false")
    env.setdefault("RAY_worker_niceness", "0")  # Ray workers at the priority of the torchrun baseline (default 15)
    print(f"load average before: {os.getloadavg()[0]:.1f} (2-core box shared with others: expect noise)")
    results = {}
    # the tiny model is built once per config (cached by hash); build it here so no scenario pays for it
    subprocess.run([sys.executable, "-c", "from derta.config import load_config; from derta.modeling import "
                    "resolve_model_path; c = load_config('tiny'); resolve_model_path(c.model, c.data.synthetic)"],
                   env=env, check=True, cwd=REPO)
    results["cold"] = timed_child("cold", args.steps, workdir, env)
    root = Path(tempfile.mkdtemp(prefix="rbs", dir="/tmp"))
    cluster = LocalCluster(root, workdir / "ray-logs", num_cpus=4)
    # LocalCluster drops inherited RAY_* variables: without this the warm cluster's workers ran at Ray's niceness 15
    # while the cold run's ran at 0 (the warm trainer start measured ~2x the cold one under load)
    cluster.env["RAY_worker_niceness"] = env["RAY_worker_niceness"]
    try:
        cluster.start_head()
        share_autogroup_priority(cluster.nodes[0].proc.pid)
        warm_env = dict(env, **{k: v for k, v in cluster.env.items() if k.startswith("RAY_")},
                        RAY_ADDRESS=cluster.gcs_address)
        results["warm-first"] = timed_child("warm-first", args.steps, workdir, warm_env)
        results["warm"] = timed_child("warm", args.steps, workdir, warm_env)
    finally:
        cluster.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    if not args.skip_torchrun:
        results["torchrun"] = torchrun_baseline(args.steps, workdir, env)

    derta_runs = ("cold", "warm-first", "warm")
    print(f"\n{'phase (s)':<30}" + "".join(f"{name:>12}" for name in derta_runs))
    for phase in PHASES:
        print(f"{phase:<30}" + "".join(f"{results[n]['phases'][phase]:>12.1f}" for n in derta_runs))
    print("(init_ray / preflight done at " + ", ".join(
        f"{n} {results[n]['init_ray_done_s']:.1f} / {results[n]['preflight_done_s']:.1f} s" for n in derta_runs)
        + " after launch)")
    for name, result in results.items():
        print(f"{name:<10} first logged step {result['first_step_s']:6.1f} s   process total {result['total_s']:6.1f} s"
              + (f"   console lines {result['console_lines']}" if "console_lines" in result else "")
              + (f"   load {result['load'][0]:.1f} -> {result['load'][1]:.1f}" if "load" in result else ""))
    if "torchrun" in results:
        base = results["torchrun"]["first_step_s"]
        print("torchrun phases: " + ", ".join(f"{k} {v:.1f}" for k, v in results["torchrun"]["phases"].items()))
        for name in derta_runs:
            print(f"ratio {name}/torchrun (time to first logged step) = {results[name]['first_step_s'] / base:.2f}x")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
