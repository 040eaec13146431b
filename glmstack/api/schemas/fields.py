"""Field types the request schemas share: text that is valid Unicode, and free-form JSON with bounded depth.

JSON may spell a lone surrogate ("\\ud800"), which Python's json module accepts and pydantic keeps in a str;
such a string cannot be encoded as UTF-8, so it would fail later — in the tokenizer, or while serializing a
response that echoes it — as a 500. It is refused at the door instead, naming the field.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator

# Free-form JSON (tool schemas, earlier tool calls, classic history) is passed on to the chat format, which
# walks it recursively; tool schemas that are used in practice nest a handful of levels.
MAX_JSON_DEPTH = 32


def unicode_text(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not valid Unicode text (a lone surrogate)") from None
    return value


def plain_json(value: Any) -> Any:
    """`value` nests at most MAX_JSON_DEPTH levels of lists and objects, and all its strings (keys too) are
    valid Unicode. Iterative, so a hostile value cannot exhaust the stack."""
    pending = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, str):
            unicode_text(item)
        elif isinstance(item, dict | list):
            if depth == MAX_JSON_DEPTH:
                raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            pending += [(child, depth + 1) for child in children]
    return value


Text = Annotated[str, AfterValidator(unicode_text)]
JsonObject = Annotated[dict[str, Any], AfterValidator(plain_json)]
JsonList = Annotated[list[Any], AfterValidator(plain_json)]
