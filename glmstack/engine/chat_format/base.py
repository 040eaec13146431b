"""What every prompt family implements: `ChatFormat` (messages -> prompt token ids and stop ids), the
`ChatPrompt` it returns, and the error a render raises."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from glmstack.engine.errors import EngineError
from glmstack.engine.tokenization.base import Tokenizer


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
    # `model.chat(..., history=[])` answers with [{"role", "content"}, ...] (ChatGLM3's own chat does) rather
    # than ChatGLM-6B's [(query, response)]
    dict_history: bool = False

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


