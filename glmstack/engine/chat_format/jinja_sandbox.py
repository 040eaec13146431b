"""The Jinja sandbox a model's chat template renders in.

A chat template ships inside the model file, so it is untrusted code: it runs in Jinja's immutable sandbox,
with a time limit (`render_budget`), and its output and the sizes of the values it builds are capped.
Everything it raises comes out as `ChatTemplateError`.
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from glmstack.engine.chat_format.base import ChatTemplateError

MAX_OUTPUT_CHARS = 4_000_000  # far above any real prompt, well below what would hurt the server


MAX_RENDER_SECONDS = 2.0  # real templates render in well under a millisecond


class TemplateEnvironment(ImmutableSandboxedEnvironment):
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


@contextmanager
def render_budget(seconds: float, max_chars: int) -> Iterator[None]:
    """The time and output budget of one render, for the guards above (per thread and task)."""
    token = _BUDGET.set(_Budget(time.monotonic() + seconds, max_chars))
    try:
        yield
    finally:
        _BUDGET.reset(token)
