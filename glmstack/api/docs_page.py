"""/docs without a CDN: FastAPI's Swagger UI page, pointed at the Swagger UI 5 files that the fastapi-offline
package vendors, served by glmstack (FastAPI's default page loads them from a CDN and is blank offline).

Plain Starlette routes, as FastAPI's own /docs is: open like /openapi.json (they describe the API and hold no
data), outside the keyed API routes (api/auth.py).
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response

ASSETS = Path(fastapi_offline.__file__).parent / "static"
ASSET_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon.png")
ASSET_PREFIX = "/docs/assets"


def install(app: FastAPI, docs_url: str = "/docs") -> None:
    redirect_url = f"{docs_url}/oauth2-redirect"

    async def page(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - API",
            oauth2_redirect_url=f"{root}{redirect_url}",
            swagger_js_url=f"{root}{ASSET_PREFIX}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSET_PREFIX}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSET_PREFIX}/favicon.png",
        )

    async def redirect(request: Request) -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    def asset(name: str):  # one route per file: a fixed list, so no request path ever reaches the filesystem
        async def serve(request: Request) -> Response:
            return FileResponse(ASSETS / name, headers={"Cache-Control": "public, max-age=86400"})
        return serve

    app.add_route(docs_url, page, include_in_schema=False)
    app.add_route(redirect_url, redirect, include_in_schema=False)
    for name in ASSET_FILES:
        app.add_route(f"{ASSET_PREFIX}/{name}", asset(name), include_in_schema=False)
