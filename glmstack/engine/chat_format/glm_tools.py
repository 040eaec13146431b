"""What the GLM tool dialects share: which tools a request offers, which of them `tool_choice` allows, call
ids, and writing text into llguidance Lark grammars (glm4.py, chatglm3.py, glm45.py)."""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Callable

from glmstack.engine.chat_format.base import ChatTemplateError

_ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    """`call_` + 24 random alphanumerics, the id shape the official GLM OpenAI servers give their calls."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


def function_tools(tools: list[dict] | None) -> list[dict]:
    """The `function` objects of the OpenAI-shaped function tools, in order. Built-in GLM-4 tool types
    (python, simple_browser, cogview) only render; a reply cannot call them through this path."""
    functions = []
    for tool in tools or []:
        if tool.get("type", "function") == "function" and isinstance(tool.get("function"), dict):
            if isinstance(tool["function"].get("name"), str) and tool["function"]["name"]:
                functions.append(tool["function"])
    return functions


def chosen_functions(tools: list[dict], tool_choice: str | dict | None) -> tuple[list[dict], bool]:
    """(the functions the reply may call, whether it must call one) for a `tool_choice`: "auto" (or None)
    any or none, "required" one of them, {"type": "function", "function": {"name": N}} exactly N."""
    functions = function_tools(tools)
    if tool_choice is None or tool_choice == "auto":
        return functions, False
    if tool_choice == "required":
        return functions, True
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        named = [function for function in functions if function["name"] == name]
        if not named:
            raise ChatTemplateError(f"tool_choice names {name!r}, which is not among the tools")
        return named, True
    raise ChatTemplateError(f"unsupported tool_choice {tool_choice!r}")


def parameters_schema(function: dict) -> dict:
    """A function's `parameters` schema, as a constrained call follows it: a function without one takes any
    JSON object; one that lists its properties takes only those unless it says otherwise (as OpenAI's strict
    mode reads it) - a model that must write a call could otherwise invent keys until max_tokens."""
    schema = function.get("parameters")
    if not isinstance(schema, dict) or not schema:
        return {"type": "object"}
    if isinstance(schema.get("properties"), dict) and schema["properties"] and "additionalProperties" not in schema:
        return {**schema, "additionalProperties": False}
    return schema


def metadata_line_grammar(functions: list[dict], required: bool,
                          call_body: Callable[[int, dict], tuple[str, list[str]]]) -> str:
    """The reply grammar of the families whose first line says what follows (ChatGLM3, GLM-4): an answer is
    `\n` + free text ("auto" only), a call is `call_body(i, function)` -> (its expression, extra rules)."""
    calls = [f"call_{i}" for i in range(len(functions))]
    lines = ["%llguidance {}", "start: " + " | ".join(calls if required else ["answer", *calls])]
    if not required:
        lines += ['answer: "\\n" TEXT', "TEXT: /(?s:.*)/"]
    for i, function in enumerate(functions):
        expression, rules = call_body(i, function)
        lines += [f"{calls[i]}: {expression}", *rules]
    return "\n".join(lines) + "\n"


def lark_literal(text: str) -> str:
    """`text` as a Lark string literal. JSON's escaping (quote, backslash, control characters) is what
    llguidance reads in "...", and non-ASCII stays as it is."""
    return json.dumps(text, ensure_ascii=False)


# Arguments are written as json.dumps writes them (", " and ": ", no other whitespace): with free whitespace a
# small model constrained into a call can loop on tabs and newlines until max_tokens.
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def lark_json(schema: dict) -> str:
    """An inline `%json {...}` schema, written compact: the same JSON on one line (so no Lark newline rules
    apply), with llguidance's `x-guidance` options fixing the separators."""
    if isinstance(schema, dict) and "x-guidance" not in schema:
        schema = {**schema, "x-guidance": COMPACT_JSON}
    return "%json " + json.dumps(schema, ensure_ascii=False)


def arguments_text(arguments: object) -> str:
    """OpenAI call arguments as the JSON text a GLM template shows: strings pass through as written."""
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments if arguments is not None else {}, ensure_ascii=False)


def arguments_dict(arguments: object) -> dict | None:
    """OpenAI call arguments (a JSON string, or already a dict) as a dict; None when they are not one."""
    if isinstance(arguments, dict):
        return arguments
    if isinstance(arguments, str):
        try:
            value = json.loads(arguments)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None
    return None


def schema_properties(schema: dict) -> list[tuple[str, dict, bool]]:
    """(name, schema, required) for each property of an object schema, in the schema's order."""
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        return []
    required = set(schema.get("required") or [])
    return [
        (key, value if isinstance(value, dict) else {}, key in required)
        for key, value in properties.items()
        if isinstance(key, str)
    ]


def ordered_fields(prefix: str, fields: list[tuple[str, bool]], separator: str = "") -> tuple[str, list[str]]:
    """Lark for a call's arguments: `fields` (expression, required) in their order, required ones always,
    optional ones maybe, with `separator` between two written ones. Returns (the start expression, the rules
    it uses). Rule `{prefix}_{i}_{started}` is "the fields from i on", with or without one already written
    (which decides the separator), so the grammar stays linear in the number of fields rather than
    enumerating the subsets. The order is the schema's: models write arguments in the order they were shown."""
    rules: dict[str, str] = {}

    def ref(i: int, started: bool) -> str:
        if i == len(fields):
            return ""
        name = f"{prefix}_{i}_{int(started)}"
        if name not in rules:
            rules[name] = ""  # reserved first; the recursion below only refers to later fields
            expression, required = fields[i]
            take = " ".join(part for part in (separator if started else "", expression, ref(i + 1, True)) if part)
            if required:
                rules[name] = take
            else:
                skip = ref(i + 1, started)
                rules[name] = f"({take}) | {skip}" if skip else f"({take})?"
        return name

    start = ref(0, False)
    return start, [f"{name}: {body}" for name, body in rules.items()]
