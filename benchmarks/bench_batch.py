"""The Batch API against the same requests sent through the sync API, one at a time and from 16 clients, on
one `glmstack serve` with the bundled model; and a chat's time to first token while a batch runs vs idle.

    python benchmarks/bench_batch.py [--lines 1000] [--max-tokens 32] [--sync-sample 50] [--clients 16]

One server (a throwaway GLMSTACK_HOME, no keys, as the README starts it), one process of clients, in order:
  1. idle TTFT: streamed chats one at a time, time to the first content delta (median of --probes)
  2. sync, one at a time: the first --sync-sample requests, completion tok/s
  3. 16 clients: all --lines requests through POST /chat/completions, --clients at a time, completion tok/s
  4. batch: the same --lines requests as one batch (upload, create, poll every 0.2 s until completed);
     tok/s = completion tokens in the output file / (completed - created, as the client saw them)
  then 16 clients again: the batch is compared with the mean of the two client runs, around it (a shared
  machine's speed drifts over minutes)
  5. TTFT during a batch: while a second batch of the same lines runs, --probes streamed chats (median)
Greedy decoding everywhere, distinct prompts. Printed: each figure, batch vs sync and vs 16 clients, and TTFT
during the batch / idle (the issue's targets: batch >= 16 clients, TTFT <= 2x idle).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from bench_servers import TOPICS, free_port, wait_ready

BASE = "/api/paas/v4"
PROBE = {"model": "glm-4", "temperature": 0, "max_tokens": 8, "stream": True,
         "messages": [{"role": "user", "content": "Say hello to the new user."}]}


def request_body(i: int, max_tokens: int) -> dict:
    topic = TOPICS[i % len(TOPICS)]
    return {"model": "glm-4", "temperature": 0, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": f"Write note {i} about {topic}, in one paragraph."}]}


def ttft(client: httpx.Client) -> float:
    started = time.perf_counter()
    with client.stream("POST", BASE + "/chat/completions", json=PROBE, timeout=300) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"]
                if delta.get("content"):
                    return time.perf_counter() - started
    raise RuntimeError("no content streamed")


def probes(client: httpx.Client, n: int, gap_s: float) -> list[float]:
    times = []
    for _ in range(n):
        times.append(ttft(client))
        time.sleep(gap_s)
    return times


def sync_one_at_a_time(client: httpx.Client, bodies: list[dict]) -> tuple[int, float]:
    started = time.perf_counter()
    tokens = 0
    for body in bodies:
        response = client.post(BASE + "/chat/completions", json=body, timeout=600)
        response.raise_for_status()
        tokens += response.json()["usage"]["completion_tokens"]
    return tokens, time.perf_counter() - started


async def concurrent_clients(url: str, bodies: list[dict], clients: int) -> tuple[int, float]:
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    tokens = 0

    async def worker(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while not queue.empty():
            body = queue.get_nowait()
            response = await http.post(BASE + "/chat/completions", json=body, timeout=600)
            response.raise_for_status()
            tokens += response.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=clients)) as http:
        started = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(clients)))
        return tokens, time.perf_counter() - started


def start_batch(client: httpx.Client, bodies: list[dict]) -> tuple[str, float]:
    lines = "".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v4/chat/completions",
                                "body": body}) + "\n" for i, body in enumerate(bodies))
    uploaded = client.post(BASE + "/files", data={"purpose": "batch"},
                           files={"file": ("lines.jsonl", lines.encode())}, timeout=120)
    uploaded.raise_for_status()
    started = time.perf_counter()
    created = client.post(BASE + "/batches", json={"input_file_id": uploaded.json()["id"],
                                                   "endpoint": "/v4/chat/completions"})
    created.raise_for_status()
    return created.json()["id"], started


def wait_batch(client: httpx.Client, batch_id: str) -> dict:
    while True:
        batch = client.get(f"{BASE}/batches/{batch_id}").json()
        if batch["status"] in ("completed", "failed", "cancelled", "expired"):
            return batch
        time.sleep(0.2)


def batch_tokens(client: httpx.Client, batch: dict) -> int:
    content = client.get(f"{BASE}/files/{batch['output_file_id']}/content", timeout=120).text
    return sum(json.loads(line)["response"]["body"]["usage"]["completion_tokens"] for line in content.splitlines())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--sync-sample", type=int, default=50)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--probes", type=int, default=9)
    args = parser.parse_args()
    bodies = [request_body(i, args.max_tokens) for i in range(args.lines)]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as home, tempfile.TemporaryFile() as log:
        env = {**os.environ, "GLMSTACK_HOME": home}
        proc = subprocess.Popen([sys.executable, "-m", "glmstack.cli", "serve", "--port", str(port)], env=env,
                                stdout=log, stderr=log)
        try:
            wait_ready(url, proc)
            client = httpx.Client(base_url=url, timeout=60)
            probes(client, 2, 0)  # warm up
            idle = probes(client, args.probes, 0.5)
            sync_tokens, sync_s = sync_one_at_a_time(client, bodies[: args.sync_sample])
            many_tokens, many_s = asyncio.run(concurrent_clients(url, bodies, args.clients))
            batch_id, started = start_batch(client, bodies)
            batch = wait_batch(client, batch_id)
            batch_s = time.perf_counter() - started
            assert batch["status"] == "completed", batch
            tokens = batch_tokens(client, batch)
            after_tokens, after_s = asyncio.run(concurrent_clients(url, bodies, args.clients))
            second_id, _ = start_batch(client, bodies)
            while client.get(f"{BASE}/batches/{second_id}").json()["request_counts"]["completed"] < args.clients:
                time.sleep(0.2)  # the batch is in full flow
            during = probes(client, args.probes, 1.0)
            still_running = client.get(f"{BASE}/batches/{second_id}").json()["status"] == "in_progress"
            client.post(f"{BASE}/batches/{second_id}/cancel")
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    before_rate, after_rate = many_tokens / many_s, after_tokens / after_s
    sync_rate, many_rate, batch_rate = sync_tokens / sync_s, (before_rate + after_rate) / 2, tokens / batch_s
    print(f"{args.lines} requests x {args.max_tokens} max tokens, bundled model, {os.cpu_count()} CPUs")
    print(f"sync, one at a time ({args.sync_sample} requests): {sync_tokens} tokens in {sync_s:.1f} s = "
          f"{sync_rate:.1f} tok/s")
    print(f"sync, {args.clients} clients: {many_tokens} tokens in {many_s:.1f} s = {before_rate:.1f} tok/s before "
          f"the batch, {after_tokens} in {after_s:.1f} s = {after_rate:.1f} tok/s after; mean {many_rate:.1f}")
    print(f"batch: {tokens} tokens in {batch_s:.1f} s = {batch_rate:.1f} tok/s "
          f"({batch['request_counts']})")
    print(f"batch vs one at a time: {batch_rate / sync_rate:.2f}x; batch vs {args.clients} clients: "
          f"{batch_rate / many_rate:.2f}x (target >= 1.0)")
    idle_ms, during_ms = statistics.median(idle) * 1000, statistics.median(during) * 1000
    print(f"chat TTFT idle: median {idle_ms:.0f} ms; during a batch: median {during_ms:.0f} ms "
          f"(max {max(during) * 1000:.0f}); ratio {during_ms / idle_ms:.2f}x (target <= 2.0)"
          + ("" if still_running else "  [the batch ended before the probes did]"))


if __name__ == "__main__":
    main()
