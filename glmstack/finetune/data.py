"""Training data: JSONL conversations rendered with the model's own chat format, with a loss mask.

Two line formats, one per file (the first line decides):
- the platform's (spec §4.2): `{"messages": [...]}` with system/user/assistant messages, assistant
  `tool_calls` and `tool` results (OpenAI's shape), and optionally `"tools": [...]` offered in the prompt;
  checked line by line with the upload check (knowledge/jsonl_checks.py), so the CLI refuses exactly what the
  platform would;
- ChatGLM's finetuning demos': `{"prompt", "response"}` with an optional `"history": [[query, answer], ...]`.

Every example is rendered by `chat_format.render` - the code that renders prompts when the engine serves -
so training sees exactly the layout the model will be asked in. Labels are the assistant's tokens only:
for each assistant message, the tokens between the prompt that asks for it (the conversation before it
with the generation prompt) and the conversation that includes it, plus the token that ends the turn when
the format writes it afterwards (GLM's next `<|user|>` / `<|observation|>`) or, at the end of the
conversation, the tokenizer's end-of-text token: the model must learn to stop where serving stops it. In
the messages format every assistant turn trains; in the prompt/response format only the response does, as
in THUDM's demos (the history is context).

Truncation: an example longer than `max_length` tokens is cut to its first `max_length` tokens (labels in
the cut part are lost; a prompt is never shortened from the front, which would change what it says). An
example left with no labelled token is dropped, with a warning naming its line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmstack.engine.chat_format import ChatFormat, ChatTemplateError
from glmstack.engine.tokenization.base import Tokenizer
from glmstack.knowledge.jsonl_checks import JsonlError, check_fine_tune, json_lines

log = logging.getLogger(__name__)

IGNORE = -100  # label of a token the loss skips (torch's cross_entropy ignore_index)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # the token itself where it trains, IGNORE elsewhere
    line: int  # 1-based line of the file it came from

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels)


class DataError(JsonlError):
    """A line of a training file that cannot be used ("train.jsonl line 7: ...")."""

    def __init__(self, line: int | None, problem: str, file: str = "") -> None:
        super().__init__(line, problem)
        where = f"{file} line {line}" if line is not None else file
        self.args = (f"{where}: {problem}" if where else problem,)


def load_examples(path: str | Path, chat_format: ChatFormat, tokenizer: Tokenizer,
                  max_length: int) -> list[Example]:
    """Every usable example of a JSONL file, rendered and masked. DataError names the first bad line."""
    path = Path(path)
    try:
        with open(path, "rb") as stream:
            first = next(json_lines(stream), None)
            if first is None:
                raise DataError(None, "the file holds no examples", str(path))
            stream.seek(0)
            if "messages" in first[1]:
                check_fine_tune(stream)
                stream.seek(0)
            examples = []
            for number, record in json_lines(stream):
                example = render_example(record, number, chat_format, tokenizer, max_length)
                if example is not None:
                    examples.append(example)
    except JsonlError as e:
        raise DataError(e.line, e.problem, path.name) from None
    if not examples:
        raise DataError(None, f"no example has a trained token within max_length={max_length}", str(path))
    return examples


def render_example(record: dict[str, Any], line: int, chat_format: ChatFormat, tokenizer: Tokenizer,
                   max_length: int) -> Example | None:
    if "messages" in record:
        messages, tools, trained = record["messages"], record.get("tools"), None
        if tools is not None and not isinstance(tools, list):
            raise JsonlError(line, "tools must be a list")
    else:
        messages, tools = _prompt_response_messages(record, line), None
        trained = {len(messages) - 1}  # only the response, as ChatGLM's demos train
    try:
        ids, labels = _render_with_labels(messages, tools, trained, chat_format, tokenizer)
    except (ChatTemplateError, ValueError, TypeError, KeyError) as e:
        raise JsonlError(line, f"cannot be rendered with the model's chat format ({e})") from None
    if len(ids) > max_length:
        ids, labels = ids[:max_length], labels[:max_length]
    example = Example(ids, labels, line)
    if example.trained_tokens == 0:
        log.warning("line %d: no assistant token within max_length=%d; skipped", line, max_length)
        return None
    return example


def _prompt_response_messages(record: dict[str, Any], line: int) -> list[dict[str, Any]]:
    for key in ("prompt", "response"):
        if not isinstance(record.get(key), str):
            raise JsonlError(line, f"{key} must be a string (a line is {{\"prompt\", \"response\"}} or "
                                   "{\"messages\": [...]})")
    history = record.get("history") or []
    if not isinstance(history, list):
        raise JsonlError(line, "history must be a list of [query, answer] pairs")
    messages: list[dict[str, Any]] = []
    for index, turn in enumerate(history):
        if not (isinstance(turn, list | tuple) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise JsonlError(line, f"history[{index}] must be a [query, answer] pair of strings")
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    return [*messages, {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["response"]}]


def _render_with_labels(messages: list[dict[str, Any]], tools: list[dict] | None, trained: set[int] | None,
                        chat_format: ChatFormat, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """The whole conversation's ids, and labels on the assistant messages' spans (those in `trained`, or
    all). Spans come from rendering prefixes of the conversation, which must render as prefixes of the
    whole: a template that rewrites earlier turns (drops old reasoning, say) cannot be trained on turn by
    turn, and is refused rather than mislabelled."""
    ids = chat_format.render(messages, tools=tools, add_generation_prompt=False).token_ids
    labels = [IGNORE] * len(ids)
    stops = set(chat_format.stop_token_ids)
    eos = tokenizer.eos_token_id
    for index, message in enumerate(messages):
        if message.get("role") != "assistant" or (trained is not None and index not in trained):
            continue
        prompt = chat_format.render(messages[:index], tools=tools, add_generation_prompt=True).token_ids
        upto = chat_format.render(messages[: index + 1], tools=tools, add_generation_prompt=False).token_ids
        if ids[: len(prompt)] != prompt or ids[: len(upto)] != upto or len(upto) <= len(prompt):
            raise ValueError(f"messages[{index}] does not render as a continuation of the messages before it")
        start, end = len(prompt), len(upto)
        if ids[end - 1] not in stops:
            ended = next((i for i in range(end - 1, start - 1, -1) if ids[i] in stops), None)
            if ended is not None:
                end = ended + 1  # ChatML's "<|im_end|>\n": the turn ends at its stop token, as generation does
            elif end < len(ids) and ids[end] in stops:
                end += 1  # the next turn's role token is what ends this one (GLM's <|user|>, <|observation|>)
            elif end == len(ids) and eos is not None:
                ids.append(eos)  # the conversation's end: the reply stops with end-of-text
                labels.append(IGNORE)
                end += 1
        labels[start:end] = ids[start:end]
    return ids, labels

