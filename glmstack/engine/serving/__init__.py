"""The serving engine: continuous batching over a paged KV cache. scheduler decides who runs, runner builds
the batched forward, core samples and emits events, async_engine runs it on a thread for the platform."""
