"""When requests may enter the replica's batch queues: only while the engine is idle, and right after a batch,
after a bounded wait for that batch's members to come back.

Serve's `@serve.batch` fixes a batch's members when its short wait ends, even while the previous batch still runs
(ray/serve/batching.py `_process_batches`), so under steady load it queues fragments of a few requests each. The
gate keeps requests out of the queues while a batch runs: everything that arrived meanwhile forms the next one.

That alone still splits a closed loop of clients (each sends its next request when its last one returns): when a
batch of k ends, the requests that waited go at once, and the k clients just answered come back a few tens of
milliseconds later, too late for that batch (a 16-client bench alternated batches of 14 and 2). So after a batch of
k ends, the gate stays closed until `waiting + k` requests are waiting (capped at the batch size) or a share
`fill_fraction` of the batch's duration has passed (at most `max_fill_wait_s`), whichever comes first. A batch that
ran ~1 s waits at most ~0.1 s for mates it will then serve in the same decoding steps; a lone client is never
held (its next request is the one expected), and a short /probe batch sets a correspondingly short window.
"""
from __future__ import annotations

import asyncio
import time


class BatchGate:
    def __init__(self, max_batch_size: int, fill_fraction: float, max_fill_wait_s: float = 0.5, clock=time.monotonic):
        self.max_batch_size, self.fill_fraction, self.max_fill_wait_s = max_batch_size, fill_fraction, max_fill_wait_s
        self.clock = clock
        self.running = 0  # batches on the engine now
        self.waiting = 0  # requests held at the gate
        self.fill_target = 0  # after a batch: hold until this many wait ...
        self.fill_deadline = 0.0  # ... or until this time (self.clock)
        self.started_at = 0.0
        self.windows = 0  # fill windows so far: a timer only ends its own
        self.open = asyncio.Event()
        self.open.set()

    async def admit(self) -> None:
        """Return when this request may join the next batch."""
        if self.open.is_set():
            return
        self.waiting += 1
        try:
            self._maybe_open()
            await self.open.wait()
        finally:
            self.waiting -= 1

    def batch_started(self) -> None:
        if self.running == 0:
            self.started_at = self.clock()
        self.running += 1
        self.open.clear()

    def batch_ended(self, size: int) -> None:
        self.running -= 1
        if self.running:
            return
        now = self.clock()
        wait = min(self.fill_fraction * (now - self.started_at), self.max_fill_wait_s)
        self.fill_target = min(self.max_batch_size, self.waiting + size)
        self.fill_deadline = now + wait
        self.windows += 1
        self._maybe_open()
        if not self.open.is_set():
            asyncio.get_running_loop().call_later(wait, self._window_over, self.windows)

    def _window_over(self, window: int) -> None:
        # asyncio may run a timer up to its clock resolution early: end the window explicitly, not by the clock
        if window == self.windows:
            self.fill_deadline = 0.0
            self._maybe_open()

    def _maybe_open(self) -> None:
        """Open once the engine is idle and the batch is full enough or the wait is over; re-checks the current
        state, so a stale timer from an earlier batch does nothing."""
        if self.running == 0 and (self.waiting >= self.fill_target or self.clock() >= self.fill_deadline):
            self.fill_target = 0
            self.open.set()
