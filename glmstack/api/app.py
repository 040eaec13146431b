"""create_app: the platform's HTTP service around one engine and one store.

Paths: everything under /api/paas/v4 (the platform's layout, spec §1.1), the same handlers under /v1 for
OpenAI clients, ChatGLM's classic `POST /`, and /health, /metrics, /docs, /openapi.json.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

import glmstack
from glmstack.api import docs_page, errors, openapi, web_page
from glmstack.api.auth import Authenticator, is_loopback
from glmstack.api.deps import Platform
from glmstack.api.limits import BodySizeLimit, ConcurrencyLimiter, RequestHeadCheck
from glmstack.api.observability import Metrics, RequestLog
from glmstack.api.routes import (
    batches,
    chat,
    classic,
    conversations,
    embeddings,
    files,
    fine_tuning,
    health,
    knowledge,
    models,
)
from glmstack.api.safety import SafetyPolicy
from glmstack.api.services.models import ModelCatalog
from glmstack.api.shutdown import Drain
from glmstack.jobs.runner import JobRunner
from glmstack.knowledge.indexer import Indexer
from glmstack.protocol import AdapterHost, Embedder, Engine
from glmstack.settings import Settings
from glmstack.store import Store
from glmstack.store.usage import UsageWriter

PLATFORM_PREFIX = "/api/paas/v4"
OPENAI_PREFIX = "/v1"
# Settings.max_queue == 0 leaves the total unbounded here (the engine's own queue bound still applies).
UNBOUNDED = 2**31


def create_app(settings: Settings, engine: Engine, store: Store, *,
               embedders: Mapping[str, Embedder] | None = None) -> FastAPI:
    limiter = ConcurrencyLimiter(
        per_key=settings.max_concurrency_per_key, total=settings.max_queue or UNBOUNDED
    )
    platform = Platform(
        settings=settings,
        engine=engine,
        store=store,
        models=ModelCatalog(engine.info().name, created=int(time.time()), aliases=settings.model_aliases,
                            adapters=engine.adapters if isinstance(engine, AdapterHost) else None,
                            owns=lambda key_id, name: store.fine_tuning.by_model(key_id, name) is not None),
        safety=SafetyPolicy.from_dir(settings.safety_dir),
        limiter=limiter,
        # Decided from the configured bind address only, never from anything a request says.
        authenticator=Authenticator(store, open_when_keyless=is_loopback(settings.host)),
        metrics=Metrics(engine.stats, lambda: limiter.active),
        usage=UsageWriter(store.usage),
        embedders=dict(embedders or {}),
        drain=Drain(settings.shutdown_grace_s),
    )
    platform.indexer = Indexer(store, platform.embedders)
    platform.jobs = JobRunner(platform)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(store.sweep_orphan_blobs)  # uploads a crash cut off, blobs no row names
        platform.indexer.start()  # documents a stopped server left half-indexed are finished first
        platform.jobs.start()  # async tasks and batches a stopped server left are resumed
        yield
        await platform.jobs.stop()  # what is still running is released for the next server to resume
        await run_in_threadpool(platform.indexer.stop)
        await run_in_threadpool(platform.usage.close)  # what was served is recorded before the process ends

    app = FastAPI(
        lifespan=lifespan,
        title="glmstack",
        version=glmstack.__version__,
        summary="The GLM open platform API (v4) on your own machine",
        docs_url=None,  # docs_page.install: the same page, without a CDN
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.platform = platform
    errors.install(app)
    openapi.install(app, platform)
    docs_page.install(app)
    web_page.install(app)  # the chat page at / (glmstack/web)
    for router in (chat.router, models.router, embeddings.router, files.router, knowledge.router,
                   batches.router, fine_tuning.router):
        app.include_router(router, prefix=PLATFORM_PREFIX)
        app.include_router(router, prefix=OPENAI_PREFIX, include_in_schema=False)
    app.include_router(conversations.router, prefix="/api/glmstack")
    app.include_router(classic.router)
    app.include_router(health.router)
    # Added last = outermost: the request log sees (and times) everything, including oversized bodies.
    app.add_middleware(RequestHeadCheck)
    # Uploads stream to disk under the caps of their purpose (api/uploads.py) instead.
    uploads = frozenset(prefix + "/files" for prefix in (PLATFORM_PREFIX, OPENAI_PREFIX))
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes, exempt=uploads)
    app.add_middleware(RequestLog, metrics=platform.metrics)
    return app
