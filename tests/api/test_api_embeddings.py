"""POST /embeddings (spec §2.7) on the bundled all-MiniLM-L6-v2 (384 dimensions) serving embedding-2 and
embedding-3, as `glmstack serve` has it.

- The size mapping as pure functions (api/services/embeddings.py): padding, Matryoshka cuts, the projection.
- The official SDKs (zhipuai, openai with its default base64 encoding) against a real uvicorn server on the
  loopback, in this process (the chat engine is the scripted one: only embeddings are asked for).
- Usage rows on SQLite and PostgreSQL, and every refusal with its documented code, through the app in process.
"""

from __future__ import annotations

import base64
import math
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import zhipuai
from fastapi.testclient import TestClient
from scripted import ScriptedEngine, written_usage
from servers import LiveServer

from glmstack.api import create_app
from glmstack.api.schemas.embeddings import MAX_INPUTS
from glmstack.api.services.embeddings import encode_base64, fit_vector, output_dimensions, projection
from glmstack.protocol import Embedder, EmbeddingModelInfo
from glmstack.settings import Settings
from glmstack.store import Store

EMBEDDINGS = "/api/paas/v4/embeddings"
TEXTS = ["The cat sits on the mat.", "A kitten rests on a rug.", "Quarterly revenue grew by nine percent."]
MINILM = EmbeddingModelInfo("all-MiniLM-L6-v2", 384, 256)


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def unit(vector: list[float]) -> list[float]:
    norm = math.sqrt(dot(vector, vector))
    return [x / norm for x in vector]


# --- the size mapping --------------------------------------------------------------------------------------


def test_sizes_by_name() -> None:
    assert output_dimensions("embedding-2", MINILM, None) == 1024
    assert output_dimensions("embedding-2", MINILM, 1024) == 1024
    assert output_dimensions("embedding-3", MINILM, None) == 2048
    assert [output_dimensions("embedding-3", MINILM, d) for d in (256, 512, 1024, 2048)] == [256, 512, 1024, 2048]
    assert output_dimensions("my-model", MINILM, None) == 384
    assert output_dimensions("my-model", MINILM, 100) == 100


def test_padding_keeps_dot_products_and_cosines() -> None:
    a, b = unit([0.3, -0.2, 0.9, 0.1]), unit([0.1, 0.4, -0.5, 0.7])
    padded_a, padded_b = fit_vector(a, 10), fit_vector(b, 10)
    assert padded_a[:4] == a and padded_a[4:] == [0.0] * 6
    assert dot(padded_a, padded_b) == pytest.approx(dot(a, b), abs=1e-12)
    assert fit_vector(a, 4) is a


def test_matryoshka_sizes_are_cut_and_renormalized() -> None:
    vector = unit([float(i % 7 - 3) for i in range(64)])
    cut = fit_vector(vector, 16, matryoshka_dims=(16, 32))
    assert cut == pytest.approx(unit(vector[:16]), abs=1e-12)


def test_other_sizes_are_a_fixed_seeded_projection() -> None:
    vector = unit([math.sin(i) for i in range(384)])
    projected = fit_vector(vector, 256)
    assert len(projected) == 256 and dot(projected, projected) == pytest.approx(1.0, abs=1e-9)
    assert fit_vector(vector, 256) == projected  # deterministic, and the same matrix for (384, 256)
    matrix = projection(384, 256)
    assert len(matrix) == 256 and len(matrix[0]) == 384
    assert projected == pytest.approx(unit([dot(list(row), vector) for row in matrix]), abs=1e-12)
    # the documented seed: every machine and Python version draws these same numbers
    assert matrix[0][:3] == pytest.approx((2.2661456286023696, -0.9858815294317644, 1.294954519046671), abs=1e-12)
    assert projection(384, 128)[0][:3] != matrix[0][:3]


def test_base64_is_little_endian_float32() -> None:
    vector = [0.5, -1.25, 3.0e-8]
    raw = base64.b64decode(encode_base64(vector))
    assert struct.unpack("<3f", raw) == pytest.approx(vector, rel=1e-7)


# --- the SDKs against a real server -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, bundled_embedder: Embedder) -> Iterator[tuple[str, str, Store]]:
    """(url, key, store) of a server with a key (so usage is per key), embedding-2 and -3 on the bundled model."""
    home = tmp_path_factory.mktemp("embeddings-server")
    with Store(f"sqlite:///{home / 'glmstack.db'}", home=home) as store:
        key = store.keys.create("embeddings")[1]
        settings = Settings(home=home, database_url="unused")
        # one model under both names, as `glmstack serve` shares one model per folder
        embedders = {"embedding-2": bundled_embedder, "embedding-3": bundled_embedder}
        app = create_app(settings, ScriptedEngine(), store, embedders=embedders)
        server = LiveServer(app)
        try:
            yield server.url, key, store
        finally:
            server.stop()
            app.state.platform.usage.close()


def zhipu(served: tuple[str, str, Store]) -> zhipuai.ZhipuAI:
    url, key, _ = served
    return zhipuai.ZhipuAI(api_key=key, base_url=f"{url}/api/paas/v4/", max_retries=0)


def test_zhipuai_sizes_and_padding(served: tuple[str, str, Store], bundled_embedder: Embedder) -> None:
    client = zhipu(served)
    own = bundled_embedder.embed(TEXTS).vectors
    for dimensions in (None, 256, 512, 1024, 2048):
        extra = {} if dimensions is None else {"dimensions": dimensions}
        reply = client.embeddings.create(model="embedding-3", input=TEXTS, **extra)
        vectors = [item.embedding for item in reply.data]
        assert [item.index for item in reply.data] == [0, 1, 2]
        assert {len(v) for v in vectors} == {dimensions or 2048}
        assert reply.model == "embedding-3" and reply.object == "list"
        assert all(dot(v, v) == pytest.approx(1.0, abs=1e-5) for v in vectors)
        if dimensions != 256:  # padded: the model's own vector, then zeros; cosines exactly the model's
            assert vectors[0][:384] == pytest.approx(own[0], abs=1e-6) and not any(vectors[0][384:])
            assert dot(vectors[0], vectors[1]) == pytest.approx(dot(own[0], own[1]), abs=1e-6)
        else:  # projected: fixed, and the similar pair stays the most similar
            again = client.embeddings.create(model="embedding-3", input=TEXTS, dimensions=256)
            assert [item.embedding for item in again.data] == vectors
            assert vectors[0] == pytest.approx(fit_vector(own[0], 256), abs=1e-6)
            assert dot(vectors[0], vectors[1]) > dot(vectors[0], vectors[2])
    single = client.embeddings.create(model="embedding-2", input=TEXTS[0])
    assert len(single.data) == 1 and len(single.data[0].embedding) == 1024
    assert single.data[0].embedding[:384] == pytest.approx(own[0], abs=1e-6)
    assert single.usage.prompt_tokens == single.usage.total_tokens > 0 and single.usage.completion_tokens == 0


def test_openai_base64_by_default(served: tuple[str, str, Store]) -> None:
    url, key, _ = served
    client = openai.OpenAI(api_key=key, base_url=f"{url}/v1", max_retries=0)
    raw = client.embeddings.with_raw_response.create(model="embedding-3", input=TEXTS, dimensions=512)
    assert isinstance(raw.http_response.json()["data"][0]["embedding"], str)  # the SDK asked for base64
    decoded = raw.parse()
    as_floats = httpx.post(f"{url}/v1/embeddings", headers={"Authorization": f"Bearer {key}"},
                           json={"model": "embedding-3", "input": TEXTS, "dimensions": 512}).json()
    assert len(decoded.data) == 3
    for ours, theirs in zip(decoded.data, as_floats["data"], strict=True):
        assert ours.embedding == pytest.approx(theirs["embedding"], rel=1e-6, abs=1e-7)  # float32 of the same
    assert decoded.usage.prompt_tokens == as_floats["usage"]["prompt_tokens"]
    floats = client.embeddings.create(model="embedding-2", input="hello", encoding_format="float")
    assert len(floats.data[0].embedding) == 1024


def test_usage_is_counted_per_key_and_model(served: tuple[str, str, Store]) -> None:
    url, _, store = served
    key = store.keys.create("usage")[1]
    client = zhipuai.ZhipuAI(api_key=key, base_url=f"{url}/api/paas/v4/", max_retries=0)
    replies = [client.embeddings.create(model="embedding-3", input=TEXTS),
               client.embeddings.create(model="embedding-3", input="one more", dimensions=256),
               client.embeddings.create(model="embedding-2", input=TEXTS[:2])]
    key_id = key.split(".")[0]
    deadline = time.monotonic() + 10
    while len(rows := store.usage.report(key_id)) < 2:  # written behind the replies
        assert time.monotonic() < deadline, rows
        time.sleep(0.05)
    by_model = {row.model: row for row in rows}
    assert by_model["embedding-3"].requests == 2
    assert by_model["embedding-3"].prompt_tokens == replies[0].usage.prompt_tokens + replies[1].usage.prompt_tokens
    assert by_model["embedding-2"].prompt_tokens == replies[2].usage.prompt_tokens
    assert by_model["embedding-2"].completion_tokens == 0


def test_sdk_errors(served: tuple[str, str, Store]) -> None:
    url, key, _ = served
    client = zhipu(served)
    with pytest.raises(zhipuai.APIRequestFailedError, match=r'^Error code: 400, with error text .*"1211"'):
        client.embeddings.create(model="embedding-9", input="x")
    with pytest.raises(zhipuai.APIRequestFailedError, match=r'"1214".*dimensions'):
        client.embeddings.create(model="embedding-3", input="x", dimensions=300)
    with pytest.raises(openai.BadRequestError) as caught:
        openai.OpenAI(api_key=key, base_url=f"{url}/v1", max_retries=0).embeddings.create(
            model="embedding-3", input=[[101, 102]])
    assert caught.value.code == "1214" and "token id" in caught.value.message


# --- usage on both databases, and the refusals ---------------------------------------------------------


def test_usage_rows_on_each_database(client: TestClient, store: Store) -> None:
    reply = client.post(EMBEDDINGS, json={"model": "Embedding-3", "input": TEXTS})  # codes match any case
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == "embedding-3"
    [row] = written_usage(store, client)
    assert (row.model, row.requests, row.prompt_tokens) == ("embedding-3", 1, reply.json()["usage"]["prompt_tokens"])


def test_long_texts_are_truncated_to_the_model_limit(client: TestClient) -> None:
    reply = client.post(EMBEDDINGS, json={"model": "embedding-2", "input": "word " * 2000})
    assert reply.status_code == 200 and reply.json()["usage"]["prompt_tokens"] == 256


@pytest.mark.parametrize(("body", "code", "words"), [
    ({"model": "embedding-9", "input": "x"}, "1211", "embedding-9"),
    ({"input": "x"}, "1213", "model"),
    ({"model": "embedding-3"}, "1213", "input"),
    ({"model": "embedding-3", "input": ""}, "1214", "input is empty"),
    ({"model": "embedding-3", "input": []}, "1214", "empty list"),
    ({"model": "embedding-3", "input": ["a", ""]}, "1214", "input[1] is empty"),
    ({"model": "embedding-3", "input": ["a", 7]}, "1214", "input[1] is not a string"),
    ({"model": "embedding-3", "input": {"text": "a"}}, "1214", "a string or a list"),
    ({"model": "embedding-3", "input": ["a"] * (MAX_INPUTS + 1)}, "1214", f"at most {MAX_INPUTS}"),
    ({"model": "embedding-3", "input": "a", "dimensions": 300}, "1214", "256, 512, 1024, 2048"),
    ({"model": "embedding-2", "input": "a", "dimensions": 2048}, "1214", "1024 dimensions only"),
    ({"model": "embedding-3", "input": "a", "dimensions": 0}, "1214", "dimensions"),
    ({"model": "embedding-3", "input": "a", "encoding_format": "int8"}, "1214", "encoding_format"),
])
def test_refusals(client: TestClient, body: dict, code: str, words: str) -> None:
    reply = client.post(EMBEDDINGS, json=body)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["code"] == code and words in error["message"], error


def test_no_embedding_model_configured(store: Store, key: str, tmp_path: Path) -> None:
    app = create_app(Settings(home=tmp_path, database_url="unused"), ScriptedEngine(), store)
    with TestClient(app) as plain:
        reply = plain.post(EMBEDDINGS, json={"model": "embedding-2", "input": "x"},
                           headers={"Authorization": f"Bearer {key}"})
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "1211"
    assert "none configured" in reply.json()["error"]["message"]
