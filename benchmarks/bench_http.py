"""What the HTTP layer costs, and whether it holds up under concurrent streaming clients.

    python benchmarks/bench_http.py [--requests 200] [--clients 32] [--seconds 120] [--max-tokens 64]
                                    [--quantize int8|int4]

1. Latency: p50 of a 1-token completion (greedy, max_tokens=1) through `glmstack serve` — auth, validation,
   safety, limits, usage accounting, JSON — against the same request on the engine alone (AsyncEngine in
   this process). The difference is the platform's overhead per request.
2. Load: N streaming clients for T seconds against the server, each sending the next request as soon as its
   stream ends, once distinct long prompts have written every block of the KV pool. Prints requests, errors
   by kind, streamed tokens/s, time to first chunk, and the server's RSS through the run (a growing RSS
   under steady load is a leak).

The server runs as a subprocess on a free port with a throwaway GLMSTACK_HOME, one API key, and per-key and
queue limits raised to fit N clients.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import psutil

from glmstack.engine.serving.core import DEFAULT_BLOCK_SIZE

FILLER = "The quick brown fox jumps over the lazy dog while the river runs past the old mill. "
PROMPTS = [
    "Say hello.",
    "Name a colour.",
    "What is two plus two?",
    "Write one sentence about the sea.",
]


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]


def p50_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


# ---- the engine alone -------------------------------------------------------------------------------------


class EngineAlone:
    """The same model on an AsyncEngine in this process: what a request costs without the platform."""

    def __init__(self, args: argparse.Namespace) -> None:
        from glmstack.engine.classic import load
        from glmstack.engine.serving.async_engine import AsyncEngine

        model, _ = load(args.model, device=args.device, quantize=args.quantize)
        self.engine = AsyncEngine(model)
        self.loop = asyncio.new_event_loop()
        self.n = 0

    def latency(self, i: int) -> float:
        from glmstack.protocol import GenerateRequest, SamplingParams

        self.n += 1
        request = GenerateRequest(
            f"bench-{self.n}", SamplingParams(max_tokens=1, do_sample=False), messages=messages(i)
        )

        async def one() -> float:
            start = time.perf_counter()
            async for _ in self.engine.generate(request):
                pass
            return time.perf_counter() - start

        return self.loop.run_until_complete(one())

    def close(self) -> None:
        self.engine.shutdown()
        self.loop.close()


# ---- the server -------------------------------------------------------------------------------------------


def start_server(args: argparse.Namespace, home: Path) -> tuple[subprocess.Popen, str, str]:
    from glmstack.store import Store

    database_url = f"sqlite:///{home / 'glmstack.db'}"
    with Store(database_url, home=home) as store:
        _, key = store.keys.create("bench")
    env = {
        **os.environ,
        "GLMSTACK_HOME": str(home),
        "GLMSTACK_DATABASE_URL": database_url,
        "GLMSTACK_MAX_CONCURRENCY_PER_KEY": str(args.clients),
        "GLMSTACK_MAX_QUEUE": str(max(64, 2 * args.clients)),
    }
    command = [sys.executable, "-m", "glmstack.cli.main", "serve", "--port", "0", "--device", args.device]
    if args.model:
        command += ["--model", args.model]
    if args.quantize:
        command += ["--quantize", args.quantize]
    proc = subprocess.Popen(
        command, env=env, text=True, stdout=subprocess.PIPE, stderr=(home / "server.log").open("w")
    )
    found: list[str] = []

    def read_banner() -> None:
        for line in proc.stdout:
            if match := re.match(r"glmstack is serving \S+ at (http://\S+)", line):
                found.append(match.group(1))

    threading.Thread(target=read_banner, daemon=True).start()
    deadline = time.monotonic() + 300
    while not found:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            sys.exit(f"server did not start; see {home / 'server.log'}")
        time.sleep(0.1)
    return proc, found[0], key


def paired_latencies(args: argparse.Namespace, engine: EngineAlone, url: str, key: str
                     ) -> tuple[list[float], list[float]]:
    """The same 1-token request alternately on the engine alone and through the server, so both see the
    same machine load from one minute to the next."""
    alone, served = [], []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
        for i in range(args.warmup + args.requests):
            body = {"model": "glm-4", "messages": messages(i), "max_tokens": 1, "do_sample": False}
            if i % 2:  # each goes first half the time: neither always follows the other's idle threads
                engine_elapsed = engine.latency(i)
            start = time.perf_counter()
            response = client.post("/api/paas/v4/chat/completions", json=body)
            elapsed = time.perf_counter() - start
            response.raise_for_status()
            if not i % 2:
                engine_elapsed = engine.latency(i)
            if i >= args.warmup:
                served.append(elapsed)
                alone.append(engine_elapsed)
    return alone, served


def server_side(log: Path, requests: int) -> list[tuple[float, float]]:
    """(duration_ms, engine_ms) of the last `requests` completions in the server's access log: the time the
    server spent on each request, and the part of it the engine spent (submit to last event)."""
    rows = []
    for line in log.read_text().splitlines():
        if "glmstack.api.access" in line and '"engine_ms"' in line:
            entry = json.loads(line.split(": ", 1)[1])
            rows.append((entry["duration_ms"], entry["engine_ms"]))
    return rows[-requests:]


def fill_kv_pool(url: str, key: str) -> int:
    """Distinct long prompts until every block of the server's KV pool has been written once. The pool is
    allocated untouched, and prefix caching keeps finished blocks, so RSS climbs toward start + KV budget
    during the first minutes of any load; filled first, the load phase's RSS shows steady state (a leak
    would still climb). Returns the prompt tokens sent."""
    metrics = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {key}"}).text
    blocks = float(re.search(r"^glmstack_engine_kv_blocks_total (\S+)$", metrics, re.MULTILINE).group(1))
    sent = 0
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300) as client:
        while sent < blocks * DEFAULT_BLOCK_SIZE:
            text = f"[{uuid.uuid4().hex}] " + FILLER * 100 + "Summarise."  # ~1,900 tokens, no shared prefix
            body = {"model": "glm-4", "messages": [{"role": "user", "content": text}], "max_tokens": 1}
            response = client.post("/api/paas/v4/chat/completions", json=body)
            response.raise_for_status()
            sent += response.json()["usage"]["prompt_tokens"]
    return sent


def completion_tokens(url: str, key: str) -> float:
    """Tokens the server generated so far, from its /metrics."""
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {key}"}).text
    return sum(
        float(v)
        for v in re.findall(r'^glmstack_tokens_total\{kind="completion"[^}]*\} (\S+)$', text, re.MULTILINE)
    )


async def streaming_load(args: argparse.Namespace, url: str, key: str) -> dict[str, object]:
    errors: Counter[str] = Counter()
    first_chunk: list[float] = []
    done = 0
    deadline = time.monotonic() + args.seconds

    async def client_loop(client_id: int, client: httpx.AsyncClient) -> None:
        nonlocal done
        i = client_id
        while time.monotonic() < deadline:
            body = {"model": "glm-4", "messages": messages(i), "max_tokens": args.max_tokens, "stream": True}
            i += args.clients
            start = time.perf_counter()
            try:
                async with client.stream("POST", "/api/paas/v4/chat/completions", json=body) as response:
                    if response.status_code != 200:
                        await response.aread()
                        errors[f"HTTP {response.status_code} {response.json()['error']['code']}"] += 1
                        continue
                    last, saw_first = None, False
                    async for line in response.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        if not saw_first:
                            first_chunk.append(time.perf_counter() - start)
                            saw_first = True
                        last = line
                    if last != "data: [DONE]":
                        errors["stream without [DONE]"] += 1
                        continue
            except httpx.HTTPError as e:
                errors[type(e).__name__] += 1
                continue
            done += 1

    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300, limits=limits
    ) as client:
        tokens_before = completion_tokens(url, key)
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(c, client) for c in range(args.clients)))
        elapsed = time.perf_counter() - started
    streamed = completion_tokens(url, key) - tokens_before
    return {
        "requests": done,
        "errors": dict(errors),
        "elapsed_s": elapsed,
        "completion_tokens": streamed,
        "first_chunk_p50_ms": p50_ms(first_chunk) if first_chunk else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quantize", default=None, choices=["int8", "int4"],
                        help="weight-only quantization for both the server and the engine alone")
    # The engine's own time varies by several ms from request to request on 2 shared cores: the p50 of a
    # few hundred pairs is what makes a difference of a few ms stand out from that.
    parser.add_argument("--requests", type=int, default=200, help="1-token requests for the latency figure")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--clients", type=int, default=32, help="concurrent streaming clients")
    parser.add_argument("--seconds", type=float, default=120, help="how long the streaming load runs")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per streamed reply")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="glmstack-bench-") as tmp:
        proc, url, key = start_server(args, Path(tmp))
        try:
            alone = EngineAlone(args)
            try:
                engine, server = paired_latencies(args, alone, url, key)
            finally:
                alone.close()
            inside = server_side(Path(tmp) / "server.log", args.requests)
            filled = fill_kv_pool(url, key)
            server_process = psutil.Process(proc.pid)
            rss: list[int] = [server_process.memory_info().rss]  # every tenth of the run
            done = threading.Event()

            def sample_rss() -> None:
                while not done.wait(args.seconds / 10):
                    rss.append(server_process.memory_info().rss)

            sampler = threading.Thread(target=sample_rss, daemon=True)
            sampler.start()
            load = asyncio.run(streaming_load(args, url, key))
            done.set()
            sampler.join()
            rss.append(server_process.memory_info().rss)
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    print(f"1-token completion, p50 over {args.requests} requests (greedy, max_tokens=1), the two alternating")
    print(f"  engine alone (AsyncEngine, in process)  {p50_ms(engine):8.1f} ms")
    print(f"  through glmstack serve (HTTP, auth, ...) {p50_ms(server):8.1f} ms")
    print(f"  HTTP platform overhead                  {p50_ms(server) - p50_ms(engine):8.1f} ms")
    pairs = [s - e for s, e in zip(server, engine, strict=True)]
    print(f"  overhead, p50 of the paired differences {p50_ms(pairs):8.1f} ms")
    # The same overhead from its parts, free of the engine's own run-to-run noise (a few ms on 2 cores):
    # what the server spends outside the engine (its access log), plus what the wire and the client add.
    duration = statistics.median(d for d, _ in inside)
    outside_engine = statistics.median(d - e for d, e in inside)
    print(f"  server time outside the engine, p50     {outside_engine:8.1f} ms  (access log: duration - engine)")
    print(f"  client and transport, p50               {p50_ms(server) - duration:8.1f} ms  (client-seen - duration)")
    print(f"\n{args.clients} streaming clients for {args.seconds:.0f} s (max_tokens={args.max_tokens}), after "
          f"{filled} prompt tokens filled the KV pool")
    print(f"  requests completed   {load['requests']}")
    print(f"  errors               {json.dumps(load['errors']) if load['errors'] else 'none'}")
    print(f"  streamed tokens/s    {load['completion_tokens'] / load['elapsed_s']:.1f}")
    print(f"  first chunk p50      {load['first_chunk_p50_ms']:.0f} ms")
    print(
        f"  server RSS           {rss[0] / 2**20:.0f} MiB at start, {rss[-1] / 2**20:.0f} MiB at end "
        f"({(rss[-1] - rss[0]) / 2**20:+.0f} MiB)"
    )
    print("  RSS every tenth     " + " ".join(f"{r / 2**20:.0f}" for r in rss) + " MiB")
    half = len(rss) // 2
    print(f"  RSS growth over the second half of the run {(rss[-1] - rss[half]) / 2**20:+.0f} MiB")


if __name__ == "__main__":
    main()
