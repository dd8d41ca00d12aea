"""What `derta` commands print: a verbosity level, progress bars, and what of Ray's output reaches the console.

Levels (`--quiet` / `--verbose` on every command; DERTA_VERBOSITY so Ray jobs and child processes inherit it):
  quiet    results and errors only
  normal   our `[derta]` lines and progress (bars on a terminal, a plain line every PLAIN_INTERVAL_S otherwise)
  verbose  everything, Ray's own logs included

Progress bars are tqdm on a terminal (rate and ETA) and periodic plain lines when stderr is not a terminal (CI, log
files), so a log never fills with carriage returns.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

VERBOSITY_ENV = "DERTA_VERBOSITY"
LEVELS = ("quiet", "normal", "verbose")
PLAIN_INTERVAL_S = float(os.environ.get("DERTA_PROGRESS_INTERVAL_S", "10"))
OUR_PREFIX = "[derta]"


def verbosity() -> str:
    level = os.environ.get(VERBOSITY_ENV, "normal").strip().lower()
    return level if level in LEVELS else "normal"


def set_verbosity(level: str) -> None:
    if level not in LEVELS:
        raise ValueError(f"verbosity must be one of {LEVELS}, not {level!r}")
    os.environ[VERBOSITY_ENV] = level


def say(line: str) -> None:
    """One of our status lines (not in quiet mode)."""
    if verbosity() != "quiet":
        print(f"{OUR_PREFIX} {line}", flush=True)


def _fmt_seconds(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds}s"


class Progress:
    """Progress of `total` units (None: unknown). A tqdm bar on a terminal, else a plain line every `interval` s
    (and at the end). Nothing in quiet mode. Thread-safe enough for one updater."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "it", interval: float | None = None,
                 stream=None, tty: bool | None = None):
        self.desc, self.total, self.unit = desc, total, unit
        self.stream = stream or sys.stderr
        self.enabled = verbosity() != "quiet"
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = PLAIN_INTERVAL_S if interval is None else interval
        self.done, self.postfix = 0, {}
        self.printed, self.lines = 0, 0  # count shown by the last plain line, plain lines so far
        self.started = self.last_line = time.monotonic()
        self.bar = None
        if self.enabled and self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"{OUR_PREFIX} {desc}", unit=f" {unit}", file=self.stream,
                            dynamic_ncols=True, leave=True)

    def update(self, n: int = 1, **postfix) -> None:
        self.set(self.done + n, **postfix)

    def set(self, done: int, **postfix) -> None:
        delta, self.done = done - self.done, done
        self.postfix.update(postfix)
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(delta)
            if postfix:
                self.bar.set_postfix_str(self._postfix(), refresh=False)
        elif time.monotonic() - self.last_line >= self.interval:
            self._line()

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        elif self.done != self.printed or not self.lines:  # the final count, unless the last line showed it
            self._line()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _postfix(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.postfix.items())

    def _line(self) -> None:
        self.last_line = now = time.monotonic()
        self.printed, self.lines = self.done, self.lines + 1
        elapsed = now - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if self.total:
            eta = (self.total - self.done) / rate if rate > 0 else None
            head = f"{self.done}/{self.total} {self.unit} ({self.done / self.total:.0%})"
            tail = f", ETA {_fmt_seconds(eta)}" if self.done < self.total else f" in {_fmt_seconds(elapsed)}"
        else:
            head, tail = f"{self.done} {self.unit}", f" in {_fmt_seconds(elapsed)}"
        extra = f", {self._postfix()}" if self.postfix else ""
        slow = 0 < rate < 1
        speed = f"{1 / rate:.1f} s per {self.unit.rstrip('s')}" if slow else f"{rate:.1f} {self.unit}/s"
        print(f"{OUR_PREFIX} {self.desc}: {head}, {speed}{tail}{extra}", file=self.stream, flush=True)


# ------------------------------------------------------------------------------------------------ training
@contextmanager
def training_progress(metrics_path: Path, total_steps: int, poll_s: float = 0.5):
    """Follow the run's metrics.jsonl (rank 0 appends a line per logged step) while training runs on the workers:
    steps, loss and tok/s in one bar, without a channel from the workers to the driver."""
    stop = threading.Event()
    bar = Progress("train", total=total_steps, unit="steps")

    def follow():
        offset = 0
        while True:
            finished = stop.is_set()  # read before the file: the final lines are never missed
            try:
                with open(metrics_path, "rb") as f:
                    f.seek(offset)
                    chunk = f.read()
            except OSError:
                chunk = b""
            complete = chunk[:chunk.rfind(b"\n") + 1]  # a line being written right now waits for the next poll
            offset += len(complete)
            for line in complete.splitlines():
                try:
                    metrics = json.loads(line)
                except ValueError:
                    continue
                if "loss" in metrics:
                    bar.set(int(metrics["step"]), loss=f"{metrics['loss']:.4f}",
                            tok_s=f"{metrics.get('tokens_per_s', 0):.0f}")
            if finished:
                return
            stop.wait(poll_s)

    thread = threading.Thread(target=follow, name="derta-train-progress", daemon=True)
    thread.start()
    try:
        yield bar
    finally:
        stop.set()
        thread.join(10)
        bar.close()


# ------------------------------------------------------------------------------------------------ data
def materialize_with_progress(dataset, desc: str, unit: str = "examples", total: int | None = None):
    """`dataset.materialize()` with a progress line per finished block: the blocks stay in the object store, the
    driver sees only their row counts (block metadata)."""
    import ray

    refs = []
    with Progress(desc, total=total, unit=unit) as bar:
        for bundle in dataset.iter_internal_ref_bundles():
            refs.extend(bundle.block_refs)
            bar.update(bundle.num_rows() or 0)
    return ray.data.from_arrow_refs(refs) if refs else dataset.materialize()  # no blocks: an empty dataset


# ------------------------------------------------------------------------------------------------ Ray output
def keep_worker_line(line: str) -> bool:
    """Which lines printed by Ray workers reach our console in normal mode: our own status lines, except the
    per-step training lines that the driver's progress bar already shows."""
    text = line.strip()
    return text.startswith(OUR_PREFIX) and not text.startswith(f"{OUR_PREFIX} step ")


def filter_ray_console() -> None:
    """After ray.init: replace Ray's printer of worker stdout/stderr with one that keeps only our lines (normal) or
    nothing (quiet); verbose keeps Ray's printer. Errors still reach the user as exceptions from ray.get / fit."""
    level = verbosity()
    if level == "verbose":
        return
    from ray._private import worker as ray_worker

    dispatcher = ray_worker.global_worker_stdstream_dispatcher

    def print_ours(data: dict) -> None:
        if verbosity() == "quiet":
            return
        lines = [line for line in data.get("lines", []) if keep_worker_line(line)]
        if lines:
            print("\n".join(line.strip() for line in lines), file=sys.stderr if data.get("is_err") else sys.stdout,
                  flush=True)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", print_ours)

    # messages the raylet pushes to the driver (its error channel) are printed directly, not through the
    # dispatcher: keep their errors (a worker killed, out of memory), drop their warnings (e.g. "N PYTHON worker
    # processes have been started ..." on a loaded machine)
    print_raylet = ray_worker.print_to_stdstream
    if getattr(print_raylet, "__name__", "") == "print_raylet_errors":
        return  # already wrapped (init_ray after a ray.shutdown)

    def print_raylet_errors(data: dict, ignore_prefix: bool) -> None:
        lines = [line for line in data.get("lines", []) if not line.lstrip().startswith("WARNING")]
        if lines and verbosity() != "quiet":
            print_raylet(dict(data, lines=lines), ignore_prefix)

    ray_worker.print_to_stdstream = print_raylet_errors


def quiet_python_logs() -> None:
    """Driver-side loggers and warnings of libraries (Ray, Ray Data, Ray Train, transformers) below ERROR stay off
    the console unless --verbose."""
    if verbosity() == "verbose":
        return
    import warnings

    for name in ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "transformers", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", module=r"ray\..*")
