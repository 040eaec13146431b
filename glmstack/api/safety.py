"""Content safety (spec §1.10): a configurable list of terms and patterns checked against the input and,
as it streams, the output.

A policy is a folder of UTF-8 `*.txt` files, one entry per line:

    # comment
    炸药配方                     a literal term, matched anywhere (Chinese has no word boundaries)
    how to make a bomb          a literal term; ASCII words only match whole (so "class" never hits "ass")
    re:\\bnerve\\s+agent\\b       a Python regular expression

Matching is case-insensitive on NFKC-normalised text (full-width letters match their ASCII forms). The
default list ships in glmstack/api/safety_terms/; GLMSTACK_SAFETY_DIR replaces it with your own folder.

On a hit in the input the request is refused with business code 1301. On a hit in the output the stream ends
with finish_reason "sensitive" (a synchronous call is refused with 1301, as the doc prescribes).
"""

from __future__ import annotations

import logging
import re
import unicodedata
from importlib import resources
from pathlib import Path
from typing import Any

from glmstack.api.errors import PlatformError

log = logging.getLogger(__name__)

REGEX_PREFIX = "re:"
# How much of the output is re-checked after each delta: enough for any term to straddle deltas.
OUTPUT_WINDOW_CHARS = 512
# The doc's severity scale is 0 (most severe) to 3 (mild); a term list carries no severity of its own.
LEVEL = 1


def _normalise(text: str) -> str:
    return unicodedata.normalize("NFKC", text)


def _pattern(entry: str) -> str:
    if entry.startswith(REGEX_PREFIX):
        pattern = entry[len(REGEX_PREFIX) :]
        re.compile(pattern)  # fail at load time, naming the entry (the caller adds the file)
        return pattern
    term = re.escape(_normalise(entry))
    if entry[0].isascii() and entry[0].isalnum():
        term = r"(?<!\w)" + term
    if entry[-1].isascii() and entry[-1].isalnum():
        term += r"(?!\w)"
    return term


class SafetyPolicy:
    def __init__(self, entries: list[str]) -> None:
        self.entries = entries
        patterns = [_pattern(e) for e in entries]
        self._regex = re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE) if patterns else None

    @classmethod
    def from_dir(cls, folder: Path | None) -> SafetyPolicy:
        """The policy in `folder`, or the shipped default when None."""
        if folder is not None and not folder.is_dir():
            raise ValueError(f"safety folder {folder} does not exist")
        files = (
            sorted(folder.glob("*.txt"))
            if folder is not None
            else sorted(
                (
                    f
                    for f in resources.files("glmstack.api.safety_terms").iterdir()
                    if f.name.endswith(".txt")
                ),
                key=lambda f: f.name,
            )
        )
        entries: list[str] = []
        for file in files:
            for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
                entry = line.strip()
                if not entry or entry.startswith("#"):
                    continue
                try:
                    _pattern(entry)
                except re.error as e:
                    raise ValueError(f"{file}:{number}: bad regular expression: {e}") from None
                entries.append(entry)
        return cls(entries)

    def hits(self, text: str) -> bool:
        return self._regex is not None and self._regex.search(_normalise(text)) is not None

    def check_input(self, messages: list[dict[str, Any]]) -> None:
        """Raises 1301 when any message's text hits. `content_filter.role` says where: "user" for what the
        caller wrote now (system and user messages), "history" for earlier assistant and tool turns."""
        for message in messages:
            content = message.get("content")
            if isinstance(content, str) and self.hits(content):
                role = "history" if message.get("role") in ("assistant", "tool") else "user"
                log.info("input blocked by the safety policy (%s message)", message.get("role"))
                raise PlatformError(1301, extra={"contentFilter": [{"level": LEVEL, "role": role}]})

    def output_monitor(self) -> OutputMonitor:
        return OutputMonitor(self)


class OutputMonitor:
    """Checks generated text delta by delta, re-reading a window of the tail so a term split across deltas
    is still found."""

    def __init__(self, policy: SafetyPolicy) -> None:
        self._policy = policy
        self._tail = ""

    def push(self, delta: str) -> bool:
        """True when the output so far (within the window) hits the policy."""
        if not delta:
            return False
        self._tail = (self._tail + delta)[-OUTPUT_WINDOW_CHARS:]
        return self._policy.hits(self._tail)
