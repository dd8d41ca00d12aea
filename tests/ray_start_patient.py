"""`ray start` as the test harness runs it: the ordinary CLI, with Ray's wait for the new raylet to register raised.

Ray gives a starting node a fixed 30 s to register its raylet with the GCS (`ray/_private/node.py`, not
configurable) and then fails with "The current node timed out during startup". On a 2-core CI machine at a load
average of 15-45 (the whole suite plus other work) registration can take longer while nothing is wrong, which made
the multi-node tests flaky. Here `services.get_node` keeps retrying for DERTA_RAY_START_WAIT_S (default 300 s)
before Ray's own loop sees the failure; everything else is `ray start` unchanged.

    python tests/ray_start_patient.py start --head ...      (same arguments as `ray`)
"""
import os
import sys
import time

import ray._private.services as services
from ray.scripts.scripts import main

WAIT_S = float(os.environ.get("DERTA_RAY_START_WAIT_S", "300"))
_get_node = services.get_node


def patient_get_node(gcs_address, node_id):
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            return _get_node(gcs_address, node_id)
        except RuntimeError:  # "node info not available yet": the raylet has not registered
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


services.get_node = patient_get_node

if __name__ == "__main__":
    sys.argv[0] = "ray"
    sys.exit(main())
