"""Ray process setup shared by the CLI, jobs and tests (kept out of library code that must not start Ray)."""
from __future__ import annotations

import logging
import os


def init_ray(num_cpus: int | None = None, address: str | None = None, quiet: bool = True) -> None:
    """Connect to RAY_ADDRESS / `address` if given, else start a local instance with `num_cpus`."""
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if quiet:  # inherited by a local instance's workers: no "Loading weights" bar per model load
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # the dashboard serves the state API, which Ray Train's placement-group cleaner polls (without it, it warns
    # on every poll and cannot clean up after a crashed controller) and `ray list ...` uses
    kwargs = dict(logging_level=logging.ERROR if quiet else logging.INFO, log_to_driver=True,
                  include_dashboard=True, dashboard_host="127.0.0.1")
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), **kwargs)
    quiet_data(quiet)


def quiet_data(quiet: bool = True) -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = not quiet
    ctx.print_on_execution_start = not quiet
    ctx.execution_options.preserve_order = True  # deterministic order: exact data position on resume
    if quiet:  # the streaming executor logs a line per dataset execution at INFO
        logging.getLogger("ray.data").setLevel(logging.WARNING)
