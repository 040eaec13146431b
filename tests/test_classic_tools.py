"""`model.chat(..., tools=...)` as ChatGLM3 users know it: a call comes back as `{"name", "parameters"}`, the
call goes into the history, and the tool's result is answered with `role="observation"` (issue 16).

A tiny GLM-4-9B-chat checkpoint is scripted to write the call `f\\n{}` (tests/scripted_models.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from scripted_models import scripted_reply
from test_glm_chat import glm4_9b_chat

import glmstack
from glmstack.engine.classic import ChatModel
from glmstack.engine.tokenization.base import Tokenizer

F = {"name": "f", "description": "Takes no arguments", "parameters": {"type": "object", "properties": {}}}


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> tuple[ChatModel, Tokenizer]:
    folder: Path = tmp_path_factory.mktemp("glm4")
    glm4_9b_chat(folder)
    _, tokenizer = glmstack.load(folder, device="cpu", dtype="float32")
    scripted_reply(folder, lambda text: tokenizer.encode(text, add_special_tokens=False, allow_special=False),
                   tokenizer.token_to_id("<|assistant|>"), "f\n{}", tokenizer.token_to_id("<|observation|>"))
    return glmstack.load(folder, device="cpu", dtype="float32")


@pytest.mark.parametrize("style", ["keyword", "history"])
def test_a_call_comes_back_as_chatglm3_returns_it(scripted: tuple[ChatModel, Tokenizer], style: str) -> None:
    model, tokenizer = scripted
    if style == "keyword":
        response, history = model.chat(tokenizer, "Call f.", tools=[F], do_sample=False)
    else:  # ChatGLM3's own way: the tools ride on the system message of the history
        system = {"role": "system", "content": "Answer with tools.", "tools": [F]}
        response, history = model.chat(tokenizer, "Call f.", history=[system], do_sample=False)
        assert history[0] == system  # the caller's history is not changed
    assert response == {"name": "f", "parameters": {}}
    call = history[-1]
    assert call["role"] == "assistant" and call["tool_calls"][0]["function"] == {"name": "f", "arguments": "{}"}
    # the result goes back as an observation; the rendered prompt carries the call and the result
    _, history = model.chat(tokenizer, '{"ok": true}', history=history, role="observation", tools=[F],
                            do_sample=False)
    assert history[-2] == {"role": "observation", "content": '{"ok": true}'}


def test_without_tools_a_call_is_just_text(scripted: tuple[ChatModel, Tokenizer]) -> None:
    model, tokenizer = scripted
    response, _ = model.chat(tokenizer, "Call f.", history=[], do_sample=False)
    assert response == "f\n{}"


def test_tuple_history_with_tools_is_refused(scripted: tuple[ChatModel, Tokenizer]) -> None:
    model, tokenizer = scripted
    with pytest.raises(ValueError, match="dicts"):
        model.chat(tokenizer, "Call f.", history=[("hi", "hello")], tools=[F])
