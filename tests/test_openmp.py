"""glmstack/engine/openmp.py: the OpenMP settings every process that imports the engine gets, and freeing the
loading thread's workers before the engine thread starts its own. Each check runs in a fresh interpreter:
libgomp reads its settings once, when torch is first imported."""

from __future__ import annotations

import os
import subprocess
import sys


def run(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    result = subprocess.run([sys.executable, "-c", code], env={**clean, **env, "OMP_NUM_THREADS": "2"},
                            capture_output=True, text=True, check=True, timeout=120)
    return result.stdout.strip()


def test_the_engine_sets_the_wait_policy_before_torch_and_keeps_the_users() -> None:
    code = "import os, glmstack.engine, torch; print(os.environ['OMP_WAIT_POLICY'], os.environ['GOMP_SPINCOUNT'])"
    assert run(code) == "ACTIVE 300000"
    assert run(code, OMP_WAIT_POLICY="PASSIVE", GOMP_SPINCOUNT="10") == "PASSIVE 10"


def test_release_thread_pool_ends_the_calling_threads_workers() -> None:
    """A parallel region on this thread leaves OpenMP workers behind (libgomp keeps its team); after
    release_thread_pool they are gone, and torch still computes (a new team starts when needed)."""
    code = """
import os, torch
from glmstack.engine import openmp
threads = lambda: len(os.listdir('/proc/self/task'))
before = threads()
x = torch.randn(2000, 2000)
(x @ x).sum()  # a parallel region on 2 threads
with_team = threads()
openmp.release_thread_pool()
released = threads()
assert torch.allclose(x @ x, x @ x)
print(before, with_team, released)
"""
    before, with_team, released = map(int, run(code).split())
    assert with_team > released, (before, with_team, released)
