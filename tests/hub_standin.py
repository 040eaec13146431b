"""A stand-in for the download endpoints of the Hugging Face Hub and of ModelScope, on 127.0.0.1, for the
`glmstack pull` tests: the routes huggingface_hub and modelscope-hub call, answered with the headers they read,
HTTP Range, and the faults a real download meets (a connection cut mid-file, a gated repo, a hub that is down,
sizes that do not match the bytes).

Hugging Face (huggingface_hub 2.x):
    GET  /api/models/{repo}/revision/{revision}?blobs=true   model info: commit sha, siblings with size / lfs
    HEAD /{repo}/resolve/{revision}/{file}                   X-Repo-Commit, ETag / X-Linked-Etag, X-Linked-Size
    GET  /{repo}/resolve/{revision}/{file}                   the bytes; Range -> 206 + Content-Range
Errors as the Hub sends them: 404 + X-Error-Code RepoNotFound / RevisionNotFound / EntryNotFound, and
401 + X-Error-Code GatedRepo for a gated repo's files (its model info stays public, as on the Hub). ModelScope
answers JSON {"Code", "Message", "Success": false}: 404 for what is missing, 401 for a gated repo's files.

ModelScope (modelscope-hub 0.5):
    GET /api/v1/models/{repo}/repo/files?Revision=&Recursive=   {"Code": 200, "Data": {"Files": [...]}}
    GET /api/v1/models/{repo}/repo?Revision=&FilePath=           the bytes; Range -> 206
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

# The Hub stores weights with LFS (X-Linked-* headers, a sha256 ETag); small text files are plain git blobs.
LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pth", ".onnx")


@dataclass
class Repo:
    files: dict[str, bytes]
    gated: bool = False
    # Sizes the file listings claim where they are not the real ones (a hub whose metadata is wrong).
    listed_sizes: dict[str, int] = field(default_factory=dict)
    # file -> send this many bytes of its first GET, then cut the connection and take the whole hub down (503)
    drop_after: dict[str, int] = field(default_factory=dict)

    def size(self, name: str) -> int:
        return self.listed_sizes.get(name, len(self.files[name]))


@dataclass
class Request:
    method: str
    path: str  # without the query
    query: dict[str, str]
    headers: dict[str, str]


class HubStandin:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.down = False  # every request answered 503, as a hub in an outage
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.standin = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def add(self, repo_id: str, files: dict[str, bytes], **options) -> Repo:
        self.repos[repo_id] = Repo(dict(files), **options)
        return self.repos[repo_id]

    def downloads(self, method: str = "GET") -> list[tuple[str, str | None]]:
        """(file, Range header) of every file request so far, in order, whichever hub's route."""
        found = []
        for r in self.requests:
            if r.method != method:
                continue
            resolve = re.fullmatch(r"/[^/]+/[^/]+/resolve/[^/]+/(.+)", r.path)
            if resolve:
                found.append((resolve.group(1), r.headers.get("range")))
            elif re.fullmatch(r"/api/v1/models/[^/]+/[^/]+/repo", r.path):
                found.append((r.query["FilePath"], r.headers.get("range")))
        return found

    @contextmanager
    def running(self) -> Iterator[HubStandin]:
        thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._server.shutdown()
            self._server.server_close()
            thread.join()


def commit_of(repo_id: str) -> str:
    return hashlib.sha1(repo_id.encode()).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as clients pool connections

    def log_message(self, format: str, *args) -> None:
        pass

    @property
    def standin(self) -> HubStandin:
        return self.server.standin  # type: ignore[attr-defined]

    def do_HEAD(self) -> None:
        self._route(body=False)

    def do_GET(self) -> None:
        self._route(body=True)

    def _route(self, body: bool) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        with self.standin._lock:
            self.standin.requests.append(
                Request(self.command, path, query, {k.lower(): v for k, v in self.headers.items()}))
        if self.standin.down:
            return self._reply(503, b"hub down", {"Content-Type": "text/plain"}, body)
        if found := re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", path):
            return self._hf_info(found.group(1), found.group(2), body)
        if found := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            return self._hf_file(found.group(1), found.group(2), found.group(3), body)
        if found := re.fullmatch(r"/api/v1/models/([^/]+/[^/]+)/repo/files", path):
            return self._ms_listing(found.group(1), body)
        if found := re.fullmatch(r"/api/v1/models/([^/]+/[^/]+)/repo", path):
            return self._ms_file(found.group(1), query.get("FilePath", ""), body)
        self._reply(404, b"not found", {"Content-Type": "text/plain"}, body)

    # ---- Hugging Face ------------------------------------------------------------------------------------

    def _hf_error(self, status: int, code: str, message: str, body: bool) -> None:
        payload = json.dumps({"error": message}).encode()
        self._reply(status, payload, {"Content-Type": "application/json", "X-Error-Code": code,
                                      "X-Error-Message": message}, body)

    def _hf_repo(self, repo_id: str, revision: str, body: bool) -> Repo | None:
        repo = self.standin.repos.get(repo_id)
        if repo is None:
            self._hf_error(404, "RepoNotFound", "Repository not found", body)
        elif revision not in ("main", commit_of(repo_id)):
            self._hf_error(404, "RevisionNotFound", "Invalid rev id: " + revision, body)
            return None
        return repo

    def _hf_info(self, repo_id: str, revision: str, body: bool) -> None:
        repo = self._hf_repo(repo_id, revision, body)
        if repo is None:
            return
        siblings = []
        for name, data in repo.files.items():
            sibling = {"rfilename": name, "size": repo.size(name), "blobId": hashlib.sha1(data).hexdigest()}
            if name.endswith(LFS_SUFFIXES):
                sibling["lfs"] = {"size": repo.size(name), "sha256": hashlib.sha256(data).hexdigest(),
                                  "pointerSize": 134}
            siblings.append(sibling)
        info = {"id": repo_id, "modelId": repo_id, "sha": commit_of(repo_id), "private": False,
                "gated": "manual" if repo.gated else False, "disabled": False, "siblings": siblings}
        self._reply(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)

    def _hf_file(self, repo_id: str, revision: str, name: str, body: bool) -> None:
        repo = self._hf_repo(repo_id, revision, body)
        if repo is None:
            return
        if repo.gated:
            return self._hf_error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have "
                                  "access to it and be authenticated to access it. Please log in.", body)
        if name not in repo.files:
            return self._hf_error(404, "EntryNotFound", f"{name} does not exist", body)
        data = repo.files[name]
        headers = {"X-Repo-Commit": commit_of(repo_id), "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if name.endswith(LFS_SUFFIXES):
            sha256 = hashlib.sha256(data).hexdigest()
            headers |= {"ETag": f'"{sha256}"', "X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(len(data))}
        else:
            headers["ETag"] = f'"{hashlib.sha1(data).hexdigest()}"'
        self._send_file(repo, name, data, headers, body)

    # ---- ModelScope ----------------------------------------------------------------------------------------

    def _ms_listing(self, repo_id: str, body: bool) -> None:
        repo = self.standin.repos.get(repo_id)
        if repo is None:
            payload = {"Code": 10010205001, "Message": f"model {repo_id} not found", "Success": False}
            return self._reply(404, json.dumps(payload).encode(), {"Content-Type": "application/json"}, body)
        files = [{"Name": name.rsplit("/", 1)[-1], "Path": name, "Size": repo.size(name), "Type": "blob",
                  "Sha256": hashlib.sha256(data).hexdigest(), "Revision": "master"}
                 for name, data in repo.files.items()]
        payload = {"Code": 200, "Data": {"Files": files}, "Message": "success", "Success": True}
        self._reply(200, json.dumps(payload).encode(), {"Content-Type": "application/json"}, body)

    def _ms_file(self, repo_id: str, name: str, body: bool) -> None:
        repo = self.standin.repos.get(repo_id)
        if repo is None or name not in repo.files:
            payload = {"Code": 404, "Message": f"{name} not found", "Success": False}
            return self._reply(404, json.dumps(payload).encode(), {"Content-Type": "application/json"}, body)
        if repo.gated:
            payload = {"Code": 401, "Message": "login required to download this model", "Success": False}
            return self._reply(401, json.dumps(payload).encode(), {"Content-Type": "application/json"}, body)
        self._send_file(repo, name, repo.files[name], {"Accept-Ranges": "bytes",
                                                       "Content-Type": "application/octet-stream"}, body)

    # ---- bytes ------------------------------------------------------------------------------------------

    def _send_file(self, repo: Repo, name: str, data: bytes, headers: dict[str, str], body: bool) -> None:
        start, status = 0, 200
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if wanted:
            start = int(wanted.group(1))
            end = int(wanted.group(2)) + 1 if wanted.group(2) else len(data)
            if start >= len(data):
                return self._reply(416, b"", {"Content-Range": f"bytes */{len(data)}"}, body)
            status = 206
            headers = headers | {"Content-Range": f"bytes {start}-{end - 1}/{len(data)}"}
            data = data[start:end]
        cut = repo.drop_after.pop(name, None) if body else None
        if cut is None:
            return self._reply(status, data, headers, body)
        # Announce the whole file, send part of it, and hang up: the connection died mid-download.
        self.send_response(status)
        for key, value in (headers | {"Content-Length": str(len(data))}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data[:cut])
        self.wfile.flush()
        self.standin.down = True
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def _reply(self, status: int, payload: bytes, headers: dict[str, str], body: bool) -> None:
        self.send_response(status)
        for key, value in (headers | {"Content-Length": str(len(payload))}).items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(payload)
