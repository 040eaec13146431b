"""What every prompt family implements: `ChatFormat` (messages -> prompt token ids and stop ids; the reply
back -> content, reasoning and tool calls; the grammar a tool call must follow), the `ChatPrompt` it returns,
and the error a render raises."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from glmstack.engine.errors import EngineError
from glmstack.engine.tokenization.base import Tokenizer
from glmstack.protocol import ToolCallDelta


class ChatTemplateError(EngineError, ValueError):
    """The chat template could not be rendered: a template bug, unsupported input, or a blocked operation."""


@dataclass
class ChatPrompt:
    token_ids: list[int]
    text: str | None  # the rendered prompt, when there is one as text
    stop_token_ids: set[int] = field(default_factory=set)


@dataclass
class ReplyDelta:
    """What a piece of reply text turned out to be."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


class ReplyParser(ABC):
    """Splits a reply, streamed as text, into content, reasoning and tool calls the way one prompt family
    writes them. Text that may still turn out to be part of a call (or of a `<think>` tag) is held back until
    it is decided; `finish()` flushes the rest when the reply ends."""

    calls: int = 0  # tool calls begun so far: a reply with any ends with finish_reason "tool_calls"

    @abstractmethod
    def push(self, text: str) -> ReplyDelta: ...

    @abstractmethod
    def finish(self) -> ReplyDelta: ...


class ContentOnly(ReplyParser):
    """A reply that is all content (no tools offered, no thinking)."""

    def push(self, text: str) -> ReplyDelta:
        return ReplyDelta(content=text)

    def finish(self) -> ReplyDelta:
        return ReplyDelta()


class ToolDialect(ABC):
    """How one family writes tool calls in a reply, apart from how its prompts are rendered, so that a
    model's own Jinja template (`TemplateChatFormat`) and a built-in format share it: GLM-4's
    `name\n{json}` (glm4.py), ChatGLM3's `tool_call(...)` (chatglm3.py), GLM-4.5's `<tool_call>` with
    `<arg_key>`/`<arg_value>` (glm45.py), Hermes-style `<tool_call>{json}</tool_call>` (hermes.py)."""

    name: str

    @abstractmethod
    def reply_parser(self, tools: list[dict]) -> ReplyParser: ...

    @abstractmethod
    def tool_grammar(self, tools: list[dict], tool_choice: str | dict | None, *,
                     parallel: bool = True) -> str | None: ...

    def template_messages(self, messages: list[dict], tools: list[dict] | None) -> list[dict]:
        """OpenAI-shaped messages (assistant `tool_calls`, `tool` results) in the shape this family's Jinja
        templates read them. Identity for templates that read the OpenAI shape themselves."""
        return messages


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

    # whether replies may open with `<think>...</think>` reasoning (GLM-Z1, GLM-4.5+, templates that do)
    supports_thinking: bool = False
    # special tokens whose text the reply parser must see (decoded, not skipped): GLM-4.5's `<tool_call>`,
    # `<arg_key>`, `<think>`, ... where its tokenizer marks them special
    reply_tokens: frozenset[str] = frozenset()

    @abstractmethod
    def render(
        self, messages: list[dict], *, tools: list[dict] | None = None, add_generation_prompt: bool = True,
        thinking: bool | None = None,
    ) -> ChatPrompt:
        """`thinking`: False asks a thinking model not to think (its template's switch), None leaves its default;
        formats without thinking ignore it."""

    def reply_parser(self, *, tools: list[dict] | None = None, thinking: bool | None = None) -> ReplyParser:
        """A parser for one reply to a prompt rendered with `tools`."""
        return ContentOnly()

    def tool_grammar(self, tools: list[dict], tool_choice: str | dict | None, *,
                     parallel: bool = True) -> str | None:
        """The whole reply as an llguidance Lark grammar when `tools` are offered: free text or a call in this
        family's syntax whose arguments follow the function's `parameters` schema ("auto"), a call to any
        tool ("required"), a call to the named one ({"type": "function", ...}). `parallel=False` (OpenAI's
        `parallel_tool_calls`): at most one call, where the syntax allows several. None: no constraint."""
        return None


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


