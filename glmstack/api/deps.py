"""What every route works with: the engine, the store and the policies built from Settings, gathered once
by create_app. The engine is seen only through `glmstack.protocol.Engine`, so nothing here imports torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from glmstack.api.auth import Authenticator
from glmstack.api.limits import ConcurrencyLimiter
from glmstack.api.observability import Metrics
from glmstack.api.safety import SafetyPolicy
from glmstack.api.services.models import ModelCatalog
from glmstack.api.shutdown import Drain
from glmstack.knowledge.indexer import Indexer
from glmstack.protocol import Embedder, Engine
from glmstack.settings import Settings
from glmstack.store import Store
from glmstack.store.usage import UsageWriter

if TYPE_CHECKING:  # jobs/ builds on the platform's services, which import this module
    from glmstack.jobs.runner import JobRunner


@dataclass
class Platform:
    settings: Settings
    engine: Engine
    store: Store
    models: ModelCatalog
    safety: SafetyPolicy
    limiter: ConcurrencyLimiter
    authenticator: Authenticator
    metrics: Metrics
    usage: UsageWriter  # usage rows are written behind the replies
    # name the API answers to (embedding-2, embedding-3, ...) -> the model serving it; several names may share one
    embedders: dict[str, Embedder] = field(default_factory=dict)
    # the background worker that chunks and embeds knowledge documents (its queue is the database)
    indexer: Indexer = field(default=None)  # type: ignore[assignment]  # create_app always sets it
    # SIGTERM's grace period: begun by `glmstack serve`, read by generations and jobs (api/shutdown.py)
    drain: Drain = field(default_factory=lambda: Drain(30.0))
    # async chat tasks and batches (jobs/runner.py), started with the app
    jobs: JobRunner = field(default=None)  # type: ignore[assignment]  # create_app always sets it


async def get_platform(request: Request) -> Platform:
    """Dependency: the app's Platform (`async`: called in place, not in a worker thread)."""
    return request.app.state.platform


PlatformDep = Annotated[Platform, Depends(get_platform)]
