"""Chunking, segmentation and rank fusion: the pure parts of retrieval (spec §6.3-6.4)."""

from __future__ import annotations

import pytest

from glmstack.knowledge import segment
from glmstack.knowledge.chunking import chunk_document, split_table, split_text
from glmstack.knowledge.retrieval import fuse
from glmstack.store.knowledge import ChunkHit


def test_default_split_is_every_newline_packed_up_to_the_size():
    text = "第一行。\n第二行。\n\n第三行。"
    assert split_text(text, None, 300) == ["第一行。\n第二行。\n第三行。"]
    assert split_text(text, None, 20) == ["第一行。\n第二行。\n第三行。"]  # 14 characters fit in 20
    lines = [f"line {i:02d} " + "x" * 20 for i in range(10)]
    chunks = split_text("\n".join(lines), None, 60)
    assert all(len(c) <= 60 for c in chunks)
    assert "\n".join(chunks).split("\n") == lines  # nothing lost, order kept


def test_custom_separator_and_long_pieces_cut_at_sentences_then_hard():
    text = "甲。乙。丙。###" + "一句很长的话" * 10 + "。"
    chunks = split_text(text, ["###"], 25)
    assert chunks[0] == "甲。乙。丙。"
    assert all(len(c) <= 25 for c in chunks)
    assert "".join(chunks[1:]) == "一句很长的话" * 10 + "。"
    english = "The first sentence is here. The second one follows it. A third closes."
    assert split_text(english, None, 30) == ["The first sentence is here.", "The second one follows it.",
                                             "A third closes."]


@pytest.mark.parametrize("size", [19, 2001])
def test_sentence_size_bounds(size: int):
    with pytest.raises(ValueError, match="20-2000"):
        split_text("text", None, size)


def test_spreadsheet_rows_become_chunks_with_their_header():
    text = "Products\n型号\t价格\t颜色\nX1\t3999\t黑\nX2\t4999\t白\nPrices include tax."
    assert split_table(text) == ["Products\nPrices include tax.", "型号: X1；价格: 3999；颜色: 黑",
                                 "型号: X2；价格: 4999；颜色: 白"]
    assert chunk_document(text, 3, None, 300) == split_table(text)
    assert chunk_document("a\nb", 1, None, 300) == ["a\nb"]


def test_terms_segment_chinese_and_lowercase_english():
    assert segment.terms("年假天数怎么计算？Annual LEAVE, GPT-4!") == [
        "年", "假", "天数", "怎么", "计算", "annual", "leave", "gpt", "gpt-4"]
    assert segment.index_terms("知识库") == "知识 知识库"
    assert segment.query_terms("请问年假有多少天") == ["年", "假", "天"]
    assert segment.query_terms("的") == ["的"]  # only stopwords: keep them rather than search for nothing


def test_reciprocal_rank_fusion_rewards_agreement():
    def hit(i: int) -> ChunkHit:
        return ChunkHit(i, f"d{i}", 0, f"t{i}", 0.0)

    fused = fuse([[hit(1), hit(2), hit(3)], [hit(3), hit(4), hit(1)]])
    assert [h.chunk_id for h in fused] == [1, 3, 2, 4]
    assert fused[0].score == pytest.approx(1 / 61 + 1 / 63)
