"""Files, knowledge and embeddings end to end (issue 17): `glmstack serve` as the README starts it (the bundled
SmolLM2 chat model and the bundled all-MiniLM-L6-v2 embedding model), driven by the official SDKs exactly as the
platform documentation's examples use them."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import zhipuai
from make_files import make_docx, make_pdf
from servers import serving

pytestmark = pytest.mark.slow

FACTS = [
    "The Aurora-7 drone has a flight time of 41 minutes on one battery.",
    "Its maximum takeoff weight is 2.3 kilograms.",
    "Aurora-7 firmware updates are installed through the Skyport desktop app.",
    "The warranty covers the motors for 18 months.",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "GLMSTACK_HOME": str(home), "GLMSTACK_DATABASE_URL": f"sqlite:///{home / 'db.sqlite'}"}
    with serving(["--port", "0", "--device", "cpu"], env, home / "server.log") as (_, url):
        yield url


def zhipu(url: str) -> zhipuai.ZhipuAI:
    return zhipuai.ZhipuAI(api_key="id.secret", base_url=f"{url}/api/paas/v4", max_retries=0)


def test_file_extract_then_ask_about_the_file(server: str, tmp_path: Path) -> None:
    """The documentation's file-extract flow: upload, read `content`, put it in the messages."""
    client = zhipu(server)
    docx = make_docx(tmp_path / "产品说明.docx", FACTS)
    uploaded = client.files.create(file=docx, purpose="file-extract")
    content = json.loads(client.files.content(file_id=uploaded.id).content)["content"]
    assert all(fact in content for fact in FACTS)
    reply = client.chat.completions.create(model="glm-4", temperature=0, max_tokens=24, messages=[
        {"role": "user", "content": f"{content}\n\nHow long can the Aurora-7 fly?"}])
    assert reply.choices[0].message.content and reply.usage.prompt_tokens > 60
    client.files.delete(file_id=uploaded.id)


def test_embeddings_in_the_documented_sizes(server: str) -> None:
    texts = ["How long does the battery last?", "The flight time is 41 minutes.", "无人机的重量是多少？"]
    one = zhipu(server).embeddings.create(model="embedding-3", input=texts, dimensions=512)
    assert [len(d.embedding) for d in one.data] == [512] * 3 and one.usage.prompt_tokens > 10
    two = openai.OpenAI(api_key="unused", base_url=f"{server}/v1").embeddings.create(
        model="embedding-2", input=texts)  # the openai SDK asks for base64 and decodes it
    vectors = [d.embedding for d in two.data]
    assert [len(v) for v in vectors] == [1024] * 3

    def cosine(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])


def test_a_knowledge_base_answers_through_the_retrieval_tool(server: str, tmp_path: Path) -> None:
    client = zhipu(server)
    knowledge_id = client.knowledge.create(embedding_id=3, name="drones", description="product facts").id
    pdf = make_pdf(tmp_path / "aurora.pdf", FACTS)
    uploaded = client.knowledge.document.create(file=open(pdf, "rb"), purpose="retrieval",
                                                knowledge_id=knowledge_id, sentence_size=80)
    document_id = uploaded.successInfos[0].documentId
    deadline = time.monotonic() + 120
    while (document := client.knowledge.document.retrieve(document_id=document_id)).embedding_stat == 0:
        assert time.monotonic() < deadline, "not indexed in time"
        time.sleep(0.5)
    assert document.embedding_stat == 1 and document.word_num > 100

    question = [{"role": "user", "content": "What is the flight time of the Aurora-7?"}]
    tools = [{"type": "retrieval", "retrieval": {"knowledge_id": knowledge_id}}]
    plain = client.chat.completions.create(model="glm-4", temperature=0, max_tokens=16, messages=question)
    chunks = list(client.chat.completions.create(model="glm-4", temperature=0, max_tokens=16, messages=question,
                                                 tools=tools, stream=True))
    references = chunks[0].model_extra["retrieval"]
    assert "41 minutes" in references[0]["text"] and references[0]["document_id"] == document_id
    assert "".join(c.choices[0].delta.content or "" for c in chunks)
    # the retrieved chunks and the documentation's template were in the prompt
    assert chunks[-1].usage.prompt_tokens > plain.usage.prompt_tokens + 40
    client.knowledge.delete(knowledge_id=knowledge_id)
