"""The Ray Serve model deployment: one `Engine` per replica, dynamic batching with `@serve.batch`.

`DertaModel` is the only Ray-aware layer around the engine: it loads the model before the replica takes traffic,
groups concurrent requests into one batched `generate`, streams per-step events back through the handle, and
returns client errors as `Rejection` values (never raised, so they are not logged as replica failures).
"""
from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import AsyncIterator

from ray import serve

from derta.config import DertaConfig, ServeConfig
from serve.batch_gate import BatchGate
from serve.engine import Engine, GenerationJob, TokenBudget
from serve.protocol import Rejection, ServeError
from serve.scheduler import Scheduler

FINAL_FIELDS = ("text", "finish_reason", "prompt_tokens", "completion_tokens", "batch_size", "error", "logprobs")


# ============================================================================================ model sources
def model_sources(cfg: DertaConfig, model: str | None = None) -> dict[str, dict[str, str | None]]:
    """Served name -> {path, adapter}: the default model plus every `serve.registry` entry."""
    default = {"path": absolute_if_local(model or cfg.model.name_or_path),
               "adapter": absolute_if_local(cfg.model.adapter)}
    sources = {cfg.serve.model_name: default}
    for name, entry in cfg.serve.registry.items():
        if "path" not in entry:
            raise ValueError(f"serve.registry.{name}: needs a 'path' (and optionally an 'adapter')")
        sources[name] = {"path": absolute_if_local(entry["path"]), "adapter": absolute_if_local(entry.get("adapter"))}
    return sources


def absolute_if_local(path: str | None) -> str | None:
    """Replicas may run in another working directory: pin existing relative paths to this one."""
    if path is None or path == "tiny":
        return path
    local = Path(os.path.expanduser(path))
    return str(local.resolve()) if local.exists() else path


def resolve_source(cfg: DertaConfig, source: dict) -> str:
    from derta.modeling import resolve_model_path

    model_cfg = cfg.model.model_copy(update={"name_or_path": source["path"]})
    return resolve_model_path(model_cfg, cfg.data.synthetic, cfg.data.refusal_string)


def model_deployment_options(s: ServeConfig) -> dict:
    options = {"ray_actor_options": dict(s.ray_actor_options), "max_ongoing_requests": s.max_ongoing_requests,
               "max_queued_requests": s.max_queued_requests}
    if s.autoscaling:
        options["autoscaling_config"] = s.autoscaling.model_dump()
    else:
        options["num_replicas"] = s.num_replicas
    if s.max_replicas_per_node:
        options["max_replicas_per_node"] = s.max_replicas_per_node
    return options


def model_capacity(s: ServeConfig, models: int = 1) -> int | None:
    """Requests the model deployments of config `s` can hold at their largest: per model, every replica's
    max_ongoing_requests plus the calling handle's max_queued_requests (None: unbounded queue)."""
    if s.max_queued_requests == -1:
        return None
    replicas = s.autoscaling.max_replicas if s.autoscaling else s.num_replicas
    return models * (replicas * s.max_ongoing_requests + s.max_queued_requests)


def deployment_capacity(config) -> int | None:
    """The same from a live Serve `DeploymentConfig` (serve_config.yaml may override the derta config's values)."""
    if config.max_queued_requests == -1:
        return None
    auto = config.autoscaling_config
    replicas = auto.max_replicas if auto else (config.num_replicas or 1)
    return replicas * config.max_ongoing_requests + config.max_queued_requests


def deployment_name(served_name: str, default_name: str) -> str:
    if served_name == default_name:
        return "DertaModel"
    return "DertaModel_" + "".join(c if c.isalnum() or c in "-_" else "_" for c in served_name)


def lower_priority(levels: int) -> None:
    """Renice every thread of this process `levels` steps (Linux niceness is per thread; threads started later,
    e.g. torch's OpenMP pool, inherit it from the thread that starts them). On CPUs shared with Serve's proxy and
    the ingress this lets them preempt the forward passes: overload 503s and /health answer in milliseconds
    instead of waiting for a core (bench/bench_serve.py `overload`)."""
    if levels <= 0:
        return
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:  # not Linux: the calling thread's process
        threads = [0]
    for tid in threads:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + levels))
        except OSError:  # the thread ended meanwhile
            pass


# ============================================================================================ deployment
@serve.deployment
class DertaModel:
    """One model per replica, loaded before the replica takes traffic."""

    async def __init__(self, config: dict, name: str, source: dict):
        import torch

        self.cfg = DertaConfig.model_validate(config)
        lower_priority(self.cfg.serve.model_niceness)
        self.name = name
        device = "cuda" if torch.cuda.is_available() else "cpu"
        # resolve_source fails the deployment early on a bad path
        self.engine = Engine(self.cfg, name, resolve_source(self.cfg, source), source.get("adapter"), device)
        self.load_error: BaseException | None = None
        self.scheduler: Scheduler | None = None  # serve.continuous_batching: one decode loop, set once loaded
        self.loaded = threading.Event()
        s = self.cfg.serve
        for batched in (self._generate_batch, self._probe_batch):
            batched.set_max_batch_size(s.max_batch_size)
            batched.set_batch_wait_timeout_s(s.batch_wait_timeout_s)
        # requests enter the batch queues only while the engine is idle, after a bounded wait for batch mates
        self.gate = BatchGate(s.max_batch_size, s.batch_fill_fraction)
        self.budget = TokenBudget(s.max_inflight_tokens
                                  or 4 * s.max_batch_size * (s.max_input_tokens + s.max_new_tokens))
        self._init_metrics()
        # Serve routes traffic to a replica once __init__ returns: load first, so a new or restarted replica
        # (node loss, autoscale-up) never answers "still loading"; a load error fails the replica
        await asyncio.to_thread(self._load)
        self.check_health()

    def _init_metrics(self) -> None:
        from ray.serve.metrics import Counter, Histogram

        self.probe_latency = Histogram("derta_probe_latency_ms", description="/probe model time (ms)",
                                       boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000])
        self.batch_sizes = Histogram("derta_generate_batch_size", description="requests per generate batch",
                                     boundaries=[1, 2, 4, 8, 16, 32, 64])
        self.generated_tokens = Counter("derta_generated_tokens", description="completion tokens generated")
        self.prompt_tokens = Counter("derta_prompt_tokens", description="prompt tokens admitted")

    def _load(self) -> None:
        try:
            self.engine.load()
            if self.cfg.serve.continuous_batching:
                self.scheduler = Scheduler(self.engine.model, self.engine.tokenizer, self.cfg.serve.max_batch_size,
                                           self.cfg.serve.batch_wait_timeout_s, self.cfg.serve.batch_fill_fraction)
        except BaseException as err:  # reported by check_health, /ready and every request
            self.load_error = err
        finally:
            self.loaded.set()

    def check_health(self) -> None:
        if self.load_error is not None:
            raise RuntimeError(f"model {self.engine.path} failed to load: {self.load_error!r}")

    def ready(self) -> bool:
        return self.loaded.is_set() and self.load_error is None

    def _require_model(self) -> None:
        if not self.ready():
            reason = f"failed to load: {self.load_error!r}" if self.load_error else "is still loading"
            raise ServeError(503, f"model {self.name!r} {reason}")

    def info(self) -> dict:
        return self.engine.info() | {"ready": self.ready()}

    # ------------------------------------------------------------------------------------ generation
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _generate_batch(self, jobs: list[GenerationJob]) -> AsyncIterator[list]:
        """Serve groups concurrent calls into `jobs`; yields one event per job per decoding step."""
        self.gate.batch_started()
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue = asyncio.Queue()
        emit = lambda item: loop.call_soon_threadsafe(steps.put_nowait, item)  # noqa: E731
        self.batch_sizes.observe(len(jobs))

        def work():
            try:
                self.engine.generate(jobs, emit)
            except Exception as err:
                emit(err)
            finally:
                emit(None)

        worker = loop.run_in_executor(None, work)
        try:
            while (events := await steps.get()) is not None:
                if isinstance(events, Exception):
                    raise events
                yield [StopIteration if event is None else dict(event, batch_size=len(jobs)) for event in events]
            await worker
        finally:
            self.gate.batch_ended(len(jobs))

    async def generate(self, request: dict) -> dict | Rejection:
        events = [event async for event in self.generate_stream(request, stream=False)]
        if isinstance(events[0], Rejection):
            return events[0]
        final = events[-1]
        if final.get("finish_reason") == "error":  # this request alone failed; its batch mates did not
            return Rejection(500, f"generation failed for this request: {final.get('error')}", code="generation_error")
        return {key: value for key, value in final.items() if key != "type" and value is not None}

    async def generate_stream(self, request: dict, stream: bool = True) -> AsyncIterator[dict | Rejection]:
        """A "start" event (or a Rejection), {"type": "delta", "text"} events (`stream=False`: only where a batch
        mate streams), then one "final" event."""
        try:
            self._require_model()
            job = self.engine.job(request, stream)
        except ServeError as err:
            yield err.rejection()
            return
        cost = len(job.prompt_ids) + job.max_new_tokens
        try:
            self.budget.acquire(cost)
        except ServeError as err:
            yield err.rejection()
            return
        try:
            yield {"type": "start", "prompt_tokens": len(job.prompt_ids)}  # validation passed: HTTP 200 from here
            async for event in self._generate_events(request, job):
                yield event
        finally:
            self.budget.release(cost)

    async def _generate_events(self, request: dict, job: GenerationJob) -> AsyncIterator[dict]:
        self.prompt_tokens.inc(len(job.prompt_ids))
        echo = await asyncio.to_thread(self.engine.echo, job.prompt_ids, job.logprobs) if request.get("echo") else None
        if job.max_new_tokens == 0:  # echo only: score the prompt
            yield {"type": "final", "model": self.name, "text": "", "finish_reason": "length", "batch_size": 1,
                   "prompt_tokens": len(job.prompt_ids), "completion_tokens": 0, "echo": echo,
                   "logprobs": [] if job.logprobs is not None else None}
            return
        if self.scheduler is not None:
            events = self._scheduled(job)
        else:
            await self.gate.admit()
            events = self._generate_batch(job)
        async for event in events:  # consumed to the end: Serve settles every step future
            if event["delta"]:
                yield {"type": "delta", "text": event["delta"]}
            if event.get("final"):
                if self.scheduler is not None:  # static batches are counted when they start
                    self.batch_sizes.observe(event["batch_size"])
                self.generated_tokens.inc(event["completion_tokens"])
                final = {"type": "final", "model": self.name, "echo": echo}
                final |= {key: event[key] for key in FINAL_FIELDS if key in event}
                if final.get("logprobs") is not None:
                    final["logprobs"] = self.engine.readable_logprobs(final["logprobs"])
                yield final

    async def _scheduled(self, job: GenerationJob) -> AsyncIterator[dict]:
        """`job` through the continuous-batching loop: its events, the final one last. A request that goes away
        (client disconnect) leaves the running batch at the next step."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        ticket = self.scheduler.submit(job, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        try:
            while not (event := await events.get()).get("final"):
                yield event
            yield event
        finally:
            self.scheduler.cancel(ticket)  # a no-op once it finished

    # ------------------------------------------------------------------------------------ probe
    async def probe(self, request: dict) -> dict | Rejection:
        try:
            return await self._probe(request)
        except ServeError as err:
            return err.rejection()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _probe_batch(self, items: list[tuple[list[int], list[int], float]]) -> list:
        """Concurrent probes share one forward pass, like /generate requests share decoding steps."""
        self.gate.batch_started()
        try:
            started = time.perf_counter()
            results = await asyncio.to_thread(self.engine.probe_batch, items)
            self.probe_latency.observe((time.perf_counter() - started) * 1000)
            return results
        finally:
            self.gate.batch_ended(len(items))

    async def _probe(self, request: dict) -> dict:
        self._require_model()
        prompt_ids, response_ids, verify, threshold = self.engine.probe_inputs(request)
        cost = self.engine.probe_cost(prompt_ids, response_ids, verify)
        self.budget.acquire(cost)
        try:
            await self.gate.admit()
            result = await self._probe_batch((prompt_ids, response_ids, threshold))
            out = self.engine.probe_report(result, response_ids, threshold) | {"prompt_tokens": len(prompt_ids)}
            if verify:  # one batched generate over all positions; its tokens are in `cost`
                out["verify"] = await asyncio.to_thread(self.engine.verify, prompt_ids, response_ids, *verify)
            return out
        finally:
            self.budget.release(cost)
