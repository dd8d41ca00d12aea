"""Benchmark the Serve app (CPU): probe cost, batched generation throughput, overload behaviour.

    python bench/bench_serve.py [--clients 16] [--requests-per-client 8] [--warmup-requests 1] [--new-tokens 32]
                                [--size probe|tiny] [--only all|latency|generate|overload[,...]] [--set KEY=VALUE]
    python bench/bench_serve.py --only overload [--overload-connections fresh|keepalive|both] [--overload-hold S]
                                [--overload-rounds N] [--overload-idle S]
                                [--overload-client asyncio|threads|both]

The model is a random-init Llama with the tiny tokenizer; `--size probe` (default) is hidden 512, 8 layers, so the
forward pass dominates a 512-token probe (`--size tiny`: the 128-hidden 4-layer default, 64 response tokens).
Named baselines, all measured in this run on the same model and sequences:
  forward          one raw forward pass over prompt + response (512 tokens in all)
  probe_inprocess  derta.probe.probe on that sequence (the function /probe calls)
  probe_http       POST /probe over HTTP through Serve (tokenization, routing, JSON included)
  per_position     the naive probe: for each of the 65 positions, prefill prompt + response[:i] and generate 1 token
  hf_sequential    unbatched HF `generate`, one request after another (before Ray starts: timed after Serve, in
                   the same process, it ran 10-20% slower even after ray.shutdown(), which would flatter Serve)
  serve_batched    POST /generate from N concurrent clients (dynamic batching in DertaModel); each client first sends
                   --warmup-requests untimed requests (all clients wait for each other), then the timed ones
  overload         4x the app's capacity (max_ongoing + max_queued) at once: admitted requests complete (p50/p99),
                   the rest get 503 + Retry-After (p50/p99/max latency; target <= 50 ms), no other 5xx; with fresh
                   connections per request and with pre-opened keep-alive ones, from an asyncio client in its own
                   process and from in-process threads (see `overload`); sent to Serve's HTTP port (`port`: HAProxy
                   under serve.direct_ingress, the default; `--set serve.direct_ingress=false`: Serve's Python
                   proxy, the baseline) and, with direct ingress, also to the ingress replica's own port (`direct`)
Ratios are printed last; targets: probe <= 1.3x forward, per_position >= 50x probe, serve_batched >= 4x hf_sequential.
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
from collections import Counter
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray starts its workers at niceness 15 (RAY_worker_niceness); a bench runs them at the priority of the process it
# compares them with, or any niced background work on the machine skews the ratio against Ray.
os.environ.setdefault("RAY_worker_niceness", "0")

import torch  # noqa: E402

from derta.config import load_config  # noqa: E402
from derta.modeling import load_model, load_tokenizer, resolve_model_path  # noqa: E402
from derta.probe import probe  # noqa: E402
from derta.transforms import PromptRenderer, refusal_token_ids  # noqa: E402

SIZES = {  # --size: model overrides and the probe's response length
    "probe": (["model.tiny.hidden_size=512", "model.tiny.intermediate_size=1408", "model.tiny.num_hidden_layers=8",
               "model.tiny.num_attention_heads=8", "model.tiny.num_key_value_heads=8",
               "model.tiny.max_position_embeddings=1024", "serve.max_input_tokens=1024"], 490),
    "tiny": ([], 64),
}
PROMPT = "Explain step by step how to make the cake, and why the sky is blue."
WORDS = "first bake the bread then explain why water and light make the sky blue because of scattering".split()
TOPICS = ["bread", "cake", "water", "light", "the sky", "a model", "a question", "an answer"]


def interleaved_seconds(fns: dict, reps: int, warmup: int = 1) -> dict[str, tuple[float, float]]:
    """name -> (min, median) seconds; the candidates run round-robin so that load from other processes on a
    shared machine hits them alike (min is the least disturbed run, median the typical one)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_index in range(warmup + reps):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            if round_index >= warmup:
                times[name].append(time.perf_counter() - started)
    return {name: (min(ts), statistics.median(ts)) for name, ts in times.items()}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def response_of_length(tokenizer, n: int) -> tuple[str, list[int]]:
    """A response text whose tokenization is exactly n tokens long (re-encoded, so HTTP sees the same ids)."""
    text = " ".join(WORDS * (n // len(WORDS) + 2) * 2)
    ids = tokenizer.encode(text, add_special_tokens=False)[:n]
    text = tokenizer.decode(ids)
    return text, tokenizer.encode(text, add_special_tokens=False)


def prompts(count: int) -> list[str]:
    return [f"Question {i}: how do I make {TOPICS[i % len(TOPICS)]} in {i % 5 + 1} steps?" for i in range(count)]


# ============================================================================================ in-process
class Local:
    def __init__(self, cfg, path: str):
        self.model = load_model(path, cfg.model).eval()
        self.tokenizer = load_tokenizer(path)
        data = cfg.data
        self.renderer = PromptRenderer(self.tokenizer, data.use_chat_template, data.plain_template, data.system_prompt)
        self.refusal_ids = refusal_token_ids(self.tokenizer, data.probe_refusal_strings)

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.renderer.encode_prompt(self.renderer.render(prompt))

    @torch.no_grad()
    def forward(self, ids: list[int]) -> None:
        self.model(input_ids=torch.tensor([ids]))

    @torch.no_grad()
    def generate(self, ids: list[int], new_tokens: int) -> int:
        input_ids = torch.tensor([ids])
        out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                  max_new_tokens=new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
        return out.shape[1] - len(ids)

    def run_generate(self, texts: list[str], new_tokens: int) -> int:
        """One batch through the serving engine's `run_generate` (what a replica runs per batch)."""
        from serve.engine import GenerationJob, run_generate

        jobs = [GenerationJob(self.prompt_ids(p), new_tokens) for p in texts]
        return sum(r["completion_tokens"] for r in run_generate(self.model, self.tokenizer, jobs))

    def per_position(self, prompt_ids: list[int], response_ids: list[int]) -> None:
        """The naive probe: one prefill + 1-token generate per position."""
        for i in range(len(response_ids) + 1):
            self.generate(prompt_ids + response_ids[:i], 1)


# ============================================================================================ Serve
def start_serve(cfg, path: str, app: bool = True) -> str:
    from ray import serve

    from derta.runtime import init_ray
    from serve.app import bind_app, http_options, set_serve_process_env

    set_serve_process_env(cfg)  # as `derta serve` starts its instance
    init_ray(num_cpus=4)
    port = free_port()
    serve.start(http_options={**http_options(cfg, port), "host": "127.0.0.1"})
    if app:
        serve.run(bind_app(cfg, path), name="bench", route_prefix="/", blocking=False)
    return f"http://127.0.0.1:{port}"


def overload(base_url: str, cfg, path: str, new_tokens: int, connections: str = "both", hold_s: float = 0,
             clients: str = "both", rounds: int = 1, idle_s: float = 0) -> dict:
    """4x capacity at once against a second app with max_ongoing=4, max_queued=4 (capacity 8).

    `connections`: "fresh" = every client opens a new connection with its request (client-side connect cost is
    part of the latency), "keepalive" = every client opened its keep-alive connection beforehand, as a load
    generator does; "both" runs the burst twice (fresh first). `clients`: "asyncio" = bench/burst_client.py in its
    own process (one aiohttp event loop, as a load generator sends), "threads" = the older in-process client (one
    httpx thread per request, in the bench process next to Ray's driver), "both" = each in turn. All requests are
    built first and sent at once; latency runs from a request's send to its response. `hold_s` > 0 (diagnostic)
    is the app's batch wait: admitted requests then sit idle that long before any compute, so the 503 latency is
    Serve's and derta's request handling alone, without the forward passes competing for the CPU. `rounds` > 1
    repeats the whole sequence (rows of round k > 1 are named `MODE-rk`): the first burst on a path meets it cold
    (e.g. HAProxy has no pooled connections to the ingress replica yet), later ones warm. `idle_s`: seconds between
    the app's start-up (and `derta serve`'s warm-up) and the first burst."""
    import httpx
    from ray import serve

    from serve.app import bind_app

    small = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={
        "max_ongoing_requests": 4, "max_queued_requests": 4, "max_batch_size": 4,
        **({"batch_wait_timeout_s": hold_s, "max_batch_size": 64} if hold_s else {})})})
    serve.run(bind_app(small, path), name="overload", route_prefix="/overload", blocking=False)
    capacity, url = 8, f"{base_url}/overload"
    with httpx.Client(base_url=url, timeout=600) as http:
        wait_ready(http)
    # "port": what users hit, Serve's HTTP port (HAProxy under serve.direct_ingress, else Serve's Python proxy)
    out, paths = {}, {"port": url}
    if cfg.serve.direct_ingress:  # also the ingress replica's own port (HAProxy keeps routing): both, one run
        from serve.app import wait_direct_ingress, warm_up

        url = paths["direct"] = out["direct_ingress_url"] = wait_direct_ingress("overload", "127.0.0.1")[0]
        # as `derta serve` does once the app runs (`--set serve.warmup_connections=0`: the cold baseline)
        out["warmup_ok"] = warm_up(paths["port"], cfg.serve.warmup_connections)
    time.sleep(idle_s)  # diagnostic: how long a warm-up lasts (HAProxy purges idle connections over time)
    if "direct" in paths:  # what the first burst finds: HAProxy's pooled connections to the ingress replica
        out["replica_connections_before_burst"] = established_to(paths["direct"])
    for round_ in range(1, rounds + 1):
        for path_name, target in paths.items():
            for client in (["asyncio", "threads"] if clients == "both" else [clients]):
                for mode in (["fresh", "keepalive"] if connections == "both" else [connections]):
                    run = burst_asyncio if client == "asyncio" else burst_threads
                    label = mode if round_ == 1 else f"{mode}-r{round_}"
                    results = run(target, 4 * capacity, new_tokens, mode, f"{path_name}-{client}-{label}")
                    time.sleep(2)  # the admitted requests of one burst are done before the next starts; logs flushed
                    out |= {f"{path_name}.{client}.{label}.{key}": value
                            for key, value in (summarise(results) | where_503s_went(results)).items()}
    with httpx.Client(base_url=url, timeout=60) as http:
        out["healthy_after"] = http.get("/health").status_code == 200 and http.post(
            "/generate", json={"prompt": "hi", "max_new_tokens": 2}).status_code == 200
    serve.delete("overload")
    return out


def established_to(url: str) -> int:
    """Open TCP connections to `url`'s port on this machine (before a burst: HAProxy's idle pool to the replica)."""
    import psutil
    from urllib.parse import urlsplit

    port = urlsplit(url).port
    return sum(c.status == psutil.CONN_ESTABLISHED and bool(c.raddr) and c.raddr.port == port
               for c in psutil.net_connections(kind="tcp"))


def burst_asyncio(url: str, count: int, new_tokens: int, mode: str, tag: str) -> list[dict]:
    """bench/burst_client.py in its own process (its interpreter start is not in the latencies)."""
    import json
    import subprocess

    script = Path(__file__).resolve().parent / "burst_client.py"
    done = subprocess.run([sys.executable, str(script), url, "--count", str(count), "--new-tokens", str(new_tokens),
                           "--mode", mode, "--tag", tag], capture_output=True, text=True, timeout=900, check=True)
    return json.loads(done.stdout)["results"]


def burst_threads(url: str, count: int, new_tokens: int, mode: str, tag: str) -> list[dict]:
    """The in-process client: one httpx thread per request, all released by a barrier."""
    import threading

    import httpx

    barrier = threading.Barrier(count)

    def one(i: int) -> dict:
        with httpx.Client(base_url=url, timeout=600) as http:
            if mode == "keepalive":
                http.get("/health").raise_for_status()  # opens the connection the request will reuse
            barrier.wait()
            sent = time.time()
            response = http.post("/generate", json={"prompt": prompts(i + 1)[i], "max_new_tokens": new_tokens},
                                 headers={"X-Request-ID": f"{tag}-{i}"})
            return {"id": f"{tag}-{i}", "status": response.status_code, "sent": sent, "received": time.time(),
                    "retry_after": response.headers.get("retry-after")}

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def summarise(results: list[dict]) -> dict:
    seconds = lambda status: sorted(r["received"] - r["sent"] for r in results if r["status"] == status)  # noqa: E731
    admitted, rejected = seconds(200), seconds(503)
    return {"sent": len(results), "admitted": len(admitted), "rejected_503": len(rejected),
            "other": sorted(r["status"] for r in results if r["status"] not in (200, 503)),
            "retry_after_on_all_503": all(r["retry_after"] for r in results if r["status"] == 503),
            "admitted_p50_s": round(statistics.median(admitted), 3) if admitted else None,
            "admitted_p99_s": round(percentile(admitted, 0.99), 3) if admitted else None,
            "rejected_p50_ms": round(statistics.median(rejected) * 1000, 1) if rejected else None,
            "rejected_p99_ms": round(percentile(rejected, 0.99) * 1000, 1) if rejected else None,
            "rejected_max_ms": round(rejected[-1] * 1000, 1) if rejected else None}


ACCESS_LOG = re.compile(r"^\w+ (\S+ \S+) (\S+) .* (\S+) -- \w+ \S+ (\d{3}) ([\d.]+)ms$")


def access_log_times() -> dict[str, dict[str, tuple[float, float]]]:
    """request id -> {"proxy"|"ingress": (start, end)} from this Ray session's Serve access logs (wall clock; a
    line is stamped when the response ends and carries its duration)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    times: dict[str, dict[str, tuple[float, float]]] = {}
    for file in [*logs.glob("proxy_*.log"), *logs.glob("replica_*DertaIngress*.log")]:
        where = "proxy" if file.name.startswith("proxy_") else "ingress"
        for line in file.read_text(errors="replace").splitlines():
            match = ACCESS_LOG.match(line)
            if match:
                end = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                times.setdefault(match[3], {})[where] = (end - float(match[5]) / 1000, end)
    return times


def where_503s_went(results: list[dict]) -> dict:
    """Median / max ms of each leg of the rejected requests, matched by request id: client send -> proxy start,
    proxy start -> ingress start, in the ingress, ingress end -> proxy end, proxy end -> client receive (with
    direct ingress there is no proxy: client send -> ingress start, ingress end -> client receive). Log stamps
    have 1 ms resolution."""
    logs = access_log_times()
    legs: dict[str, list[float]] = {}
    for r in results:
        seen = logs.get(r["id"], {})
        if r["status"] != 503 or "ingress" not in seen:
            continue
        (i0, i1), (p0, p1) = seen["ingress"], seen.get("proxy", (None, None))
        points = [("send", r["sent"]), *([("proxy", p0)] if p0 else []), ("ingress", i0), ("503_out", i1),
                  *([("proxy_out", p1)] if p1 else []), ("client", r["received"])]
        for (a, ta), (b, tb) in zip(points, points[1:]):
            legs.setdefault(f"{a}->{b}", []).append((tb - ta) * 1000)
    return {f"ms_{leg}": f"{statistics.median(ms):.1f} / {max(ms):.1f}" for leg, ms in legs.items()}


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def wait_ready(http) -> None:
    for _ in range(600):
        if http.get("/ready").status_code == 200:
            return
        time.sleep(0.2)
    raise TimeoutError("server never became ready")


def hf_sequential(local: Local, texts: list[str], new_tokens: int) -> tuple[int, float]:
    """The baseline: unbatched HF `generate`, one request after another; (tokens, seconds)."""
    started = time.perf_counter()
    tokens = sum(local.generate(local.prompt_ids(p), new_tokens) for p in texts)
    return tokens, time.perf_counter() - started


def serve_throughput(url: str, texts: list[str], clients: int, new_tokens: int,
                     warmup: int = 0) -> tuple[float, int, list[int]]:
    """Tokens/s with `clients` concurrent HTTP clients; also the batch size each timed request ran in.

    Each client first sends `warmup` untimed requests; the clock starts once every client has finished them (a
    barrier), so the ramp-up of the first batches is not in the steady-state number."""
    import threading

    import httpx

    chunks = [texts[i::clients] for i in range(clients)]
    warm = threading.Barrier(clients + 1)

    def client_loop(chunk: list[str]) -> list[dict]:
        with httpx.Client(base_url=url, timeout=300) as http:
            post = lambda p: http.post("/generate", json={"prompt": p, "max_new_tokens": new_tokens}).json()  # noqa: E731
            try:
                for p in chunk[:warmup]:
                    post(p)
            finally:
                warm.wait()
            return [post(p) for p in chunk]

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client_loop, chunk) for chunk in chunks]
        warm.wait()
        started = time.perf_counter()
        results = [r for future in futures for r in future.result()]
        seconds = time.perf_counter() - started
    tokens = sum(r["completion_tokens"] for r in results)
    return tokens / seconds, tokens, [r["batch_size"] for r in results]


def print_overload(overloaded: dict) -> None:
    print("\n== overload: 4x capacity at once (503 target: <= 50 ms) ==")
    for name, value in overloaded.items():
        print(f"  {name:32s} {value}")
    runs = [name.removesuffix(".rejected_p50_ms") for name in overloaded if name.endswith(".rejected_p50_ms")]
    if runs:  # the load generator's view (an out-of-process asyncio client) on the path users hit, `--port`
        heads = [r for r in runs if r.startswith("port.asyncio.")] or runs[:1]
        for best in heads:
            p50, worst = overloaded[f"{best}.rejected_p50_ms"], overloaded[f"{best}.rejected_max_ms"]
            met = (p50 is not None and worst <= 50 and not any(overloaded[f"{r}.other"] for r in runs)
                   and overloaded.get("healthy_after", False))
            print(f"OVERLOAD headline: {best} (path.client.connections): 503 p50 {p50} ms, max {worst} ms "
                  f"(<= 50 ms, no other 5xx, healthy after: {'met' if met else 'NOT met'})")
            direct = overloaded.get(best.replace("port.", "direct.", 1) + ".rejected_p50_ms")
            if direct and p50:
                print(f"OVERLOAD --port vs the ingress replica's own port (same client, same run): 503 p50 "
                      f"{p50 / direct:.2f}x")


PARTS = ("latency", "generate", "overload")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests-per-client", type=int, default=8, help="timed /generate requests per client")
    parser.add_argument("--warmup-requests", type=int, default=1, help="untimed /generate requests per client first")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--size", choices=sorted(SIZES), default="probe")
    parser.add_argument("--only", default="all",
                        help="comma-separated parts to run: all, or some of latency (forward, probe, per_position), "
                             "generate (hf_sequential, engine_inprocess, serve_batched), overload")
    parser.add_argument("--overload-connections", choices=["fresh", "keepalive", "both"], default="both",
                        help="overload clients: a new connection per request, pre-opened keep-alive ones, or both")
    parser.add_argument("--overload-client", choices=["asyncio", "threads", "both"], default="both",
                        help="overload load generator: bench/burst_client.py in its own process (asyncio), the "
                             "in-process httpx threads, or both in turn")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="derta config override for the served app, e.g. serve.batch_fill_fraction=0")
    parser.add_argument("--generate-path", choices=["port", "direct"], default="direct",
                        help="latency and generate clients send to Serve's HTTP port (`port`: what users hit, "
                             "HAProxy under serve.direct_ingress) or, with direct ingress, the ingress replica's own "
                             "port (`direct`, no HAProxy hop; the earlier runs' path)")
    parser.add_argument("--overload-rounds", type=int, default=1, metavar="N",
                        help="repeat the overload bursts N times (round 1 cold, later rounds warm)")
    parser.add_argument("--overload-idle", type=float, default=0, metavar="S",
                        help="diagnostic: wait S s after start-up (and the warm-up) before the first overload burst")
    parser.add_argument("--overload-hold", type=float, default=0, metavar="S",
                        help="diagnostic: admitted overload requests wait S s idle before any compute (isolates the "
                             "503 path's own cost from CPU contention with the forward passes)")
    args = parser.parse_args()
    parts = set(PARTS) if args.only == "all" else set(args.only.split(","))
    if not parts or parts - set(PARTS):
        parser.error(f"--only: all, or a comma-separated subset of {', '.join(PARTS)}")

    size_overrides, response_tokens = SIZES[args.size]
    cfg = load_config("tiny", [f"serve.max_batch_size={args.clients}", "serve.ray_actor_options={num_cpus: 2}",
                               f"serve.max_ongoing_requests={2 * args.clients}", *size_overrides, *args.set])
    path = resolve_model_path(cfg.model, cfg.data.synthetic, cfg.data.refusal_string)
    torch.set_num_threads(2)
    if parts == {"overload"}:
        print(f"[bench] load average at start {os.getloadavg()}", flush=True)
        overloaded = overload(start_serve(cfg, path, app=False), cfg, path, args.new_tokens, args.overload_connections,
                              args.overload_hold, args.overload_client, args.overload_rounds, args.overload_idle)
        print_overload(overloaded)
        print(f"[bench] load average at end {os.getloadavg()}", flush=True)
        from ray import serve

        serve.shutdown()
        return
    local = Local(cfg, path)
    prompt_ids = local.prompt_ids(PROMPT)
    response_text, response_ids = response_of_length(local.tokenizer, response_tokens)
    sequence = prompt_ids + response_ids
    print(f"[bench] model {path}; prompt {len(prompt_ids)} tokens, response {len(response_ids)} tokens; "
          f"torch threads {torch.get_num_threads()}; parts {sorted(parts)}; load average {os.getloadavg()}",
          flush=True)

    short_ids = local.prompt_ids(prompts(1)[0])
    t: dict[str, tuple[float, float]] = {}
    if "latency" in parts:
        t = interleaved_seconds({
            "forward": lambda: local.forward(sequence),
            "probe_inprocess": lambda: probe(local.model, prompt_ids, response_ids, local.refusal_ids),
            "generate_8_inprocess": lambda: local.generate(short_ids, 8),
        }, args.reps)
        t |= interleaved_seconds({"per_position": lambda: local.per_position(prompt_ids, response_ids)}, 1, warmup=0)

    texts = prompts(args.clients * args.requests_per_client)
    if "generate" in parts:
        local.generate(short_ids, args.new_tokens)  # warm-up, untimed
        hf_tokens, hf_seconds = hf_sequential(local, texts, args.new_tokens)
        hf_throughput = hf_tokens / hf_seconds
        started = time.perf_counter()  # diagnostic: the engine's static batches in process, no Serve, no HTTP
        engine_tokens = sum(local.run_generate(texts[i:i + args.clients], args.new_tokens)
                            for i in range(0, len(texts), args.clients))
        engine_throughput = engine_tokens / (time.perf_counter() - started)

    import httpx

    url = proxy_url = start_serve(cfg, path)
    with httpx.Client(base_url=url, timeout=300) as http:
        wait_ready(http)
    if cfg.serve.direct_ingress and args.generate_path == "direct":  # the ingress replica's own port, no hop
        from serve.app import wait_direct_ingress

        url = wait_direct_ingress("bench", "127.0.0.1")[0]
        print(f"[bench] latency and generate through direct ingress {url}", flush=True)
    else:
        print(f"[bench] latency and generate through Serve's HTTP port {url}", flush=True)
    with httpx.Client(base_url=url, timeout=300) as http:
        wait_ready(http)
        if "latency" in parts:
            probe_body = {"prompt": PROMPT, "response": response_text}
            assert http.post("/probe", json=probe_body).json()["response_tokens"] == len(response_ids)
            gen_body = {"prompt": prompts(1)[0], "max_new_tokens": 8}
            t |= interleaved_seconds({  # the in-process twins again, interleaved with their HTTP calls
                "forward_again": lambda: local.forward(sequence),
                "probe_http": lambda: http.post("/probe", json=probe_body).raise_for_status(),
                "generate_8_http": lambda: http.post("/generate", json=gen_body).raise_for_status(),
                "generate_8_inprocess_again": lambda: local.generate(short_ids, 8),
            }, args.reps)
    if "generate" in parts:
        serve_tps, serve_tokens, batch_sizes = serve_throughput(url, texts, args.clients, args.new_tokens,
                                                                args.warmup_requests)
    overloaded = (overload(proxy_url, cfg, path,  # the proxy's base: overload finds its own direct port
                           args.new_tokens, args.overload_connections, clients=args.overload_client,
                           rounds=args.overload_rounds)
                  if "overload" in parts else {})

    ratios = {}
    if t:
        print("\n== latency: min / median over interleaved runs ==")
        for name, (best, median) in t.items():
            print(f"  {name:28s} {best * 1000:9.2f} / {median * 1000:9.2f} ms")
        median = {name: values[1] for name, values in t.items()}
        generate_overhead = median["generate_8_http"] - median["generate_8_inprocess_again"]
        probe_overhead = median["probe_http"] - median["forward_again"]
        print(f"  p50 Serve+HTTP overhead over the raw model call: /generate (8 tokens) "
              f"{generate_overhead * 1000:.2f} ms, /probe {probe_overhead * 1000:.2f} ms")
        ratios |= {  # medians; HTTP numbers against the forward measured interleaved with them
            "probe_inprocess/forward (<=1.3)": median["probe_inprocess"] / median["forward"],
            "probe_http/forward (<=1.3)": median["probe_http"] / median["forward_again"],
            "per_position/probe_inprocess (>=50)": median["per_position"] / median["probe_inprocess"],
            "per_position/probe_http (>=50)": median["per_position"] / median["probe_http"],
        }
    if "generate" in parts:
        print("\n== generation throughput ==")
        print(f"  hf_sequential          {hf_throughput:9.1f} tokens/s  ({hf_tokens} tokens, batch 1)")
        print(f"  serve_batched          {serve_tps:9.1f} tokens/s  ({serve_tokens} tokens, {args.clients} clients x "
              f"{args.requests_per_client} timed after {args.warmup_requests} warm-up, median batch "
              f"{statistics.median(batch_sizes):g}, largest {max(batch_sizes)})")
        print(f"  engine_inprocess       {engine_throughput:9.1f} tokens/s  (diagnostic: run_generate in batches of "
              f"{args.clients} in this process, no Serve/HTTP; {engine_throughput / hf_throughput:.2f}x hf_sequential)")
        sizes = Counter(batch_sizes)
        print("  batches (size x count): " + ", ".join(f"{size} x {sizes[size] // size}" for size in sorted(sizes)))
        ratios["serve_batched/hf_sequential (>=4)"] = serve_tps / hf_throughput
    if overloaded:
        print_overload(overloaded)

    print("\n== ratios (medians) ==")
    for name, value in ratios.items():
        print(f"  {name:40s} {value:8.2f}x")
    print("RATIOS " + "  ".join(f"{name.split(' ')[0]}={value:.2f}x" for name, value in ratios.items()))
    print(f"[bench] load average at end {os.getloadavg()}")

    from ray import serve

    serve.shutdown()


if __name__ == "__main__":
    main()
