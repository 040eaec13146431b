"""/health (public, for load balancers and `curl`) and /metrics (keyed: it shows traffic and token volumes)."""

from __future__ import annotations

from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from glmstack.api.auth import keyed_router
from glmstack.api.deps import PlatformDep

router = keyed_router(tags=["operations"])


@router.get("/health", summary="Model loaded and database reachable (200), or not (503)")
async def health(platform: PlatformDep) -> JSONResponse:
    info = platform.engine.info()
    database = await run_in_threadpool(platform.store.healthy)
    body = {
        "status": "ok" if database else "degraded",
        "model": {"name": info.name, "loaded": True},
        "database": database,
    }
    return JSONResponse(body, status_code=200 if database else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(platform: PlatformDep) -> Response:
    # In a worker thread: reading engine.stats() waits for the engine step in progress to end, which must not
    # hold up the event loop (and every stream on it).
    payload, content_type = await run_in_threadpool(platform.metrics.render)
    return Response(payload, media_type=content_type)
