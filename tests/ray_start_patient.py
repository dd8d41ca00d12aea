"""`ray start` as the test harness runs it: the ordinary CLI, with Ray's wait for the new raylet to register raised.

Ray gives a starting node a fixed 30 s to register its raylet with the GCS (`ray/_private/node.py`, not
configurable) and then fails with "The current node timed out during startup". On a 2-core CI machine at a load
average of 15-45 (the whole suite plus other work) registration can take longer while nothing is wrong, which made
the multi-node tests flaky. Here `services.get_node` keeps retrying for DERTA_RAY_START_WAIT_S (default 300 s)
before Ray's own loop sees the failure, unless the raylet process has died; everything else is `ray start`
unchanged. A raylet also aborts when its dashboard agent takes more than ~15 s to report its ports, which no setting
changes: the agent is started through ray_agent_early_ports.py, which reports them first. A start that fails anyway
is retried (multinode_utils.LocalCluster._start).

    python tests/ray_start_patient.py start --head ...      (same arguments as `ray`)
"""
import os
import sys
import time
from pathlib import Path

import ray._private.ray_constants as ray_constants
import ray._private.services as services
from ray.scripts.scripts import main

WAIT_S = float(os.environ.get("DERTA_RAY_START_WAIT_S", "300"))
_get_node = services.get_node


def raylet_alive() -> bool:
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            if child.name() == "raylet" and child.status() != psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            continue
    return False


def patient_get_node(gcs_address, node_id):
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            return _get_node(gcs_address, node_id)
        except RuntimeError:  # "node info not available yet": the raylet has not registered
            # a raylet that died (e.g. it gave up waiting for its dashboard agent) never registers: fail now, the
            # harness retries with fresh ports
            if time.monotonic() > deadline or not raylet_alive():
                raise
            time.sleep(0.5)


services.get_node = patient_get_node

# the dashboard agent reports its (explicitly given) ports before its slow start-up: see ray_agent_early_ports.py
AGENT_LAUNCHER = Path(__file__).resolve().with_name("ray_agent_early_ports.py")
_python_command = services._build_python_executable_command_memory_profileable


def agent_python_command(component, session_dir, unbuffered=True):
    command = _python_command(component, session_dir, unbuffered)
    if component == ray_constants.PROCESS_TYPE_DASHBOARD_AGENT:
        command = [*command, str(AGENT_LAUNCHER)]
    return command


services._build_python_executable_command_memory_profileable = agent_python_command

if __name__ == "__main__":
    sys.argv[0] = "ray"
    sys.exit(main())
