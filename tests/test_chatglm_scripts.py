"""The scripts ChatGLM users already have, with one changed import (`from glmstack import AutoModel,
AutoTokenizer`): the loop bodies of THUDM's cli_demo.py / web_demo.py for each generation, re-typed here (not
copied; plus `max_new_tokens=16`, since a random tiny model never ends its reply on its own), run
against every GLM family's tiny checkpoint (tests/test_glm_chat.py writes them) and the bundled model; and the
`.half()` / `.float()` / `.cuda()` / `.to()` / `.eval()` / `.quantize()` chain their READMEs use."""
# The demos rebind `history` and `past_key_values` in the very loop that passes them: that is the idiom under test.
# ruff: noqa: B007, B020

from __future__ import annotations

from pathlib import Path

import pytest
import test_glm_chat
import torch

from glmstack import AutoModel, AutoTokenizer
from glmstack.engine.classic import PastKeyValues
from glmstack.engine.loading.catalog import bundled_model_path

FAMILIES = list(test_glm_chat.BUILDERS)
checkpoint = test_glm_chat.checkpoint  # the tiny checkpoints, as a fixture of this module too


def last_turn(model, query: str, response: str):  # type: ignore[no-untyped-def]
    """The turn as the family's own chat() records it: ChatGLM3 and GLM-4-9B-chat as role dicts."""
    if model.chat_format.dict_history:
        return [{"role": "user", "content": query}, {"role": "assistant", "content": response}]
    return [(query, response)]


def load_as_thudm_does(path: Path | str | None):  # type: ignore[no-untyped-def]
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    model = AutoModel.from_pretrained(path, trust_remote_code=True).float()  # the READMEs' CPU line
    model = model.eval()
    return tokenizer, model


@pytest.mark.parametrize("family", FAMILIES)
def test_chatglm_6b_cli_demo_loop(checkpoint, family: str) -> None:
    """ChatGLM-6B's cli_demo: tuple history, `for response, history in model.stream_chat(...)`."""
    tokenizer, model = load_as_thudm_does(checkpoint(family))
    history: list = []
    for query in ["你好", "再说一遍"]:
        count = 0
        for response, history in model.stream_chat(tokenizer, query, history=history, max_length=2048,
                                                   max_new_tokens=16, do_sample=False, top_p=0.7, temperature=0.95):
            count += 1
            assert isinstance(response, str)
        assert count >= 1 and history[-len(last_turn(model, query, response)):] == last_turn(model, query, response)
    assert len(history) == 2 * len(last_turn(model, "", ""))


@pytest.mark.parametrize("family", FAMILIES)
def test_chatglm2_web_demo_loop_unpacks_three_values(checkpoint, family: str) -> None:
    """ChatGLM2/3's web demos: `past_key_values` passed in and given back as the third value."""
    tokenizer, model = load_as_thudm_does(checkpoint(family))
    history: list = []
    past_key_values = None
    for query in ["hello", "and then?"]:
        for response, history, past_key_values in model.stream_chat(
                tokenizer, query, history, past_key_values=past_key_values, return_past_key_values=True,
                max_length=2048, max_new_tokens=16, top_p=0.8, temperature=0.95):
            pass
        assert history[-len(last_turn(model, query, response)):] == last_turn(model, query, response)
    assert isinstance(past_key_values, PastKeyValues) and past_key_values.turns == len(history)


@pytest.mark.parametrize("family", ["chatglm3", "glm4-9b-chat"])
def test_chatglm3_cli_demo_loop_with_dict_history_and_role(checkpoint, family: str) -> None:
    """ChatGLM3's cli_demo: dict history, near-greedy sampling, and `chat(..., role=...)`."""
    tokenizer, model = load_as_thudm_does(checkpoint(family))
    history: list = []
    past_key_values = None
    for response, history, past_key_values in model.stream_chat(
            tokenizer, "你好", history=history, top_p=1, temperature=0.01, past_key_values=past_key_values,
            return_past_key_values=True, max_length=2048, max_new_tokens=16):
        pass
    assert history[-2:] == [{"role": "user", "content": "你好"}, {"role": "assistant", "content": response}]
    response, history = model.chat(tokenizer, "again", history=history, role="user", do_sample=False,
                                   max_length=2048, max_new_tokens=16)
    assert history[-1] == {"role": "assistant", "content": response} and len(history) == 4


def test_the_readme_chain_on_the_bundled_model() -> None:
    path = bundled_model_path()
    tokenizer, model = load_as_thudm_does(path)
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    question = "What is the capital of France? Answer in one sentence."
    greedy, _ = model.chat(tokenizer, question, history=[], do_sample=False)
    assert "Paris" in greedy
    model = model.half()  # on a CPU: bfloat16, the same memory as fp16, and native matmuls
    assert model.dtype == torch.bfloat16 and next(model.module.parameters()).dtype == torch.bfloat16
    assert "Paris" in model.chat(tokenizer, question, history=[], do_sample=False)[0]
    model = model.to("cpu").to(torch.float32)
    assert model.dtype == torch.float32 and model.chat(tokenizer, question, history=[], do_sample=False)[0] == greedy
    assert model.quantize(4) is model
    assert "Paris" in model.chat(tokenizer, question, history=[], do_sample=False)[0]
    model = model.half()  # ChatGLM-6B's README order, `.quantize(4).half()`: the int4 codes stay, scales go bf16
    assert model.dtype == torch.bfloat16 and "Paris" in model.chat(tokenizer, question, history=[], do_sample=False)[0]
    with pytest.raises(ValueError, match="move it first, then quantize"):
        model.to("meta")  # int4 is packed for the device it was quantized on
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            model.cuda()


def test_what_is_not_supported_is_named() -> None:
    path = bundled_model_path()
    with pytest.raises(TypeError, match="attn_implementation"):
        AutoModel.from_pretrained(path, trust_remote_code=True, attn_implementation="flash_attention_2")
    tokenizer, model = load_as_thudm_does(path)
    with pytest.raises(TypeError, match="repetition_penalty"):
        model.chat(tokenizer, "hi", history=[], repetition_penalty=1.2)
    with pytest.raises(ValueError, match="beam search"):
        model.chat(tokenizer, "hi", history=[], num_beams=4)
    with pytest.raises(TypeError, match="stream_chat"):
        model.chat(tokenizer, "hi", history=[], return_past_key_values=True)
    # what ChatGLM's own chat() passes by default is accepted
    response, _ = model.chat(tokenizer, "hi", history=[], num_beams=1, logits_processor=None, do_sample=False,
                             max_new_tokens=4)
    assert isinstance(response, str)
