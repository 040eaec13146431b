"""The web chat page: GET / (index.html) and its static files under /web/, from the package's `web/` folder.

Plain Starlette routes, like docs_page.py: open (the page holds no data; the API calls it makes carry the key,
api/auth.py), outside the keyed API routes. `POST /` stays ChatGLM's classic api.py (api/routes/classic.py):
Starlette matches the method as well as the path.

The files are listed once at start-up, so a request path is only ever looked up in that list and never
reaches the filesystem (no traversal to guard against beyond the lookup itself).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
ASSET_PREFIX = "/web"

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".md": "text/plain; charset=utf-8",
}

# The page's own files change with each glmstack version and are small: revalidate every time (an ETag makes
# that a 304). The vendored libraries are pinned, but the same rule keeps an upgrade from serving stale code.
CACHE_CONTROL = "no-cache"

# Content-Security-Policy for the page: everything from this server, nothing inline; model output is
# sanitized (DOMPurify) before it is inserted, and this is the second line.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


def asset_files(root: Path = WEB_DIR) -> dict[str, Path]:
    """Every servable file under `root` by its URL path relative to it ('app.js', 'vendor/marked.esm.js');
    LICENSE files are served as plain text."""
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and (path.suffix in CONTENT_TYPES or path.name.startswith("LICENSE")):
            files[path.relative_to(root).as_posix()] = path
    return files


def _file(path: Path) -> Response:
    media_type = CONTENT_TYPES.get(path.suffix, "text/plain; charset=utf-8")
    headers = {"Cache-Control": CACHE_CONTROL, "X-Content-Type-Options": "nosniff"}
    if path.suffix == ".html":
        headers["Content-Security-Policy"] = CSP
    return FileResponse(path, media_type=media_type, headers=headers)


def install(app: FastAPI, root: Path = WEB_DIR) -> None:
    files = asset_files(root)

    async def page(request: Request) -> Response:
        return _file(files["index.html"])

    async def asset(request: Request) -> Response:
        path = files.get(request.path_params["path"])
        if path is None:
            return PlainTextResponse("not found", status_code=404)
        return _file(path)

    app.add_route("/", page, methods=["GET", "HEAD"], include_in_schema=False)
    app.add_route(ASSET_PREFIX + "/{path:path}", asset, methods=["GET", "HEAD"], include_in_schema=False)
