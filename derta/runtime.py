"""Ray process setup shared by the CLI, jobs and tests (kept out of library code that must not start Ray).

Which Ray a `derta` command uses, in this order (only an explicit choice ever attaches to a running cluster):
1. `address` / RAY_ADDRESS: that cluster (a `ray job submit` driver gets RAY_ADDRESS from Ray).
2. The cluster a plain `ray start --head` registered in Ray's default temp dir (/tmp/ray/ray_current_cluster),
   when its GCS is alive and it belongs to this user; DERTA_RAY_REUSE=0 turns this off (the test suite does).
   A `ray start` with a private `--temp-dir` never registers there, so private clusters are never picked up.
3. Otherwise a private local instance (`address="local"`: Ray itself would otherwise attach to case 2 silently).
   `init_ray(dashboard=False)` (what `derta train` asks for) starts it lean: no dashboard (ray.init waits for the
   dashboard and its ~10 module processes before it even starts the raylet) and no Ray Train helper actors that only
   matter for a cluster that outlives this process (see `trainer_class`).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

REUSE_ENV = "DERTA_RAY_REUSE"
# environment our workers need wherever they run: set for a local instance (inherited) and passed as runtime_env
# env_vars to a running cluster (whose workers inherit `ray start`'s environment, not ours)
WORKER_ENV = {"RAY_TRAIN_V2_ENABLED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
              "RAY_DEDUP_LOGS": "1"}
# a lean private instance dies with this process: nothing to watch for node preemption (one actor less); also set
# when the train workers can only run on the driver's node (`trainer_class`)
LEAN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
_lean_session: str | None = None  # GCS address of the lean private instance init_ray started, if any


def running_cluster() -> tuple[str | None, str]:
    """(GCS address or None, how it was found) following the order in the module docstring."""
    explicit = os.environ.get("RAY_ADDRESS")
    if explicit:
        return explicit, "RAY_ADDRESS"
    if os.environ.get(REUSE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None, f"{REUSE_ENV}=0"
    from ray._private.services import find_gcs_addresses
    from ray._private.utils import get_ray_address_file

    record = Path(get_ray_address_file(None))  # written by `ray start` with the default temp dir only
    try:
        if record.stat().st_uid != os.getuid():
            return None, f"{record} belongs to another user"
        address = record.read_text().strip()
    except OSError:
        return None, "no `ray start --head` cluster"
    if address and address in find_gcs_addresses():
        return address, "`ray start --head`"
    return None, f"stale {record}"  # the cluster it names is gone


def _job_env_vars() -> set[str]:
    """Env var keys a `ray job submit` runtime env already sets (ray.init must not set them again)."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    try:
        job = json.loads(os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR) or "{}")
        return set(((job.get("runtime_env") or {}).get("env_vars") or {}))
    except ValueError:
        return set()


def init_ray(num_cpus: int | None = None, address: str | None = None, quiet: bool = True,
             dashboard: bool = True) -> str | None:
    """Connect to a running cluster (see module docstring) or start a private local instance with `num_cpus`
    (default: all cores, at least 4 logical CPUs so 2 train workers and a Ray Data stage fit side by side);
    `dashboard=False` starts that instance lean (module docstring). Returns the address connected to (None: a local
    instance)."""
    global _lean_session
    from derta.progress import filter_ray_console, quiet_python_logs, say, verbosity

    quiet = quiet and verbosity() != "verbose"
    for key, value in WORKER_ENV.items():
        if key != "HF_HUB_DISABLE_PROGRESS_BARS" or quiet:
            os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():
        return None
    quiet_python_logs()
    how = "argument"
    if not address:
        address, how = running_cluster()
    kwargs = dict(logging_level=logging.ERROR if quiet else logging.INFO, log_to_driver=True)
    if address:
        env = {k: v for k, v in WORKER_ENV.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS" or quiet}
        if not address.startswith("ray://"):
            # Ray Train's placement-group cleaner calls the state API without an address from a worker; with
            # another Ray instance on the machine it would fail with "Found multiple active Ray instances"
            env["RAY_ADDRESS"] = address
        if how == "`ray start --head`" and os.environ.get("PYTHONPATH"):
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]  # same machine: workers import the same code as we do
        taken = _job_env_vars()
        env = {k: v for k, v in env.items() if k not in taken}
        ray.init(address=address, runtime_env={"env_vars": env} if env else None, **kwargs)
        if how == "`ray start --head`":
            say(f"using the Ray cluster started with `ray start --head` at {address} "
                f"({REUSE_ENV}=0 starts a private one)")
    else:
        # the dashboard serves the state API, which Ray Train's placement-group cleaner polls (without it, it warns
        # on every poll) and `ray list ...` uses; a lean instance runs no cleaner (`trainer_class`)
        if not dashboard:
            for key, value in LEAN_ENV.items():
                os.environ.setdefault(key, value)
        _start_local(dict(address="local", num_cpus=num_cpus or max(os.cpu_count() or 1, 4),
                          include_dashboard=dashboard, dashboard_host="127.0.0.1", **kwargs))
        _lean_session = None if dashboard else ray.get_runtime_context().gcs_address
    quiet_data(quiet)
    quiet_python_logs()  # after quiet_data, which sets Ray Data's level too
    filter_ray_console()
    return address


def trainer_class(train=None):
    """Ray Train's `TorchTrainer` without the helper actors derta has no use for. Each one is a fresh Ray worker
    process (~1.5-2 CPU-s to start) that competes with the train workers' start on a small machine:
    * DatasetsCallback starts a DatasetManager actor for the trainer's `datasets`: derta passes none (each rank
      reads its share of the prepared Parquet itself, derta.train_data), so it is dropped whenever there are none.
    * PlacementGroupCleanerCallback starts a detached actor that removes the workers' placement group if the
      controller dies while the driver lives on. The controller is an actor of this driver's job, so Ray already
      removes that placement group when the job ends (checked on Ray 2.60 by killing a driver whose actor held one),
      and a `derta` driver ends when training fails; on a lean instance its state-API polls would also need the
      dashboard, which a lean instance lacks.
    * The preemption watcher (`train`: the TrainConfig, to know where its workers can go) on a lean instance, or when
      the workers can only be placed on this driver's own node: a drain of that node ends the driver too, so there
      is nothing to react to. On a multi-node (or autoscaling) cluster it stays.
    """
    import ray
    from ray.train.torch import TorchTrainer

    lean = bool(_lean_session and ray.is_initialized() and ray.get_runtime_context().gcs_address == _lean_session)
    if not lean and train is not None and _workers_fit_only_here(train):
        os.environ.setdefault(*next(iter(LEAN_ENV.items())))

    class DertaTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            unused = {"PlacementGroupCleanerCallback"} | (set() if self.datasets else {"DatasetsCallback"})
            return [cb for cb in super()._create_default_callbacks() if type(cb).__name__ not in unused]

    return DertaTorchTrainer


def _workers_fit_only_here(train) -> bool:
    """True when the cluster is this driver's node alone and that node has the resources of every train worker
    (so no autoscaler has to add a node for them, and Ray places them all here)."""
    import ray

    alive = [node for node in ray.nodes() if node.get("Alive")]
    if len(alive) != 1 or alive[0]["NodeID"] != ray.get_runtime_context().get_node_id():
        return False
    if train.placement_strategy == "STRICT_SPREAD" and train.num_workers > 1:
        return False
    per_worker = train.resources_per_worker or ({"CPU": 1, "GPU": 1} if train.use_gpu else {"CPU": 1})
    total = alive[0].get("Resources", {})
    return all(total.get(name, 0) >= amount * train.num_workers for name, amount in per_worker.items())


START_ATTEMPTS = 3


def _start_local(init_kwargs: dict) -> None:
    """ray.init of a private instance, retried: Ray gives a new node's raylet and dashboard agent fixed start-up
    windows (~15-30 s) that a heavily loaded machine misses ("The current node timed out during startup"). The
    processes of a failed attempt are stopped before the next one."""
    import time

    import psutil
    import ray

    for attempt in range(START_ATTEMPTS):
        started = time.time()
        try:
            ray.init(**init_kwargs)
            return
        except Exception as err:  # noqa: BLE001 - Ray raises a bare Exception for this
            if "timed out during startup" not in str(err) or attempt == START_ATTEMPTS - 1:
                raise
        ray.shutdown()
        leftovers = [child for child in psutil.Process().children(recursive=True)
                     if child.create_time() >= started - 1]
        for child in leftovers:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(leftovers, timeout=10)
        time.sleep(5 * (attempt + 1))


def quiet_data(quiet: bool = True) -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = not quiet
    ctx.print_on_execution_start = not quiet
    ctx.execution_options.preserve_order = True  # deterministic order: exact data position on resume
    if quiet:  # the streaming executor logs a line per dataset execution at INFO
        logging.getLogger("ray.data").setLevel(logging.WARNING)
