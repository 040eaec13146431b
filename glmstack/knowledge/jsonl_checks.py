"""Line-by-line checks of uploaded JSONL (spec §4.2 fine-tuning data, §4.3 batch input), streaming: one line
in memory at a time, so a 100 MB file costs one line's worth.

Each check raises JsonlError naming the 1-based line and the problem ("line 7: not valid JSON (Expecting
value at column 1)"); blank lines are skipped (editors leave a trailing one).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, BinaryIO

MAX_BATCH_REQUESTS = 50_000  # "单个文件最多包含 50,000 个请求" (spec §4.1)
# url -> endpoint, for what a batch line may call: the documented /v4 paths, the SDK's /v1 spellings (spec
# §9.4 item 38) and the full platform paths.
BATCH_URLS = {
    f"{prefix}/{endpoint}": endpoint
    for prefix in ("/v4", "/v1", "/api/paas/v4")
    for endpoint in ("chat/completions", "embeddings")
}
FINE_TUNE_ROLES = frozenset({"system", "user", "assistant", "tool", "function"})
# One JSON line never needs more; a longer one is refused before it is held whole in memory.
MAX_LINE_BYTES = 8 * 1024 * 1024
_SHOWN = 40  # characters of a value quoted in an error message


class JsonlError(ValueError):
    def __init__(self, line: int | None, problem: str) -> None:
        self.line, self.problem = line, problem
        super().__init__(f"line {line}: {problem}" if line is not None else problem)


def _shown(value: str) -> str:
    return repr(value if len(value) <= _SHOWN else value[:_SHOWN] + "…")


def json_lines(stream: BinaryIO) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; JsonlError at the first line that is not UTF-8 or
    not a JSON object."""
    number = 0
    while True:
        raw = stream.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        number += 1
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            raise JsonlError(number, f"the line is longer than {MAX_LINE_BYTES} bytes")
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a BOM that Windows editors write
            raw = raw[3:]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise JsonlError(number, f"not UTF-8 (byte {e.start + 1})") from None
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise JsonlError(number, f"not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(value, dict):
            raise JsonlError(number, f"expected a JSON object, got {type(value).__name__}")
        yield number, value


def check_batch(stream: BinaryIO) -> int:
    """Checks that a batch input file (spec §4.3) is JSONL - every non-blank line a JSON object, at most
    MAX_BATCH_REQUESTS of them - and returns the count. What each request says (custom_id, method, url, body)
    is checked when the batch runs: a line that cannot run goes to the batch's error file with the code the
    endpoint would answer, and the other lines proceed (jobs/batch_run.py)."""
    count = 0
    for number, _request in json_lines(stream):
        count += 1
        if count > MAX_BATCH_REQUESTS:
            raise JsonlError(number, f"a batch file holds at most {MAX_BATCH_REQUESTS} requests")
    if count == 0:
        raise JsonlError(None, "the file holds no requests")
    return count


def check_fine_tune(stream: BinaryIO) -> int:
    """Checks fine-tuning data (spec §4.2) and returns its example count: every line {"messages": [...]}
    with string contents, a system message only first, at least one user message, ending with the
    assistant's."""
    count = 0
    for number, example in json_lines(stream):
        count += 1
        messages = example.get("messages")
        if not isinstance(messages, list) or not messages:
            raise JsonlError(number, "messages must be a non-empty list")
        for index, message in enumerate(messages):
            where = f"messages[{index}]"
            if not isinstance(message, dict):
                raise JsonlError(number, f"{where} must be an object")
            role = message.get("role")
            if role not in FINE_TUNE_ROLES:
                shown = _shown(role) if isinstance(role, str) else "(missing or not a string)"
                raise JsonlError(number, f"{where}.role {shown} is not one of "
                                         f"{', '.join(sorted(FINE_TUNE_ROLES))}")
            if role == "system" and index != 0:
                raise JsonlError(number, f"{where}: a system message may only come first")
            content = message.get("content")
            if not isinstance(content, str):
                # an assistant turn that only calls a tool may have no text
                if not (role == "assistant" and content is None and message.get("tool_calls")):
                    raise JsonlError(number, f"{where}.content must be a string")
        if not any(m.get("role") == "user" for m in messages):
            raise JsonlError(number, "there is no user message")
        if messages[-1].get("role") != "assistant":
            raise JsonlError(number, "the last message must be the assistant's")
    if count == 0:
        raise JsonlError(None, "the file holds no examples")
    return count
