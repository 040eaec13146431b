"""The files API (spec §2.10, §4.1-4.3): uploads of every purpose through the official SDKs against a real
socket, JSONL checked line by line, file-extract extraction, and hostile uploads - path-like and unicode
names, oversize bodies with and without Content-Length, broken forms - each leaving nothing on disk. On SQLite
and PostgreSQL (the `database_url` fixture)."""

from __future__ import annotations

import io
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import zhipuai
from fastapi.testclient import TestClient
from make_files import make_docx, make_encrypted_pdf, make_ole, make_pdf, make_xxe_docx, make_zip_bomb
from scripted import ScriptedEngine
from servers import LiveServer

from glmstack.api import create_app
from glmstack.api.services import files as files_service
from glmstack.knowledge.extraction import ExtractionLimits
from glmstack.knowledge.jsonl_checks import MAX_BATCH_REQUESTS, JsonlError, check_batch, check_fine_tune
from glmstack.settings import Settings
from glmstack.store import Store
from glmstack.store.blobs import BLOB_NAME, ORPHAN_GRACE_S, BlobStore, display_name
from glmstack.store.files import NewFile

FILES = "/api/paas/v4/files"
OLD = time.time() - 2 * ORPHAN_GRACE_S  # an mtime the orphan sweep no longer spares


def batch_line(custom_id: str = "request-1", model: str = "glm-4", **overrides: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v4/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": "你好"}]}, **overrides}


def jsonl(*lines: Any) -> bytes:
    return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode("utf-8")


GOOD_BATCH = jsonl(batch_line("request-1"), batch_line("request-2"))
GOOD_FINE_TUNE = jsonl(
    {"messages": [{"role": "system", "content": "你是一位乐于助人的助手。"},
                  {"role": "user", "content": "请介绍一下AlphaGo的基本原理。"},
                  {"role": "assistant", "content": "AlphaGo 把深度神经网络与树搜索结合。"}]},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
)


def leftovers(store: Store) -> list[str]:
    """What is on disk besides the blobs of live rows: staging files, and blobs no row names."""
    named = store.files.blobs()
    staged = [f"staging/{p.name}" for p in store.blobs.staging.iterdir()]
    return staged + [p.name for p in store.blobs.root.iterdir() if p.is_file() and p.name not in named]


def blob_names(store: Store) -> list[str]:
    return sorted(p.name for p in store.blobs.root.iterdir() if p.is_file())


def upload(client: TestClient, content: bytes, purpose: str = "batch", filename: str = "input.jsonl",
           **fields: str) -> httpx.Response:
    return client.post(FILES, data={"purpose": purpose, **fields}, files={"file": (filename, content)})


def assert_error(response: httpx.Response, status: int, code: str, *words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    for word in words:
        assert word in error["message"], error


# --- a real server on a socket, for the SDKs ------------------------------------------------------------------

@pytest.fixture
def live(store: Store, tmp_path: Path) -> Iterator[LiveServer]:
    settings = Settings(home=tmp_path, database_url="unused", max_upload_bytes=64 * 1024)
    server = LiveServer(create_app(settings, ScriptedEngine(), store))
    yield server
    server.stop()


def test_the_zhipuai_sdk_uploads_lists_reads_and_deletes(live: LiveServer, store: Store, key: str,
                                                          tmp_path: Path) -> None:
    client = zhipuai.ZhipuAI(api_key=key, base_url=f"{live.url}/api/paas/v4")
    batch_path, tune_path = tmp_path / "requests.jsonl", tmp_path / "train.jsonl"
    batch_path.write_bytes(GOOD_BATCH)
    tune_path.write_bytes(GOOD_FINE_TUNE)
    with batch_path.open("rb") as f:
        batch = client.files.create(file=f, purpose="batch")
    with tune_path.open("rb") as f:
        tune = client.files.create(file=f, purpose="fine-tune")
    assert batch.id.startswith("file-") and batch.object == "file" and batch.status == "processed"
    assert (batch.filename, batch.bytes, batch.purpose) == ("requests.jsonl", len(GOOD_BATCH), "batch")
    assert abs(batch.created_at - time.time()) < 3600

    assert [f.id for f in client.files.list(purpose="batch").data] == [batch.id]
    assert {f.id for f in client.files.list().data} == {batch.id, tune.id}
    assert client.files.content(batch.id).content == GOOD_BATCH
    assert client.files.content(tune.id).content == GOOD_FINE_TUNE

    blob = store.files.get(store.keys.list()[0].id, batch.id).blob
    assert store.blobs.path(blob).read_bytes() == GOOD_BATCH
    deleted = client.files.delete(file_id=batch.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (batch.id, True, "file")
    assert not store.blobs.path(blob).exists()
    assert [f.id for f in client.files.list().data] == [tune.id]
    with pytest.raises(zhipuai.APIStatusError) as refused:
        client.files.content(batch.id)
    assert refused.value.status_code == 404
    assert leftovers(store) == []


def test_the_openai_sdk_pages_with_after(live: LiveServer, store: Store, key: str) -> None:
    client = openai.OpenAI(api_key=key, base_url=f"{live.url}/v1")
    made = [client.files.create(file=(f"part-{i}.jsonl", GOOD_BATCH), purpose="batch").id for i in range(5)]
    assert [f.id for f in client.files.list(limit=2)] == made[::-1]  # the page iterator follows `after`
    assert client.files.content(made[0]).content == GOOD_BATCH
    assert client.files.delete(made[0]).deleted is True


def test_oversize_streamed_without_a_length_is_refused_while_it_streams(live: LiveServer, store: Store,
                                                                       key: str) -> None:
    boundary = "b0undary"
    sent = 0

    def body() -> Iterator[bytes]:  # a generator: httpx sends it chunked, with no Content-Length
        nonlocal sent
        yield (f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
               f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n').encode()
        for _ in range(64):  # 4 MiB against the server's 64 KiB cap
            sent += 65536
            yield b"x" * 65536
        yield f"\r\n--{boundary}--\r\n".encode()

    response = httpx.post(f"{live.url}{FILES}", content=body(), timeout=60,
                          headers={"Authorization": f"Bearer {key}",
                                   "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert_error(response, 435, "435", "64KB")
    assert "content-length" not in response.request.headers
    assert leftovers(store) == [] and blob_names(store) == []


def test_a_client_that_hangs_up_mid_upload_leaves_nothing(live: LiveServer, store: Store, key: str) -> None:
    boundary = "gone"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n').encode()
    port = int(live.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(f"POST {FILES} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
                     f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: 50000\r\n\r\n"
                     .encode() + head + GOOD_BATCH)
        deadline = time.monotonic() + 30
        while not any(store.blobs.staging.iterdir()):  # the server is writing the file part
            assert time.monotonic() < deadline, "the upload never reached the staging folder"
            time.sleep(0.01)
    deadline = time.monotonic() + 30
    while leftovers(store):  # the server notices the closed connection and removes the partial file
        assert time.monotonic() < deadline, leftovers(store)
        time.sleep(0.01)
    assert blob_names(store) == []


def test_oversize_through_the_sdk(live: LiveServer, store: Store, key: str, tmp_path: Path) -> None:
    big = tmp_path / "big.jsonl"
    big.write_bytes(jsonl(*[batch_line(f"r{i}") for i in range(2000)]))  # ~250 KB with a Content-Length
    client = zhipuai.ZhipuAI(api_key=key, base_url=f"{live.url}/api/paas/v4", max_retries=0)
    with pytest.raises(zhipuai.APIStatusError) as refused, big.open("rb") as f:
        client.files.create(file=f, purpose="batch")
    assert refused.value.status_code == 435
    assert leftovers(store) == [] and blob_names(store) == []


# --- purposes ---------------------------------------------------------------------------------------------------

def test_file_extract_returns_the_text_of_a_docx_and_a_pdf(live: LiveServer, store: Store, key: str,
                                                           tmp_path: Path) -> None:
    docx_path, pdf_path = tmp_path / "报告 2024.docx", tmp_path / "notes.pdf"
    make_docx(docx_path, ["The launch moved to Thursday.", "发布会改到周四。"], title="季度报告")
    make_pdf(pdf_path, ["Quarterly revenue grew by 12 percent."])
    sdk = zhipuai.ZhipuAI(api_key=key, base_url=f"{live.url}/api/paas/v4")
    for path, words, mime in ((docx_path, ["Thursday", "周四"], "wordprocessingml"),
                              (pdf_path, ["revenue grew"], "pdf")):
        with path.open("rb") as f:
            uploaded = sdk.files.create(file=f, purpose="file-extract")  # type: ignore[arg-type]  # not in its hint
        assert uploaded.filename == path.name and uploaded.bytes == path.stat().st_size
        extracted = json.loads(sdk.files.content(uploaded.id).content)
        assert extracted["type"] == "file" and extracted["filename"] == path.name
        assert mime in extracted["file_type"]
        assert isinstance(extracted["title"], str)
        for word in words:
            assert word in extracted["content"]
    assert leftovers(store) == []


@pytest.mark.parametrize("name, content, words", [
    ("broken.pdf", b"%PDF-1.7\n1 0 obj << /Type /Catalog >>\nnot a pdf at all", []),
    ("program.exe", b"MZ\x90\x00", ["DOCX"]),
    ("empty.txt", b"", ["empty"]),
])
def test_file_extract_refusals_keep_nothing(client: TestClient, store: Store, name: str, content: bytes,
                                            words: list[str]) -> None:
    assert_error(upload(client, content, "file-extract", name), 400, "1214", "file", *words)
    assert client.get(FILES, params={"purpose": "file-extract"}).json()["data"] == []
    assert leftovers(store) == [] and blob_names(store) == []


def truncated_pdf(path: Path) -> None:
    make_pdf(path, ["text"] * 40)
    path.write_bytes(path.read_bytes()[:900])


HOSTILE_FILES = {
    "a zip bomb (1 GiB of zeros in 1 MB)": ("bomb.docx", lambda p: make_zip_bomb(p), "inflates"),
    "an external entity": ("xxe.docx", lambda p: make_xxe_docx(p), "DTD"),
    "an encrypted PDF": ("secret.pdf", lambda p: make_encrypted_pdf(p, ["hidden"]), "password"),
    "a truncated PDF": ("cut.pdf", lambda p: truncated_pdf(p), "PDF"),
    "a legacy .doc": ("old.doc", lambda p: make_ole(p), "docx"),
}


@pytest.mark.parametrize("what", list(HOSTILE_FILES))
def test_hostile_documents_are_refused_in_bounded_time(client: TestClient, store: Store, tmp_path: Path,
                                                       what: str) -> None:
    name, build, word = HOSTILE_FILES[what]
    path = tmp_path / name
    build(path)
    started = time.monotonic()
    response = upload(client, path.read_bytes(), "file-extract", name)
    assert_error(response, 400, "1214", "file", word)
    assert "root:" not in response.text
    assert time.monotonic() - started < ExtractionLimits().timeout_s  # refused, not timed out
    assert leftovers(store) == [] and blob_names(store) == []


@pytest.mark.parametrize("purpose, content, words", [
    ("batch", b'{"custom_id": "a", "method": "POST"', ["line 1", "JSON"]),
    ("batch", b"\n\n" + jsonl([1, 2]), ["line 3", "JSON object"]),
    ("batch", jsonl(batch_line("a")) + b'{"custom_id": "\xff"}\n', ["line 2", "UTF-8"]),
    ("fine-tune", jsonl({"messages": [{"role": "user", "content": "hi"}]}), ["line 1", "assistant"]),
    ("fine-tune", jsonl({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                        {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"},
                                      {"role": "assistant", "content": "b"}]}), ["line 2", "system"]),
    ("fine-tune", jsonl({"prompt": "x", "completion": "y"}), ["line 1", "messages"]),
])
def test_bad_jsonl_names_the_line(client: TestClient, store: Store, purpose: str, content: bytes,
                                  words: list[str]) -> None:
    assert_error(upload(client, content, purpose), 400, "1214", "file", *words)
    assert leftovers(store) == [] and blob_names(store) == []


def test_jsonl_checks_stream_line_by_line() -> None:
    assert check_batch(io.BytesIO(GOOD_BATCH)) == 2
    assert check_batch(io.BytesIO(b"\xef\xbb\xbf" + GOOD_BATCH + b"\n\n")) == 2  # BOM and trailing blank lines
    embeddings = {"custom_id": "e", "method": "POST", "url": "/v1/embeddings",
                  "body": {"model": "embedding-3", "input": "x"}}
    assert check_batch(io.BytesIO(jsonl(embeddings))) == 1
    assert check_fine_tune(io.BytesIO(GOOD_FINE_TUNE)) == 2
    with pytest.raises(JsonlError, match="no requests"):
        check_batch(io.BytesIO(b"\n"))
    # what a request says is checked when the batch runs (a bad line goes to the error file): a repeated
    # custom_id, a GET, another url or model still make a JSONL file
    odd = jsonl(batch_line("a"), batch_line("a", method="GET", url="/v4/images/edit", model="glm-4-air"))
    assert check_batch(io.BytesIO(odd)) == 2
    too_many = b"".join(json.dumps(batch_line(f"r{i}")).encode() + b"\n" for i in range(MAX_BATCH_REQUESTS + 1))
    with pytest.raises(JsonlError) as over:
        check_batch(io.BytesIO(too_many))
    assert over.value.line == MAX_BATCH_REQUESTS + 1


def test_purpose_and_form_errors(client: TestClient, store: Store) -> None:
    assert_error(upload(client, GOOD_BATCH, "voice-clone"), 400, "1214", "purpose")
    assert_error(client.post(FILES, files={"file": ("a.jsonl", GOOD_BATCH)}), 400, "1213", "purpose")
    assert_error(client.post(FILES, data={"purpose": "batch"}, files={"other": ("a.jsonl", b"x")}),
                 400, "1213", "file")
    assert_error(client.post(FILES, json={"purpose": "batch", "file": "x"}), 400, "1210", "multipart")
    assert_error(upload(client, GOOD_BATCH, upload_detail="[]"), 400, "1214", "upload_detail")
    # a body cut off before its closing boundary
    boundary = "cut"
    truncated = (f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
                 f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'
                 ).encode() + GOOD_BATCH
    response = client.post(FILES, content=truncated,
                           headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert_error(response, 400, "1210", "boundary")
    assert leftovers(store) == [] and blob_names(store) == []


def raw_upload(client: TestClient, filename: bytes, content: bytes, purpose: bytes = b"batch") -> httpx.Response:
    """A multipart body written by hand: httpx would escape what a hostile client sends as is."""
    boundary = b"hostile"
    body = (b'--' + boundary + b'\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n' + purpose + b'\r\n'
            b'--' + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="' + filename
            + b'"\r\nContent-Type: application/octet-stream\r\n\r\n' + content + b'\r\n--' + boundary + b'--\r\n')
    return client.post(FILES, content=body,
                       headers={"Content-Type": "multipart/form-data; boundary=" + boundary.decode()})


@pytest.mark.parametrize("sent, shown", [
    (b"../../etc/passwd", "passwd"),
    (b"..\\..\\x", "x"),
    ("报告 2024.docx".encode(), "报告 2024.docx"),
    (b"a\x00b\x01.jsonl", "ab.jsonl"),
    (b"..", "file"),
    ("\u202egnp.jsonl".encode(), "gnp.jsonl"),
    (b"C:\\Users\\me\\" + b"y" * 300 + b".jsonl", "y" * 249 + ".jsonl"),
])
def test_a_filename_is_only_a_label(client: TestClient, store: Store, sent: bytes, shown: str) -> None:
    response = raw_upload(client, sent, GOOD_BATCH)
    assert response.status_code == 200, response.text
    assert response.json()["filename"] == shown
    assert client.get(FILES).json()["data"][0]["filename"] == shown
    assert all(BLOB_NAME.fullmatch(name) for name in blob_names(store))
    assert leftovers(store) == []


def test_display_names_and_blob_paths(tmp_path: Path) -> None:
    assert display_name("dir/sub\\name.pdf") == "name.pdf"
    assert display_name("\r\n") == "file"
    blobs = BlobStore(tmp_path / "files")
    for hostile in ("../secret.key", "/etc/passwd", "0" * 31, "A" * 32, "0" * 32 + "/.."):
        with pytest.raises(ValueError):
            blobs.path(hostile)
    with pytest.raises(ValueError):
        blobs.adopt(tmp_path / "elsewhere")


def test_oversize_with_a_content_length(make_client, key: str, store: Store) -> None:
    client = make_client(max_upload_bytes=1000)
    client.headers["Authorization"] = f"Bearer {key}"
    assert_error(upload(client, jsonl(*[batch_line(f"r{i}") for i in range(20)])), 435, "435", "1000B")
    # a Content-Length far over every cap is refused before the body is read
    response = client.post(FILES, content=b"x" * 10, headers={
        "Content-Type": "multipart/form-data; boundary=x", "Content-Length": str(2**40)})
    assert_error(response, 435, "435")
    assert upload(client, GOOD_BATCH).status_code == 200  # under the cap
    assert leftovers(store) == []


def test_uploads_are_not_bound_by_the_request_body_limit(make_client, key: str, store: Store) -> None:
    client = make_client(max_body_bytes=1000)
    client.headers["Authorization"] = f"Bearer {key}"
    content = jsonl(*[batch_line(f"r{i}") for i in range(50)])
    assert len(content) > 1000
    assert upload(client, content).status_code == 200
    assert client.post("/v1/chat/completions", content=b"x" * 2000).status_code == 413


def test_caps_per_purpose() -> None:
    cap_for, largest = files_service.caps(None)
    assert largest == 100 * 2**20
    assert cap_for("batch", "a.jsonl") == cap_for("fine-tune", None) == 100 * 2**20
    assert cap_for("file-extract", "a.pdf") == cap_for("retrieval", "a.docx") == 50 * 2**20
    assert cap_for("file-extract", "scan.JPG") == 5 * 2**20
    cap_for, largest = files_service.caps(2 * 2**20)
    assert largest == cap_for("batch", None) == 2 * 2**20 and cap_for("file-extract", "a.png") == 2 * 2**20
    assert Settings.from_env({"GLMSTACK_MAX_UPLOAD_BYTES": "1000"}).max_upload_bytes == 1000
    assert Settings.from_env({}).max_upload_bytes is None


def test_the_count_cap_per_key(client: TestClient, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(files_service.MAX_FILES_PER_KEY, "batch", 2)
    for _ in range(2):
        assert upload(client, GOOD_BATCH).status_code == 200
    assert_error(upload(client, GOOD_BATCH), 400, "1210", "2 batch files")
    assert upload(client, GOOD_FINE_TUNE, "fine-tune").status_code == 200  # other purposes are not counted
    assert len(blob_names(store)) == 3 and leftovers(store) == []


def test_listing_pages_with_after_page_and_order(client: TestClient) -> None:
    made = [upload(client, GOOD_BATCH, filename=f"{i}.jsonl").json()["id"] for i in range(5)]
    upload(client, GOOD_FINE_TUNE, "fine-tune")
    seen, after = [], None
    while True:  # as the SDKs' cursor pages do: until a page comes back empty
        page = client.get(FILES, params={"purpose": "batch", "limit": 2, **({"after": after} if after else {})})
        data = page.json()["data"]
        if not data:
            break
        assert page.json()["has_more"] == (len(seen) + len(data) < 5)
        seen += [f["id"] for f in data]
        after = data[-1]["id"]
    assert seen == made[::-1]
    ascending = client.get(FILES, params={"purpose": "batch", "order": "asc", "limit": 3}).json()
    assert [f["id"] for f in ascending["data"]] == made[:3] and ascending["has_more"]
    page2 = client.get(FILES, params={"purpose": "batch", "limit": 2, "page": 2}).json()
    assert [f["id"] for f in page2["data"]] == made[::-1][2:4]
    assert len(client.get(FILES).json()["data"]) == 6  # no purpose: every purpose but retrieval
    assert_error(client.get(FILES, params={"limit": 101}), 400, "1214", "limit")
    assert_error(client.get(FILES, params={"order": "sideways"}), 400, "1214", "order")
    assert_error(client.get(FILES, params={"purpose": "nope"}), 400, "1214", "purpose")
    assert_error(client.get(FILES, params={"after": "file-000000000000000000000000"}), 400, "1214", "after")


def test_another_key_sees_none_of_my_files(client: TestClient, make_client, store: Store) -> None:
    mine = upload(client, GOOD_BATCH).json()["id"]
    other = make_client()
    other.headers["Authorization"] = f"Bearer {store.keys.create('other')[1]}"
    assert other.get(FILES).json()["data"] == []
    assert_error(other.get(f"{FILES}/{mine}/content"), 404, "1214", "file_id")
    assert_error(other.delete(f"{FILES}/{mine}"), 404, "1214", "file_id")
    assert_error(other.get(FILES, params={"after": mine}), 400, "1214", "after")
    assert client.get(f"{FILES}/{mine}/content").content == GOOD_BATCH  # still there for its owner
    assert_error(client.delete(f"{FILES}/no-such-file"), 404, "1214", "file_id")
    assert_error(client.get(f"{FILES}/{'x' * 500}/content"), 404, "1214", "file_id")


def test_orphans_are_swept_when_the_server_starts(store: Store, tmp_path: Path, key: str) -> None:
    kept = store.files.create(None, NewFile(purpose="batch", filename="a.jsonl", bytes=1,
                                                         blob="a" * 32))
    assert kept is not None
    blobs = store.blobs
    paths = {name: blobs.root / name for name in ("a" * 32, "b" * 32, "c" * 32, "notes.txt")}
    paths["staged"] = blobs.staging_path()
    paths["staged-now"] = blobs.staging_path()
    for name, path in paths.items():
        path.write_bytes(b"x")
        if name not in ("c" * 32, "staged-now"):  # these two were written just now: maybe by another process
            os.utime(path, (OLD, OLD))
    app = create_app(Settings(home=tmp_path, database_url="unused"), ScriptedEngine(), store)
    assert all(path.exists() for path in paths.values())  # building the app touches nothing
    with TestClient(app):  # the lifespan: what `glmstack serve` runs at start-up
        pass
    remaining = {name for name, path in paths.items() if path.exists()}
    assert remaining == {"a" * 32, "c" * 32, "notes.txt", "staged-now"}


def test_both_prefixes(client: TestClient) -> None:
    made = client.post("/v1/files", data={"purpose": "batch"}, files={"file": ("a.jsonl", GOOD_BATCH)}).json()
    assert client.get(f"{FILES}/{made['id']}/content").content == GOOD_BATCH
    assert client.delete(f"/v1/files/{made['id']}").json()["deleted"] is True
