"""OpenMP, which runs the threads of torch's CPU kernels and of the native ones (libgomp), tuned for a process
whose engine steps from a thread of its own (the server's `glmstack-engine`).

libgomp keeps a team of worker threads per thread that starts parallel regions. Once a server has loaded its
model on the main thread and then steps the engine on another, two teams exist, and with more of their threads
than CPUs libgomp throttles every worker's spin-wait to ~1,000 iterations: nearly every parallel region of a
step then waits for a sleeping worker to wake. `benchmarks/bench_engine_thread.py` on 2 cores with the bundled
model (BENCHMARKS.md, "glmstack serve against llama-server"): one request decoded 92.6 tok/s on the engine
thread with libgomp's defaults against 174.6 on the loading thread, and 172.9-175.5 with the settings below.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: free the threads, keep nothing else


def set_wait_policy_defaults() -> None:
    """Workers spin up to GOMP_SPINCOUNT iterations (well under a millisecond) before sleeping, throttled or
    not: OMP_WAIT_POLICY=ACTIVE makes the throttled spin the full one, and the bounded count keeps an idle
    server at no CPU. libgomp reads these once, when torch is first imported, so this runs before that (from
    glmstack/engine/__init__.py); values the user set are kept."""
    os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")
    os.environ.setdefault("GOMP_SPINCOUNT", "300000")


def release_thread_pool() -> None:
    """Free the calling thread's OpenMP workers in every libgomp loaded (torch's, and copies other wheels
    bundle), with OpenMP 5.0's omp_pause_resource_all: called on the thread that loaded the model just before
    the engine thread starts, so the engine's team is the only one. A libgomp without it is left alone; a
    later parallel region on this thread simply starts a new team."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            paths = sorted({line.split()[-1] for line in maps if "libgomp" in line and "/" in line})
    except OSError:  # not Linux
        return
    for path in paths:
        try:
            pause = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
        if pause(OMP_PAUSE_SOFT) != 0:
            log.debug("omp_pause_resource_all failed in %s", path)
