"""glmstack serve against llama.cpp's llama-server: the same GGUF, the same client, the same minute.

    LLAMA_SERVER="$(bash benchmarks/build_llama_server.sh)"
    python benchmarks/bench_servers.py --llama-server "$LLAMA_SERVER" [--clients 16] [--max-tokens 128]
                                       [--quantize none int8 int4] [--threads 2]

Each server is started in turn on a free port (glmstack with a throwaway GLMSTACK_HOME and no keys, as the
README starts it plus `--quantize`; llama-server with `-np CLIENTS -t THREADS`), warmed up with one request, then
sent CLIENTS concurrent chats (OpenAI /v1/chat/completions, temperature 0, distinct prompts, max_tokens) by the
same asyncio client. Printed per server: requests refused, completion tokens, wall time, aggregate tok/s, and
the ratio to llama-server. llama-server runs first and last; the ratio uses the mean of its two runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from glmstack.engine.loading.catalog import bundled_model_path

TOPICS = ["rivers", "mountains", "bread", "clocks", "bridges", "owls", "glass", "trains", "tea", "maps", "salt",
          "kites", "copper", "bees", "lighthouses", "violins", "deserts", "paper", "comets", "gardens"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not become ready")


async def one_chat(client: httpx.AsyncClient, url: str, i: int, max_tokens: int) -> tuple[int, int]:
    body = {"model": "glm-4", "temperature": 0, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": f"Write a short essay about {TOPICS[i % len(TOPICS)]}."}]}
    response = await client.post(url + "/v1/chat/completions", json=body, timeout=600)
    if response.status_code != 200:
        return response.status_code, 0
    return 200, int(response.json()["usage"]["completion_tokens"])


async def load(url: str, clients: int, max_tokens: int) -> dict[str, float]:
    async with httpx.AsyncClient(headers={"Authorization": "Bearer local.any"},
                                 limits=httpx.Limits(max_connections=clients)) as client:
        await one_chat(client, url, 99, 8)  # warm up
        started = time.perf_counter()
        results = await asyncio.gather(*(one_chat(client, url, i, max_tokens) for i in range(clients)))
        wall = time.perf_counter() - started
    tokens = sum(t for _, t in results)
    return {"refused": sum(s != 200 for s, _ in results), "tokens": tokens, "seconds": wall,
            "tok_s": tokens / wall}


def run_server(command: list[str], env: dict[str, str], url: str, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=log)
        try:
            wait_ready(url, proc)
            return asyncio.run(load(url, args.clients, args.max_tokens))
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-server", required=True, help="path to the llama-server binary")
    parser.add_argument("--model", default=None, help="GGUF file (default: the bundled SmolLM2)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quantize", nargs="+", default=["none", "int8", "int4"])
    args = parser.parse_args()
    model = Path(args.model) if args.model else bundled_model_path()
    assert model is not None, "no --model and the bundled model is not installed"

    def llama() -> dict[str, float]:
        port = free_port()
        command = [args.llama_server, "-m", str(model), "-np", str(args.clients), "-t", str(args.threads),
                   "-c", str(args.clients * (args.max_tokens + 256)), "--port", str(port), "--host", "127.0.0.1"]
        # as a user starts it: without the OpenMP wait settings importing glmstack.engine put in this process
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
        return run_server(command, env, f"http://127.0.0.1:{port}", args)

    def glmstack(quantize: str) -> dict[str, float]:
        port = free_port()
        with tempfile.TemporaryDirectory() as home:
            env = {**os.environ, "GLMSTACK_HOME": home, "OMP_NUM_THREADS": str(args.threads)}
            command = [sys.executable, "-m", "glmstack.cli", "serve", "--port", str(port), "--quantize", quantize]
            return run_server(command, env, f"http://127.0.0.1:{port}", args)

    def show(label: str, figures: dict[str, float], peer: float | None = None) -> None:
        ratio = f"  {figures['tok_s'] / peer:.2f}x llama-server" if peer else ""
        print(f"{label:28} refused={figures['refused']:.0f} tokens={figures['tokens']:.0f} "
              f"seconds={figures['seconds']:.1f} tok/s={figures['tok_s']:.1f}{ratio}", flush=True)

    print(f"{model.name}, {args.clients} concurrent chats x {args.max_tokens} tokens, {args.threads} threads")
    first = llama()
    show(f"llama-server -np {args.clients}", first)
    ours = {q: glmstack(q) for q in args.quantize}
    last = llama()
    show(f"llama-server -np {args.clients}", last)
    peer = (first["tok_s"] + last["tok_s"]) / 2
    for quantize, figures in ours.items():
        show(f"glmstack serve --quantize {quantize}", figures, peer)


if __name__ == "__main__":
    main()
