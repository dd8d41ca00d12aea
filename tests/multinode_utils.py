"""A real two-node Ray cluster on one machine, driven only through subprocesses (for tests/test_multinode.py).

Nothing here imports or initialises Ray in the calling process: nodes are `ray start --block` subprocesses, jobs
go through `ray job submit`, Serve through `serve deploy` / `serve status`, and cluster state is read by small
Python scripts run in subprocesses. That keeps the cluster fully independent of any local `ray.init()` instance
the same pytest process may hold.

How the nodes are kept apart from every other Ray instance on the machine:

* Each node has its own loopback IP. Ray rewrites `--node-ip-address 127.0.0.1`/`localhost` into the machine's
  routable address (`services.resolve_ip_for_localhost`), so the head is 127.0.0.2 and the worker node 127.0.0.3:
  both are loopback (127.0.0.0/8), neither is "localhost" to Ray, and the nodes look like two hosts.
* Every listening port is chosen free up front (`free_ports`); worker ports are OS-assigned (`--min-worker-port 0
  --max-worker-port 0`), which can't collide with anyone's fixed range.
* Each node has its own short `--temp-dir` (Unix socket paths must stay under ~107 characters).
* Token auth with a per-cluster random token (`RAY_AUTH_MODE=token`, `RAY_AUTH_TOKEN`), so nothing depends on
  `~/.ray/auth_token`. Inherited `RAY_*` variables (e.g. `RAY_ADDRESS`) never reach these subprocesses.
* `ray start` runs through tests/ray_start_patient.py: Ray's fixed start-up waits (30 s for the raylet to register,
  ~15 s for the dashboard agent's ports) are not enough on a loaded 2-core CI machine; see that file. A failed start
  is still retried with fresh ports.
* Every node is started with `start_new_session=True`, so all of its processes (GCS, raylet, agents, every worker
  and actor) share that node's session id. Teardown kills exactly those PIDs. `ray stop` is never used: it
  matches processes by name and would kill every Ray instance on the machine.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
HEAD_IP = "127.0.0.2"
NODE2_IP = "127.0.0.3"
HEAD_RESOURCE = "head_slot"
NODE2_RESOURCE = "node2_slot"
OBJECT_STORE_BYTES = 256 * 1024 * 1024
READY_LINE = "block forever"  # what `ray start --block` prints once the node is up
PATIENT_RAY_START = Path(__file__).resolve().parent / "ray_start_patient.py"  # `ray start`, waits longer on load


def tool(name: str) -> str | None:
    """A console script of this interpreter's environment (`ray`, `serve`), else the one on PATH."""
    local = VENV_BIN / name
    return str(local) if local.exists() else shutil.which(name)


def loopback_ok(*hosts: str) -> bool:
    """Can we listen on these loopback addresses (Linux routes all of 127/8 to lo; macOS does not)?"""
    for host in hosts:
        try:
            with socket.socket() as sock:
                sock.bind((host, 0))
        except OSError:
            return False
    return True


def free_ports(count: int, host: str) -> list[int]:
    """`count` distinct ports that are free right now (all sockets are held until every port is picked)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def session_id(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[3]) if fields[0] != "Z" else None  # a zombie is already dead


def pids_in_sessions(sessions: set[int]) -> list[int]:
    """Live processes whose session id is one of ours (each node's `ray start` is a session leader)."""
    if not sessions:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid() and session_id(int(entry)) in sessions:
            pids.append(int(entry))
    return pids


def kill_sessions(sessions: set[int], grace: float = 10.0) -> list[int]:
    """SIGTERM every process of `sessions`, SIGKILL what is left after `grace` s; returns PIDs still alive."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        for pid in pids_in_sessions(sessions):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.time() + wait
        while time.time() < deadline and pids_in_sessions(sessions):
            time.sleep(0.2)
        if not pids_in_sessions(sessions):
            return []
    return pids_in_sessions(sessions)


def tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return f"<{path} unreadable>"


@dataclass
class Node:
    name: str
    ip: str
    temp_dir: Path
    log: Path
    proc: subprocess.Popen
    ports: dict[str, int] = field(default_factory=dict)
    node_id: str = ""

    def raylet(self):
        import psutil

        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if child.name() == "raylet":
                    return child
            except psutil.NoSuchProcess:
                continue
        raise RuntimeError(f"node {self.name}: no raylet under `ray start` pid {self.proc.pid}")

    def read_node_id(self) -> str:
        """The node id Ray gave this node (the raylet's `--node_id=` argument)."""
        for arg in self.raylet().cmdline():
            if arg.startswith("--node_id="):
                self.node_id = arg.split("=", 1)[1]
                return self.node_id
        raise RuntimeError(f"node {self.name}: raylet has no --node_id argument")


class LocalCluster:
    """Head (127.0.0.2, `head_slot` resource) + one worker node (127.0.0.3, `node2_slot`) that can be killed and
    restarted. `root` must be short (Unix socket paths); `logs` holds the `ray start` output of every node."""

    def __init__(self, root: Path, logs: Path, num_cpus: int = 2, home: Path | None = None):
        """`home`: run every process with HOME=home and the token in home/.ray/auth_token, created by
        `ray get-auth-token --generate` (what the README tells a user to do); default: a random RAY_AUTH_TOKEN."""
        import secrets

        self.root, self.logs, self.num_cpus = root, logs, num_cpus
        self.workdir = root / "cwd"  # cwd of every Ray process: nothing importable by accident
        self.workdir.mkdir(parents=True, exist_ok=True)
        logs.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update({
            "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
            "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_V2_ENABLED": "1",
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
        })
        if home is None:
            env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        else:
            home.mkdir(parents=True, exist_ok=True)
            env["HOME"] = str(home)
        self.env = env
        self.sessions: set[int] = set()
        self.nodes: list[Node] = []
        self.head: Node | None = None
        self.node2: Node | None = None
        self.incarnations = 0
        self.gcs_port = self.dashboard_port = 0
        atexit.register(self.shutdown)  # a fixture finalizer that never ran (interpreter exit) still cleans up
        if home is not None:
            self.run(tool("ray"), "get-auth-token", "--generate")
            assert (home / ".ray" / "auth_token").exists(), "`ray get-auth-token --generate` wrote no token file"

    # ------------------------------------------------------------------------------------ addresses
    @property
    def gcs_address(self) -> str:
        return f"{HEAD_IP}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{HEAD_IP}:{self.dashboard_port}"

    # ------------------------------------------------------------------------------------ nodes
    def _start(self, name: str, ip: str, args: list[str], port_keys: list[str], timeout: float,
               attempts: int = 1) -> Node:
        """`ray start --block` in its own session; waits until it reports the node up. On an overloaded machine
        `ray start` can give up on its own (Ray waits a fixed 30 s for the raylet to register with the GCS):
        such an attempt is cleaned up and retried up to `attempts` times."""
        errors = []
        for attempt in range(attempts):
            label = name if attempt == 0 else f"{name}-retry{attempt}"
            ports = dict(zip(port_keys, free_ports(len(port_keys), ip)))  # fresh ones on every attempt
            try:
                return self._start_once(label, ip, args, ports, timeout)
            except (RuntimeError, TimeoutError) as err:
                errors.append(str(err)[-1500:])
                kill_sessions({self.nodes[-1].proc.pid}, grace=3)
                self._keep_raylet_logs(self.nodes[-1])
                time.sleep(min(5 * 2 ** attempt, 30))  # an overloaded GCS/machine: give it room before retrying
        raise RuntimeError(f"`ray start` for {name} failed {attempts} times:\n" + "\n---\n".join(errors))

    def _start_once(self, name: str, ip: str, args: list[str], ports: dict[str, int], timeout: float) -> Node:
        temp_dir = self.root / name
        log = self.logs / f"ray-start-{name}.log"
        port_args = [a for key, port in ports.items() for a in (f"--{key}", str(port))]
        cmd = [sys.executable, str(PATIENT_RAY_START), "start", "--block", "--node-ip-address", ip, *args,
               *port_args,
               "--min-worker-port", "0", "--max-worker-port", "0", "--num-cpus", str(self.num_cpus),
               "--object-store-memory", str(OBJECT_STORE_BYTES), "--temp-dir", str(temp_dir),
               "--disable-usage-stats"]
        with log.open("w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.env, cwd=self.workdir, start_new_session=True)
        self.sessions.add(proc.pid)
        node = Node(name, ip, temp_dir, log, proc, ports)
        self.nodes.append(node)
        deadline = time.time() + timeout
        while READY_LINE not in tail(log, 1_000_000):
            if proc.poll() is not None:
                raise RuntimeError(f"`ray start` for {name} exited with {proc.returncode}:\n{tail(log, 1500)}")
            if time.time() > deadline:
                raise TimeoutError(f"`ray start` for {name} not up after {timeout:.0f}s:\n{tail(log, 1500)}")
            time.sleep(0.25)
        node.read_node_id()
        return node

    def _keep_raylet_logs(self, node: Node) -> None:
        """Copy a failed node's raylet/GCS logs next to its `ray start` log (its temp dir is removed later)."""
        for path in node.temp_dir.glob("session_*/logs/*"):
            if path.name.startswith(("raylet", "gcs_server")) and path.is_file():
                shutil.copy(path, self.logs / f"{node.name}-{path.name}")

    def start_head(self, timeout: float = 400) -> Node:
        keys = ["port", "ray-client-server-port", "dashboard-port", "node-manager-port", "object-manager-port",
                "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                "metrics-export-port"]
        self.head = self._start("head", HEAD_IP, [
            "--head", "--include-dashboard", "true", "--dashboard-host", HEAD_IP,
            "--resources", json.dumps({HEAD_RESOURCE: 1})], keys, timeout, attempts=5)
        self.gcs_port, self.dashboard_port = self.head.ports["port"], self.head.ports["dashboard-port"]
        return self.head

    def start_node2(self, timeout: float = 400) -> Node:
        """Start (or restart: a fresh temp dir and fresh ports each time) the second node."""
        keys = ["node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port"]
        self.incarnations += 1
        self.node2 = self._start(f"n2{chr(ord('a') + self.incarnations - 1)}", NODE2_IP, [
            "--address", self.gcs_address, "--resources", json.dumps({NODE2_RESOURCE: 1})], keys, timeout,
            attempts=5)
        return self.node2

    def wait_node_dead(self, node_id: str, timeout: float = 180) -> None:
        """Until the GCS has marked `node_id` DEAD: a restart of the node then registers as a new node without
        racing the GCS's failure detection of the old one (which takes longer on a loaded machine)."""
        deadline = time.time() + timeout
        while True:
            states = {n["node_id"]: n["state"] for n in self.state()["nodes"]}
            if states.get(node_id) == "DEAD":
                return
            if time.time() > deadline:
                raise TimeoutError(f"node {node_id} not marked DEAD after {timeout:.0f}s: {states}")
            time.sleep(1)

    def kill_node2(self, timeout: float = 60) -> int:
        """SIGKILL the second node's raylet (an abrupt node loss). `ray start --block` notices its raylet died
        and kills the node's remaining processes; whatever survives is killed by PID; then waits until the GCS has
        marked the node DEAD. Returns the raylet PID."""
        node = self.node2
        pid = node.raylet().pid
        os.kill(pid, signal.SIGKILL)
        try:
            node.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        left = kill_sessions({node.proc.pid}, grace=5)
        assert not left, f"processes of {node.name} survived: {left}"
        self.wait_node_dead(node.node_id)
        return pid

    def shutdown(self) -> list[int]:
        """Stop every process of every node this cluster started, by PID (SIGTERM, then SIGKILL after a short
        grace: nothing of a throw-away cluster needs a graceful stop); returns any PID that survived."""
        atexit.unregister(self.shutdown)
        left = kill_sessions(self.sessions, grace=3)
        for node in self.nodes:
            if node.proc.poll() is None:
                node.proc.kill()
            node.proc.wait(timeout=10)  # reap our direct children
        return left

    # ------------------------------------------------------------------------------------ commands
    def run(self, *args: str, timeout: float = 120, check: bool = True,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), env=self.env, cwd=cwd or self.workdir, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:4])} ... exited {proc.returncode}:\n"
                               f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def popen(self, args: list[str], log: Path, cwd: Path | None = None) -> subprocess.Popen:
        with log.open("w") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.env, cwd=cwd or self.workdir, start_new_session=True)
        self.sessions.add(proc.pid)  # killed with the cluster if the test fails half-way
        return proc

    def python(self, code: str, timeout: float = 60):
        """Run `code` in a fresh interpreter (RAY_ADDRESS = this cluster); it must print one JSON document."""
        env = dict(self.env, RAY_ADDRESS=self.gcs_address)
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=self.workdir,
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"driver script failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def state(self, attempts: int = 3) -> dict:
        """Nodes and actors from the Ray state API (dashboard), dead ones included; retried, since a busy
        dashboard can time out a query."""
        for attempt in range(attempts):
            try:
                return self._state()
            except (RuntimeError, ValueError, subprocess.TimeoutExpired):
                if attempt == attempts - 1:
                    raise
                time.sleep(2)

    def _state(self) -> dict:
        return self.python(f"""
            import json
            from ray.util.state import list_actors, list_nodes
            addr = {self.dashboard_url!r}
            nodes = [dict(node_id=n.node_id, ip=n.node_ip, state=n.state, resources=n.resources_total)
                     for n in list_nodes(address=addr, detail=True, limit=1000)]
            actors = [dict(class_name=a.class_name, node_id=a.node_id, state=a.state, pid=a.pid, job_id=a.job_id)
                      for a in list_actors(address=addr, detail=True, limit=10000)]
            print(json.dumps({{"nodes": nodes, "actors": actors}}))
        """)

    def serve_status(self) -> dict:
        import yaml

        try:
            proc = self.run(tool("serve"), "status", "--address", self.dashboard_url, timeout=60, check=False)
        except subprocess.TimeoutExpired:
            return {}  # callers poll again
        return (yaml.safe_load(proc.stdout) or {}) if proc.returncode == 0 else {}
