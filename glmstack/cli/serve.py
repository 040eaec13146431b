"""`glmstack serve`: load the model, open the store, run the HTTP API with uvicorn.

This is the composition root, the one place on the HTTP side allowed to touch the engine package (lazily,
inside `run`): it builds the engine and hands create_app only the object glmstack.protocol describes.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
from types import FrameType
from typing import TYPE_CHECKING, Any

from glmstack.settings import DEVICE_CHOICES, DTYPE_CHOICES, QUANTIZE_CHOICES, QUANTIZE_HELP, Settings

if TYPE_CHECKING:
    import uvicorn

    from glmstack.api.shutdown import Drain

EXIT_USAGE = 2
GIL_SWITCH_INTERVAL_S = 0.0005
# Libraries that narrate start-up at INFO (migrations, the server process, ...); shown with --debug.
THIRD_PARTY_LOGGERS = ("alembic", "uvicorn", "sqlalchemy", "httpx", "httpcore", "asyncio", "multipart")
# uvicorn cancels what still runs this long after the shutdown grace: by then the replies cut at the deadline
# have ended themselves (an engine abort takes effect within a step), with their error event sent.
SHUTDOWN_MARGIN_S = 3.0


def add_subcommands(subparsers: Any) -> None:
    serve = subparsers.add_parser("serve", help="run the HTTP API (platform v4, OpenAI /v1, ChatGLM api.py)")
    serve.add_argument("--host", default=None, help="bind address (default: $GLMSTACK_HOST, then 127.0.0.1)")
    serve.add_argument(
        "--port", type=int, default=None, help="port (default: $GLMSTACK_PORT, then 8000; 0 picks a free one)"
    )
    serve.add_argument(
        "--model",
        "-m",
        default=None,
        help="path or name of a model (default: $GLMSTACK_MODEL, then the bundled SmolLM2)",
    )
    serve.add_argument("--device", default=None, choices=DEVICE_CHOICES)
    serve.add_argument("--dtype", default=None, choices=DTYPE_CHOICES)
    serve.add_argument("--quantize", default=None, choices=QUANTIZE_CHOICES, help=QUANTIZE_HELP)
    serve.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", type=adapter_arg,
                       help="also serve this LoRA / P-Tuning v2 adapter of the model as model NAME (repeatable)")


def adapter_arg(value: str) -> tuple[str, str]:
    """`NAME=DIR` -> (NAME, DIR)."""
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{value!r}: expected NAME=DIR")
    return name, path


def settings_from(args: argparse.Namespace) -> Settings:
    """The GLMSTACK_* settings, with the command's flags (those it has and were given) on top."""
    settings = Settings.from_env()
    flags = {name: getattr(args, name, None) for name in ("host", "port", "model", "device", "dtype", "quantize")}
    return dataclasses.replace(settings, **{k: v for k, v in flags.items() if v is not None})


def run(args: argparse.Namespace) -> int:
    from glmstack.api.auth import is_loopback
    from glmstack.store import Store, StoreError

    settings = settings_from(args)
    if not args.debug:
        logging.getLogger().setLevel(settings.log_level)
        if settings.log_level != "DEBUG":  # our own INFO lines (access log, key events), not the libraries'
            for library in THIRD_PARTY_LOGGERS:
                logging.getLogger(library).setLevel(logging.WARNING)
    try:
        store = Store(settings.database_url, home=settings.home)
    except StoreError as e:
        print(f"glmstack: error: cannot open the database: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        active_keys = store.keys.count_active()
        if active_keys == 0 and not is_loopback(settings.host):
            print(
                f"glmstack: error: refusing to serve {settings.host} without API keys: anyone who can reach "
                "it could use the model. Create a key first (glmstack keys create), or bind to 127.0.0.1.",
                file=sys.stderr,
            )
            return EXIT_USAGE
        return _serve(settings, store, active_keys, getattr(args, "adapter", None))
    except StoreError as e:
        print(f"glmstack: error: database: {e}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        store.close()


def _serve(settings: Settings, store: Any, active_keys: int, adapters: list[tuple[str, str]] | None = None) -> int:
    import asyncio

    import uvicorn

    from glmstack.api.app import create_app
    from glmstack.api.h11_envelope import EnvelopeH11Protocol
    from glmstack.api.limits import MAX_HEAD_BYTES
    from glmstack.engine.classic import load
    from glmstack.engine.serving.async_engine import AsyncEngine

    model, _ = load(
        settings.model,
        device=settings.device,
        dtype=settings.dtype,
        quantize=settings.quantize,
        progress=sys.stderr.isatty(),
        settings=settings,
    )
    for name, path in adapters or []:
        try:
            model.adapters.load(name, path)
        except (OSError, ValueError) as e:
            print(f"glmstack: error: adapter {name}: {e}", file=sys.stderr)
            return EXIT_USAGE
    _prepare_native_kernels(model)
    try:
        embedders = load_embedders(settings)
    except (OSError, ValueError) as e:  # a GLMSTACK_EMBEDDING_MODELS folder that is missing or not loadable
        print(f"glmstack: error: embedding model: {e}", file=sys.stderr)
        return EXIT_USAGE
    engine = AsyncEngine(model, max_waiting=settings.max_queue or 2**31,
                         max_background_running=settings.batch_concurrency,
                         kv_cache_bytes=settings.kv_cache_mb * 1024 * 1024)
    # The event loop and the engine's thread share the GIL. At Python's default 5 ms switch interval, a
    # request arriving while the engine runs Python (scheduling, sampling) waits up to 5 ms for the loop to
    # get a turn; the engine spends its time in kernels that release the GIL, so handing over sooner costs
    # it nothing measurable.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    try:
        app = create_app(settings, engine, store, embedders=embedders)
        config = uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            access_log=False,
            # uvicorn sets its own loggers' levels from this
            log_level=logging.getLevelName(logging.getLogger("uvicorn").getEffectiveLevel()).lower(),
            # uvicorn waits this long for open connections once it stops listening, then cancels them; the
            # app's own deadline (Drain) comes SHUTDOWN_MARGIN_S earlier, so replies end with an error instead.
            timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s + SHUTDOWN_MARGIN_S),
            http=EnvelopeH11Protocol,
            h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        )
        server = draining_server(config, app.state.platform.drain)
        asyncio.run(_run_until_stopped(server, settings, model.name, active_keys))
        return 0 if server.started else 1
    finally:
        engine.shutdown()


def draining_server(config: uvicorn.Config, drain: Drain) -> uvicorn.Server:
    """uvicorn's Server, which also starts `drain` at SIGTERM or SIGINT. uvicorn itself tells the app nothing
    until every connection has closed (its lifespan shutdown comes last), too late to end a reply cleanly."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # A signal handler, run by the main thread - the event loop's - between two bytecodes.
            if not drain.draining:
                logging.getLogger(__name__).info(
                    "draining for %g s: no new connections; replies still running then are cut", drain.grace_s
                )
            drain.begin()
            super().handle_exit(sig, frame)

    return DrainingServer(config)


def load_embedders(settings: Settings) -> dict[str, Any]:
    """The embedding models by the names the API answers to: settings.embedding_models, and embedding-2 and
    embedding-3 on the bundled all-MiniLM-L6-v2 unless named there. One model per distinct folder, shared by
    its names. Without the bundled model's package, only configured names are served (a warning says so)."""
    from glmstack.engine.embeddings import bundled_embedding_model_dir, load_embedder

    folders = dict(settings.embedding_models)
    missing = [name for name in ("embedding-2", "embedding-3") if name not in folders]
    if missing:
        try:
            bundled = str(bundled_embedding_model_dir())
            folders.update((name, bundled) for name in missing)
        except FileNotFoundError as e:
            logging.getLogger(__name__).warning("%s: %s are not served", e, " and ".join(missing))
    loaded: dict[str, Any] = {}  # folder -> its model
    for folder in folders.values():
        if folder not in loaded:
            loaded[folder] = load_embedder(folder)
    return {name: loaded[folder] for name, folder in folders.items()}


def _prepare_native_kernels(model: Any) -> None:
    """A quantized model decodes on the native kernels: build (or load) them now, before the banner says the
    server is ready, instead of inside the first request."""
    from glmstack.engine import native

    if getattr(model.module, "quantization", None) is None or native.unavailable_reason() is not None:
        return
    if not native.is_built():
        print("glmstack: compiling the native CPU kernels (once per machine and version, about a minute)...",
              file=sys.stderr, flush=True)
    native.kernels()


async def _run_until_stopped(server: Any, settings: Settings, model_name: str, active_keys: int) -> None:
    import asyncio

    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        port = server.servers[0].sockets[0].getsockname()[1]
        print(banner(settings.host, port, model_name, active_keys), flush=True)
    await task


def banner(host: str, port: int, model_name: str, active_keys: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    shown = f"[{shown}]" if ":" in shown else shown
    url = f"http://{shown}:{port}"
    if active_keys:
        auth = f"API key required ({active_keys} active; glmstack keys create makes one)"
        key = "YOUR_ID.YOUR_SECRET"
    else:
        auth = "open: no API key configured, loopback only (any key is accepted until one is created)"
        key = "local.any"
    return f"""glmstack is serving {model_name} at {url}
  platform API  {url}/api/paas/v4    OpenAI clients  {url}/v1
  docs          {url}/docs           health {url}/health
  auth          {auth}

Try it:
  curl {url}/api/paas/v4/chat/completions \\
    -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\
    -d '{{"model": "glm-4", "messages": [{{"role": "user", "content": "你好"}}], "max_tokens": 64}}'

  from zhipuai import ZhipuAI
  client = ZhipuAI(api_key="{key}", base_url="{url}/api/paas/v4")
  reply = client.chat.completions.create(model="glm-4", messages=[{{"role": "user", "content": "你好"}}])
  print(reply.choices[0].message.content)
"""
