"""Any glmstack tokenizer as an llguidance `LLTokenizer`: the bytes every token id stands for.

llguidance walks a trie of token bytes to find which tokens may come next, so all it needs from a tokenizer
is id -> bytes (plus which ids end the reply). One table built from `id_to_token` serves every tokenizer
glmstack has, instead of one llguidance loader per library (its HF loader would not read GLM's sentencepiece
or tiktoken files, nor the vocabularies rebuilt from GGUF): token strings come in two spellings only,

    byte-level BPE (GPT-2's byte alphabet): HF byte-level vocabularies, GGUF "gpt2" ones, GLM-4's tiktoken
    sentencepiece ("▁" for space, "<0xAB>" byte pieces): Llama/SmolLM-style SP, ChatGLM2/3, ChatGLM-6B

Special and control tokens are handed to llguidance as special: it never lets grammar *text* produce them
(a JSON string can never contain "<|im_end|>" as one token), only the end-of-reply ids it is given.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import weakref
from collections.abc import Iterable, Sequence

import llguidance

from glmstack.engine.tokenization.base import Tokenizer
from glmstack.engine.tokenization.gguf_vocab import bytes_to_unicode
from glmstack.engine.tokenization.glm import ChatGLMv1Tokenizer, GLM4Tokenizer
from glmstack.engine.tokenization.hf import HFTokenizer

log = logging.getLogger(__name__)

_SPIECE_SPACE = "\u2581"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(tokenizer: Tokenizer) -> tuple[list[bytes], set[int]]:
    """(the bytes of every id below `vocab_size`, the special ids). Ids with no token (holes in a vocabulary,
    embedding padding) get b"" and count as special, so no grammar ever picks them."""
    special = set(tokenizer.special_tokens.values())
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token_id = getattr(tokenizer, name)
        if token_id is not None:
            special.add(token_id)
    byte_level = _is_byte_level(tokenizer)
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    v1 = tokenizer if isinstance(tokenizer, ChatGLMv1Tokenizer) else None
    tokens: list[bytes] = []
    for token_id in range(tokenizer.vocab_size):
        piece = tokenizer.id_to_token(token_id)
        if piece is None or token_id in special:
            special.add(token_id)
            tokens.append(piece.encode() if piece else b"")
        elif byte_level:
            tokens.append(_byte_level_bytes(piece, byte_of))
        else:
            tokens.append(_sentencepiece_bytes(piece, v1))
    return tokens, special


def _is_byte_level(tokenizer: Tokenizer) -> bool:
    if isinstance(tokenizer, GLM4Tokenizer):
        return True
    if isinstance(tokenizer, HFTokenizer):
        return "ByteLevel" in json.dumps(json.loads(tokenizer.backend.to_str()).get("decoder"))
    return False


def _byte_level_bytes(piece: str, byte_of: dict[str, int]) -> bytes:
    if all(char in byte_of for char in piece):
        return bytes(byte_of[char] for char in piece)
    return piece.encode()  # an added (non-special) token kept as plain text


def _sentencepiece_bytes(piece: str, v1: ChatGLMv1Tokenizer | None) -> bytes:
    match = _BYTE_PIECE.fullmatch(piece)
    if match:
        return bytes([int(match.group(1), 16)])
    text = piece.replace(_SPIECE_SPACE, " ")
    if v1 is not None:  # ChatGLM-6B's whitespace stand-ins: "<n>", "<|tab|>", "<|blank_4|>"
        text = v1.postprocess(text)
    return text.encode()


class _Vocabulary:
    """The shape `llguidance.LLTokenizer` reads a Python tokenizer through (its `TokenizerWrapper`)."""

    def __init__(self, tokenizer: Tokenizer, eos_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self.tokens, special = token_bytes(tokenizer)
        self.special_token_ids = sorted(special)
        self.eos_token_id = eos_ids[0]
        self.bos_token_id = tokenizer.bos_token_id
        self.is_tokenizer_wrapper = True
        self._by_bytes: dict[bytes, int] | None = None  # built on the first text the tokenizer cannot spell
        self._longest = 1

    def __call__(self, text: str | bytes) -> list[int]:
        # llguidance tokenizes the forced bytes of a grammar with this: plain text, never control tokens, and
        # the ids must spell exactly those bytes. A sentencepiece tokenizer puts its dummy "▁" in front (so
        # "get" came back as "▁g" + ..., which the mask then allowed and the grammar refused): such text is
        # tokenized by longest match over the vocabulary instead.
        data = text if isinstance(text, bytes) else text.encode()
        ids = self._tokenizer.encode(data.decode("utf-8", errors="replace"), allow_special=False)
        if b"".join(self.tokens[i] for i in ids if i < len(self.tokens)) == data:
            return ids
        return self._longest_match(data)

    def _longest_match(self, data: bytes) -> list[int]:
        if self._by_bytes is None:
            special = set(self.special_token_ids)
            self._by_bytes = {}
            for i, piece in enumerate(self.tokens):
                if piece and i not in special:
                    self._by_bytes.setdefault(piece, i)
            self._longest = max(map(len, self._by_bytes), default=1)
        ids, start = [], 0
        while start < len(data):
            for end in range(min(len(data), start + self._longest), start, -1):
                token = self._by_bytes.get(data[start:end])
                if token is not None:
                    ids.append(token)
                    start = end
                    break
            else:  # a byte no token spells alone: nothing can produce it
                start += 1
        return ids


_cache: weakref.WeakKeyDictionary[Tokenizer, dict[tuple[int, ...], llguidance.LLTokenizer]] = (
    weakref.WeakKeyDictionary())
_cache_lock = threading.Lock()


def ll_tokenizer(tokenizer: Tokenizer, eos_ids: Iterable[int]) -> llguidance.LLTokenizer:
    """The `LLTokenizer` for `tokenizer` whose grammars may end the reply with any of `eos_ids` (the chat
    format's stop ids). Built once per tokenizer (~0.3 s for a 49k vocabulary) and kept while it lives."""
    ends = tuple(sorted(set(eos_ids))) or ((tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ())
    if not ends:
        raise ValueError("constrained decoding needs an end-of-reply token id")
    with _cache_lock:
        built = _cache.setdefault(tokenizer, {})
        if ends not in built:
            started = time.perf_counter()
            built[ends] = llguidance.LLTokenizer(
                _Vocabulary(tokenizer, ends),  # type: ignore[arg-type]
                n_vocab=tokenizer.vocab_size, eos_token=list(ends))
            log.info("grammar vocabulary for %d tokens built in %.2f s", tokenizer.vocab_size,
                     time.perf_counter() - started)
        return built[ends]
