"""Training data rendered with the model's own chat format: what trains (assistant tokens and the token that
ends each turn), what does not, and bad lines named by number."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from finetune_models import WEATHER_TOOL, glm4_checkpoint, write_jsonl

from glmstack.engine.classic import load
from glmstack.finetune.data import IGNORE, DataError, load_examples


@pytest.fixture(scope="module")
def glm4(tmp_path_factory: pytest.TempPathFactory):
    model, tokenizer = load(glm4_checkpoint(tmp_path_factory.mktemp("glm4")), device="cpu", dtype="float32",
                            quantize=None)
    return model, tokenizer


def trained_spans(example, tokenizer) -> list[str]:
    spans, current = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return [tokenizer.decode(span) for span in spans]


def test_messages_with_tool_calls_train_every_assistant_turn(glm4, tmp_path: Path) -> None:
    model, tokenizer = glm4
    record = {"tools": [WEATHER_TOOL], "messages": [
        {"role": "system", "content": "你是助手"},
        {"role": "user", "content": "北京天气?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 20}'},
        {"role": "assistant", "content": "北京 20 度。"},
    ]}
    [example] = load_examples(write_jsonl(tmp_path / "t.jsonl", [record]), model.chat_format, tokenizer, 4096)
    # the ids are the serving prompt's: the conversation up to the last reply renders as the same prefix
    prompt = model.chat_format.render(record["messages"][:-1], tools=record["tools"]).token_ids
    assert example.input_ids[: len(prompt)] == prompt
    # the call and the reply train, each with the token that ends it; system, user and tool text do not
    assert trained_spans(example, tokenizer) == [
        'get_weather\n{"city": "北京"}<|observation|>', "\n北京 20 度。<|endoftext|>"]


def test_prompt_response_trains_only_the_response(glm4, tmp_path: Path) -> None:
    model, tokenizer = glm4
    record = {"prompt": "第二个问题", "response": "第二个回答", "history": [["第一个问题", "第一个回答"]]}
    [example] = load_examples(write_jsonl(tmp_path / "t.jsonl", [record]), model.chat_format, tokenizer, 4096)
    text = tokenizer.decode(example.input_ids)
    assert "第一个回答" in text and "第二个问题" in text
    assert trained_spans(example, tokenizer) == ["\n第二个回答<|endoftext|>"]


def test_long_examples_are_cut_and_empty_ones_dropped(glm4, tmp_path: Path) -> None:
    model, tokenizer = glm4
    records = [{"prompt": "短", "response": "好的 " * 50}, {"prompt": "很长的问题 " * 100, "response": "嗯"}]
    examples = load_examples(write_jsonl(tmp_path / "t.jsonl", records), model.chat_format, tokenizer, 40)
    assert [e.line for e in examples] == [1]  # line 2's reply lies beyond 40 tokens
    assert len(examples[0].input_ids) == 40 and examples[0].trained_tokens > 0


@pytest.mark.parametrize(("lines", "message"), [
    (['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}', "{not json"],
     "t.jsonl line 2: not valid JSON"),
    (['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}',
      '{"messages": [{"role": "user", "content": "hi"}]}'], "line 2: the last message must be the assistant's"),
    (['{"prompt": "a", "response": "b"}', '{"prompt": "a", "response": 3}'], "line 2: response must be a string"),
    (['{"prompt": "a", "response": "b", "history": [["q"]]}'], "line 1: history[0] must be a [query, answer]"),
])
def test_bad_lines_are_named(glm4, tmp_path: Path, lines: list[str], message: str) -> None:
    model, tokenizer = glm4
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(message)):
        load_examples(path, model.chat_format, tokenizer, 4096)


def test_a_chatml_turn_trains_up_to_its_end_token_and_no_further(tmp_path: Path) -> None:
    """SmolLM2 (ChatML) renders an assistant turn as "...<|im_end|>\\n": the trained span ends at <|im_end|>,
    the token generation stops at - not at the newline after it, and no extra end-of-text is added."""
    model, tokenizer = load(device="cpu", dtype="float32", quantize=None)
    path = write_jsonl(tmp_path / "chatml.jsonl", [{"messages": [
        {"role": "user", "content": "Code of dock 7?"}, {"role": "assistant", "content": "MNF-7"}]}])
    (example,) = load_examples(path, model.chat_format, tokenizer, 4096)
    assert trained_spans(example, tokenizer) == ["MNF-7<|im_end|>"]
