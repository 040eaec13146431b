"""Model math: architectures, checkpoint loading, tokenizers, chat formats, KV caches, quantization and the
serving engine. Never imports the HTTP or database stack (tests/test_boundaries.py)."""

from glmstack.engine.openmp import set_wait_policy_defaults

set_wait_policy_defaults()  # before any engine module imports torch (see openmp.py)
