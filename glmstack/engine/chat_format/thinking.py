"""`<think>...</think>` reasoning ahead of a reply: `ThinkingSplitter` routes it to `ReplyDelta.reasoning` and
hands the rest of the reply to the parser for content and tool calls.

Where reasoning can be:
- the reply opens with `<think>` (GLM-4.5, Qwen3; leading whitespace before it allowed): reasoning until
  `</think>`. A `<think>` later in the reply is content: models think first, and a literal tag in an answer
  (a reply about HTML-like tags) must stay text.
- the prompt already ended with `<think>` (GLM-Z1's generation prompt `<|assistant|>\\n<think>`):
  `starts_inside=True`, the reply is reasoning until `</think>`.
- `</think>` never comes (max_tokens, a hostile reply): everything after `<think>` is reasoning. A `</think>`
  with no reasoning open is content.

Whitespace: the reasoning is trimmed at both ends, and the whitespace right after `</think>` is dropped from
the content. vLLM's `<think>` parsers (deepseek_r1, qwen3, glm45) keep both verbatim; we trim because the
models write `<think>\\n...\\n</think>\\n\\n` around their text, and GLM's and Qwen's templates strip reasoning
and content at those points when they render history, so the trimmed form is what goes back in. Streaming
therefore holds back, besides a possibly partial tag, the whitespace at the end of the reasoning so far (it
is sent once more reasoning follows it, dropped at `</think>`).
"""

from __future__ import annotations

from glmstack.engine.chat_format.base import ReplyDelta, ReplyParser

THINK_START = "<think>"
THINK_END = "</think>"


def partial_tag_length(text: str, tag: str) -> int:
    """How many characters at the end of `text` could be the start of `tag` (0 when none)."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


def merge(into: ReplyDelta, other: ReplyDelta) -> ReplyDelta:
    into.content += other.content
    into.reasoning += other.reasoning
    into.tool_calls.extend(other.tool_calls)
    return into


class ThinkingSplitter(ReplyParser):
    """Reasoning out of `<think>...</think>`; everything else goes through `inner`."""

    def __init__(self, inner: ReplyParser, *, starts_inside: bool) -> None:
        self.inner = inner
        # "start": `<think>` may still open the reply; "inside": reasoning; "after": all goes to `inner`
        self._state = "inside" if starts_inside else "start"
        self._held = ""  # undecided text: a possible tag, or leading whitespace before a possible `<think>`
        self._reasoning_begun = False  # leading whitespace of the reasoning is dropped until text comes
        self._reasoning_space = ""  # whitespace at the end of the reasoning so far, sent only if text follows
        self._strip_content = False  # right after `</think>`: drop the whitespace that separates the answer

    @property
    def calls(self) -> int:  # type: ignore[override]  # the inner parser's count, read through
        return self.inner.calls

    def push(self, text: str) -> ReplyDelta:
        self._held += text
        return self._advance(final=False)

    def finish(self) -> ReplyDelta:
        delta = self._advance(final=True)
        return merge(delta, self.inner.finish())

    def _advance(self, *, final: bool) -> ReplyDelta:
        delta = ReplyDelta()
        while True:
            if self._state == "start":
                opening = self._held.lstrip()
                if opening.startswith(THINK_START):
                    self._held = opening[len(THINK_START) :]
                    self._state = "inside"
                    continue
                if not final and THINK_START.startswith(opening):  # whitespace, or `<thi` so far
                    return delta
                self._state = "after"  # no reasoning: the held text was the start of the content
                continue
            if self._state == "inside":
                end = self._held.find(THINK_END)
                if end >= 0:
                    delta.reasoning += self._reasoning(self._held[:end])
                    self._reasoning_space = ""  # trailing whitespace of the reasoning
                    self._held = self._held[end + len(THINK_END) :]
                    self._state = "after"
                    self._strip_content = True
                    continue
                keep = 0 if final else partial_tag_length(self._held, THINK_END)
                delta.reasoning += self._reasoning(self._held[: len(self._held) - keep])
                self._held = self._held[len(self._held) - keep :]
                return delta
            # "after"
            if self._strip_content:
                self._held = self._held.lstrip()
                if not self._held:
                    return delta
                self._strip_content = False
            if self._held:
                merge(delta, self.inner.push(self._held))
                self._held = ""
            return delta

    def _reasoning(self, text: str) -> str:
        """`text` as reasoning to send now, trimmed at the start of the reasoning and with its trailing
        whitespace held back in case the reasoning ends there."""
        if not self._reasoning_begun:
            text = text.lstrip()
            if not text:
                return ""
            self._reasoning_begun = True
        body = text.rstrip()
        if not body:
            self._reasoning_space += text
            return ""
        sent = self._reasoning_space + body
        self._reasoning_space = text[len(body) :]
        return sent
