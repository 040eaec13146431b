"""One request's decode speed when the engine steps on a thread other than the one that loaded the model, as
`glmstack serve` runs it, under each OpenMP setup (glmstack/engine/openmp.py explains why it matters).

    python benchmarks/bench_engine_thread.py [--tokens 256] [--runs 3]

Each case runs in a fresh interpreter (libgomp reads its settings when torch is imported): load the bundled
model (the server's default precision) on the main thread, decode once there to warm up, then decode
`--tokens` greedy tokens `--runs` times through `EngineCore`:

- main thread: where the model was loaded (the in-process best case);
- engine thread, libgomp defaults: OMP_WAIT_POLICY and GOMP_SPINCOUNT unset, the loading thread's workers kept;
- engine thread, wait policy only: glmstack's OMP_WAIT_POLICY / GOMP_SPINCOUNT, workers kept;
- engine thread, as glmstack does: the wait policy, and the loading thread's workers released first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

CASE = r"""
import sys, threading, time
release, on_main, tokens, runs = sys.argv[1] == "1", sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
import torch  # first, so glmstack.engine's defaults apply only where the environment already has them
from glmstack.engine import openmp
from glmstack.engine.classic import load
from glmstack.engine.serving.core import EngineCore
from glmstack.protocol import SamplingParams

model, _ = load(device="cpu", quantize="auto")
ids = model.chat_format.render([{"role": "user", "content": "Write a short essay about the sea."}]).token_ids
rates = []

def decode():
    core = EngineCore(model)
    core.add_request("r", ids, SamplingParams(max_tokens=tokens, do_sample=False))
    started, n = time.perf_counter(), 0
    while core.has_work():
        for _, event in core.step(lambda r: False, lambda: False):
            n += len(event.token_ids)
    rates.append(n / (time.perf_counter() - started))

decode()  # warm-up, on the loading thread
rates.clear()
if release:
    openmp.release_thread_pool()
for _ in range(runs):
    if on_main:
        decode()
    else:
        worker = threading.Thread(target=decode)
        worker.start()
        worker.join()
print(" ".join(f"{r:.1f}" for r in rates))
"""

CASES = [  # label, wait policy set, release the loading thread's workers, decode on the main thread
    ("main thread", True, False, True),
    ("engine thread, libgomp defaults", False, False, False),
    ("engine thread, wait policy only", True, False, False),
    ("engine thread, as glmstack does", True, True, False),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    base["OMP_NUM_THREADS"] = str(args.threads)
    print(f"bundled model, server default precision, {args.threads} threads, {args.tokens} tokens, tok/s per run")
    for label, policy, release, on_main in CASES:
        env = dict(base, OMP_WAIT_POLICY="ACTIVE", GOMP_SPINCOUNT="300000") if policy else base
        out = subprocess.run([sys.executable, "-c", CASE, str(int(release)), str(int(on_main)), str(args.tokens),
                              str(args.runs)], env=env, capture_output=True, text=True, check=True)
        rates = [float(r) for r in out.stdout.split()]
        print(f"{label:34} median {statistics.median(rates):6.1f}   runs {' '.join(f'{r:.1f}' for r in rates)}")


if __name__ == "__main__":
    main()
