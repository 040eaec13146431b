"""Model math: architectures, checkpoint loading, tokenizers, chat formats, KV caches, quantization and the
serving engine. Never imports the HTTP or database stack (tests/test_boundaries.py)."""

import os

# OpenMP (libgomp: torch's CPU kernels and glmstack's native ones run on it) reads these once, when torch is
# first imported, which is after this package in every glmstack entry point. A server or the classic API steps
# the engine from a thread of its own while other threads (the main one at load, the knowledge indexer) start
# parallel regions too; each such thread gets a team, and once the teams' threads outnumber the CPUs libgomp
# cuts its workers' spin-wait to ~1,000 iterations, so nearly every parallel region of a step waits for a
# sleeping worker to wake. Through `glmstack serve`, 16 streams made 630-660 tok/s that way and 740-770 with
# these (BENCHMARKS.md). The spin stays bounded (GOMP_SPINCOUNT iterations, well under a millisecond), so an
# idle server uses no CPU. Values set by the user are kept.
os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "300000")
