"""An overload burst from its own process: N POST /generate at once from one asyncio event loop (aiohttp).

    python bench/burst_client.py URL [--count 32] [--new-tokens 32] [--mode fresh|keepalive] [--tag burst]

This is how a load generator sends a burst: out of the server's process, no thread per request. bench_serve.py's
`overload` runs it as a subprocess (and, for comparison, its older in-process client: one httpx thread per
request). `fresh`: every request opens its own connection (`force_close`); `keepalive`: N connections are opened
beforehand with concurrent GET /health and the burst reuses them. Every request carries `X-Request-ID: TAG-i`
(Serve keeps a client's request id), so its times match the server's log lines. Prints one JSON object: per
request its status, Retry-After, and wall-clock send / receive times (`time.time()`, comparable with log stamps).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time

TOPICS = ["bread", "cake", "water", "light", "the sky", "a model", "a question", "an answer"]


def prompt(i: int) -> str:
    return f"Question {i}: how do I make {TOPICS[i % len(TOPICS)]} in {i % 5 + 1} steps?"


async def burst(url: str, count: int, new_tokens: int, mode: str, tag: str) -> list[dict]:
    import aiohttp

    keepalive = mode == "keepalive"
    connector = aiohttp.TCPConnector(limit=0, force_close=not keepalive)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(base_url=url.rstrip("/") + "/", connector=connector, timeout=timeout) as http:
        if keepalive:  # N concurrent requests: N connections, pooled for the burst
            for response in await asyncio.gather(*(http.get("health") for _ in range(count))):
                response.raise_for_status()
                await response.read()
                response.release()
        start = asyncio.Event()

        async def one(i: int) -> dict:
            await start.wait()
            sent = time.time()
            async with http.post("generate", json={"prompt": prompt(i), "max_new_tokens": new_tokens},
                                 headers={"X-Request-ID": f"{tag}-{i}"}) as response:
                await response.read()
                return {"id": f"{tag}-{i}", "status": response.status, "sent": sent, "received": time.time(),
                        "retry_after": response.headers.get("Retry-After")}

        tasks = [asyncio.ensure_future(one(i)) for i in range(count)]
        await asyncio.sleep(0)  # every task is parked on the event: they all go at once
        start.set()
        return await asyncio.gather(*tasks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--mode", choices=["fresh", "keepalive"], default="keepalive")
    parser.add_argument("--tag", default="burst")
    args = parser.parse_args()
    results = asyncio.run(burst(args.url, args.count, args.new_tokens, args.mode, args.tag))
    print(json.dumps({"client": "asyncio (aiohttp, own process)", "mode": args.mode, "results": results}))


if __name__ == "__main__":
    main()
