"""What a request's reply must follow, compiled once: `response_format` or the tools' call grammar ->
an llguidance matcher for that request.

Which constraint a request gets (`Constraints.matcher_for`):

    tools offered, tool_choice not "none", and the chat format has a tool grammar
        -> that grammar (`ChatFormat.tool_grammar`): "auto" is free text or a call, "required" / a named
           function is a call. It wins over `response_format`: a reply that may hold a call cannot also be
           forced to be one JSON document. (OpenAI applies response_format to the content when no tool is
           called; that would need the format's grammar to embed the schema, so such content is free here.)
    response_format {"type": "json_object"}            -> any JSON object
    response_format {"type": "json_schema", ...}       -> that schema ("strict": true refuses keywords the
                                                          compiler does not enforce; otherwise they are ignored)
    response_format {"type": "text"} / None, no tools  -> no constraint

Compiling is the expensive part (a matcher builds its lexer over the vocabulary: ~2 ms for a 2 KB schema
on a 49k vocabulary), so compiled matchers are kept in an LRU keyed by the grammar text and each request
gets a `deep_copy()` (microseconds). llguidance bounds the work itself (`LLParserLimits`: a 1 MB schema,
a recursive `$ref` or 128 tools answer in well under a second with a matcher or an error); errors become
`InvalidConstraintError` naming the request field.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import llguidance

from glmstack.engine.chat_format.base import ChatFormat
from glmstack.engine.constrained.vocabulary import ll_tokenizer
from glmstack.engine.tokenization.base import Tokenizer
from glmstack.protocol import InvalidConstraintError

SCHEMA_FIELD = "response_format.json_schema.schema"
CACHE_SIZE = 256
# The most objects and arrays a schema may hold. llguidance's own limits bound most work, but not all: a
# 1.2 MB schema of 16k optional properties ran 12 s before llguidance panicked (optional properties cost
# quadratic work: 2k took 0.4 s, 4k 1.7 s). 2k nodes is a few hundred properties with their descriptions.
MAX_SCHEMA_NODES = 2048

# Compact JSON, the way json.dumps writes it: with flexible whitespace a small model can loop on newlines
# inside an object until max_tokens, and a fixed layout lets prefix caching see identical replies.
_JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# verbose errors carry parser state and the grammar itself: too long for an API error message
_LIMITS = llguidance.LLParserLimits(verbose_errors=False)


def schema_grammar(schema: Any, *, strict: bool, field: str) -> str:
    """The llguidance grammar for a JSON schema (not yet checked: `Constraints.compile` does that)."""
    if not isinstance(schema, dict):
        raise InvalidConstraintError("a JSON schema must be an object", field)
    if count_nodes(schema, MAX_SCHEMA_NODES) > MAX_SCHEMA_NODES:
        raise InvalidConstraintError(f"schema too large: more than {MAX_SCHEMA_NODES} objects and arrays", field)
    try:
        options: Any = {**_JSON_OPTIONS, "lenient": not strict}  # a TypedDict llguidance does not export
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=options)
    except (ValueError, TypeError, RecursionError) as exc:  # not JSON-serializable, nested past Python's limit
        raise InvalidConstraintError(f"invalid JSON schema: {exc}", field) from None


def count_nodes(value: Any, limit: int) -> int:
    """The objects and arrays in a JSON value, counting stops past `limit`. A walk with its own stack, so a
    schema nested thousands deep costs no Python recursion."""
    count, stack = 0, [value]
    while stack and count <= limit:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        else:
            continue
        count += 1
    return count


def lark_grammar(text: str) -> str:
    return llguidance.LLMatcher.grammar_from_lark(text)


class Constraints:
    """One model's grammar compiler: its vocabulary as llguidance sees it and the cache of compiled matchers.
    Safe to call from several threads (AsyncEngine compiles off the event loop, the worker thread steps)."""

    def __init__(self, tokenizer: Tokenizer, chat_format: ChatFormat, end_ids: Iterable[int]) -> None:
        self.tokenizer = tokenizer
        self.chat_format = chat_format
        self.end_ids = tuple(sorted(set(end_ids)))
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()
        self.compiled = 0  # cache misses, for the tests and benchmarks

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        return ll_tokenizer(self.tokenizer, self.end_ids)

    def compile(self, grammar: str, field: str) -> llguidance.LLMatcher:
        """A fresh matcher for `grammar` (an llguidance grammar: `schema_grammar` / `lark_grammar`), from the
        cache when it was compiled before. Raises InvalidConstraintError naming `field`."""
        with self._lock:
            template = self._cache.get(grammar)
            if template is not None:
                self._cache.move_to_end(grammar)
                return template.deep_copy()
        # compiled outside the lock: llguidance drops the GIL while it builds, so others keep going
        template = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0, limits=_LIMITS)
        if template.is_error():
            raise InvalidConstraintError(template.get_error().strip(), field)
        with self._lock:
            self.compiled += 1
            self._cache[grammar] = template
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return template.deep_copy()

    def matcher_for(self, *, tools: list[dict] | None = None, tool_choice: str | dict | None = None,
                    response_format: dict | None = None, parallel: bool = True) -> llguidance.LLMatcher | None:
        """The matcher a request with these fields decodes under, or None for free text (see the module
        docstring for which one wins). `parallel=False`: at most one tool call."""
        if tools and tool_choice != "none":
            for i, tool in enumerate(tools):  # each one's size, before a format embeds them in one grammar
                if count_nodes(tool, MAX_SCHEMA_NODES) > MAX_SCHEMA_NODES:
                    raise InvalidConstraintError(f"tool too large: more than {MAX_SCHEMA_NODES} objects and "
                                                 "arrays", f"tools[{i}].function.parameters")
            try:
                text = self.chat_format.tool_grammar(tools, tool_choice, parallel=parallel)
            except (KeyError, TypeError, ValueError) as exc:  # a tool the format cannot read
                raise InvalidConstraintError(f"cannot build the tool-call grammar: {exc}", "tools") from None
            if text is not None:
                try:
                    return self.compile(lark_grammar(text), "tools")
                except InvalidConstraintError as exc:
                    raise self._blame_tool(tools, exc) from None
        if response_format is None:
            return None
        kind = response_format.get("type")
        if kind in (None, "text"):
            return None
        if kind == "json_object":
            return self.compile(schema_grammar({"type": "object"}, strict=False, field=SCHEMA_FIELD),
                                "response_format")
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or "schema" not in spec:
                raise InvalidConstraintError("json_schema needs a schema", "response_format.json_schema")
            grammar = schema_grammar(spec["schema"], strict=bool(spec.get("strict")), field=SCHEMA_FIELD)
            return self.compile(grammar, SCHEMA_FIELD)
        raise InvalidConstraintError(f"unknown response_format type {kind!r}", "response_format.type")

    def _blame_tool(self, tools: list[dict], error: InvalidConstraintError) -> InvalidConstraintError:
        """The whole tool grammar failed: compile each tool's parameters alone to name the one at fault."""
        for i, tool in enumerate(tools):
            function = tool.get("function") if isinstance(tool, dict) else None
            field = f"tools[{i}].function.parameters"
            parameters = function.get("parameters", {"type": "object"}) if isinstance(function, dict) else None
            try:
                self.compile(schema_grammar(parameters, strict=False, field=field), field)
            except InvalidConstraintError as exc:
                return InvalidConstraintError(str(exc), field)
        return error

