"""Hermes-style tool calls, the convention of Qwen2.5/Qwen3, Hermes 2/3 and most Llama-family fine-tunes: the
reply is text and/or `<tool_call>` blocks, one JSON object per call,

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

several blocks (separated by a newline) being parallel calls.

Prompts for a template that takes no `tools` (SmolLM2's, most plain ChatML/Llama templates): `hermes_messages`
rewrites the conversation the way Qwen2.5's template would render it, into messages any template renders:
- the tools go into the system message as Qwen2.5's block (`tools_system_text`: the "# Tools" header, one
  `{"type": "function", "function": {...}}` JSON per line inside `<tools></tools>`, and the `<tool_call>`
  instructions), after the client's first system message and a blank line, or as a new first system message
  when there is none (which replaces a template's default system prompt);
- assistant `tool_calls` become `<tool_call>` blocks appended to the assistant content (after a newline when
  there is content), their arguments as a JSON object, as the model is asked to write them;
- `tool` results become `<tool_response>\\n{content}\\n</tool_response>`: in a `tool` message when the template
  renders any role it is given, else (a template that rejects or drops unknown roles) in a user message,
  consecutive results joined by newlines into one, as Qwen2.5 does.

Parsing (`HermesReplyParser`): text outside blocks is content, streamed as it comes, holding back only what
could be the start of `<tool_call>`; whitespace between and after blocks is dropped. A block is emitted whole
when `</tool_call>` arrives, as one `ToolCallDelta` with the id, the name and all arguments
(`json.dumps(arguments, ensure_ascii=False)`). A block that is not a call to an offered tool -- invalid JSON,
no string `name`, arguments that are not an object, a name not among `tools` -- is given back as content,
verbatim with its tags, so the client sees what the model wrote and nothing is run that was not offered. A
block never closed is a call if its text is a complete valid call (generation stopped before or inside
`</tool_call>`), else content. The parser never raises.

Grammar (`hermes_tool_grammar`): see its docstring.
"""

from __future__ import annotations

import json
from typing import Any

from glmstack.engine.chat_format.base import ReplyDelta, ReplyParser, ToolDialect, message_text
from glmstack.engine.chat_format.glm_tools import (
    COMPACT_JSON,
    chosen_functions,
    function_tools,
    lark_json,
    lark_literal,
    new_call_id,
    parameters_schema,
)
from glmstack.engine.chat_format.thinking import partial_tag_length
from glmstack.protocol import ToolCallDelta

CALL_START = "<tool_call>"
CALL_END = "</tool_call>"

# Qwen2.5's tools block (its template's text, without the `<|im_end|>` it ends with).
TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\n</tool_call>"
)

# ---- rendering for templates that take no tools ----------------------------------------------------------


def tools_system_text(tools: list[dict]) -> str:
    """Qwen2.5's system block for `tools` (each as HF's `tojson` writes it: non-ASCII kept, keys in order)."""
    lines = "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools)
    return TOOLS_HEADER + lines + TOOLS_FOOTER


def call_block(call: dict) -> str:
    """An OpenAI `tool_calls` entry as the `<tool_call>` block the model writes: arguments sent back as a JSON
    string go in as the object they encode (a string that is not JSON stays a string)."""
    function = call.get("function") or {}
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            pass
    body = json.dumps({"name": function.get("name", ""), "arguments": arguments}, ensure_ascii=False)
    return f"{CALL_START}\n{body}\n{CALL_END}"


def hermes_messages(messages: list[dict], tools: list[dict] | None, *, tool_role: bool) -> list[dict]:
    """OpenAI-shaped messages with tools and tool turns folded into plain system/user/assistant (and `tool`
    when `tool_role`) messages with string content; see the module docstring. Messages are copied, never
    changed in place."""
    result: list[dict] = []
    previous_role = None
    for message in messages:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            text = message_text(message)
            blocks = "\n".join(call_block(call) for call in message["tool_calls"])
            rest = {k: v for k, v in message.items() if k != "tool_calls"}
            result.append({**rest, "content": f"{text}\n{blocks}" if text else blocks})
        elif role == "tool":
            response = f"<tool_response>\n{message_text(message)}\n</tool_response>"
            if tool_role:
                result.append({"role": "tool", "content": response})
            elif previous_role == "tool":  # results of one round of parallel calls share a user turn
                result[-1]["content"] += "\n" + response
            else:
                result.append({"role": "user", "content": response})
        else:
            result.append(dict(message))
        previous_role = role
    if tools:
        block = tools_system_text(tools)
        if result and result[0].get("role") == "system":
            result[0] = {**result[0], "content": f"{message_text(result[0])}\n\n{block}"}
        else:
            result.insert(0, {"role": "system", "content": block})
    return result


# ---- parsing ---------------------------------------------------------------------------------------------


def parse_call(text: str, names: set[str]) -> tuple[str, str] | None:
    """(name, arguments JSON) for a block's text when it is a call to one of `names`, else None."""
    try:
        call = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or call["name"] not in names:
        return None
    arguments: Any = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):  # some fine-tunes write the OpenAI wire form, a JSON string
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            return None
    if not isinstance(arguments, dict):
        return None
    return call["name"], json.dumps(arguments, ensure_ascii=False)


class HermesReplyParser(ReplyParser):
    """A Hermes reply as it streams (module docstring: what is content and what is a call)."""

    def __init__(self, tools: list[dict]) -> None:
        self.names = {function["name"] for function in function_tools(tools)}
        self.calls = 0
        self._held = ""
        self._in_call = False
        self._scanned = 0  # how much of a call's held text is known not to hold `</tool_call>`
        self._after_call = False  # whitespace after a block is dropped

    def push(self, text: str) -> ReplyDelta:
        self._held += text
        return self._advance(final=False)

    def finish(self) -> ReplyDelta:
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> ReplyDelta:
        delta = ReplyDelta()
        while True:
            if self._in_call:
                end = self._held.find(CALL_END, self._scanned)
                if end < 0:
                    if final:
                        self._end_call(self._held, closed=False, delta=delta)
                        self._held = ""
                    # a long call streams in small pieces: search only where the end tag could now be
                    self._scanned = max(0, len(self._held) - len(CALL_END) + 1)
                    return delta
                self._end_call(self._held[:end], closed=True, delta=delta)
                self._held = self._held[end + len(CALL_END) :]
                continue
            if self._after_call:
                self._held = self._held.lstrip()
                if not self._held:
                    return delta
                self._after_call = False
            start = self._held.find(CALL_START)
            if start >= 0:
                delta.content += self._held[:start]
                self._held = self._held[start + len(CALL_START) :]
                self._in_call = True
                self._scanned = 0
                continue
            keep = 0 if final else partial_tag_length(self._held, CALL_START)
            delta.content += self._held[: len(self._held) - keep]
            self._held = self._held[len(self._held) - keep :]
            return delta

    def _end_call(self, body: str, *, closed: bool, delta: ReplyDelta) -> None:
        self._in_call = False
        self._after_call = True
        # cut off mid-way through the end tag (max_tokens): the call is judged without the tag's start
        complete = body if closed else body[: len(body) - partial_tag_length(body, CALL_END)]
        call = parse_call(complete, self.names)
        if call is None:
            delta.content += CALL_START + body + (CALL_END if closed else "")
            return
        name, arguments = call
        delta.tool_calls.append(ToolCallDelta(index=self.calls, id=new_call_id(), name=name, arguments=arguments))
        self.calls += 1


# ---- grammar ---------------------------------------------------------------------------------------------


def calls_schema(functions: list[dict]) -> dict:
    """A JSON schema for `{"name": ..., "arguments": ...}` that ties each name to its function's parameters."""
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": function["name"]}, "arguments": parameters_schema(function)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for function in functions
    ]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    # JSON laid out as `json.dumps` writes it, the way the prompt and the rendered history show calls: a model
    # free to choose its whitespace can wander into long runs of it.
    return {**schema, "x-guidance": COMPACT_JSON}


def hermes_tool_grammar(
    tools: list[dict], tool_choice: str | dict | None, *, special_tokens: frozenset[str] = frozenset(),
    parallel: bool = True,
) -> str | None:
    """The reply as an llguidance Lark grammar:

    - "auto" (or None): free text, optionally followed by one or more calls (a newline between calls, nothing
      after the last: the model ends its turn there);
    - "required": one or more calls and nothing else;
    - {"type": "function", "function": {"name": N}}: exactly one call, to N;
    - `parallel=False`: one call at most, in every mode.

    A call is `<tool_call>\\n{json}\\n</tool_call>`, the JSON held by `%json` to a schema that pairs each tool's
    name (a `const`) with its `parameters` schema, so both the name and the argument types are enforced.

    The free text must not swallow the call. Where the tokenizer has `<tool_call>` as an added token (Qwen2.5,
    whose `"special": false` tokens llguidance treats as special too) that is automatic: the tags are written
    as token references (`<tool_call>`), which no text regex can produce (a model spelling the tag in pieces
    instead would be writing text, unconstrained). Where the tag is plain text (SmolLM2), the text alternative
    is a regex intersected with the negation of "contains `<tool_call>`" (llguidance's `&` / `~`), so once the
    model writes the tag only the call can go on; text followed by a call is one lazy lexeme ending at the
    first `<tool_call>` (llguidance's documented tool-calling pattern), since a greedy text lexeme cannot hand
    over to a literal.
    """
    functions, required = chosen_functions(tools, tool_choice)
    if not functions:
        return None
    special = CALL_START in special_tokens and CALL_END in special_tokens
    start, end = (CALL_START, CALL_END) if special else (lark_literal(CALL_START), lark_literal(CALL_END))
    body = f'"\\n" call_json "\\n" {end}'
    more = " more_calls" if parallel else ""  # what may follow the first call
    lines = [
        "%llguidance {}",
        f"call_json: {lark_json(calls_schema(functions))}",
        f"call: {start} {body}",
        'more_calls: ("\\n" call)*',
    ]
    if isinstance(tool_choice, dict):
        lines.insert(1, "start: call")
    elif required:
        lines.insert(1, f"start: call{more}")
    elif special:
        lines.insert(1, f"start: TEXT | TEXT call{more}")
        lines.append(r"TEXT: /(?s:.*)/")
    else:
        lines.insert(1, f"start: TEXT | text_then_call{more}")
        lines.append(f"text_then_call: text_then_start {body}")
        lines.append(f"text_then_start[lazy]: /(?s:.*){CALL_START}/")  # ends at the first <tool_call>
        lines.append(rf"TEXT: /(?s:.*)/ & ~/(?s:.*){CALL_START}(?s:.*)/")
    return "\n".join(lines) + "\n"


class HermesDialect(ToolDialect):
    """Hermes `<tool_call>{json}</tool_call>` calls. `special_tokens`: which of the tags the tokenizer has as
    added tokens (the grammar must then reference the tokens, not spell the text)."""

    name = "hermes"

    def __init__(self, special_tokens: frozenset[str] = frozenset()) -> None:
        self.special_tokens = special_tokens

    def reply_parser(self, tools: list[dict]) -> ReplyParser:
        return HermesReplyParser(tools)

    def tool_grammar(self, tools: list[dict], tool_choice: str | dict | None, *,
                     parallel: bool = True) -> str | None:
        return hermes_tool_grammar(tools, tool_choice, special_tokens=self.special_tokens, parallel=parallel)

    def template_messages(self, messages: list[dict], tools: list[dict] | None) -> list[dict]:
        """For templates that read `tool_calls` themselves (Qwen2.5: `tool_call.arguments | tojson`): arguments
        the client sent as a JSON string become the object, as vLLM does before rendering, so the template
        writes `"arguments": {...}` and not a quoted string."""
        return [with_argument_objects(message) for message in messages]


def with_argument_objects(message: dict) -> dict:
    if message.get("role") != "assistant" or not message.get("tool_calls"):
        return message
    calls = []
    for call in message["tool_calls"]:
        function = call.get("function") or {}
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                function = {**function, "arguments": json.loads(arguments)}
            except (ValueError, RecursionError):
                pass  # not JSON: the template shows it as the string it is
        calls.append({**call, "function": function})
    return {**message, "tool_calls": calls}
