"""serve/batch_gate.py: requests enter a batch only while the engine is idle, after a bounded fill wait (no Ray)."""
import asyncio

from serve.batch_gate import BatchGate

NEVER = 1000.0  # a fill wait no test waits out: a test that depended on it would hang, then fail by its timeout


class Clock:
    """Time moves only when a test says so: batches here "run" 100 s whatever the machine's load."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def gate_of(max_batch_size: int = 16, max_fill_wait_s: float = NEVER) -> BatchGate:
    return BatchGate(max_batch_size, fill_fraction=1.0, max_fill_wait_s=max_fill_wait_s, clock=Clock())


def batch_ends(gate: BatchGate, size: int, seconds: float = 100.0) -> None:
    gate.clock.now += seconds
    gate.batch_ended(size)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_idle_gate_admits_at_once_and_a_running_batch_holds_requests():
    async def scenario():
        gate = gate_of()
        await gate.admit()  # idle, no batch before: no wait
        gate.batch_started()
        held = [asyncio.create_task(gate.admit()) for _ in range(3)]
        await settle()
        assert gate.waiting == 3 and not any(task.done() for task in held)
        batch_ends(gate, size=0)  # nothing to expect back: the three waiting are the next batch
        await asyncio.gather(*held)
        assert gate.waiting == 0

    run(scenario())


def test_after_a_batch_the_gate_waits_for_its_members_to_come_back():
    async def scenario():
        gate = gate_of()
        gate.batch_started()
        early = [asyncio.create_task(gate.admit()) for _ in range(2)]  # arrived during the batch
        await settle()
        batch_ends(gate, size=14)  # 14 clients were just answered: wait for 2 + 14
        await settle()
        assert not any(task.done() for task in early)
        back = [asyncio.create_task(gate.admit()) for _ in range(13)]
        await settle()
        assert not any(task.done() for task in early + back) and gate.waiting == 15
        last = asyncio.create_task(gate.admit())  # the 16th: the whole next batch goes together
        await asyncio.gather(*early, *back, last)
        assert gate.waiting == 0
        await gate.admit()  # still idle and the window is closed: a late request passes too

    run(scenario())


def test_fill_target_is_capped_at_the_batch_size():
    async def scenario():
        gate = gate_of(max_batch_size=4)
        gate.batch_started()
        early = [asyncio.create_task(gate.admit()) for _ in range(3)]
        await settle()
        batch_ends(gate, size=4)  # 3 + 4 expected, but a batch holds 4
        await settle()
        assert not any(task.done() for task in early)
        await asyncio.gather(*early, gate.admit())

    run(scenario())


def test_the_fill_wait_is_bounded():
    async def scenario():
        gate = gate_of(max_fill_wait_s=0.05)
        gate.batch_started()
        batch_ends(gate, size=8)  # 8 expected back, only 1 comes: it goes when the window ends
        await gate.admit()
        assert gate.open.is_set()

    run(scenario())


def test_a_lone_sequential_client_is_never_held():
    async def scenario():
        gate = gate_of()
        for _ in range(3):
            await gate.admit()
            gate.batch_started()
            batch_ends(gate, size=1)  # its own request: the next one is the one expected

    run(scenario())


def test_a_stale_window_timer_does_not_open_a_later_window():
    async def scenario():
        gate = gate_of()
        gate.batch_started()
        batch_ends(gate, size=4)
        waiter = asyncio.create_task(gate.admit())
        await settle()
        gate._window_over(gate.windows - 1)  # an earlier batch's timer fires late
        await settle()
        assert not waiter.done()
        gate._window_over(gate.windows)  # this window's own timer
        await waiter

    run(scenario())


def test_fill_fraction_zero_starts_the_next_batch_with_whatever_waits():
    async def scenario():
        gate = BatchGate(max_batch_size=16, fill_fraction=0.0, clock=Clock())
        gate.batch_started()
        batch_ends(gate, size=16)
        await gate.admit()

    run(scenario())
