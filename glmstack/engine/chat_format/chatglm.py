"""ChatGLM-6B and ChatGLM2-6B prompts: numbered question/answer rounds in plain text (spec 1.7, 2.7).

    ChatGLM-6B:  [Round 0]\\n问：{q0}\\n答：{r0}\\n ... [Round n]\\n问：{query}\\n答：   then [gMASK] <sop>
                 (a first question alone is just "{query}", no round markers)
    ChatGLM2-6B: [gMASK] sop  [Round 1]\\n\\n问：{q1}\\n\\n答：{r1}\\n\\n ... [Round n]\\n\\n问：{query}\\n\\n答：

`：` is the full-width colon. The whole prompt is one piece of text encoded with special tokens off, so
nothing a user types becomes a control token; the GLM marks are added by id. Neither model has a system
prompt, roles beyond question/answer, or tools: system messages are left out (logged), tools are an
error. The answer cue `答：` belongs to the round, so `add_generation_prompt` changes nothing here.
"""

from __future__ import annotations

import logging
from abc import abstractmethod

from glmstack.engine.chat_format.base import ChatFormat, ChatPrompt, ChatTemplateError, message_text
from glmstack.engine.tokenization.base import Tokenizer

log = logging.getLogger(__name__)


def question_answer_rounds(messages: list[dict], name: str) -> tuple[list[tuple[str, str]], str | None]:
    """Alternating user/assistant messages as (question, answer) pairs, plus the unanswered question at the
    end (None when the last message is an answer). System messages are dropped."""
    rounds: list[tuple[str, str]] = []
    question: str | None = None
    dropped_system = False
    for message in messages:
        role = message.get("role")
        if role == "system":
            dropped_system = True
        elif role == "user":
            if question is not None:
                raise ChatTemplateError(
                    f"{name} needs user and assistant messages in turn (two user messages)"
                )
            question = message_text(message)
        elif role == "assistant":
            if question is None:
                raise ChatTemplateError(f"{name} needs each assistant message to answer a user message")
            rounds.append((question, message_text(message)))
            question = None
        else:
            raise ChatTemplateError(f"{name} has no {role!r} role (only user and assistant)")
    if dropped_system:
        log.info("%s has no system prompt; the system message was left out", name)
    return rounds, question


class _RoundsChatFormat(ChatFormat):
    """What ChatGLM-6B and ChatGLM2 share: rounds of text, GLM marks added by id, no tools."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__(tokenizer)
        self.gmask_id = require_token(tokenizer, "[gMASK]")

    def render(
        self, messages: list[dict], *, tools: list[dict] | None = None, add_generation_prompt: bool = True,
        thinking: bool | None = None,
    ) -> ChatPrompt:
        if tools:
            raise ChatTemplateError(f"{self.name} does not support tools")
        rounds, question = question_answer_rounds(messages, self.name)
        text = self.prompt_text(rounds, question)
        ids = self.prompt_ids(self.tokenizer.encode(text, add_special_tokens=False, allow_special=False))
        return ChatPrompt(token_ids=ids, text=text, stop_token_ids=set(self.stop_token_ids))

    @abstractmethod
    def prompt_text(self, rounds: list[tuple[str, str]], question: str | None) -> str: ...

    @abstractmethod
    def prompt_ids(self, text_ids: list[int]) -> list[int]:
        """The encoded prompt text with the GLM marks around it."""


class ChatGLM6BChatFormat(_RoundsChatFormat):
    """ChatGLM-6B (v1), `model.chat` in its modeling_chatglm.py. Stops on `<eop>`."""

    name = "chatglm-6b"

    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__(tokenizer)
        self.sop_id = require_token(tokenizer, "<sop>")
        self.stop_token_ids = {require_token(tokenizer, "<eop>")}

    def prompt_text(self, rounds: list[tuple[str, str]], question: str | None) -> str:
        if not rounds and question is not None:
            return question
        text = "".join(f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(rounds))
        if question is not None:
            text += f"[Round {len(rounds)}]\n问：{question}\n答："
        return text

    def prompt_ids(self, text_ids: list[int]) -> list[int]:
        # v1 marks the generation point at the end: bidirectional attention over everything before <sop>.
        return [*text_ids, self.gmask_id, self.sop_id]


class ChatGLM2ChatFormat(_RoundsChatFormat):
    """ChatGLM2-6B, `build_prompt` in its modeling_chatglm.py: rounds count from 1, double newlines. Stops
    on eos (`</s>`, id 2) only."""

    name = "chatglm2"

    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__(tokenizer)
        self.sop_id = require_token(tokenizer, "sop")
        if tokenizer.eos_token_id is None:
            raise ChatTemplateError("the ChatGLM2 tokenizer has no eos id")
        self.stop_token_ids = {tokenizer.eos_token_id}

    def prompt_text(self, rounds: list[tuple[str, str]], question: str | None) -> str:
        text = "".join(f"[Round {i}]\n\n问：{q}\n\n答：{r}\n\n" for i, (q, r) in enumerate(rounds, start=1))
        if question is not None:
            text += f"[Round {len(rounds) + 1}]\n\n问：{question}\n\n答："
        return text

    def prompt_ids(self, text_ids: list[int]) -> list[int]:
        return [self.gmask_id, self.sop_id, *text_ids]


def require_token(tokenizer: Tokenizer, token: str) -> int:
    """The id of a token the format writes by id; a tokenizer without it is the wrong one for the format."""
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ChatTemplateError(f"this tokenizer has no {token!r} token; is it a GLM tokenizer?")
    return token_id
