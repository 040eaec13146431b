"""ChatGLM3-6B prompts: role tokens and a metadata line per message (spec 2.8, `build_chat_input`), and
ChatGLM3's `tool_call(...)` dialect.

    [gMASK] sop
    per message:  <|role|> + encode(f"{metadata}\\n") + encode(content)
    then:         <|assistant|>

Each piece is encoded *separately*: sentencepiece puts its dummy "▁" in front of every piece (so "\\n" alone is
`[▁, <0x0A>]`), which is what the model was trained on; encoding the rendered text in one go gives other ids.
Content is encoded with special tokens off, so typed "<|user|>" stays text. There is no end-of-turn token:
the next role token ends a turn, and the model ends its answer with `<|user|>` or, for a tool call,
`<|observation|>` -- both stop generation, with eos.

Tools: a system message carrying `tools` gets them appended as `"\\n" + json.dumps(tools, indent=4,
ensure_ascii=False)`. `render(tools=...)` hangs them on the client's first system message, keeping its text
(what ChatGLM3's own `model.chat` does, verified in spec 2.8), or, when there is none, puts a system message
with `DEFAULT_TOOLS_PROMPT` first, as the official API server does. The model answers a call with
`<|assistant|>{tool name}\\n` and a ```python `tool_call(k=v, ...)` block; OpenAI `tool_calls` history is
rendered back into that shape, and tool results are `observation` messages (`tool`/`function` map to it).

`ChatGLM3Dialect` parses such replies with `ast` -- keyword arguments whose values are Python literals, never
evaluated -- and writes the grammar a call must follow.
"""

from __future__ import annotations

import ast
import json

from glmstack.engine.chat_format.base import (
    ChatFormat,
    ChatPrompt,
    ChatTemplateError,
    ContentOnly,
    ReplyDelta,
    ReplyParser,
    ToolDialect,
    message_text,
)
from glmstack.engine.chat_format.chatglm import require_token
from glmstack.engine.chat_format.glm_tools import (
    arguments_dict,
    chosen_functions,
    function_tools,
    lark_json,
    lark_literal,
    metadata_line_grammar,
    new_call_id,
    ordered_fields,
    parameters_schema,
    schema_properties,
)
from glmstack.engine.tokenization.base import Tokenizer
from glmstack.protocol import ToolCallDelta

DEFAULT_TOOLS_PROMPT = (
    "Answer the following questions as best as you can. You have access to the following tools:"
)
ROLES = ("system", "user", "assistant", "observation")
ROLE_ALIASES = {"tool": "observation", "function": "observation"}  # OpenAI names for tool results


def glm_role(message: dict) -> str:
    """The GLM role of a message (ChatGLM3 and GLM-4 share the four roles)."""
    role = str(message.get("role"))
    role = ROLE_ALIASES.get(role, role)
    if role not in ROLES:
        raise ChatTemplateError(f"unknown role {message.get('role')!r}; GLM roles are {', '.join(ROLES)}")
    return role


def with_tools_message(messages: list[dict], tools: list[dict], default_content: str) -> list[dict]:
    """The conversation with `tools` on its first system message, whose text stays; without one, a system
    message with `default_content` and the tools goes first."""
    rest = list(messages)
    first_system = next((i for i, message in enumerate(rest) if message.get("role") == "system"), None)
    if first_system is None:
        return [{"role": "system", "content": default_content, "tools": tools}, *rest]
    rest[first_system] = {**rest[first_system], "tools": tools}
    return rest


# --- tool calls as ChatGLM3 writes them ---------------------------------------------------------------------


def tool_call_block(arguments: object) -> str:
    """OpenAI call arguments as ChatGLM3's ```python `tool_call(k=v, ...)` block, values as Python literals
    (`repr`, which is what `ast.unparse` writes for the constants ChatGLM3's fine-tuning code builds).
    Arguments that are not a JSON object go in as written."""
    kwargs = arguments_dict(arguments)
    if kwargs is None or not all(isinstance(key, str) and key.isidentifier() for key in kwargs):
        call = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    else:
        call = "tool_call(" + ", ".join(f"{key}={value!r}" for key, value in kwargs.items()) + ")"
    return f"```python\n{call}\n```"


def expand_tool_calls(messages: list[dict]) -> list[dict]:
    """OpenAI assistant `tool_calls` as ChatGLM3 wrote them: one assistant message per call, the function
    name as metadata and the `tool_call(...)` block as content. Other messages pass through."""
    expanded = []
    for message in messages:
        if message.get("role") != "assistant" or not message.get("tool_calls"):
            expanded.append(message)
            continue
        for call in message["tool_calls"]:
            function = call.get("function") or {}
            content = tool_call_block(function.get("arguments"))
            expanded.append({"role": "assistant", "metadata": function.get("name", ""), "content": content})
    return expanded


def literal_kwargs(code: str) -> dict | None:
    """The keyword arguments of a `tool_call(k=v, ...)` expression whose values are all Python literals;
    None for anything else. Parsed with `ast` and `ast.literal_eval`: nothing the model wrote is executed."""
    tree = ast.parse(code.strip(), mode="eval")
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call"):
        return None
    if call.args or any(keyword.arg is None for keyword in call.keywords):
        return None
    return {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords}


def tool_call_arguments(body: str) -> str:
    """A call's arguments as a JSON string, from the text after the name line: the ``` fence lines dropped (as
    ChatGLM3's `process_response` does), then `literal_kwargs`. What does not parse is returned as written."""
    lines = body.strip().split("\n")
    if lines and lines[0].lstrip().startswith("```"):
        lines = lines[1:]
    if lines and lines[-1].strip() == "```":
        lines = lines[:-1]
    try:
        kwargs = literal_kwargs("\n".join(lines))
        if kwargs is None:
            return body
        return json.dumps(kwargs, ensure_ascii=False, allow_nan=False)
    except Exception:  # a model's text is data: syntax errors, non-literals, sets, NaN, deep nesting alike
        return body


def classic_tool_result(name: str, arguments_json: str) -> dict:
    """What ChatGLM3's own `chat()` returns for a call: `{"name", "parameters": {...}}`, or the arguments
    text under "content" when they are not a JSON object (its answer for tool text it cannot evaluate)."""
    parameters = arguments_dict(arguments_json)
    if parameters is None:
        return {"name": name, "content": arguments_json}
    return {"name": name, "parameters": parameters}


class ChatGLM3ReplyParser(ReplyParser):
    """A ChatGLM3 reply as it streams. Its first line is the metadata: empty for an answer (the content, which
    streams at once), a tool name for a call (its block is held until the reply ends, then parsed), anything
    else -- `interpreter` included, for now -- plain content. While the first line could still become a
    tool name, text is held back."""

    def __init__(self, names: set[str]) -> None:
        self.names = names
        self.calls = 0
        self._mode = "undecided"  # then "content" or "call"
        self._held = ""

    def push(self, text: str) -> ReplyDelta:
        if self._mode == "content":
            return ReplyDelta(content=text)
        self._held += text
        if self._mode == "call":
            return ReplyDelta()
        return self._decide(final=False)

    def finish(self) -> ReplyDelta:
        if self._mode == "call":
            arguments, self._held = tool_call_arguments(self._held), ""
            return ReplyDelta(tool_calls=[ToolCallDelta(index=0, arguments=arguments)])
        return self._decide(final=True) if self._mode == "undecided" else ReplyDelta()

    def _decide(self, final: bool) -> ReplyDelta:
        held = self._held
        if not held:
            return ReplyDelta()
        if held.startswith("\n"):
            return self._content(held[1:])
        newline = held.find("\n")
        if newline < 0:
            prefix = held.strip()
            if not final and any(name.startswith(prefix) for name in self.names):
                return ReplyDelta()
            return self._content(held)
        name = held[:newline].strip()
        if name not in self.names:
            return self._content(held)
        self._mode, self._held, self.calls = "call", held[newline + 1 :], 1
        delta = ReplyDelta(tool_calls=[ToolCallDelta(index=0, id=new_call_id(), name=name, arguments="")])
        if final:
            delta.tool_calls += self.finish().tool_calls
        return delta

    def _content(self, text: str) -> ReplyDelta:
        self._mode, self._held = "content", ""
        return ReplyDelta(content=text)


# --- the grammar of a call ----------------------------------------------------------------------------------

# Python literals as ChatGLM3 writes argument values. Containers and strings are approximations of Python's
# grammar (no implicit concatenation, no triple quotes, no raw or byte strings): enough for `literal_eval`.
PYTHON_LITERALS = r"""
PY_STR: /"([^"\\\n]|\\.)*"/ | /'([^'\\\n]|\\.)*'/
PY_INT: /-?[0-9]+/
PY_NUMBER: /-?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?/
PY_BOOL: "True" | "False"
COMMA: /, */
COLON: /: */
py_value: PY_STR | PY_NUMBER | PY_BOOL | "None" | py_list | py_dict
py_list: "[" (py_value (COMMA py_value)*)? "]"
py_dict: "{" (py_value COLON py_value (COMMA py_value COLON py_value)*)? "}"
KW_NAME: /[A-Za-z_][A-Za-z0-9_]*/
any_kwargs: (KW_NAME "=" py_value (COMMA KW_NAME "=" py_value)*)?
"""
_TYPE_RULES = {
    "string": "PY_STR",
    "integer": "PY_INT",
    "number": "PY_NUMBER",
    "boolean": "PY_BOOL",
    "null": '"None"',
    "array": "py_list",
    "object": "py_dict",
}


def python_value_rule(schema: dict) -> str:
    """A Lark expression for one argument value: the schema's `enum` exactly (as Python writes each value, and
    strings also in double quotes), its `type` (or list of types) otherwise, any literal when it says neither."""
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        spellings: list[str] = []
        for value in schema["enum"]:
            spellings.append(repr(value))
            if isinstance(value, str):
                spellings.append(json.dumps(value, ensure_ascii=False))
        return "(" + " | ".join(lark_literal(spelling) for spelling in dict.fromkeys(spellings)) + ")"
    types = schema.get("type")
    if types in ("integer", "number"):
        # JSON writes numbers as Python does, so the schema's minimum/maximum hold through llguidance's JSON
        # support (and a small model cannot write digits forever). Strings stay Python's, either quote.
        return lark_json(schema)
    types = [types] if isinstance(types, str) else types if isinstance(types, list) else []
    rules = [_TYPE_RULES[kind] for kind in types if kind in _TYPE_RULES]
    return "(" + " | ".join(rules) + ")" if rules else "py_value"


def kwargs_rules(prefix: str, schema: dict) -> tuple[str, list[str]]:
    """(the expression for a call's keyword arguments, the rules it uses): the schema's properties in their
    order as `key=value`, separated by commas (`ordered_fields`). A schema without properties takes any
    keywords."""
    fields = [
        (f"{lark_literal(key + '=')} {python_value_rule(value)}", required)
        for key, value, required in schema_properties(schema)
        if key.isidentifier()
    ]
    if not fields:
        return "any_kwargs", []
    return ordered_fields(prefix, fields, separator="COMMA")


class ChatGLM3Dialect(ToolDialect):
    """ChatGLM3's `{name}\\n` + ```python `tool_call(k=v, ...)` block calls."""

    name = "chatglm3"

    def reply_parser(self, tools: list[dict]) -> ReplyParser:
        names = {function["name"] for function in function_tools(tools)}
        return ChatGLM3ReplyParser(names) if names else ContentOnly()

    def tool_grammar(self, tools: list[dict], tool_choice: str | dict | None, *,
                     parallel: bool = True) -> str | None:
        """The reply's grammar: "\\n" + free text ("auto" only), or `name\\n```python\\ntool_call(...)\\n````
        with the function's properties as keyword arguments in schema order, each value a Python literal of
        the property's type (enums exactly). Nested schemas are not followed inside lists and dicts."""
        functions, required = chosen_functions(tools, tool_choice)
        if not functions:
            return None

        def call(i: int, function: dict) -> tuple[str, list[str]]:
            kwargs, rules = kwargs_rules(f"args_{i}", parameters_schema(function))
            head = lark_literal(f"{function['name']}\n```python\ntool_call(")
            return f"{head} {kwargs} {lark_literal(chr(10).join([')', '```']))}", rules

        return metadata_line_grammar(functions, required, call) + PYTHON_LITERALS

    def template_messages(self, messages: list[dict], tools: list[dict] | None) -> list[dict]:
        return expand_tool_calls(messages)


# --- the prompt format --------------------------------------------------------------------------------------


class RoleTokenChatFormat(ChatFormat):
    """What ChatGLM3 and GLM-4 share: turns open with a `<|role|>` token, user text is encoded with special
    tokens off, and the prompt ends with `<|assistant|>` when a reply is wanted."""

    role_ids: dict[str, int]
    dict_history = True

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False, allow_special=False)

    def _prompt(self, ids: list[int], text: list[str], add_generation_prompt: bool) -> ChatPrompt:
        if add_generation_prompt:
            ids.append(self.role_ids["assistant"])
            text.append("<|assistant|>")
        return ChatPrompt(token_ids=ids, text="".join(text), stop_token_ids=set(self.stop_token_ids))


class ChatGLM3ChatFormat(RoleTokenChatFormat):
    name = "chatglm3"

    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__(tokenizer)
        self.prefix_ids = [require_token(tokenizer, "[gMASK]"), require_token(tokenizer, "sop")]
        self.role_ids = {role: require_token(tokenizer, f"<|{role}|>") for role in ROLES}
        self.stop_token_ids = {self.role_ids["user"], self.role_ids["observation"]}
        if tokenizer.eos_token_id is not None:
            self.stop_token_ids.add(tokenizer.eos_token_id)
        self.dialect = ChatGLM3Dialect()

    def render(
        self, messages: list[dict], *, tools: list[dict] | None = None, add_generation_prompt: bool = True,
        thinking: bool | None = None,
    ) -> ChatPrompt:
        if tools:
            messages = with_tools_message(messages, tools, DEFAULT_TOOLS_PROMPT)
        ids = list(self.prefix_ids)
        text = ["[gMASK]sop"]
        for message in expand_tool_calls(messages):
            role = glm_role(message)
            metadata = str(message.get("metadata") or "")
            content = message_text(message)
            if role == "system" and "tools" in message:
                content += "\n" + json.dumps(message["tools"], indent=4, ensure_ascii=False)
            ids += [self.role_ids[role], *self._encode(f"{metadata}\n"), *self._encode(content)]
            text.append(f"<|{role}|>{metadata}\n{content}")
        return self._prompt(ids, text, add_generation_prompt)

    def reply_parser(self, *, tools: list[dict] | None = None, thinking: bool | None = None) -> ReplyParser:
        return self.dialect.reply_parser(tools) if tools else ContentOnly()

    def tool_grammar(self, tools: list[dict], tool_choice: str | dict | None, *,
                     parallel: bool = True) -> str | None:
        return self.dialect.tool_grammar(tools, tool_choice, parallel=parallel)
