"""The dashboard agent as the test harness starts it: its ports are reported to the raylet at once, then Ray's agent
runs unchanged.

A raylet waits a fixed ~15 s (not configurable in Ray 2.60) for its dashboard agent to write its port files
(`<session_dir>/{metrics_agent_port,metrics_export_port,dashboard_agent_listen_port}_<node_id>`) and aborts the node
when they are late. The agent writes them only after importing every dashboard module, which on a 2-core machine at
a load average of 40-70 took longer and made the multi-node tests flaky. The harness gives every port explicitly
(tests/multinode_utils.py), so the files' contents are known before the agent starts: this writes them (only ports
given as positive numbers) and then runs `python ray/dashboard/agent.py ARGS` as Ray would; the agent rewrites the
same values when it is up.

    python tests/ray_agent_early_ports.py /path/to/ray/dashboard/agent.py --node-id=... --session-dir=... ...
"""
import os
import runpy
import sys

PORT_FILES = {"metrics_agent_port": "grpc-port", "metrics_export_port": "metrics-export-port",
              "dashboard_agent_listen_port": "listen-port"}


def arg(name: str) -> str | None:
    prefix = f"--{name}="
    return next((a[len(prefix):] for a in sys.argv[2:] if a.startswith(prefix)), None)


def main() -> None:
    agent, session_dir, node_id = sys.argv[1], arg("session-dir"), arg("node-id")
    if session_dir and node_id:
        for file_name, option in PORT_FILES.items():
            value = arg(option) or ""
            if value.isdigit() and int(value) > 0:
                path = os.path.join(session_dir, f"{file_name}_{node_id}")
                with open(path + ".early", "w") as f:
                    f.write(value)
                os.replace(path + ".early", path)  # the raylet never reads a half-written file
    sys.argv = sys.argv[1:]
    runpy.run_path(agent, run_name="__main__")


if __name__ == "__main__":
    main()
