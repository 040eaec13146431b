"""Real-size GLM checkpoints on this machine: load time, memory and decode speed per precision, against llama.cpp's
llama-server on the same GGUF in the same run (issue 15).

    LLAMA_SERVER="$(bash benchmarks/build_llama_server.sh)"
    python benchmarks/bench_real_size.py --llama-server "$LLAMA_SERVER" --sizes 1.5b 6b [--dir /tmp/synthetic]

Checkpoints are synthetic (benchmarks/synthetic_glm.py: GLM-4-0414's architecture at 1.56B / 6.2B parameters,
random weights, a bf16 safetensors folder and a GGUF with llama.cpp's Q4_K_M tensor types), written once into
--dir. Each row starts a server as a user would (`glmstack serve --model M [--quantize Q]`, or `llama-server -m
GGUF -np 16`) and measures, through HTTP with the same client:

- load: seconds from start until /health answers (glmstack: loading, quantizing, building kernels' layouts);
- peak / final RSS: the server process's VmHWM and VmRSS (MiB) after the runs below;
- batch 1: decode tok/s of one chat, (128 - 1) tokens over the time a 128-token reply takes beyond a 1-token
  one (so the prompt's prefill is left out), the median of 3 such pairs;
- 16 streams: aggregate tok/s of 16 concurrent 64-token chats.

Both servers get the same KV capacity: llama-server `-c 16 x 320` tokens, glmstack GLMSTACK_KV_CACHE_MB for as
many tokens. The `glmstack quantize --bits 4` row loads the checkpoint that command wrote (timed separately).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from bench_servers import free_port, load, wait_ready
from synthetic_glm import HEAD_DIM, SIZES, parameters, write_gguf, write_safetensors_checkpoint

STREAMS, STREAM_TOKENS, DECODE_TOKENS = 16, 64, 128
BATCH1_RUNS = 3
CONTEXT = STREAMS * (STREAM_TOKENS + 256)


def memory(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process, MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def chat_seconds(url: str, max_tokens: int) -> tuple[float, int]:
    body = {"model": "glm-4", "temperature": 0, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]}
    started = time.perf_counter()
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=1200,
                          headers={"Authorization": "Bearer local.any"})
    response.raise_for_status()
    return time.perf_counter() - started, int(response.json()["usage"]["completion_tokens"])


def measure(command: list[str], env: dict[str, str], url: str) -> dict[str, float]:
    with tempfile.TemporaryFile() as log:
        started = time.perf_counter()
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=log)
        try:
            wait_ready(url, proc, seconds=1800)
            figures: dict[str, float] = {"load_s": time.perf_counter() - started}
            chat_seconds(url, 4)  # warm up
            rates = []
            for _ in range(BATCH1_RUNS):  # this machine's memory speed drifts 10-20% within minutes
                one, _ = chat_seconds(url, 1)
                full, tokens = chat_seconds(url, DECODE_TOKENS)
                rates.append((tokens - 1) / max(full - one, 1e-9))
            figures["batch1_tok_s"] = statistics.median(rates)
            figures["batch1_tokens"] = tokens
            streams = asyncio.run(load(url, STREAMS, STREAM_TOKENS))
            figures["streams_tok_s"] = streams["tok_s"]
            figures["refused"] = streams["refused"]
            figures["rss_mib"], figures["peak_mib"] = memory(proc.pid)
            return figures
        except Exception:
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace")[-3000:])
            raise
        finally:
            proc.terminate()
            proc.wait(timeout=120)


def kv_cache_mb(size: str) -> int:
    s = SIZES[size]
    per_token = 2 * s["layers"] * s["kv_heads"] * HEAD_DIM * 2  # k and v, bf16
    return math.ceil(CONTEXT * per_token / 2**20) + 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-server", required=True)
    parser.add_argument("--sizes", nargs="+", default=["1.5b"], choices=sorted(SIZES))
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "glmstack-synthetic")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", nargs="+", default=["llama", "gguf", "bf16", "int8", "int4", "quantized"])
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    for size in args.sizes:
        folder, gguf = args.dir / f"glm4-{size}", args.dir / f"glm4-{size}.Q4_K_M.gguf"
        if not (folder / "config.json").is_file():
            write_safetensors_checkpoint(folder, size)
        if not gguf.is_file():
            write_gguf(gguf, size)
        quantized = args.dir / f"glm4-{size}-int4"
        quantize_s = None
        if "quantized" in args.rows and not quantized.exists():
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "glmstack.cli", "quantize", str(folder), "--bits", "4", "-o",
                            str(quantized)], check=True)
            quantize_s = time.perf_counter() - started
        print(f"\nGLM-4 {size}: {parameters(size) / 1e9:.2f}B parameters; bf16 {_gb(folder)} GB, "
              f"Q4_K_M GGUF {_gb(gguf)} GB, int4 checkpoint {_gb(quantized)} GB"
              + (f" (glmstack quantize: {quantize_s:.0f} s)" if quantize_s else ""), flush=True)
        print("| server | load s | peak RSS MiB | RSS MiB | batch-1 tok/s | 16 streams tok/s |", flush=True)
        print("| --- | ---: | ---: | ---: | ---: | ---: |", flush=True)
        rows = {
            "llama": ("llama-server Q4_K_M GGUF", None),
            "gguf": ("glmstack serve, Q4_K_M GGUF (auto: int4 + int8)", (gguf, None)),
            "bf16": ("glmstack serve, bf16 safetensors (auto: bf16)", (folder, None)),
            "int8": ("glmstack serve, bf16 safetensors --quantize int8", (folder, "int8")),
            "int4": ("glmstack serve, bf16 safetensors --quantize int4", (folder, "int4")),
            "quantized": ("glmstack serve, `glmstack quantize --bits 4` output", (quantized, None)),
        }
        for row in args.rows:
            label, spec = rows[row]
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            if spec is None:
                command = [args.llama_server, "-m", str(gguf), "-np", str(STREAMS), "-t", str(args.threads),
                           "-c", str(CONTEXT), "--port", str(port), "--host", "127.0.0.1"]
                figures = measure(command, dict(os.environ), url)
            else:
                model, quantize = spec
                with tempfile.TemporaryDirectory() as home:
                    env = {**os.environ, "GLMSTACK_HOME": home, "OMP_NUM_THREADS": str(args.threads),
                           "GLMSTACK_KV_CACHE_MB": str(kv_cache_mb(size))}
                    command = [sys.executable, "-m", "glmstack.cli", "serve", "--port", str(port), "--model",
                               str(model)] + (["--quantize", quantize] if quantize else [])
                    figures = measure(command, env, url)
            print(f"| {label} | {figures['load_s']:.1f} | {figures['peak_mib']:.0f} | {figures['rss_mib']:.0f} | "
                  f"{figures['batch1_tok_s']:.1f} | {figures['streams_tok_s']:.1f} |", flush=True)


def _gb(path: Path) -> str:
    if not path.exists():
        return "-"
    files = [path] if path.is_file() else [p for p in path.iterdir() if p.is_file()]
    return f"{sum(p.stat().st_size for p in files) / 1e9:.2f}"


if __name__ == "__main__":
    main()
