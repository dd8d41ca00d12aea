"""Continuous batching: one decode loop per model that requests join and leave between decoding steps. No Ray.

`run_generate` (serve/engine.py) decodes a static batch: it starts when the batch is formed and ends with its
slowest row, and under Serve the engine then idles for the return trip (answer -> ingress -> client -> next
request -> replica) and the wait for the next batch to fill. `Scheduler` keeps one running batch instead, in a
thread of its own:

* between two decoding steps, waiting requests are prefilled together (one left-padded forward pass) and merged
  into the running batch's KV cache (`DecodeBatch.join`): both caches are left-padded to the longer one, so every
  row keeps its padding on the left and its own `position_ids` (the count of its real tokens), as HF `generate`
  does for a left-padded batch: greedy rows decode the same tokens as unbatched generation;
* a row that finished (EOS, stop string, max_tokens, error) or was cancelled leaves at once
  (`DecodeBatch.drop`), and cache columns that only padding uses any more are cut off;
* the KV cache's layers (`GrowingLayer`) write each step's column into buffers with room to grow instead of
  concatenating the whole cache every step as HF's `DynamicLayer` does.

Per row, exactly as in `run_generate`: its own seeded sampling (temperature, top_p), stop strings, logprobs,
max_tokens (`RowDecoder`, `sample_token`), and one row's failure never touches its batch mates.
"""
from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass
from typing import Callable

from serve.engine import GenerationJob, RowDecoder, eos_token_ids, left_pad, row_error, sample_token


@dataclass(eq=False)
class Ticket:
    """One submitted request: its decoder, its random stream, and where its events go (called from the loop)."""
    job: GenerationJob
    on_event: Callable[[dict], None]
    row: RowDecoder | None = None
    generator: object = None
    cancelled: bool = False
    next_token: int = 0  # the token the next decoding step feeds for this row
    batch_size: int = 0  # the most rows it shared a decoding step with
    arrived_step: int = 0  # Scheduler.steps when it was submitted


class DecodeBatch:
    """The running batch's torch state: a DynamicCache, its left-padded attention mask, one Ticket per row."""

    def __init__(self, model, pad_id: int):
        self.model, self.pad_id = model, pad_id
        self.tickets: list[Ticket] = []
        self.cache = None
        self.mask = None  # [rows, cache columns]: 1 = a real token
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        self.cache_kwarg = cache_kwarg(model)

    def __len__(self) -> int:
        return len(self.tickets)

    def _forward(self, input_ids, mask, cache):
        import torch

        # as `generate` for a left-padded batch: a token's position is the count of real tokens before it
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        with torch.no_grad():
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                             use_cache=True, logits_to_keep=1, **{self.cache_kwarg: cache})
        return out.logits[:, -1]

    def join(self, tickets: list[Ticket]) -> None:
        """Prefill `tickets` in one forward pass, choose their first tokens, merge them into the batch."""
        import torch
        from transformers import DynamicCache

        device = self.model.device
        input_ids, new_mask = left_pad([t.job.prompt_ids for t in tickets], self.pad_id, device)
        cache = DynamicCache(config=self.model.config)
        check_cache_layers(cache)
        cache.layers = [GrowingLayer() for _ in cache.layers]
        if getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:  # a config that names no layers
            cache.layer_class_to_replicate = GrowingLayer
        logits = self._forward(input_ids, new_mask, cache)
        choose_tokens(tickets, logits)
        if self.cache is None:
            self.cache, self.mask, self.tickets = cache, new_mask, list(tickets)
            return
        width = max(self.mask.shape[1], new_mask.shape[1])
        for old_layer, new_layer in zip(self.cache.layers, cache.layers):
            old_layer.keys = torch.cat([pad_left(old_layer.keys, width, -2), pad_left(new_layer.keys, width, -2)])
            old_layer.values = torch.cat([pad_left(old_layer.values, width, -2),
                                          pad_left(new_layer.values, width, -2)])
        self.mask = torch.cat([pad_left(self.mask, width, -1), pad_left(new_mask, width, -1)])
        self.tickets += tickets

    def step(self) -> None:
        """One decoding step for every row: feed each row's last token, choose its next one."""
        import torch

        device = self.model.device
        input_ids = torch.tensor([[t.next_token] for t in self.tickets], device=device)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.tickets), 1))], dim=-1)
        logits = self._forward(input_ids, self.mask, self.cache)
        choose_tokens(self.tickets, logits)
        if self.max_positions:  # a row at the model's context length ends, as `generate` ends there
            lengths = self.mask.sum(-1).tolist()
            for ticket, length in zip(self.tickets, lengths):
                if not ticket.row.finished and length + 1 >= self.max_positions:
                    ticket.row.finish_reason = "length"
                    ticket.row.text += ticket.row.detok.flush()

    def drop(self) -> None:
        """Remove finished and cancelled rows; cut cache columns that are padding in every remaining row."""
        import torch

        keep = [i for i, t in enumerate(self.tickets) if not (t.cancelled or t.row.finished)]
        if len(keep) == len(self.tickets):
            return
        if not keep:
            self.tickets, self.cache, self.mask = [], None, None
            return
        self.tickets = [self.tickets[i] for i in keep]
        index = torch.tensor(keep, device=self.mask.device)
        self.mask = self.mask[index]
        first = int(self.mask.any(0).long().argmax())  # the first column some row still uses
        self.mask = self.mask[:, first:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]

    def fail_all(self, err: Exception) -> None:
        for ticket in self.tickets:
            if not ticket.row.finished:
                ticket.row.fail(row_error(err))


try:
    from transformers.cache_utils import DynamicLayer
except ImportError:  # transformers without cache layers: DecodeBatch then fails at join, with the cache's own error
    DynamicLayer = object


class GrowingLayer(DynamicLayer):
    """A full-attention KV cache layer whose `keys`/`values` are views of buffers with room to grow.

    HF's `DynamicLayer.update` concatenates every step, copying the layer's whole cache: with 16 rows that was 23%
    of a decoding step's CPU time (torch.profiler, hidden 512, 8 layers). Here a step writes only its new column;
    a buffer is reallocated (one copy) when full, to 1.5x its need (+ `GROW_MIN` columns), or when `join`/`drop`
    replaced `keys`/`values` with tensors of their own (detected by storage), so those stay plain tensor edits.
    """

    GROW_MIN = 64

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        self.key_buffer = self.value_buffer = None

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        used = self.get_seq_length()
        need = used + key_states.shape[-2]
        if not (self._owns(self.keys, self.key_buffer) and self._owns(self.values, self.value_buffer)
                and self.key_buffer.shape[-2] >= need and self.key_buffer.shape[0] == key_states.shape[0]):
            self.key_buffer = self._reallocate(self.keys, key_states, used, need)
            self.value_buffer = self._reallocate(self.values, value_states, used, need)
        self.key_buffer[:, :, used:need] = key_states
        self.value_buffer[:, :, used:need] = value_states
        self.keys, self.values = self.key_buffer[:, :, :need], self.value_buffer[:, :, :need]
        return self.keys, self.values

    @staticmethod
    def _owns(view, buffer) -> bool:
        """`view` is the leading columns of `buffer` (and not a tensor `join`/`drop` put there)."""
        return (buffer is not None and view.numel() > 0 and view.data_ptr() == buffer.data_ptr()
                and view.stride() == buffer.stride())

    def _reallocate(self, old, new, used: int, need: int):
        shape = list(new.shape)
        shape[-2] = need + max(self.GROW_MIN, need // 2)
        buffer = new.new_empty(shape)
        if used:
            buffer[:, :, :used] = old
        return buffer


def cache_kwarg(model) -> str:
    """transformers >= 5.x names the KV cache argument `cache` (`past_key_values` is deprecated), older ones only
    `past_key_values`."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper takes **kwargs
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def pad_left(tensor, width: int, dim: int):
    """Zero-pad `tensor` on the left of `dim` to `width` (zeros: masked cache columns / mask entries)."""
    import torch

    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def check_cache_layers(cache) -> None:
    from transformers.cache_utils import DynamicLayer

    kinds = {type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer}
    if kinds:
        raise ValueError(f"continuous batching needs a plain full-attention KV cache; this model's has {sorted(kinds)} "
                         "layers: set serve.continuous_batching=false")


def choose_tokens(tickets: list[Ticket], logits) -> None:
    """Each row's next token from its logits row: greedy argmax, or its own seeded draw; logprobs; push."""
    import torch

    greedy = logits.argmax(-1).tolist()  # one op for the whole batch
    for ticket, row_logits, best in zip(tickets, logits, greedy):
        row = ticket.row
        if row.finished or ticket.cancelled:
            continue
        try:
            if row.job.logprobs is not None:
                row.step_log_probs = torch.log_softmax(row_logits.float(), dim=-1).cpu()
            if row.job.samples:
                token = sample_token(row_logits.cpu(), row.job.temperature, row.job.top_p, ticket.generator)
            else:
                token = best
            row.push(token)
            ticket.next_token = token
        except Exception as err:  # noqa: BLE001 -- isolate the row; the message names the cause
            row.fail(row_error(err))


class Scheduler:
    """Owns one decode loop (a daemon thread) over a `DecodeBatch` of at most `max_batch_size` rows.

    `submit(job, on_event)` queues a request; `on_event` is called from the loop's thread with {"delta": text}
    events (only if `job.stream`) and one final event (the `RowDecoder.result()` fields, "delta", "final": True,
    "batch_size": the most rows it shared a step with). `cancel(ticket)` drops a request at the next step, silently.

    When newcomers join: a prefill is a forward pass of its own (on a CPU one lone 27-token prefill costs about a
    decoding step of 16 rows), so while rows decode, newcomers join once `join_min` of them wait (or enough to fill
    the batch), or when the oldest has waited `join_wait_steps` steps. An idle loop waits for batch mates as the
    static path's batch gate and `@serve.batch` do: right after the batch emptied, until as many requests as it
    held are back, or `fill_fraction` of its run time has passed (<= `max_fill_wait_s`); then up to `idle_wait_s`
    (Serve's `batch_wait_timeout_s`) for `max_batch_size` requests. So a closed
    loop of clients whose rows finish together (same max_tokens) starts again as one full batch with one prefill,
    and neither path waits for a request that is not coming back.
    """

    def __init__(self, model, tokenizer, max_batch_size: int, idle_wait_s: float = 0.0, fill_fraction: float = 0.0,
                 join_min: int = 4, join_wait_steps: int = 4, max_fill_wait_s: float = 0.5):
        self.model, self.tokenizer, self.max_batch_size = model, tokenizer, max_batch_size
        self.idle_wait_s, self.fill_fraction, self.max_fill_wait_s = idle_wait_s, fill_fraction, max_fill_wait_s
        self.join_min, self.join_wait_steps = join_min, join_wait_steps
        self.run_started = 0.0  # when the batch last became non-empty
        self.run_peak = 0  # the most rows it held since
        self.fill_target, self.fill_deadline = max_batch_size, 0.0  # set when the batch empties
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.batch = DecodeBatch(model, tokenizer.pad_token_id)
        self.pending: list[Ticket] = []
        self.wake = threading.Condition()
        self.closed = False
        self.steps = 0  # decoding steps run (joins not counted), for tests and metrics
        self.thread: threading.Thread | None = None

    def submit(self, job: GenerationJob, on_event: Callable[[dict], None]) -> Ticket:
        seed = job.seed if job.seed is not None else secrets.randbits(63)
        import torch

        ticket = Ticket(job, on_event, RowDecoder(self.tokenizer, job, self.eos_ids), torch.Generator().manual_seed(seed))
        with self.wake:
            if self.closed:
                raise RuntimeError("the scheduler is closed")
            ticket.arrived_step = self.steps
            self.pending.append(ticket)
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name="derta-decode", daemon=True)
                self.thread.start()
            self.wake.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        ticket.cancelled = True  # read by the loop between steps; a pending ticket is skipped when taken

    def close(self) -> None:
        with self.wake:
            self.closed = True
            self.wake.notify()
        if self.thread is not None:
            self.thread.join()

    def _take_newcomers(self) -> list[Ticket] | None:
        with self.wake:
            while not self.closed and not self.pending and not len(self.batch):
                self.wake.wait()
            if not len(self.batch):  # as the static path: the batch gate's fill wait, then Serve's batch wait
                self._wait_until(lambda: len(self.pending) >= self.fill_target, self.fill_deadline)
                self._wait_until(lambda: len(self.pending) >= self.max_batch_size,
                                 time.monotonic() + self.idle_wait_s)
                self.fill_target, self.fill_deadline = self.max_batch_size, 0.0
                self.run_started, self.run_peak = time.monotonic(), 0
            if self.closed:
                return None
            room = self.max_batch_size - len(self.batch)
            if not self._join_now(room):
                return []
            taken, self.pending = self.pending[:room], self.pending[room:]
        return [t for t in taken if not t.cancelled]

    def _wait_until(self, enough, deadline: float) -> None:
        """With `self.wake` held: until `enough()`, the deadline (time.monotonic) or close."""
        while not self.closed and not enough() and (left := deadline - time.monotonic()) > 0:
            self.wake.wait(left)

    def _join_now(self, room: int) -> bool:
        """Newcomers join when the batch is empty, when enough of them wait to fill it or to make their prefill
        worth a forward pass of its own (`join_min`), or when the oldest has waited `join_wait_steps` steps."""
        if not self.pending or room <= 0:
            return False
        return (not len(self.batch) or len(self.pending) >= min(room, self.join_min)
                or self.steps - self.pending[0].arrived_step >= self.join_wait_steps)

    def _loop(self) -> None:
        while (newcomers := self._take_newcomers()) is not None:
            # a failed forward pass ends the rows in it (a failed prefill only the newcomers), never the loop
            if newcomers:
                try:
                    self.batch.join(newcomers)
                except Exception as err:  # noqa: BLE001
                    for ticket in newcomers:
                        ticket.row.fail(row_error(err))
                self._report(newcomers)
                self.batch.drop()
            if len(self.batch):
                try:
                    self.batch.step()
                    self.steps += 1
                except Exception as err:  # noqa: BLE001
                    self.batch.fail_all(err)
                self._report(self.batch.tickets)
                self.batch.drop()
                if not len(self.batch):
                    self._batch_emptied()

    def _batch_emptied(self) -> None:
        now = time.monotonic()
        with self.wake:
            self.fill_target = min(self.max_batch_size, len(self.pending) + self.run_peak)
        self.fill_deadline = now + min(self.fill_fraction * (now - self.run_started), self.max_fill_wait_s)

    def _report(self, tickets: list[Ticket]) -> None:
        size = len(self.batch)
        self.run_peak = max(self.run_peak, size)
        for ticket in tickets:
            row = ticket.row
            if ticket.cancelled:
                continue
            ticket.batch_size = max(ticket.batch_size, size)
            delta = row.take_delta()
            if row.finished:
                event = {"delta": delta, **row.result(), "final": True, "batch_size": ticket.batch_size}
            elif ticket.job.stream and delta:
                event = {"delta": delta, "batch_size": ticket.batch_size}
            else:
                continue
            try:
                ticket.on_event(event)
            except Exception:  # noqa: BLE001 -- a consumer that went away must not stop the loop
                ticket.cancelled = True
