"""Chat prompts: the base `ChatFormat`, a model's own Jinja chat template, and a plain fallback.

A chat template ships inside the model file, so it is untrusted code: it runs in Jinja's immutable sandbox,
and its output and the sizes of strings it builds are capped. Everything it raises comes out as
`ChatTemplateError`, a `ValueError` the API can turn into a 400.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from glmstack.engine.errors import EngineError
from glmstack.engine.tokenizer import Tokenizer

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
        self, tokenizer: Tokenizer, template: str | None = None, *, max_output_chars: int = MAX_OUTPUT_CHARS
    ) -> None:
        super().__init__(tokenizer)
        source = template if template is not None else tokenizer.chat_template
        if not source:
            raise ChatTemplateError("the tokenizer has no chat template")
        self.source = source
        self.max_output_chars = max_output_chars
        self._env = _TemplateEnvironment(max_output_chars)
        try:
            self._template = self._env.from_string(source)
            self._supports_tools = "tools" in jinja2.meta.find_undeclared_variables(self._env.parse(source))
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"invalid chat template: {exc}") from exc
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
        pieces: list[str] = []
        size = 0
        try:
            # Rendered piece by piece so a runaway loop stops at the cap instead of filling memory.
            for piece in self._template.generate(**context):
                size += len(piece)
                if size > self.max_output_chars:
                    raise ChatTemplateError(
                        f"chat template output exceeds {self.max_output_chars} characters"
                    )
                pieces.append(piece)
        except ChatTemplateError:
            raise
        except jinja2.exceptions.SecurityError as exc:
            raise ChatTemplateError(f"chat template tried a blocked operation: {exc}") from exc
        except Exception as exc:  # anything else the template code raised (TypeError, UndefinedError, ...)
            raise ChatTemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from exc
        return "".join(pieces)

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
    """The sandbox HF renders chat templates in, plus a cap on the strings and lists `*` can build (the
    sandbox already caps `range`), which would otherwise allocate before the output cap could see them."""

    intercepted_binops = frozenset(["*", "**"])

    def __init__(self, max_output_chars: int) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        self.max_output_chars = max_output_chars
        self.filters["tojson"] = _tojson
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = _strftime_now

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        # The sandbox would hand back an Undefined that only fails when used, so `{{ x.__class__ }}` renders
        # as "". Fail at once instead: no real chat template reaches for Python internals.
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} is unsafe"
        )

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            sized, count = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(sized, str | list | tuple) and isinstance(count, int):
                if len(sized) * count > self.max_output_chars:
                    raise ChatTemplateError("chat template builds a value larger than the output cap")
        if operator == "**" and isinstance(right, int) and abs(right) > 1024:
            raise ChatTemplateError("chat template computes an oversized power")
        return super().call_binop(context, operator, left, right)


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
