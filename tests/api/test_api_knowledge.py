"""Knowledge bases, documents and the chat retrieval tool over HTTP (spec §2.10-2.12, §3.3), through the official
zhipuai SDK (and openai for chat) against a real server on a socket, with the bundled embedding model, on SQLite
and PostgreSQL. The chat model is the scripted engine, so what the retrieval tool put in the prompt can be read
back exactly."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import zhipuai
from fastapi.testclient import TestClient
from make_files import make_docx, make_xlsx
from scripted import ScriptedEngine
from servers import LiveServer

from glmstack.api import create_app
from glmstack.api.services.retrieval import DEFAULT_PROMPT_TEMPLATE
from glmstack.settings import Settings
from glmstack.store import Store

BASE = "/api/paas/v4"
PARAGRAPHS = [
    "员工入职满一年后，每年可享受十五天带薪年假。",
    "未休完的年假可以顺延到次年三月底，逾期作废。",
    "The office printer needs a new toner cartridge after about 3000 printed pages.",
    "Guests connect to the wireless network named Visitor-5G.",
]


@pytest.fixture
def live(store: Store, engine: ScriptedEngine, bundled_embedder: Any, tmp_path: Path) -> Iterator[LiveServer]:
    settings = Settings(home=tmp_path, database_url="unused")
    server = LiveServer(create_app(settings, engine, store, embedders={"embedding-2": bundled_embedder}))
    yield server
    server.stop()


def sdk(live: LiveServer, key: str) -> zhipuai.ZhipuAI:
    return zhipuai.ZhipuAI(api_key=key, base_url=f"{live.url}{BASE}", max_retries=0)


def wait_indexed(client: zhipuai.ZhipuAI, document_id: str, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        document = client.knowledge.document.retrieve(document_id=document_id)
        if document.embedding_stat != 0:
            return document
        time.sleep(0.2)
    raise AssertionError(f"document {document_id} was not indexed in {timeout} s")


def knowledge_with_document(client: zhipuai.ZhipuAI, tmp_path: Path) -> tuple[str, str]:
    knowledge_id = client.knowledge.create(embedding_id=3, name="手册", description="公司制度").id
    docx = make_docx(tmp_path / "员工手册.docx", PARAGRAPHS)
    uploaded = client.knowledge.document.create(file=open(docx, "rb"), purpose="retrieval",
                                                knowledge_id=knowledge_id, sentence_size=60)
    document_id = uploaded.successInfos[0].documentId
    assert wait_indexed(client, document_id).embedding_stat == 1
    return knowledge_id, document_id


def test_the_sdk_manages_bases_and_documents(live: LiveServer, key: str, tmp_path: Path):
    client = sdk(live, key)
    knowledge_id, document_id = knowledge_with_document(client, tmp_path)
    assert knowledge_id.isdigit()

    client.knowledge.modify(knowledge_id=knowledge_id, embedding_id=3, name="员工手册", description="HR")
    page = client.knowledge.query(page=1, size=10)
    assert [(k.id, k.name, k.description) for k in page.list] == [(knowledge_id, "员工手册", "HR")]
    assert page.total == 1 and page.list[0].document_size == 1 and page.list[0].word_num > 0

    used = client.knowledge.used()
    assert used.used.word_num == sum(len(p) for p in PARAGRAPHS) + len(PARAGRAPHS) - 1
    assert used.used.length == (tmp_path / "员工手册.docx").stat().st_size
    assert used.total.word_num == 5_000_000 and used.total.length == 1024**3

    listed = client.knowledge.document.list(knowledge_id=knowledge_id, purpose="retrieval")
    assert [d.id for d in listed.list] == [document_id]
    document = client.knowledge.document.retrieve(document_id=document_id)
    assert (document.name, document.sentence_size, document.custom_separator) == ("员工手册.docx", 60, ["\n"])

    # New chunking (type 5, custom) queues the document again; it comes back indexed with more chunks.
    client.knowledge.document.edit(document_id=document_id, knowledge_type=5, custom_separator=["。"],
                                   sentence_size=20)
    edited = wait_indexed(client, document_id)
    assert (edited.embedding_stat, edited.sentence_size, edited.custom_separator) == (1, 20, ["。"])

    client.knowledge.document.delete(document_id=document_id)
    assert client.knowledge.document.list(knowledge_id=knowledge_id, purpose="retrieval").list == []
    client.knowledge.delete(knowledge_id=knowledge_id)
    assert client.knowledge.query().list == []


def test_a_spreadsheet_becomes_one_chunk_per_row(live: LiveServer, key: str, store: Store, tmp_path: Path):
    client = sdk(live, key)
    knowledge_id = client.knowledge.create(embedding_id=3, name="价目表").id
    xlsx = make_xlsx(tmp_path / "prices.xlsx", {"商品": [["型号", "价格"], ["X1", 3999], ["X2", 4999]]})
    uploaded = client.files.create(file=open(xlsx, "rb"), purpose="retrieval", knowledge_id=knowledge_id)
    document_id = uploaded.model_extra["successInfos"][0]["documentId"]
    assert wait_indexed(client, document_id).knowledge_type == 3
    chunks = store.knowledge.document_chunks(document_id)
    assert any("型号: X2" in c and "价格: 4999" in c for c in chunks), chunks


def chat(api: Any, knowledge_id: str, stream: bool, **retrieval: Any) -> tuple[str, list[dict[str, Any]]]:
    tools = [{"type": "retrieval", "retrieval": {"knowledge_id": knowledge_id, **retrieval}}]
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
                {"role": "user", "content": "年假没休完怎么办？"}]
    if not stream:
        reply = api.chat.completions.create(model="glm-4", messages=messages, tools=tools)
        return reply.choices[0].message.content, reply.model_extra["retrieval"]
    chunks = list(api.chat.completions.create(model="glm-4", messages=messages, tools=tools, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    return text, chunks[0].model_extra["retrieval"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("kind", ["zhipuai", "openai"])
def test_the_retrieval_tool_grounds_the_question(live: LiveServer, key: str, engine: ScriptedEngine,
                                                 tmp_path: Path, kind: str, stream: bool):
    knowledge_id, document_id = knowledge_with_document(sdk(live, key), tmp_path)
    api = sdk(live, key) if kind == "zhipuai" else openai.OpenAI(api_key=key, base_url=f"{live.url}/v1",
                                                                  max_retries=0)
    text, references = chat(api, knowledge_id, stream)
    assert text == "Hello there!"
    prompt = engine.requests[-1].messages[-1]["content"]
    # the documentation's template, filled: the chunk about carrying leave over first, then the question
    assert prompt.startswith('从文档\n"""\n') and '中找问题\n"""\n年假没休完怎么办？\n"""\n的答案' in prompt
    assert "顺延到次年三月底" in prompt.split("中找问题")[0]
    assert engine.requests[-1].messages[0]["content"] == "你好"  # only the last question is grounded
    assert references[0]["document_id"] == document_id and "顺延" in references[0]["text"]
    assert all(r["knowledge_id"] == knowledge_id for r in references)
    assert engine.requests[-1].tools is None  # the model is not shown a tool it cannot call


def test_a_custom_template(live: LiveServer, key: str, engine: ScriptedEngine, tmp_path: Path):
    client = sdk(live, key)
    knowledge_id, _ = knowledge_with_document(client, tmp_path)
    chat(client, knowledge_id, False, prompt_template="Q: {{question}}\nUse {json: true}\nK: {{knowledge}}")
    prompt = engine.requests[-1].messages[-1]["content"]
    assert prompt.startswith("Q: 年假没休完怎么办？\nUse {json: true}\nK: ") and "三月底" in prompt
    assert "{{" not in DEFAULT_PROMPT_TEMPLATE.replace("{{knowledge}}", "").replace("{{question}}", "")


def envelope(response: Any) -> tuple[int, str, str]:
    body = response.json()
    return response.status_code, body["error"]["code"], body["error"]["message"]


def test_refusals(client: TestClient, make_client: Any, store: Store, tmp_path: Path):
    def chat_with(tool: dict[str, Any]) -> Any:
        return client.post(f"{BASE}/chat/completions", json={
            "model": "glm-4", "messages": [{"role": "user", "content": "hi"}], "tools": [tool]})

    assert envelope(client.post(f"{BASE}/knowledge", json={"embedding_id": 99, "name": "x"}))[:2] == (400, "1214")
    assert envelope(client.post(f"{BASE}/knowledge", json={"embedding_id": "3", "name": ""}))[:2] == (400, "1214")
    assert envelope(client.post(f"{BASE}/knowledge", json={"name": "x"}))[:2] == (400, "1213")
    made = client.post(f"{BASE}/knowledge", json={"embedding_id": "3", "name": "x", "description": None,
                                                  "icon": None, "background": None, "bucket_id": None,
                                                  "customer_identifier": None})
    assert made.status_code == 200 and made.json()["embedding_id"] == 3
    knowledge_id = made.json()["id"]
    assert envelope(client.put(f"{BASE}/knowledge/{knowledge_id}", json={"id": knowledge_id}))[:2] == (400, "1213")
    assert envelope(chat_with({"type": "retrieval", "retrieval": {}}))[:3] == (
        400, "1213", "未正常接收到tools[0].retrieval.knowledge_id参数。 (the retrieval tool needs "
                     "retrieval.knowledge_id)")
    assert envelope(chat_with({"type": "retrieval", "retrieval": {"knowledge_id": "123"}}))[:2] == (404, "1214")
    assert envelope(client.get(f"{BASE}/document/123"))[:2] == (404, "1214")
    assert envelope(client.put(f"{BASE}/document/123", json={"knowledge_type": 1}))[:2] == (404, "1214")
    assert envelope(client.put(f"{BASE}/document/123", json={"knowledge_type": 9}))[:2] == (400, "1214")
    assert envelope(client.delete(f"{BASE}/document/123"))[:2] == (404, "1214")
    assert envelope(client.get(f"{BASE}/knowledge", params={"size": 0}))[:2] == (400, "1214")

    def upload(name: str, content: bytes, **fields: str) -> Any:
        return client.post(f"{BASE}/files", data={"purpose": "retrieval", **fields},
                           files={"file": (name, content)})

    assert envelope(upload("a.txt", b"text"))[:2] == (400, "1213")
    assert envelope(upload("a.txt", b"text", knowledge_id="999"))[:2] == (404, "1214")
    assert envelope(upload("a.txt", b"text", knowledge_id=knowledge_id, sentence_size="10"))[:2] == (400, "1214")
    refused = upload("tool.exe", b"MZ", knowledge_id=knowledge_id).json()
    assert refused["successInfos"] == [] and "unsupported format .exe" in refused["failedInfos"][0]["failReason"]
    assert list((tmp_path / "files" / "staging").iterdir()) == []
    assert store.knowledge.list_documents(None, knowledge_id)[1] == 0  # owner None: this client has a key


def test_another_key_sees_nothing_of_mine(client: TestClient, make_client: Any, store: Store):
    knowledge_id = client.post(f"{BASE}/knowledge", json={"embedding_id": 3, "name": "mine"}).json()["id"]
    document = client.post(f"{BASE}/files", data={"purpose": "retrieval", "knowledge_id": knowledge_id},
                           files={"file": ("a.txt", "年假十五天".encode())}).json()["successInfos"][0]["documentId"]
    other = make_client()
    other.headers["Authorization"] = f"Bearer {store.keys.create('other')[1]}"
    assert other.get(f"{BASE}/knowledge").json()["list"] == []
    assert other.get(f"{BASE}/knowledge/capacity").json()["used"] == {"word_num": 0, "length": 0}
    for response in (other.put(f"{BASE}/knowledge/{knowledge_id}", json={"name": "stolen"}),
                     other.delete(f"{BASE}/knowledge/{knowledge_id}"),
                     other.get(f"{BASE}/document/{document}"),
                     other.delete(f"{BASE}/document/{document}"),
                     other.delete(f"{BASE}/files/{document}"),
                     other.get(f"{BASE}/files", params={"purpose": "retrieval", "knowledge_id": knowledge_id}),
                     other.post(f"{BASE}/chat/completions", json={
                         "model": "glm-4", "messages": [{"role": "user", "content": "年假"}],
                         "tools": [{"type": "retrieval", "retrieval": {"knowledge_id": knowledge_id}}]})):
        assert response.status_code == 404, response.text
    assert client.get(f"{BASE}/document/{document}").status_code == 200
    # the doc's way to delete a knowledge file: DELETE /files/{id}
    assert client.delete(f"{BASE}/files/{document}").json() == {"id": document, "deleted": True, "object": "file"}
    assert client.get(f"{BASE}/document/{document}").status_code == 404


def test_a_restarted_server_finishes_what_it_had_queued(store: Store, engine: ScriptedEngine, bundled_embedder: Any,
                                                       key: str, tmp_path: Path):
    settings = Settings(home=tmp_path, database_url="unused")
    first = create_app(settings, engine, store, embedders={"embedding-2": bundled_embedder})
    first.state.platform.indexer.stop()  # as if killed before it got to the upload
    client = TestClient(first)
    client.headers["Authorization"] = f"Bearer {key}"
    knowledge_id = client.post(f"{BASE}/knowledge", json={"embedding_id": 3, "name": "kb"}).json()["id"]
    document = client.post(f"{BASE}/files", data={"purpose": "retrieval", "knowledge_id": knowledge_id},
                           files={"file": ("notes.md", b"# Notes\nThe gate code is 4711.")}
                           ).json()["successInfos"][0]["documentId"]
    assert client.get(f"{BASE}/document/{document}").json()["embedding_stat"] == 0

    second = create_app(settings, engine, store, embedders={"embedding-2": bundled_embedder})
    with TestClient(second) as restarted:  # runs the lifespan: the indexer starts with the queue it finds
        restarted.headers["Authorization"] = f"Bearer {key}"
        deadline = time.monotonic() + 60
        while restarted.get(f"{BASE}/document/{document}").json()["embedding_stat"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        detail = restarted.get(f"{BASE}/document/{document}").json()
    assert detail["embedding_stat"] == 1 and detail["word_num"] == len("# Notes\nThe gate code is 4711.")
    assert "failInfo" not in detail


def test_an_id_with_a_nul_character_is_not_found(client: TestClient) -> None:
    """%00 in a path id: 404, on SQLite and on PostgreSQL (whose text cannot hold NUL: the lookup itself used to
    fail with a 500 - found by tests/reliability/test_platform_schema.py)."""
    from scripted import error_of

    for path in ("/knowledge/%00%C3%93", "/document/a%00b", "/files/%00", "/batches/x%00"):
        assert error_of(client.get(BASE + path)) == (404, "1214"), path


def test_a_retrieval_tool_naming_a_knowledge_id_with_a_nul_is_a_client_error(client: TestClient) -> None:
    """The same NUL in a request body's knowledge_id (found by schemathesis on PostgreSQL): no 5xx."""
    response = client.post(BASE + "/chat/completions", json={
        "model": "glm-4", "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "retrieval", "retrieval": {"knowledge_id": "kb\x00x"}}]})
    assert response.status_code < 500, response.text
