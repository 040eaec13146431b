"""GLM-4.5 / GLM-4.6 prompts (spec 5.2) and their XML tool dialect (spec 5.3), after GLM-4.5's chat template
(tests/data/templates/glm-4.5-air.jinja, rendered the way transformers renders it):

    [gMASK]<sop>
    with tools:      <|system|>\\n# Tools ... <tools>\\n{tool JSON}\\n...</tools> ... XML call format
    system:          <|system|>\\n{content}
    user:            <|user|>\\n{content}[/nothink when thinking is off]
    assistant:       <|assistant|>\\n<think>{reasoning}</think>[\\n{content}]{\\n<tool_call>{name}\\n
                     <arg_key>{k}</arg_key>\\n<arg_value>{v}</arg_value>\\n...</tool_call>}
    tool results:    <|observation|> (once for a run of results) + \\n<tool_response>\\n{content}\\n</tool_response>
    then:            <|assistant|>[\\n<think></think> when thinking is off]

An assistant turn's reasoning is shown only for turns after the last user message (a tool-calling loop in
progress); earlier turns get an empty `<think></think>`, so past reasoning is never fed back. `<think>`,
`<tool_call>`, `<arg_key>` and the other tags are special tokens of GLM-4.5's tokenizer: the format writes
them by id (and the reply parser must see them as text: `reply_tokens`), while what clients wrote is encoded
with special tokens off.

The reply: `<think>...</think>` reasoning (thinking.py's splitter), content, then zero or more calls:
`<tool_call>{name}\\n<arg_key>{key}</arg_key>\\n<arg_value>{value}</arg_value>\\n...</tool_call>`. Values of
string-typed arguments are kept as text; others are JSON (vLLM's glm45 rules).
"""

from __future__ import annotations

import ast
import json
import re

from glmstack.engine.chat_format.base import (
    ChatFormat,
    ChatPrompt,
    ContentOnly,
    ReplyDelta,
    ReplyParser,
    ToolDialect,
    message_text,
)
from glmstack.engine.chat_format.chatglm import require_token
from glmstack.engine.chat_format.chatglm3 import glm_role
from glmstack.engine.chat_format.glm_tools import (
    arguments_dict,
    chosen_functions,
    function_tools,
    lark_json,
    lark_literal,
    new_call_id,
    ordered_fields,
    parameters_schema,
    schema_properties,
)
from glmstack.engine.chat_format.thinking import ThinkingSplitter, partial_tag_length
from glmstack.engine.tokenization.base import Tokenizer
from glmstack.protocol import ToolCallDelta

TOOLS_HEADER = (
    "\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
TOOLS_FOOTER = (
    "</tools>\n\nFor each function call, output the function name and arguments within the following XML format:"
    "\n<tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>\n<arg_value>{arg-value-1}</arg_value>"
    "\n<arg_key>{arg-key-2}</arg_key>\n<arg_value>{arg-value-2}</arg_value>\n...\n</tool_call>"
)
# The format's markup: written by id where the tokenizer has the token (it does for GLM-4.5), as text if not.
MARKUP = (
    "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>", "<think>", "</think>",
    "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>", "<tool_response>",
    "</tool_response>", "/nothink",
)  # fmt: skip
STOP_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")
CALL_START, CALL_END = "<tool_call>", "</tool_call>"
REPLY_TOKENS = frozenset(
    {"<think>", "</think>", CALL_START, CALL_END, "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"}
)
_PAIR = re.compile(r"<arg_key>(.*?)</arg_key>(?:\\n|\s)*<arg_value>(.*?)</arg_value>", re.DOTALL)


def argument_value(text: str, schema: dict) -> object:
    """One `<arg_value>` as vLLM's glm45 parser reads it: stripped; kept as text when the schema says
    string; else JSON, then Python literal, then the text itself."""
    value = text.strip()
    if schema.get("type") == "string":
        return value
    try:
        return json.loads(value)
    except ValueError:
        pass
    try:
        return ast.literal_eval(value)
    except Exception:  # model text is data: anything literal_eval rejects stays a string
        return value


def parse_call(inner: str, functions: dict[str, dict]) -> tuple[str, str] | None:
    """(name, arguments JSON) of the text between `<tool_call>` and `</tool_call>`; None when the name is not
    one of the offered functions."""
    cut = min((i for i in (inner.find("\n"), inner.find("<arg_key>")) if i >= 0), default=len(inner))
    name = inner[:cut].strip()
    if name not in functions:
        return None
    properties = {key: schema for key, schema, _ in schema_properties(parameters_schema(functions[name]))}
    arguments = {
        key.strip(): argument_value(value, properties.get(key.strip(), {}))
        for key, value in _PAIR.findall(inner[cut:])
    }
    try:
        return name, json.dumps(arguments, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):  # literal_eval gave a set, bytes or NaN: keep those values as text
        return name, json.dumps({k: v if _is_json(v) else str(v) for k, v in arguments.items()}, ensure_ascii=False)


def _is_json(value: object) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


class GLM45ReplyParser(ReplyParser):
    """Content up to the first `<tool_call>` streams at once (a possibly partial tag, and whitespace that may
    precede a call, held back); each call is buffered to its `</tool_call>` and emitted whole, name and
    arguments in one delta, as vLLM's glm45 parser does. Like vLLM, text between and after calls is not
    content. A call to a function that was not offered, and a call never closed, are content as written."""

    def __init__(self, functions: dict[str, dict]) -> None:
        self.functions = functions
        self.calls = 0
        self._held = ""
        self._in_calls = False  # a call has been seen: only further calls count now
        self._gap = ""  # whitespace before the first call while it is open: content again if it never closes

    def push(self, text: str) -> ReplyDelta:
        self._held += text
        return self._advance(final=False)

    def finish(self) -> ReplyDelta:
        return self._advance(final=True)

    def _advance(self, final: bool) -> ReplyDelta:
        delta = ReplyDelta()
        while True:
            start = self._held.find(CALL_START)
            if start < 0:
                if self._in_calls:
                    # between or after calls: dropped, except a possible start of the next call
                    keep = 0 if final else partial_tag_length(self._held, CALL_START)
                    self._held = self._held[len(self._held) - keep :]
                    return delta
                keep = len(self._held) if final else self._undecided_tail(self._held)
                if final:
                    delta.content += self._held
                    self._held = ""
                else:
                    delta.content += self._held[: len(self._held) - keep]
                    self._held = self._held[len(self._held) - keep :]
                return delta
            end = self._held.find(CALL_END, start)
            if end < 0:
                if final:  # a call that never closed: what the model wrote, as content
                    delta.content += self._gap + self._held[start:] if self._in_calls else self._held
                    self._held = self._gap = ""
                elif not self._in_calls:
                    before = self._held[:start]
                    delta.content += before.rstrip()
                    self._gap = before[len(before.rstrip()) :]  # dropped if the call closes
                    self._held = self._held[start:]
                    self._in_calls = True
                return delta
            if not self._in_calls:
                delta.content += self._held[:start].rstrip()
                self._in_calls = True
            self._gap = ""
            call = parse_call(self._held[start + len(CALL_START) : end], self.functions)
            if call is None:
                delta.content += self._held[start : end + len(CALL_END)]
            else:
                name, arguments = call
                delta.tool_calls.append(
                    ToolCallDelta(index=self.calls, id=new_call_id(), name=name, arguments=arguments)
                )
                self.calls += 1
            self._held = self._held[end + len(CALL_END) :]

    @staticmethod
    def _undecided_tail(text: str) -> int:
        """How much of the end of the content to hold: a partial `<tool_call>`, and the whitespace before it
        (the template puts "\\n" between content and a call, which is not part of the content)."""
        partial = partial_tag_length(text, CALL_START)
        body = text[: len(text) - partial]
        return partial + (len(body) - len(body.rstrip()))


def calls_rule(required: bool, parallel: bool) -> str:
    """The calls at the end of a reply: one or more (or just one when not `parallel`), optional unless
    `required`."""
    calls = "call (WS call)*" if parallel else "call"
    return calls if required else f"({calls})?"


class GLM45Dialect(ToolDialect):
    """GLM-4.5's `<tool_call>{name}` + `<arg_key>`/`<arg_value>` pairs. `special_tags`: the tags are special
    tokens of the model's tokenizer (GLM-4.5's are), so the grammar names them as tokens, not text."""

    name = "glm45"

    def __init__(self, *, special_tags: bool = True) -> None:
        self.special_tags = special_tags

    def reply_parser(self, tools: list[dict]) -> ReplyParser:
        functions = {function["name"]: function for function in function_tools(tools)}
        return GLM45ReplyParser(functions) if functions else ContentOnly()

    def _tag(self, tag: str) -> str:
        return tag if self.special_tags else lark_literal(tag)

    def tool_grammar(self, tools: list[dict], tool_choice: str | dict | None, *,
                     parallel: bool = True) -> str | None:
        """The reply: optional `<think>` reasoning, free text, then calls ("auto": any number, "required" and
        named: at least one) with only whitespace between them. A call is the name, then the function's
        properties in schema order (required ones always) as key/value pairs: string-typed values free text,
        other values JSON following the property's schema. A function without properties takes any keys."""
        functions, required = chosen_functions(tools, tool_choice)
        if not functions:
            return None
        tag = self._tag
        calls = " | ".join(f"fn_{i}" for i in range(len(functions)))
        lines = [
            "%llguidance {}",
            f"start: reasoning? TEXT {calls_rule(required, parallel)} WS",
            f"reasoning: WS {tag('<think>')} TEXT {tag('</think>')}",
            f"call: {tag(CALL_START)} ({calls}) {tag(CALL_END)}",
            "TEXT: /(?s:.*)/",
            "WS: /[ \\t\\r\\n]*/",
            f"any_pair: {tag('<arg_key>')} TEXT {tag('</arg_key>')} \"\\n\" {tag('<arg_value>')} TEXT"
            f" {tag('</arg_value>')} \"\\n\"",
        ]
        for i, function in enumerate(functions):
            fields = []
            for key, schema, is_required in schema_properties(parameters_schema(function)):
                value = "TEXT" if schema.get("type", "string") == "string" else lark_json(schema)
                pair = (
                    f"{tag('<arg_key>')} {lark_literal(key)} {tag('</arg_key>')} \"\\n\" "
                    f"{tag('<arg_value>')} {value} {tag('</arg_value>')} \"\\n\""
                )
                fields.append((pair, is_required))
            if fields:
                pairs, rules = ordered_fields(f"args_{i}", fields)
            else:
                pairs, rules = "any_pair*", []
            lines += [f"fn_{i}: {lark_literal(function['name'] + chr(10))} {pairs}".rstrip(), *rules]
        return "\n".join(lines) + "\n"

    def template_messages(self, messages: list[dict], tools: list[dict] | None) -> list[dict]:
        """The template iterates `tc.arguments.items()`: OpenAI's JSON-string arguments become dicts; and None
        content becomes "" (its `visible_text` would print "None")."""
        shaped = []
        for message in messages:
            if message.get("content") is None:
                message = {**message, "content": ""}
            if message.get("tool_calls"):
                message = {**message, "tool_calls": [_with_dict_arguments(call) for call in message["tool_calls"]]}
            shaped.append(message)
        return shaped


def _with_dict_arguments(call: dict) -> dict:
    function = call.get("function") or {}
    arguments = arguments_dict(function.get("arguments"))
    if arguments is None:
        return call
    return {**call, "function": {**function, "arguments": arguments}}


class GLM45ChatFormat(ChatFormat):
    name = "glm45"
    dict_history = True
    supports_thinking = True
    reply_tokens = REPLY_TOKENS

    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__(tokenizer)
        for token in ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"):
            require_token(tokenizer, token)
        self.markup_ids = {t: i for t in MARKUP if (i := tokenizer.token_to_id(t)) is not None}
        self.stop_token_ids = {require_token(tokenizer, token) for token in STOP_TOKENS}
        self.dialect = GLM45Dialect(special_tags=all(tag in self.markup_ids for tag in REPLY_TOKENS))
        self._markup = re.compile("(" + "|".join(re.escape(t) for t in self.markup_ids) + ")")

    def render(
        self, messages: list[dict], *, tools: list[dict] | None = None, add_generation_prompt: bool = True,
        thinking: bool | None = None,
    ) -> ChatPrompt:
        pieces: list[tuple[str, bool]] = []  # (text, is markup the format wrote)

        def markup(text: str) -> None:
            pieces.append((text, True))

        def data(text: str) -> None:
            pieces.append((text, False))

        markup("[gMASK]<sop>")
        if tools:
            markup("<|system|>" + TOOLS_HEADER)
            data("".join(json.dumps(tool, ensure_ascii=False) + "\n" for tool in tools))
            markup(TOOLS_FOOTER)
        last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
        for i, message in enumerate(messages):
            role = message.get("role")
            if role == "user":
                content = message_text(message)
                markup("<|user|>\n")
                data(content)
                if thinking is False and not content.endswith("/nothink"):
                    markup("/nothink")
            elif role == "assistant":
                self._assistant(message, i > last_user, markup, data)
            elif role in ("tool", "observation", "function"):
                if i == 0 or messages[i - 1].get("role") not in ("tool", "observation", "function"):
                    markup("<|observation|>")
                markup("\n<tool_response>\n")
                data(message_text(message))
                markup("\n</tool_response>")
            elif role == "system":
                markup("<|system|>\n")
                data(message_text(message))
            else:
                glm_role(message)  # not a GLM role: raises the same error the other GLM formats raise
        if add_generation_prompt:
            markup("<|assistant|>")
            if thinking is False:
                markup("\n<think></think>")
        return self._prompt(pieces)

    @staticmethod
    def _assistant(message: dict, current: bool, markup, data) -> None:
        content = message_text(message)
        reasoning = message.get("reasoning_content")
        if not isinstance(reasoning, str):
            reasoning = ""
            if "</think>" in content:
                reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                content = content.split("</think>")[-1].lstrip("\n")
        markup("<|assistant|>")
        if current and reasoning:
            markup("\n<think>")
            data(reasoning.strip())
            markup("</think>")
        else:
            markup("\n<think></think>")
        if content.strip():
            markup("\n")
            data(content.strip())
        for call in message.get("tool_calls") or []:
            function = call.get("function") or call
            markup("\n<tool_call>")
            data(str(function.get("name", "")))
            markup("\n")
            for key, value in (arguments_dict(function.get("arguments")) or {}).items():
                markup("<arg_key>")
                data(str(key))
                markup("</arg_key>\n<arg_value>")
                data(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
                markup("</arg_value>\n")
            markup("</tool_call>")

    def _prompt(self, pieces: list[tuple[str, bool]]) -> ChatPrompt:
        """Ids as the rendered template tokenizes: markup tokens by id, and each stretch of text between them
        -- markup text and client text together -- encoded in one go with special tokens off, so that what a
        client wrote never becomes a control token."""
        ids: list[int] = []
        run = ""
        for text, is_markup in pieces:
            parts = self._markup.split(text) if is_markup and self.markup_ids else [text]
            for part in parts:
                if is_markup and part in self.markup_ids:
                    ids += self._encode(run) + [self.markup_ids[part]]
                    run = ""
                else:
                    run += part
        ids += self._encode(run)
        text = "".join(piece for piece, _ in pieces)
        return ChatPrompt(token_ids=ids, text=text, stop_token_ids=set(self.stop_token_ids))

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False, allow_special=False) if text else []

    def reply_parser(self, *, tools: list[dict] | None = None, thinking: bool | None = None) -> ReplyParser:
        inner = self.dialect.reply_parser(tools) if tools else ContentOnly()
        return ThinkingSplitter(inner, starts_inside=False)

    def tool_grammar(self, tools: list[dict], tool_choice: str | dict | None, *,
                     parallel: bool = True) -> str | None:
        return self.dialect.tool_grammar(tools, tool_choice, parallel=parallel)
