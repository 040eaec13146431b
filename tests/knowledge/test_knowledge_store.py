"""Knowledge bases in the database (SQLite + sqlite-vec + FTS5, PostgreSQL + pgvector + full text): owners,
documents, chunks, the two searches, hybrid retrieval with the bundled embedding model, and the background
indexer from a real uploaded file to searchable chunks, including a resume after a crash."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from glmstack.knowledge import segment
from glmstack.knowledge.indexer import CHARACTERS_FULL, UNREADABLE, Indexer, index_text
from glmstack.knowledge.retrieval import Retriever
from glmstack.protocol import EmbeddingBatch
from glmstack.store import Store
from glmstack.store.knowledge import EMBEDDED, FAILED, VECTORISING

FACTS = {
    "leave": "员工入职满一年后，每年可享受十五天带薪年假，未休完的年假可顺延至次年三月底。",
    "toner": "The office printer needs a new toner cartridge after about 3000 printed pages.",
    "expense": "差旅报销须在出差结束后三十天内提交，并附上发票原件和行程单。",
    "wifi": "Guests connect to the wireless network named Visitor-5G; the password changes every Monday.",
}


@pytest.fixture
def store(database_url: str, tmp_path: Path):
    with Store(database_url, home=tmp_path) as s:
        yield s


def _base_with_facts(store: Store, embedder, key_id: str | None = None) -> tuple[str, dict[str, str]]:
    kid = store.knowledge.create_base(key_id, name="facts")
    documents = {}
    for name, text in FACTS.items():
        did = store.knowledge.create_document(key_id, knowledge_id=kid, name=f"{name}.txt", length=len(text))
        index_text(store, embedder, kid, did, text)
        documents[name] = did
    return kid, documents


def test_bases_belong_to_their_owner(store: Store):
    mine = store.knowledge.create_base("key-a", name="mine", description="d")
    store.knowledge.create_base("key-b", name="theirs")
    store.knowledge.create_base(None, name="open mode")
    assert [b.name for b in store.knowledge.list_bases("key-a")[0]] == ["mine"]
    assert store.knowledge.get_base("key-b", mine) is None
    assert store.knowledge.get_base(None, mine) is None
    assert not store.knowledge.update_base("key-b", mine, name="stolen")
    assert store.knowledge.delete_base("key-b", mine) is None
    assert store.knowledge.update_base("key-a", mine, name="renamed")
    assert store.knowledge.get_base("key-a", mine).name == "renamed"


def test_listing_pages_and_totals(store: Store):
    ids = [store.knowledge.create_base("k", name=f"b{i}") for i in range(5)]
    first, total = store.knowledge.list_bases("k", page=1, size=2)
    second, _ = store.knowledge.list_bases("k", page=2, size=2)
    third, _ = store.knowledge.list_bases("k", page=3, size=2)
    assert total == 5
    assert [b.id for b in first + second + third] == ids[::-1]  # newest first, each once


def test_dense_lexical_and_hybrid_search_find_the_fact(store: Store, embedder):
    kid, documents = _base_with_facts(store, embedder)
    retriever = Retriever(store, embedder)
    # English paraphrase: the dense model carries it
    assert retriever.search(kid, "How many pages can I print before replacing the ink?", 1, "dense")[0].document_id \
        == documents["toner"]
    # Chinese: all-MiniLM-L6-v2 reads Chinese as [UNK], so BM25 over jieba terms carries it
    assert retriever.search(kid, "年假没休完怎么办", 1, "lexical")[0].document_id == documents["leave"]
    assert retriever.search(kid, "报销要带发票吗", 1, "hybrid")[0].document_id == documents["expense"]
    assert retriever.search(kid, "what is the guest wifi called", 1, "hybrid")[0].document_id == documents["wifi"]
    other = store.knowledge.create_base(None, name="empty")
    assert retriever.search(other, "年假", 5) == []


def test_chunks_go_with_their_document_and_base(store: Store, embedder):
    kid, documents = _base_with_facts(store, embedder)
    assert store.knowledge.get_base(None, kid).document_size == 4
    deleted = store.knowledge.delete_document(None, documents["leave"])
    assert deleted is not None and deleted.name == "leave.txt"
    assert store.knowledge.document_chunks(documents["leave"]) == []
    assert all(h.document_id != documents["leave"]
               for h in store.knowledge.lexical_search([kid], segment.query_terms("年假"), 10))
    assert store.knowledge.delete_base(None, kid) == []
    assert store.knowledge.document_chunks(documents["toner"]) == []
    assert store.knowledge.usage(None) == (0, 0)


class CountingEmbedder:
    """The real model, counting what it is asked to embed (to prove a resumed document repeats nothing)."""

    def __init__(self, inner, stop_after: int | None = None, stop: threading.Event | None = None):
        self.inner, self.texts, self.stop_after, self.stop = inner, [], stop_after, stop

    def info(self):
        return self.inner.info()

    def embed(self, texts: list[str]) -> EmbeddingBatch:
        self.texts += texts
        if self.stop is not None and self.stop_after is not None and len(self.texts) >= self.stop_after:
            self.stop.set()  # as if the server were killed after this batch
        return self.inner.embed(texts)


def _upload(store: Store, kid: str, path: Path, **settings) -> str:
    staged = store.blobs.staging_path()
    staged.write_bytes(path.read_bytes())
    blob = store.blobs.adopt(staged)
    return store.knowledge.create_document(None, knowledge_id=kid, name=path.name, length=path.stat().st_size,
                                           blob=blob, **settings)


def test_indexer_reads_a_real_document_and_resumes_without_repeating(store: Store, embedder, tmp_path: Path):
    from make_files import make_docx

    paragraphs = [f"第{i}条：编号 {i:03d} 的设备每 {i + 10} 天检查一次。" for i in range(60)]
    docx = make_docx(tmp_path / "维护规程.docx", paragraphs)
    kid = store.knowledge.create_base(None, name="manuals")
    did = _upload(store, kid, docx, sentence_size=60)

    first = Indexer(store, {"embedding-2": None})  # replaced below: the real model, stopped mid-way
    first.embedders = {"embedding-2": CountingEmbedder(embedder, stop_after=16, stop=first._stop)}
    first.run_pending()
    assert store.knowledge.get_document(None, did).embedding_stat == VECTORISING
    chunks = store.knowledge.count_chunks(did)
    embedded_before = first.embedders["embedding-2"].texts
    assert 16 <= len(embedded_before) < chunks

    counting = CountingEmbedder(embedder)
    Indexer(store, {"embedding-2": counting}).run_pending()  # a restarted server
    document = store.knowledge.get_document(None, did)
    assert document.embedding_stat == EMBEDDED
    assert document.word_num == sum(len(p) for p in paragraphs) + len(paragraphs) - 1
    assert len(embedded_before) + len(counting.texts) == chunks  # every chunk embedded exactly once
    assert not set(embedded_before) & set(counting.texts)
    assert store.knowledge.count_chunks(did) == chunks
    hit = Retriever(store, embedder).search(kid, "编号 042 的设备多久检查", 1)[0]
    assert "编号 042" in hit.text


def test_unreadable_documents_fail_with_a_reason(store: Store, embedder, tmp_path: Path):
    kid = store.knowledge.create_base(None, name="bad")
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.7\n" + b"\x00garbage" * 100)
    legacy = tmp_path / "old.doc"
    legacy.write_bytes(bytes.fromhex("D0CF11E0A1B11AE1") + b"\x00" * 1024)
    ids = [_upload(store, kid, p) for p in (broken, legacy)]
    Indexer(store, {"embedding-2": embedder}).run_pending()
    for did in ids:
        document = store.knowledge.get_document(None, did)
        assert document.embedding_stat == FAILED
        assert document.fail_code == UNREADABLE and document.fail_msg
    assert "docx" in store.knowledge.get_document(None, ids[1]).fail_msg


def test_character_capacity_is_enforced(store: Store, embedder, tmp_path: Path, monkeypatch):
    from glmstack.knowledge import indexer

    monkeypatch.setattr(indexer, "MAX_WORDS", 50)
    kid = store.knowledge.create_base(None, name="small")
    text = tmp_path / "long.txt"
    text.write_text("很长的文本。" * 20, encoding="utf-8")
    did = _upload(store, kid, text)
    Indexer(store, {"embedding-2": embedder}).run_pending()
    document = store.knowledge.get_document(None, did)
    assert (document.embedding_stat, document.fail_code) == (FAILED, CHARACTERS_FULL)
