"""Chat prompts: the base `ChatFormat`, a model's own Jinja chat template, and a plain fallback.

A chat template ships inside the model file, so it is untrusted code: it runs in Jinja's immutable sandbox,
with a time limit, and its output and the sizes of the values it builds are capped. A template only ever
comes from the model's files (or the code), never from a request. Everything it raises comes out as
`ChatTemplateError`, a `ValueError` the API can turn into a 400.
"""

from __future__ import annotations

import functools
import json
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from glmstack.engine.errors import EngineError
from glmstack.engine.tokenization.base import Tokenizer

# Tokens that end a turn in the common template families. A format stops on the ones its vocabulary has
# and its template writes, plus eos.
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<end_of_turn>",
    "</s>",
)

MAX_OUTPUT_CHARS = 4_000_000  # far above any real prompt, well below what would hurt the server
MAX_RENDER_SECONDS = 2.0  # real templates render in well under a millisecond
# The largest published chat templates are ~20k characters; compiling one costs ~30 ms per 1k characters.
MAX_TEMPLATE_CHARS = 64 * 1024


class ChatTemplateError(EngineError, ValueError):
    """The chat template could not be rendered: a template bug, unsupported input, or a blocked operation."""


@dataclass
class ChatPrompt:
    token_ids: list[int]
    text: str | None  # the rendered prompt, when there is one as text
    stop_token_ids: set[int] = field(default_factory=set)


class ChatFormat(ABC):
    """Turns a conversation into prompt ids and says what ends the model's answer. One subclass per
    prompt family."""

    name: str
    stop_token_ids: set[int]
    stop_strings: list[str]

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.stop_token_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        self.stop_strings = []

    @abstractmethod
    def render(
        self, messages: list[dict], *, tools: list[dict] | None = None, add_generation_prompt: bool = True
    ) -> ChatPrompt: ...


def message_text(message: dict) -> str:
    """A message's content as one string: None is "", a list of OpenAI content parts is its text parts joined.
    For formats that build prompts in code; Jinja templates get the message as it is."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(part, dict) and part.get("type") == "text" for part in content
    ):
        return "".join(str(part.get("text", "")) for part in content)
    raise ChatTemplateError("message content must be a string or a list of text parts")


class TemplateChatFormat(ChatFormat):
    """The Jinja chat template that came with the model (`tokenizer.chat_template`), rendered like HF's
    `apply_chat_template`."""

    name = "template"

    def __init__(
        self,
        tokenizer: Tokenizer,
        template: str | None = None,
        *,
        max_output_chars: int = MAX_OUTPUT_CHARS,
        max_render_seconds: float = MAX_RENDER_SECONDS,
    ) -> None:
        super().__init__(tokenizer)
        source = template if template is not None else tokenizer.chat_template
        if not source:
            raise ChatTemplateError("the tokenizer has no chat template")
        if len(source) > MAX_TEMPLATE_CHARS:
            raise ChatTemplateError(
                f"chat template is {len(source)} characters, over the {MAX_TEMPLATE_CHARS} limit"
            )
        self.source = source
        self.max_output_chars = max_output_chars
        self.max_render_seconds = max_render_seconds
        self._env = _TemplateEnvironment(max_output_chars)
        try:
            self._template = self._env.from_string(source)
            self._supports_tools = "tools" in jinja2.meta.find_undeclared_variables(self._env.parse(source))
        except (jinja2.TemplateError, RecursionError) as exc:
            problem = "nested too deeply" if isinstance(exc, RecursionError) else exc
            raise ChatTemplateError(f"invalid chat template: {problem}") from exc
        for token in END_OF_TURN_TOKENS:
            token_id = tokenizer.token_to_id(token)
            if token_id is not None and token in source:
                self.stop_token_ids.add(token_id)

    def render(
        self, messages: list[dict], *, tools: list[dict] | None = None, add_generation_prompt: bool = True
    ) -> ChatPrompt:
        if tools and not self._supports_tools:
            raise ChatTemplateError("this model's chat template does not support tools")
        text = self.render_text(messages, tools=tools, add_generation_prompt=add_generation_prompt)
        # The template pastes message content in as text, and the whole prompt is encoded with special tokens
        # allowed -- so a user who types "<|im_end|>" gets the real control token. HF's apply_chat_template does
        # the same; keeping user text apart would mean rendering every template with placeholders. Engine
        # callers that care can reject such text before rendering.
        ids = self.tokenizer.encode(text, add_special_tokens=False, allow_special=True)
        return ChatPrompt(token_ids=ids, text=text, stop_token_ids=set(self.stop_token_ids))

    def render_text(
        self, messages: list[dict], *, tools: list[dict] | None = None, add_generation_prompt: bool = True
    ) -> str:
        context: dict[str, Any] = {
            "messages": messages,
            "tools": tools,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self._token_text(self.tokenizer.bos_token_id),
            "eos_token": self._token_text(self.tokenizer.eos_token_id),
            "pad_token": self._token_text(self.tokenizer.pad_token_id),
        }
        budget = _BUDGET.set(_Budget(time.monotonic() + self.max_render_seconds, self.max_output_chars))
        try:
            return "".join(self._template.generate(**context))
        except ChatTemplateError:
            raise
        except jinja2.exceptions.SecurityError as exc:
            raise ChatTemplateError(f"chat template tried a blocked operation: {exc}") from exc
        except Exception as exc:  # anything else the template code raised (TypeError, UndefinedError, ...)
            raise ChatTemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from exc
        finally:
            _BUDGET.reset(budget)

    def _token_text(self, token_id: int | None) -> str:
        token = self.tokenizer.id_to_token(token_id) if token_id is not None else None
        return token or ""


class PlainChatFormat(ChatFormat):
    """For models without a chat template: "User: ...\\nAssistant: ..." lines. A base model continues this
    reasonably, but it is a guess, not the format the model was tuned on."""

    name = "plain"

    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__(tokenizer)
        self.stop_strings = ["\nUser:"]

    def render(
        self, messages: list[dict], *, tools: list[dict] | None = None, add_generation_prompt: bool = True
    ) -> ChatPrompt:
        if tools:
            raise ChatTemplateError("the plain chat format does not support tools")
        lines = []
        for message in messages:
            role = str(message.get("role", "user"))
            lines.append(f"{role.capitalize()}: {message.get('content') or ''}\n")
        if add_generation_prompt:
            lines.append("Assistant:")
        text = "".join(lines)
        # No template wrote special tokens here, so nothing in the text may become one.
        ids = self.tokenizer.encode(text, add_special_tokens=True, allow_special=False)
        return ChatPrompt(token_ids=ids, text=text, stop_token_ids=set(self.stop_token_ids))


def chat_format_for(tokenizer: Tokenizer) -> ChatFormat:
    """The model's own template when it has one, else the plain fallback."""
    if tokenizer.chat_template:
        return TemplateChatFormat(tokenizer)
    return PlainChatFormat(tokenizer)


class _TemplateEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox HF renders chat templates in, plus limits, each checked before the work it guards:

    - time: every `for` item and every call checks the render's deadline, so nested loops stop in time;
    - output: everything written, top level or into a macro or `{% set %}` block, counts against the cap;
    - size: no operator, `~`, filter or call may build a string or list larger than the cap, and no integer
      argument may exceed it (`center(10**9)`, `batch(10**9)`, `tojson(indent=10**9)`), since those would
      allocate before any output is written. (The sandbox itself caps `range`.)
    """

    intercepted_binops = frozenset(["*", "**", "+", "%"])

    def __init__(self, max_output_chars: int) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        self.max_output_chars = max_output_chars
        self.filters["tojson"] = _tojson
        self.filters = {name: self._sized_filter(name, f) for name, f in self.filters.items()}
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = _strftime_now
        # Text generators no chat template uses, which could run long on a large input in one call.
        del self.globals["lipsum"], self.filters["wordwrap"], self.filters["urlize"]

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        # Route every output, loop and `~` through a guard (see the class docstring).
        tree = super()._parse(source, name, filename)
        for output in list(tree.find_all(nodes.Output)):
            output.nodes = [self._guard_call("guard_output", node, node.lineno) for node in output.nodes]
        for loop in list(tree.find_all(nodes.For)):
            loop.iter = self._guard_call("guard_loop", loop.iter, loop.lineno)
        for concat in list(tree.find_all(nodes.Concat)):
            concat.nodes = [
                self._guard_call("guard_concat", nodes.Tuple(concat.nodes, "load"), concat.lineno)
            ]
        return tree

    def _guard_call(self, guard: str, arg: nodes.Expr, lineno: int) -> nodes.Call:
        call = nodes.Call(nodes.EnvironmentAttribute(guard), [arg], [], None, None)
        return call.set_lineno(lineno).set_environment(self)

    def guard_loop(self, iterable: Any) -> Iterator[Any]:
        for item in iterable:
            _check_time()
            yield item

    def guard_output(self, value: Any) -> Any:
        budget = _BUDGET.get()
        if budget is not None:
            budget.chars_left -= len(str(value))
            if budget.chars_left < 0:
                raise ChatTemplateError(f"chat template output exceeds {self.max_output_chars} characters")
        return value

    def guard_concat(self, parts: tuple[Any, ...]) -> str:
        texts = [str(part) for part in parts]
        self._check_size(sum(map(len, texts)))
        return "".join(texts)

    def call(self, context: jinja2.runtime.Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        _check_time()
        if getattr(obj, "__self__", None) is self:  # one of the guards above, written in by _parse
            return context.call(obj, *args, **kwargs)
        self._check_arguments(args, kwargs)
        method = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format
        owner = getattr(method, "__self__", None)
        if isinstance(owner, str):
            name = getattr(method, "__name__", "")
            if name in ("format", "format_map"):
                self._check_format(owner, args)
            elif name == "replace" and len(args) >= 2:
                self._check_size(_replaced_size(owner, *args[:3]))
            elif name == "join" and args:
                self._check_size(_joined_size(owner, args[0]))
        return super().call(context, obj, *args, **kwargs)

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            sized, count = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(sized, str | list | tuple) and isinstance(count, int):
                self._check_size(_size(sized) * count)
        elif (
            operator == "+" and isinstance(left, str | list | tuple) and isinstance(right, str | list | tuple)
        ):
            self._check_size(_size(left) + _size(right))
        elif operator == "%" and isinstance(left, str):
            self._check_format(left, right if isinstance(right, tuple) else (right,))
        elif operator == "**" and isinstance(right, int) and abs(right) > 1024:
            raise ChatTemplateError("chat template computes an oversized power")
        return super().call_binop(context, operator, left, right)

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        # The sandbox would hand back an Undefined that only fails when used, so `{{ x.__class__ }}` renders
        # as "". Fail at once instead: no real chat template reaches for Python internals.
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} is unsafe"
        )

    def _sized_filter(self, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        skip = 2 if getattr(func, "jinja_pass_arg", None) else 1  # context/environment first, then the value

        @functools.wraps(func)  # keeps jinja_pass_arg
        def sized(*args: Any, **kwargs: Any) -> Any:
            self._check_arguments(args[skip:], kwargs)
            value, params = (args[skip - 1], args[skip:]) if len(args) >= skip else (None, ())
            if name == "replace" and len(params) >= 2:
                self._check_size(_replaced_size(str(value), *params[:3]))
            elif name == "join":
                self._check_size(_joined_size(str(params[0]) if params else "", value))
            elif name == "format":
                self._check_format(str(value), params)
            elif name == "indent":
                text, width = str(value), params[0] if params else kwargs.get("width", 4)
                pad = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
                self._check_size(len(text) + (text.count("\n") + 1) * pad)
            return func(*args, **kwargs)

        return sized

    def _check_arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        for value in (*args, *kwargs.values()):
            if isinstance(value, int) and abs(value) > self.max_output_chars:
                raise ChatTemplateError(
                    f"chat template passes an integer over the {self.max_output_chars} cap"
                )

    def _check_format(self, text: str, args: Any) -> None:
        # A width or precision is written in the format ("%999999999d", "{:>999999999}") or passed by "*".
        widths = [int(d) for d in re.findall(r"\d+", text)]
        self._check_arguments((*widths, *(args if "*" in text else ())), {})

    def _check_size(self, size: int) -> None:
        if size > self.max_output_chars:
            raise ChatTemplateError("chat template builds a value larger than the output cap")


@dataclass
class _Budget:
    """What one render may still spend. Each render sets its own, so renders on other threads don't share."""

    deadline: float  # time.monotonic()
    chars_left: int


_BUDGET: ContextVar[_Budget | None] = ContextVar("chat_template_budget", default=None)


def _check_time() -> None:
    budget = _BUDGET.get()
    if budget is not None and time.monotonic() > budget.deadline:
        raise ChatTemplateError("chat template ran past its time limit")


def _size(value: Any) -> int:
    """Characters or items, counting the strings and lists inside a list (one level) at their length."""
    if isinstance(value, str):
        return len(value)
    return len(value) + sum(len(v) for v in value if isinstance(v, str | list | tuple))


def _replaced_size(text: str, old: Any, new: Any, count: Any = -1) -> int:
    if not isinstance(old, str) or not isinstance(new, str):
        return len(text)
    hits = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(text) + hits * (len(new) - len(old))


def _joined_size(separator: str, items: Any) -> int:
    if not isinstance(items, list | tuple):
        return 0  # a generator or mapping is bounded by what built it
    return sum(len(str(item)) for item in items) + len(separator) * max(len(items) - 1, 0)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; templates expect plain JSON with non-ASCII kept as is.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)
