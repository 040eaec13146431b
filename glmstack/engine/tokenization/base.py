"""Tokenizers behind one small interface.

Everything above the engine talks to `Tokenizer`: encode text, decode ids, stream ids back into text, and
know the special ids (bos/eos/pad) and the chat template shipped with the model. Two constructors produce
an `HFTokenizer` around the `tokenizers` library:

    load_tokenizer_json("path/to/model")       # hf.py: tokenizer.json (+ tokenizer_config.json) from a HF repo
    tokenizer_from_gguf("model.gguf")          # gguf_vocab.py: the vocabulary llama.cpp stores in GGUF metadata

GLM's own tokenizers (sentencepiece ice_text.model / tokenizer.model, tiktoken for GLM-4) are in glm.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence


class Tokenizer(ABC):
    """What the engine and the chat formats need from a tokenizer, whatever library is behind it."""

    vocab_size: int
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    chat_template: str | None = None  # the Jinja template shipped with the model, if any
    special_tokens: dict[str, int]  # added/control token text -> id

    @abstractmethod
    def encode(self, text: str, *, add_special_tokens: bool = False, allow_special: bool = True) -> list[int]:
        """Token ids for `text`.

        add_special_tokens: add what the model puts around every sequence (usually a BOS).
        allow_special: special-token text such as "<|im_start|>" becomes its id. Needed for rendered chat
        templates; pass False for raw user text that must never turn into control tokens.
        """

    @abstractmethod
    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str: ...

    @abstractmethod
    def token_to_id(self, token: str) -> int | None: ...

    @abstractmethod
    def id_to_token(self, token_id: int) -> str | None: ...

    def stream_decoder(self, *, skip_special_tokens: bool = True, keep: frozenset[int] = frozenset()) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens, keep=keep)


class StreamDecoder:
    """Turns generated ids into text as they arrive, never emitting half a character.

    One token can hold part of a multibyte character (byte-level BPE, sentencepiece byte fallback), and
    some decoders look at neighbouring tokens (sentencepiece drops the first leading space). So instead of
    decoding tokens one by one we decode a short window twice -- without and with the new ids -- and emit
    the difference once it no longer ends in U+FFFD, the replacement a dangling partial character decodes
    to. The window starts at a token boundary where earlier text was complete, so the difference is exact.

    `keep`: special ids written out even when the others are skipped -- the tokens a chat format's reply
    parser reads (`ChatFormat.reply_tokens`: GLM-4.5's `<tool_call>`, `<think>`, ...).
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True,
                 keep: frozenset[int] = frozenset()) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._keep = keep if skip_special_tokens else frozenset()
        self._ids: list[int] = []
        self._prefix_offset = 0  # the window starts here: text before it has been emitted and is complete
        self._read_offset = 0  # ids before this are emitted; those after it are held back

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes (often "", never a partial character)."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held back at the end of generation. Generation can stop in the middle of a
        multi-byte character (max_tokens); those dangling bytes are dropped rather than shown as U+FFFD."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        emitted = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        if final:
            text = text.rstrip("\ufffd")
        if len(text) <= len(emitted) or (text.endswith("\ufffd") and not final):
            return ""
        # Drop ids no future window needs, so a long generation keeps a short list.
        del self._ids[: self._read_offset]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        return text[len(emitted) :]

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if not self._keep or self._keep.isdisjoint(ids):
            return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)
        # The kept tokens cut the window into runs decoded as usual; each kept token decodes alone. Both
        # decodes of a window cut it at the same places, so their difference stays exact.
        parts: list[str] = []
        run: list[int] = []
        for token_id in ids:
            if token_id in self._keep:
                parts += [self._tokenizer.decode(run, skip_special_tokens=True) if run else "",
                          self._tokenizer.decode([token_id], skip_special_tokens=False)]
                run = []
            else:
                run.append(token_id)
        if run:
            parts.append(self._tokenizer.decode(run, skip_special_tokens=True))
        return "".join(parts)
