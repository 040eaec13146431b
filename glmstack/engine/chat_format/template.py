"""A model's own Jinja chat template as a `ChatFormat`, and a plain fallback for models without one.

A chat template ships inside the model file, so it is untrusted code: it runs in Jinja's immutable sandbox,
with a time limit, and its output and the sizes of the values it builds are capped. A template only ever
comes from the model's files (or the code), never from a request. Everything it raises comes out as
`ChatTemplateError`, a `ValueError` the API can turn into a 400.

Tools and thinking, read off the template's source:
- the tool dialect (how replies write calls) is GLM-4's `name\n{json}` when the template writes GLM-4's tools
  block, GLM-4.5's `<arg_key>`/`<arg_value>` when it writes those, else Hermes `<tool_call>{json}</tool_call>`
  (`dialect_for_template`);
- a template that reads `tools` gets them as a variable (OpenAI shape) and the history in the dialect's shape
  (`ToolDialect.template_messages`); one that does not gets them folded into its messages the Hermes way
  (hermes.py: a "# Tools" system block, `<tool_call>` blocks in assistant content, `<tool_response>` results);
- thinking: `enable_thinking` is passed when the request says True/False (left undefined otherwise); a template
  that mentions `<think>` or `enable_thinking` has its replies split into reasoning and the rest (thinking.py),
  starting inside the reasoning when its generation prompt ends with `<think>` (GLM-Z1). Assistant
  `reasoning_content` reaches only templates that read it.
"""

from __future__ import annotations

import re
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta

from glmstack.engine.chat_format.base import (
    ChatFormat,
    ChatPrompt,
    ChatTemplateError,
    ContentOnly,
    ReplyParser,
    ToolDialect,
)
from glmstack.engine.chat_format.hermes import HermesDialect, hermes_messages
from glmstack.engine.chat_format.jinja_sandbox import (
    MAX_OUTPUT_CHARS,
    MAX_RENDER_SECONDS,
    TemplateEnvironment,
    render_budget,
)
from glmstack.engine.chat_format.thinking import THINK_END, THINK_START, ThinkingSplitter
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

# Tags a reply parser must see as text. Where a tokenizer has them as special tokens, decoding with special
# tokens skipped would drop them, so they are the format's `reply_tokens` (and grammars reference them as tokens).
REPLY_TAGS = (
    "<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
    "</arg_value>", "<tool_response>",
)
# A probe message for what a template does with a role or a generation prompt.
_PROBE = "\x00glmstack-probe\x00"

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
        self.reply_tokens = special_tags(tokenizer)
        self.dialect = dialect_for_template(source, self.reply_tokens)
        self.supports_thinking = THINK_START in source or "enable_thinking" in source
        self._reads_reasoning = "reasoning_content" in source
        self._tool_role: bool | None = None  # whether the template renders a `tool` message (probed once)
        self._starts_inside: dict[bool | None, bool] = {}  # generation prompt ends inside `<think>`, per switch

    def render(
        self, messages: list[dict], *, tools: list[dict] | None = None, add_generation_prompt: bool = True,
        thinking: bool | None = None,
    ) -> ChatPrompt:
        text = self.render_text(
            self.template_messages(messages, tools),
            tools=tools if self._supports_tools else None,
            add_generation_prompt=add_generation_prompt,
            thinking=thinking,
        )
        # The template pastes message content in as text, and the whole prompt is encoded with special tokens
        # allowed -- so a user who types "<|im_end|>" gets the real control token. HF's apply_chat_template does
        # the same; keeping user text apart would mean rendering every template with placeholders. Engine
        # callers that care can reject such text before rendering.
        ids = self.tokenizer.encode(text, add_special_tokens=False, allow_special=True)
        return ChatPrompt(token_ids=ids, text=text, stop_token_ids=set(self.stop_token_ids))

    def template_messages(self, messages: list[dict], tools: list[dict] | None) -> list[dict]:
        """The conversation as this template is given it: tools and tool turns in the dialect's shape (or
        folded in the Hermes way for a template without tools), reasoning kept only if the template reads it."""
        if not self._reads_reasoning and any("reasoning_content" in message for message in messages):
            messages = [{k: v for k, v in message.items() if k != "reasoning_content"} for message in messages]
        if self._supports_tools:
            return self.dialect.template_messages(messages, tools)
        if tools or any(message.get("role") == "tool" or message.get("tool_calls") for message in messages):
            return hermes_messages(messages, tools, tool_role=self._renders_tool_role())
        return messages

    def reply_parser(self, *, tools: list[dict] | None = None, thinking: bool | None = None) -> ReplyParser:
        inner = self.dialect.reply_parser(tools) if tools else ContentOnly()
        if not self.supports_thinking:
            return inner
        return ThinkingSplitter(inner, starts_inside=self.starts_inside_thinking(thinking))

    def tool_grammar(self, tools: list[dict], tool_choice: str | dict | None, *,
                     parallel: bool = True) -> str | None:
        grammar = self.dialect.tool_grammar(tools, tool_choice, parallel=parallel)
        # a dialect whose grammar already makes room for reasoning (GLM-4.5's) is left as it is
        if grammar is None or not self.supports_thinking or THINK_START in grammar:
            return grammar
        return with_reasoning(grammar, self.reply_tokens, starts_inside=self.starts_inside_thinking(None))

    def starts_inside_thinking(self, thinking: bool | None) -> bool:
        """Whether the generation prompt (with this `thinking` switch) leaves the reply inside `<think>`."""
        if thinking not in self._starts_inside:
            try:
                text = self.render_text([{"role": "user", "content": _PROBE}], thinking=thinking)
            except ChatTemplateError:
                text = ""
            self._starts_inside[thinking] = text.rstrip().endswith(THINK_START)
        return self._starts_inside[thinking]

    def _renders_tool_role(self) -> bool:
        """Whether the template writes a `tool` message it is given (templates that paste any role do; others
        raise or drop it): the probe's text and the role's name must both come out."""
        if self._tool_role is None:
            messages = [{"role": "user", "content": "?"}, {"role": "tool", "content": _PROBE}]
            try:
                text = self.render_text(messages, add_generation_prompt=False)
            except ChatTemplateError:
                text = ""
            self._tool_role = _PROBE in text and "tool" in text.replace(_PROBE, "")
        return self._tool_role

    def render_text(
        self, messages: list[dict], *, tools: list[dict] | None = None, add_generation_prompt: bool = True,
        thinking: bool | None = None,
    ) -> str:
        context: dict[str, Any] = {
            "messages": messages,
            "tools": tools,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self._token_text(self.tokenizer.bos_token_id),
            "eos_token": self._token_text(self.tokenizer.eos_token_id),
            "pad_token": self._token_text(self.tokenizer.pad_token_id),
        }
        if thinking is not None:  # absent, the template's own default applies (`enable_thinking is defined`)
            context["enable_thinking"] = thinking
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


def special_tags(tokenizer: Tokenizer) -> frozenset[str]:
    """The `REPLY_TAGS` this tokenizer has as added/control tokens. Those are the ones decoding may drop, and
    llguidance treats every added token, `"special": false` ones included (Qwen2.5's `<tool_call>`), as a
    special token that a grammar must reference as `<tag>` rather than spell as text."""
    special = getattr(tokenizer, "special_tokens", None) or {}
    return frozenset(tag for tag in REPLY_TAGS if tag in special)


def dialect_for_template(source: str, special_tokens: frozenset[str] = frozenset()) -> ToolDialect:
    """The tool dialect a template's model writes, read off the template text. The GLM dialects are imported
    here, when a GLM template asks for them, so the Hermes path does not depend on them."""
    if "<arg_key>" in source:
        from glmstack.engine.chat_format.glm45 import GLM45Dialect

        # its tags are special tokens in GLM-4.5's tokenizer; spelled out for a vocabulary without them
        return GLM45Dialect(special_tags="<tool_call>" in special_tokens)
    if "在调用上述函数时" in source or ("<|observation|>" in source and "metadata" in source):
        from glmstack.engine.chat_format.glm4 import GLM4Dialect

        return GLM4Dialect()
    return HermesDialect(special_tokens)


def with_reasoning(grammar: str, special_tokens: frozenset[str], *, starts_inside: bool) -> str:
    """A reply grammar with room for `<think>...</think>` reasoning first: required when the prompt ends inside
    it, optional otherwise; then whitespace, then the reply as `grammar` (its `start` renamed). Tags that are
    special tokens are referenced as tokens; spelled-out ones end one lazy lexeme, like Hermes' `<tool_call>`.
    The whitespace is a rule over single characters, not one greedy lexeme: that would eat the newline that
    GLM-4's answer alternative starts with."""
    reply = re.sub(r"^start:", "think_reply:", grammar, count=1, flags=re.MULTILINE)
    if THINK_END in special_tokens:
        thought = f"THINK_TEXT {THINK_END}"
        lines = ["THINK_TEXT: /(?s:.*)/"]
    else:
        thought = "think_text_end"
        lines = [r"think_text_end[lazy]: /(?s:.*)<\/think>/"]  # `/` escaped inside a Lark regex
    opening = THINK_START if THINK_START in special_tokens else f'"{THINK_START}"'
    if starts_inside:
        lines.insert(0, f"start: {thought} think_gap think_reply")
    else:
        lines.insert(0, f"start: think_reply | {opening} {thought} think_gap think_reply")
    lines += ["think_gap: THINK_SPACE*", r"THINK_SPACE: /[ \t\r\n]/"]
    return reply + "\n".join(lines) + "\n"


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


