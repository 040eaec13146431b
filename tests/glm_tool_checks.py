"""What the GLM tool-call tests share: the models' templates (tests/data/templates) rendered the way
transformers renders them, the rendered text tokenized the way a tokenizer with special tokens does, reply
parsers fed whole and at every split, and llguidance matchers run over token ids."""

from __future__ import annotations

import re
from pathlib import Path

import llguidance
from transformers.utils.chat_template_utils import render_jinja_template

from glmstack.engine.chat_format.base import ReplyParser

TEMPLATES = Path(__file__).parent / "data" / "templates"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "查询城市天气",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the web",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
    },
}
SYSTEM = "你是一个乐于助人的助手。Answer briefly."


def render_template(name: str, messages: list[dict], **kwargs) -> str:
    """The template rendered exactly as transformers' apply_chat_template renders it."""
    template = (TEMPLATES / name).read_text()
    rendered, _ = render_jinja_template([messages], chat_template=template, add_generation_prompt=True, **kwargs)
    return rendered[0]


def ids_of_rendered(text: str, tik, specials: dict[str, int]) -> list[int]:
    """What the rendered template tokenizes to with its special tokens on: each special token by id, the text
    between them encoded on its own."""
    pattern = "(" + "|".join(re.escape(token) for token in sorted(specials, key=len, reverse=True)) + ")"
    ids: list[int] = []
    for piece in re.split(pattern, text):
        if piece in specials:
            ids.append(specials[piece])
        elif piece:
            ids += tik.encode(piece)
    return ids


def run_parser(parser: ReplyParser, chunks: list[str]) -> dict:
    """Everything a parser said about a reply, merged: content, reasoning, and each call's id, name and
    concatenated arguments."""
    content, reasoning, calls = "", "", {}
    for delta in [*(parser.push(chunk) for chunk in chunks), parser.finish()]:
        content += delta.content
        reasoning += delta.reasoning
        for call in delta.tool_calls:
            entry = calls.setdefault(call.index, {"id": None, "name": None, "arguments": ""})
            if call.id is not None:
                assert entry["id"] is None, "a call's id comes once"
                entry["id"] = call.id
            if call.name is not None:
                entry["name"] = call.name
            entry["arguments"] += call.arguments
    return {"content": content, "reasoning": reasoning, "calls": [calls[i] for i in sorted(calls)], "n": parser.calls}


def without_ids(result: dict) -> dict:
    for call in result["calls"]:
        assert re.fullmatch(r"call_[A-Za-z0-9]{24}", call["id"] or ""), call["id"]
    return {**result, "calls": [{k: v for k, v in call.items() if k != "id"} for call in result["calls"]]}


def parse_every_split(make_parser, reply: str) -> dict:
    """The reply fed whole, in single characters, and split in two at every position: all must agree."""
    whole = without_ids(run_parser(make_parser(), [reply]))
    assert without_ids(run_parser(make_parser(), list(reply))) == whole
    for cut in range(1, len(reply)):
        assert without_ids(run_parser(make_parser(), [reply[:cut], reply[cut:]])) == whole, cut
    return whole


def accepts(lltokenizer, grammar: str, token_ids: list[int]) -> bool:
    matcher = llguidance.LLMatcher(lltokenizer, grammar, log_level=0)
    return matcher.consume_tokens(token_ids) and not matcher.is_error() and matcher.is_accepting()


def many_tools(count: int) -> list[dict]:
    return [
        {
            "type": "function",
            "function": {
                "name": f"tool_{i}",
                "description": f"tool number {i}",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "text": {"type": "string"},
                        "n": {"type": "integer", "minimum": 0},
                        "flag": {"type": "boolean"},
                        "tags": {"type": "array", "items": {"type": "string"}},
                        "mode": {"enum": ["a", "b", "c"]},
                    },
                    "required": ["text", "n"],
                },
            },
        }
        for i in range(count)
    ]
