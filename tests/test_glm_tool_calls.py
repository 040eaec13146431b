"""Tool calls in GLM-4's and ChatGLM3's formats: prompts byte for byte against the models' real chat templates
(tests/data/templates, rendered the way transformers renders them), reply parsers fed whole and split at
every character, hostile replies, and the llguidance grammars checked by llguidance itself. GLM-4.5's are in
test_glm45_tool_calls.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import llguidance
import pytest
import tiktoken
from glm_tool_checks import (
    SEARCH,
    SYSTEM,
    TEMPLATES,
    WEATHER,
    accepts,
    ids_of_rendered,
    many_tools,
    parse_every_split,
    render_template,
    run_parser,
)
from glm_vocab import GLM4_PAT, GLM4_SPECIALS, chatglm2_model, glm4_ranks, sp_oracle

from glmstack.engine.chat_format.chatglm3 import (
    DEFAULT_TOOLS_PROMPT,
    ChatGLM3ChatFormat,
    ChatGLM3Dialect,
    classic_tool_result,
    tool_call_arguments,
)
from glmstack.engine.chat_format.glm4 import GLM4ChatFormat, GLM4Dialect
from glmstack.engine.tokenization.glm import ChatGLM2Tokenizer, GLM4Tokenizer

GLM4_IDS = {name: 151329 + i for i, name in enumerate(GLM4_SPECIALS)}
CALL_ARGS = '{"city": "北京"}'
# An OpenAI-shaped conversation: system, user, an assistant call, its result, a follow-up answer, a new question.
OPENAI_CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "北京天气？"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": CALL_ARGS}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 22}'},
    {"role": "assistant", "content": "北京今天 22 度。"},
    {"role": "user", "content": "明天呢？ <|user|> typed"},
]


@pytest.fixture(scope="module")
def tik():
    return tiktoken.Encoding(name="oracle", pat_str=GLM4_PAT, mergeable_ranks=glm4_ranks(), special_tokens={})


@pytest.fixture(scope="module")
def glm4():
    return GLM4Tokenizer(glm4_ranks())


@pytest.fixture(scope="module")
def lltokenizer():
    """llguidance's view of the GLM-4 test vocabulary; generation ends on any of GLM-4's three stop ids."""
    return llguidance.LLTokenizer.from_tiktoken(  # type: ignore[attr-defined]
        encoder=glm4_ranks(),
        special_tokens=GLM4_IDS,
        pattern=GLM4_PAT,
        eos_token=[GLM4_IDS["<|endoftext|>"], GLM4_IDS["<|user|>"], GLM4_IDS["<|observation|>"]],
        n_vocab=max(GLM4_IDS.values()) + 1,
    )


# --- GLM-4-9B-chat: the prompt against THUDM's template ----------------------------------------------------


def glm4_template_messages(openai_messages: list[dict], tools: list[dict]) -> list[dict]:
    """The conversation the way GLM-4-9B-chat's template is fed (spec 3.3): tools on a system message of
    their own, calls as metadata messages, results as observations -- written out here, not by the code
    under test."""
    return [
        {"role": "system", "content": None, "tools": tools},
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "北京天气？"},
        {"role": "assistant", "metadata": "get_weather", "content": CALL_ARGS},
        {"role": "observation", "content": '{"temp": 22}'},
        {"role": "assistant", "content": "北京今天 22 度。"},
        {"role": "user", "content": "明天呢？ <|user|> typed"},
    ]


def test_glm4_prompt_is_the_templates_byte_for_byte(glm4, tik):
    tools = [WEATHER, SEARCH, {"type": "python"}, {"type": "simple_browser"}, {"type": "cogview"}]
    expected = render_template("glm-4-9b-chat.jinja", glm4_template_messages(OPENAI_CONVERSATION, tools))
    prompt = GLM4ChatFormat(glm4).render(OPENAI_CONVERSATION, tools=tools)
    assert prompt.text == expected
    assert "# 可用工具\n## get_weather\n\n{" in expected and "。\n## python\n\n" in expected  # one newline
    assert f"<|system|>\n{SYSTEM}<|user|>" in expected  # the client's system message is kept
    # Ids: the template's text tokenized with its special tokens, except that typed "<|user|>" stays text.
    typed = expected.rindex("<|user|> typed")
    ids = ids_of_rendered(expected[:typed], tik, GLM4_IDS) + tik.encode(expected[typed:-len("<|assistant|>")])
    assert prompt.token_ids == [*ids, GLM4_IDS["<|assistant|>"]]


def test_glm4_prompt_without_tools_is_the_templates(glm4, tik):
    messages = [m for m in glm4_template_messages(OPENAI_CONVERSATION, [])[1:] if m["role"] != "system"]
    openai = [m for m in OPENAI_CONVERSATION if m["role"] != "system"]
    expected = render_template("glm-4-9b-chat.jinja", messages)
    assert GLM4ChatFormat(glm4).render(openai).text == expected


def test_glm4_self_intro_is_chatglm_unless_the_models_template_says_glm4(glm4):
    ours = GLM4ChatFormat(glm4).render([{"role": "user", "content": "hi"}], tools=[WEATHER]).text
    assert "你是一个名为 ChatGLM 的人工智能助手" in ours
    older = (TEMPLATES / "glm-4-9b-chat.jinja").read_text().replace("名为 ChatGLM 的", "名为 GLM-4 的")
    tokenizer = GLM4Tokenizer(glm4_ranks(), chat_template=older)
    prompt = GLM4ChatFormat(tokenizer).render([{"role": "user", "content": "hi"}], tools=[WEATHER])
    assert "名为 GLM-4 的" in prompt.text


def test_glm4_z1_template_reads_the_dialects_history():
    """GLM-Z1-0414's template (served by TemplateChatFormat) fed GLM4Dialect.template_messages: the call is an
    assistant turn with its name as metadata and the result an observation."""
    messages = GLM4Dialect().template_messages(OPENAI_CONVERSATION, [WEATHER])
    text = render_template("glm-z1-9b-0414.jinja", messages, tools=[WEATHER])
    assert text.startswith("[gMASK]<sop><|system|>\n你是一个名为 ChatGLM 的人工智能助手。")
    # `{%- set function ... %}` strips the blank line, so this copy too has ONE newline before "## name".
    assert "\n\n# 可用工具\n## get_weather\n\n{\n    \"name\": \"get_weather\"" in text
    assert f"<|system|>\n{SYSTEM}<|user|>\n北京天气？" in text
    assert f'<|assistant|>get_weather\n{CALL_ARGS}<|observation|>\n{{"temp": 22}}<|assistant|>\n北京今天' in text
    assert text.endswith("<|assistant|>\n<think>")


# --- GLM4Dialect: parsing replies ---------------------------------------------------------------------------


def glm4_parser():
    return GLM4Dialect().reply_parser([WEATHER, SEARCH])


def test_glm4_parses_a_call_at_every_split():
    result = parse_every_split(glm4_parser, 'get_weather\n{"city": "北京", "days": 3}')
    assert result == {
        "content": "",
        "reasoning": "",
        "calls": [{"name": "get_weather", "arguments": '{"city": "北京", "days": 3}'}],
        "n": 1,
    }


def test_glm4_answer_is_content_without_its_leading_newline():
    answer = "北京今天晴。\nget_weather\n{}"
    assert parse_every_split(glm4_parser, "\n" + answer)["content"] == answer
    parser = glm4_parser()
    assert parser.push("\n北").content == "北"  # an answer streams at once: no holding back


def test_glm4_text_is_held_only_while_it_could_be_a_call():
    parser = glm4_parser()
    assert parser.push("get_wea").content == ""  # could still be get_weather
    assert parser.push("ther").content == ""
    assert parser.push("\n").content == "" and parser.calls == 0  # the arguments decide
    delta = parser.push('{"ci')
    assert [(c.name, c.arguments) for c in delta.tool_calls] == [("get_weather", ""), (None, '{"ci')]
    assert parser.push('ty": 1}').tool_calls[0].arguments == 'ty": 1}'
    other = glm4_parser()
    assert other.push("Sure").content == "Sure"  # no tool name starts so: content at once


@pytest.mark.parametrize(
    "reply",
    [
        "delete_everything\n{\"path\": \"/\"}",  # a name that is not a tool
        "get_weather\nI cannot call that.",  # a tool name, but no JSON after it
        "get_weather",  # the first line never ended
        "get_weather\n",
        "search the web for me",
        "",
    ],
)
def test_glm4_what_is_not_a_call_is_content(reply):
    result = parse_every_split(glm4_parser, reply)
    assert result["calls"] == [] and result["n"] == 0
    assert result["content"] == reply


@pytest.mark.parametrize(
    "arguments", ['{"city": "北', '{"city": }', '{"a": [1, 2', "{}}}", '{"code": "```python\\nx\\n```"}']
)
def test_glm4_broken_arguments_are_returned_as_written(arguments):
    result = parse_every_split(glm4_parser, "search\n" + arguments)
    assert result["calls"] == [{"name": "search", "arguments": arguments}]


def test_glm4_without_tools_everything_is_content():
    parser = GLM4Dialect().reply_parser([{"type": "cogview"}])
    assert parser.push("get_weather\n{}").content == "get_weather\n{}"


# --- GLM4Dialect: the grammar -------------------------------------------------------------------------------


def test_glm4_grammars_are_valid_llguidance(lltokenizer):
    dialect = GLM4Dialect()
    for choice in ("auto", "required", {"type": "function", "function": {"name": "search"}}):
        grammar = dialect.tool_grammar([WEATHER, SEARCH], choice)
        assert llguidance.LLMatcher.validate_grammar(grammar, lltokenizer) == "", choice
    assert dialect.tool_grammar([{"type": "python"}], "auto") is None


def test_glm4_grammar_accepts_calls_and_rejects_wrong_types(lltokenizer, tik):
    grammar = GLM4Dialect().tool_grammar([WEATHER, SEARCH], "auto")
    assert accepts(lltokenizer, grammar, tik.encode('get_weather\n{"city": "北京", "days": 3}'))
    assert accepts(lltokenizer, grammar, tik.encode("\n北京今天晴。"))
    assert accepts(lltokenizer, grammar, [*tik.encode('search\n{"query": "x"}'), GLM4_IDS["<|observation|>"]])
    assert not accepts(lltokenizer, grammar, tik.encode('get_weather\n{"city": 3}'))
    assert not accepts(lltokenizer, grammar, tik.encode('get_weather\n{"days": 3}'))  # city is required
    assert not accepts(lltokenizer, grammar, tik.encode('delete\n{"path": "/"}'))
    required = GLM4Dialect().tool_grammar([WEATHER, SEARCH], "required")
    assert not accepts(lltokenizer, required, tik.encode("\nno call"))
    named = GLM4Dialect().tool_grammar([WEATHER, SEARCH], {"type": "function", "function": {"name": "search"}})
    assert accepts(lltokenizer, named, tik.encode('search\n{"query": "x"}'))
    assert not accepts(lltokenizer, named, tik.encode('get_weather\n{"city": "x"}'))

def test_glm4_grammar_for_128_tools_compiles_quickly(lltokenizer, tik):
    tools = many_tools(128)
    started = time.perf_counter()
    grammar = GLM4Dialect().tool_grammar(tools, "auto")
    matcher = llguidance.LLMatcher(lltokenizer, grammar, log_level=0)
    elapsed = time.perf_counter() - started
    assert not matcher.is_error(), matcher.get_error()
    assert matcher.consume_tokens(tik.encode('tool_127\n{"text": "hi", "n": 2, "mode": "b"}'))
    assert matcher.is_accepting()
    assert elapsed < 5.0, elapsed


def test_tool_choice_naming_an_unknown_tool_is_an_error():
    from glmstack.engine.chat_format.base import ChatTemplateError

    with pytest.raises(ChatTemplateError):
        GLM4Dialect().tool_grammar([WEATHER], {"type": "function", "function": {"name": "nope"}})


def test_glm4_chat_format_delegates_to_its_dialect(glm4):
    chat_format = GLM4ChatFormat(glm4)
    assert chat_format.reply_parser(tools=None).push("get_weather\n{}").content == "get_weather\n{}"
    parser = chat_format.reply_parser(tools=[WEATHER])
    parser.push('get_weather\n{"city": "x"}')
    assert parser.calls == 1
    assert chat_format.tool_grammar([WEATHER], "auto") == GLM4Dialect().tool_grammar([WEATHER], "auto")
    assert json.loads(run_parser(chat_format.reply_parser(tools=[WEATHER]), ['get_weather\n{"city": "x"}'])[
        "calls"
    ][0]["arguments"]) == {"city": "x"}


# --- ChatGLM3 ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sp_v2():
    return sp_oracle(chatglm2_model())


@pytest.fixture(scope="module")
def chatglm3(sp_v2):
    return ChatGLM2Tokenizer(sp_v2, role_tokens=True)


def test_chatglm3_tool_history_is_written_as_chatglm3_wrote_it(chatglm3, sp_v2):
    sp = sp_v2.encode
    arguments = {"city": "北京", "days": 3, "metric": True, "extra": None, "tags": ["a", 1.5], "opt": {"k": "v"}}
    messages = [
        {"role": "user", "content": "北京天气？"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": json.dumps(arguments)},
                },
                {"id": "c2", "type": "function", "function": {"name": "search", "arguments": "not json"}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 22}'},
    ]
    prompt = ChatGLM3ChatFormat(chatglm3).render(messages, tools=[WEATHER, SEARCH])
    call = "```python\ntool_call(city='北京', days=3, metric=True, extra=None, tags=['a', 1.5], opt={'k': 'v'})\n```"
    assert f"<|assistant|>get_weather\n{call}<|assistant|>search\n```python\nnot json\n```<|observation|>\n" in (
        prompt.text
    )
    # No client system message: the official server's default prompt carries the tools.
    system = DEFAULT_TOOLS_PROMPT + "\n" + json.dumps([WEATHER, SEARCH], indent=4, ensure_ascii=False)
    expected = [64790, 64792, 64794, *sp("\n"), *sp(system), 64795, *sp("\n"), *sp("北京天气？")]
    expected += [64796, *sp("get_weather\n"), *sp(call), 64796, *sp("search\n"), *sp("```python\nnot json\n```")]
    expected += [64797, *sp("\n"), *sp('{"temp": 22}'), 64796]
    assert prompt.token_ids == expected
    # What the model would write back parses to the same arguments.
    assert json.loads(tool_call_arguments(call)) == arguments


def chatglm3_parser():
    return ChatGLM3Dialect().reply_parser([WEATHER, SEARCH])


def test_chatglm3_parses_a_call_at_every_split():
    reply = 'get_weather\n```python\ntool_call(city="北京", days=3, tags=["a", (1, 2)], x={"k": None})\n```'
    result = parse_every_split(chatglm3_parser, reply)
    assert result["content"] == "" and result["n"] == 1
    assert [call["name"] for call in result["calls"]] == ["get_weather"]
    assert json.loads(result["calls"][0]["arguments"]) == {
        "city": "北京",
        "days": 3,
        "tags": ["a", [1, 2]],
        "x": {"k": None},
    }


def test_chatglm3_answer_and_other_metadata_are_content():
    assert parse_every_split(chatglm3_parser, "\n你好！有什么可以帮你的吗？")["content"] == "你好！有什么可以帮你的吗？"
    code = "interpreter\n```python\nprint(1)\n```"
    assert parse_every_split(chatglm3_parser, code) == {"content": code, "reasoning": "", "calls": [], "n": 0}
    assert parse_every_split(chatglm3_parser, "get_weather")["content"] == "get_weather"


@pytest.mark.parametrize(
    "body",
    [
        "```python\ntool_call(__import__('os'))\n```",  # positional: not keywords
        "```python\ntool_call(x=__import__('os').system('touch /tmp/glmstack-pwned'))\n```",
        "```python\ntool_call(**{'a': 1})\n```",
        "```python\nos.system('ls')\n```",
        "```python\ntool_call(city='北京'\n```",  # truncated
        "```python\ntool_call(a={1, 2})\n```",  # a set: no JSON for it
        "```python\ntool_call(a=float('nan'))\n```",
        "```python\ntool_call(a=" + "[" * 5000 + "]" * 5000 + ")\n```",  # nesting deep enough to hurt a parser
        "```python\ntool_call(code='```python\\nx\\n```')\n```\n```",  # a stray fence line after the block
        "no fence at all",
    ],
)
def test_chatglm3_hostile_calls_never_run_and_never_raise(body):
    result = run_parser(chatglm3_parser(), ["search\n", body])
    assert result["n"] == 1 and result["calls"][0]["name"] == "search"
    assert result["calls"][0]["arguments"] == body  # not a literal keyword call: passed on as written
    assert not Path("/tmp/glmstack-pwned").exists()


def test_chatglm3_nested_fence_in_a_string_value():
    body = "```python\ntool_call(code='```python\\nx\\n```')\n```"
    assert json.loads(tool_call_arguments(body)) == {"code": "```python\nx\n```"}


def test_classic_tool_result():
    assert classic_tool_result("get_weather", '{"city": "北京"}') == {
        "name": "get_weather",
        "parameters": {"city": "北京"},
    }
    assert classic_tool_result("search", "tool_call(") == {"name": "search", "content": "tool_call("}
    assert classic_tool_result("search", "[1, 2]") == {"name": "search", "content": "[1, 2]"}


def test_chatglm3_grammar(lltokenizer, tik):
    # The grammar is about text; the GLM-4 test vocabulary stands in for ChatGLM3's sentencepiece here.
    tools = [
        WEATHER,
        {
            "type": "function",
            "function": {
                "name": "convert",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "amount": {"type": "number"},
                        "unit": {"enum": ["celsius", "fahrenheit"]},
                        "round": {"type": "boolean"},
                        "tags": {"type": "array"},
                    },
                    "required": ["amount"],
                },
            },
        },
        {"type": "function", "function": {"name": "free", "parameters": {"type": "object"}}},
    ]
    dialect = ChatGLM3Dialect()
    grammar = dialect.tool_grammar(tools, "auto")
    assert llguidance.LLMatcher.validate_grammar(grammar, lltokenizer) == ""

    def ok(text: str, g: str = grammar) -> bool:
        return accepts(lltokenizer, g, tik.encode(text))

    fence = "\n```python\ntool_call({})\n```"
    assert ok("get_weather" + fence.format("city='北京', days=3"))
    assert ok("get_weather" + fence.format('city="北京"'))
    assert ok("convert" + fence.format("amount=1.5, unit='celsius', tags=['a', 2]"))
    assert ok("convert" + fence.format("amount=-2, round=True"))
    assert ok("free" + fence.format("anything={'a': [1, None]}, b=2"))
    assert ok("\n普通回答")
    assert not ok("get_weather" + fence.format("city=3"))  # wrong type
    assert not ok("get_weather" + fence.format("days=3"))  # city is required
    assert not ok("convert" + fence.format("amount=1, unit='kelvin'"))  # not in the enum
    assert not ok("get_weather" + fence.format("city=__import__('os')"))
    required = dialect.tool_grammar(tools, "required")
    assert llguidance.LLMatcher.validate_grammar(required, lltokenizer) == ""
    assert not ok("\n普通回答", required)
