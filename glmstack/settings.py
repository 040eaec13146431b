"""One Settings object for the whole of glmstack, read from GLMSTACK_* environment variables.

The CLI builds it (`Settings.from_env()`, then `dataclasses.replace` for its flags) and passes it in; the
classic `glmstack.load()` builds one when not given one. Nothing else reads a GLMSTACK_* variable (the
boundary test checks). Standard library only, so any part of glmstack can import it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

# "auto": the precision the checkpoint stores (a Q4 GGUF runs as int4, Q8_0 as int8); "none": floats
QUANTIZE_CHOICES = ("auto", "none", "int8", "int4")
QUANTIZE_HELP = ("weights: auto (the default: a Q4_0/Q4_1 GGUF as int4, Q8_0 as int8, other checkpoints as "
                 "stored), none (floats), int8 or int4; a quantized model computes in bfloat16 on CPU")
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
_MiB = 1024 * 1024


@dataclass
class Settings:
    home: Path
    database_url: str
    host: str = "127.0.0.1"
    port: int = 8000
    model: str | None = None            # None: the engine's default model
    device: str = "auto"
    dtype: str = "auto"
    # One of QUANTIZE_CHOICES. "auto": a Q4_0/Q4_1 GGUF (the bundled model) is served as int4 and a Q8_0 one as
    # int8, on the native kernels, exactly the file's weights; 16/32-bit checkpoints stay floats. Every row of a
    # quantized step takes the same kernels, so a greedy answer is the same cold, cached or batched.
    quantize: str = "auto"
    max_body_bytes: int = 4 * _MiB
    # None: the documented per-purpose upload caps (100 MB for batch and fine-tune, 50 MB for file-extract and
    # retrieval, 5 MB for images); set: every purpose is capped at min(its documented cap, this)
    max_upload_bytes: int | None = None
    # None: a caller is bounded only by max_queue (the engine's), so one app can use the whole server; a key's
    # own concurrency_limit (`glmstack keys create --concurrency N`) overrides this.
    max_concurrency_per_key: int | None = None
    max_queue: int = 64
    max_tokens_cap: int | None = None   # None: only the model's context length limits a reply
    max_messages: int = 256
    safety_dir: Path | None = None      # None: the word lists shipped with glmstack
    log_level: str = "INFO"
    # More names the API answers to: name -> a name it answers to already (GLMSTACK_MODEL_ALIASES, written
    # "my-model=glm-4,gpt-4o-mini=glm-4"); GET /models lists them.
    model_aliases: dict[str, str] = field(default_factory=dict)
    # Embedding model name -> a sentence-transformers folder (GLMSTACK_EMBEDDING_MODELS, written
    # "embedding-3=/models/bge-m3,my-embedder=/models/e5"). embedding-2 and embedding-3 not named here are
    # served by the bundled all-MiniLM-L6-v2.
    embedding_models: dict[str, str] = field(default_factory=dict)
    kv_cache_mb: int = 512              # the serving engine's paged KV pool
    native: bool = True                 # the native CPU kernels (glmstack/engine/native), where they build
    native_dir: Path | None = None      # None: torch's extension cache, shared by every home
    vnni: bool = True                   # False keeps the native int8/int4 kernels on fp32 activations
    # After SIGTERM, requests in flight have this long to finish; a reply still running then is cut with an
    # error (api/shutdown.py)
    shutdown_grace_s: float = 30.0
    # Batch lines and async tasks running in the engine at once (jobs/runner.py): background work, scheduled
    # after interactive requests; below the engine's own limit of running sequences so a chat always gets in
    batch_concurrency: int = 16
    # Batch lines queued in the engine beyond batch_concurrency: the engine runs at most batch_concurrency of
    # them (max_background_running) and puts a queued one in a finished one's place in the same step
    batch_prefetch: int = 4
    batch_window_s: int = 24 * 3600        # a batch not finished this long after creation expires (spec §2.9.5)
    async_result_ttl_s: int = 24 * 3600    # finished async chat results are kept this long (spec §2.4)
    finetune_concurrency: int = 1          # fine-tuning jobs trained at once (each a child process)
    # threads of a fine-tuning process (which also runs at the lowest CPU priority, so serving comes first)
    finetune_threads: int = max(1, (os.cpu_count() or 2) // 2)

    @property
    def models_dir(self) -> Path:
        """Where `--model NAME` looks when NAME is not a path."""
        return self.home / "models"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Settings from `env` (default: os.environ). Empty variables count as unset. Raises ValueError naming
        the variable when a value does not parse."""
        env = os.environ if env is None else env

        def get(name: str) -> str | None:
            value = env.get(f"GLMSTACK_{name}", "").strip()
            return value or None

        def get_optional_int(name: str, *, minimum: int) -> int | None:
            raw = get(name)
            if raw is None:
                return None
            try:
                value = int(raw)
            except ValueError:
                raise ValueError(f"GLMSTACK_{name} must be an integer, got {raw!r}") from None
            if value < minimum:
                raise ValueError(f"GLMSTACK_{name} must be at least {minimum}, got {value}")
            return value

        def get_int(name: str, default: int, *, minimum: int) -> int:
            value = get_optional_int(name, minimum=minimum)
            return default if value is None else value

        def get_float(name: str, default: float, *, minimum: float) -> float:
            raw = get(name)
            if raw is None:
                return default
            try:
                value = float(raw)
            except ValueError:
                value = math.nan
            if not math.isfinite(value):  # "inf" and "nan" parse, but are no number of seconds
                raise ValueError(f"GLMSTACK_{name} must be a number, got {raw!r}")
            if value < minimum:
                raise ValueError(f"GLMSTACK_{name} must be at least {minimum:g}, got {raw}")
            return value

        def get_bool(name: str, default: bool) -> bool:
            raw = get(name)
            if raw is None:
                return default
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"GLMSTACK_{name} must be 1 or 0 (true/false, yes/no, on/off), got {raw!r}")

        def get_map(name: str) -> dict[str, str]:
            mapping = {}
            for item in (get(name) or "").split(","):
                if not item.strip():
                    continue
                key, sep, value = (part.strip() for part in item.partition("="))
                if not (sep and key and value):
                    raise ValueError(f"GLMSTACK_{name} must be name=target pairs separated by commas, got {item!r}")
                mapping[key] = value
            return mapping

        def get_path(name: str) -> Path | None:
            raw = get(name)
            return Path(raw).expanduser() if raw else None

        home = Path(get("HOME") or Path.home() / ".glmstack").expanduser().absolute()
        quantize = (get("QUANTIZE") or cls.quantize).lower()
        if quantize not in QUANTIZE_CHOICES:
            choices = ", ".join(QUANTIZE_CHOICES)
            raise ValueError(f"GLMSTACK_QUANTIZE must be one of {choices}, got {quantize!r}")
        defaults = cls(home=home, database_url="")
        return cls(
            home=home,
            database_url=get("DATABASE_URL") or f"sqlite:///{home / 'glmstack.db'}",
            host=get("HOST") or defaults.host,
            port=get_int("PORT", defaults.port, minimum=0),
            model=get("MODEL"),
            device=get("DEVICE") or defaults.device,
            dtype=get("DTYPE") or defaults.dtype,
            quantize=quantize,
            max_body_bytes=get_int("MAX_BODY_BYTES", defaults.max_body_bytes, minimum=1),
            max_upload_bytes=get_optional_int("MAX_UPLOAD_BYTES", minimum=1),
            max_concurrency_per_key=get_optional_int("MAX_CONCURRENCY_PER_KEY", minimum=1),
            max_queue=get_int("MAX_QUEUE", defaults.max_queue, minimum=0),
            max_tokens_cap=get_optional_int("MAX_TOKENS_CAP", minimum=1),
            max_messages=get_int("MAX_MESSAGES", defaults.max_messages, minimum=1),
            safety_dir=get_path("SAFETY_DIR"),
            log_level=(get("LOG_LEVEL") or defaults.log_level).upper(),
            model_aliases=get_map("MODEL_ALIASES"),
            embedding_models=get_map("EMBEDDING_MODELS"),
            kv_cache_mb=get_int("KV_CACHE_MB", defaults.kv_cache_mb, minimum=1),
            batch_concurrency=get_int("BATCH_CONCURRENCY", defaults.batch_concurrency, minimum=1),
            batch_prefetch=get_int("BATCH_PREFETCH", defaults.batch_prefetch, minimum=0),
            batch_window_s=get_int("BATCH_WINDOW_S", defaults.batch_window_s, minimum=1),
            async_result_ttl_s=get_int("ASYNC_RESULT_TTL_S", defaults.async_result_ttl_s, minimum=1),
            finetune_concurrency=get_int("FINETUNE_CONCURRENCY", defaults.finetune_concurrency, minimum=1),
            finetune_threads=get_int("FINETUNE_THREADS", defaults.finetune_threads, minimum=1),
            native=get_bool("NATIVE", defaults.native),
            native_dir=get_path("NATIVE_DIR"),
            vnni=get_bool("VNNI", defaults.vnni),
            shutdown_grace_s=get_float("SHUTDOWN_GRACE_S", defaults.shutdown_grace_s, minimum=0),
        )
