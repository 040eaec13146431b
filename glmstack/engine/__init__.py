"""Model math: architectures, checkpoint loading, tokenizers, chat formats, KV caches, quantization and the
serving engine. Never imports the HTTP or database stack (tests/test_boundaries.py)."""
