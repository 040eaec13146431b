"""A model's own Jinja chat template as a `ChatFormat`, and a plain fallback for models without one.

A chat template ships inside the model file, so it is untrusted code: it runs in Jinja's immutable sandbox,
with a time limit, and its output and the sizes of the values it builds are capped. A template only ever
comes from the model's files (or the code), never from a request. Everything it raises comes out as
`ChatTemplateError`, a `ValueError` the API can turn into a 400.
"""

from __future__ import annotations

from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta

from glmstack.engine.chat_format.base import ChatFormat, ChatPrompt, ChatTemplateError
from glmstack.engine.chat_format.jinja_sandbox import (
    MAX_OUTPUT_CHARS,
    MAX_RENDER_SECONDS,
    TemplateEnvironment,
    render_budget,
)
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

# The largest published chat templates are ~20k characters; compiling one costs ~30 ms per 1k characters.
MAX_TEMPLATE_CHARS = 64 * 1024


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
        self._env = TemplateEnvironment(max_output_chars)
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
        self, messages: list[dict], *, tools: list[dict] | None = None, add_generation_prompt: bool = True,
        thinking: bool | None = None,
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
        with render_budget(self.max_render_seconds, self.max_output_chars):
            try:
                return "".join(self._template.generate(**context))
            except ChatTemplateError:
                raise
            except jinja2.exceptions.SecurityError as exc:
                raise ChatTemplateError(f"chat template tried a blocked operation: {exc}") from exc
            except Exception as exc:  # anything else the template code raised (TypeError, UndefinedError, ...)
                raise ChatTemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from exc

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
        self, messages: list[dict], *, tools: list[dict] | None = None, add_generation_prompt: bool = True,
        thinking: bool | None = None,
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


