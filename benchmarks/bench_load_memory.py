"""Memory of loading a checkpoint, against what `glmstack inspect` predicts (issue 15).

    python benchmarks/bench_load_memory.py MODEL [--quantize auto|none|int8|int4]

In a fresh process per run: `glmstack.load(MODEL, device="cpu", quantize=...)`, then one 16-token greedy
request. Prints load seconds, the process's VmRSS after loading, VmHWM (the peak) and VmRSS after the request,
and `glmstack inspect`'s "process memory after loading" estimate with its error against that RSS.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

CHILD = """
import sys, time
import glmstack
from glmstack.protocol import SamplingParams

def memory():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024

started = time.perf_counter()
model, _ = glmstack.load(sys.argv[1], device="cpu", quantize=None if sys.argv[2] == "none" else sys.argv[2])
seconds = time.perf_counter() - started
rss, peak = memory()
list(model.stream_messages([{"role": "user", "content": "hello"}], SamplingParams(max_tokens=16, do_sample=False)))
print(seconds, rss, peak, memory()[0])
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--quantize", default="auto", choices=["auto", "none", "int8", "int4"])
    args = parser.parse_args()
    done = subprocess.run([sys.executable, "-c", CHILD, args.model, args.quantize], capture_output=True, text=True,
                          check=True)
    seconds, rss, peak, after = map(float, done.stdout.split()[-4:])
    print(f"{args.model} --quantize {args.quantize}: load {seconds:.1f} s, RSS after loading {rss:,.0f} MiB, "
          f"peak {peak:,.0f} MiB, RSS after a request {after:,.0f} MiB")
    if args.quantize == "auto":
        inspect = subprocess.run([sys.executable, "-m", "glmstack.cli", "inspect", args.model], capture_output=True,
                                 text=True, check=True).stdout
        found = re.search(r"process memory after loading ~([\d.]+) GB", inspect)
        if found:
            predicted = float(found.group(1)) * 1e9 / 2**20
            print(f"glmstack inspect: ~{predicted:,.0f} MiB ({100 * (predicted / rss - 1):+.1f}% against the RSS)")


if __name__ == "__main__":
    main()
