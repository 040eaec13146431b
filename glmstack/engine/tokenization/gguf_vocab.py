"""The vocabulary llama.cpp stores in a GGUF file's `tokenizer.*` metadata, rebuilt as an `HFTokenizer`."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from glmstack.engine.errors import ModelFileError
from glmstack.engine.loading.gguf_file import GGUFFile
from glmstack.engine.tokenization.hf import HFTokenizer

log = logging.getLogger(__name__)

# Pre-tokenizer splits for byte-level vocabularies, keyed by `tokenizer.ggml.pre`: text must be cut the way it
# was cut when the merges were learned. Regexes as in llama.cpp / the models' own tokenizer.json files.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


_BYTE_LEVEL_SPLITS = {
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "chatglm-bpe": _LLAMA3_SPLIT,  # GLM-4's tiktoken pattern is cl100k's, the same as Llama 3's
    "glm4": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
}


# GPT-2's own regex, after cutting every digit apart (StarCoder-style vocabularies never merged digits).
_DIGIT_THEN_GPT2 = {"smollm", "starcoder", "refact"}


# Vocabularies born in tiktoken (Llama 3, GLM-4): a piece that is itself a token is taken whole, as tiktoken
# does, instead of being rebuilt from merges (llama.cpp and Llama 3's tokenizer.json do the same).
_IGNORE_MERGES = {"llama-bpe", "llama3", "chatglm-bpe", "glm4"}


_SPIECE_SPACE = "\u2581"  # sentencepiece's visible space, "▁"


def tokenizer_from_gguf(source: gguf.GGUFReader | Mapping[str, Any] | str | Path) -> HFTokenizer:
    """The tokenizer a GGUF file describes in its `tokenizer.*` metadata.

    `source` is a path, metadata already read (`GGUFFile.metadata`), or an open `gguf.GGUFReader`. A path is
    read with `GGUFFile`, which validates the file and is far faster than `gguf.GGUFReader` (that one builds
    a numpy view per vocabulary entry: about 4 s for a 49k vocabulary here).
    """
    if isinstance(source, gguf.GGUFReader):
        meta = {
            key: _field_value(field) for key, field in source.fields.items() if key.startswith("tokenizer.")
        }
    elif isinstance(source, Mapping):
        meta = source
    else:
        gguf_file = GGUFFile(source)
        gguf_file.close()  # the metadata is parsed into plain Python values; the tensors are not needed
        meta = gguf_file.metadata
    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        backend = _byte_level_bpe(meta)
        add_bos = meta.get("tokenizer.ggml.add_bos_token", False)
    elif kind == "llama":
        backend = _sentencepiece_bpe(meta)
        add_bos = meta.get("tokenizer.ggml.add_bos_token", True)  # llama.cpp's default for sentencepiece
    else:
        where = source if isinstance(source, str | Path) else "GGUF metadata"
        problem = f"unsupported tokenizer model {kind!r} (supported: 'gpt2', 'llama')"
        raise ModelFileError(where, problem, field="tokenizer.ggml.model")

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    _add_control_tokens(backend, tokens, meta.get("tokenizer.ggml.token_type"))

    def token_id(name: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{name}_token_id")
        return value if isinstance(value, int) and 0 <= value < len(tokens) else None

    bos, eos = token_id("bos"), token_id("eos")
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
    backend.post_processor = _bos_eos_processor(tokens, bos if add_bos else None, eos if add_eos else None)
    return HFTokenizer(
        backend,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=token_id("padding"),
        chat_template=meta.get("tokenizer.chat_template"),
    )


def _byte_level_bpe(meta: dict[str, Any]) -> BackendTokenizer:
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [gguf.TokenType.NORMAL] * len(tokens)
    # Normal tokens are spelled in GPT-2's byte alphabet ("Ġ" for a space); a few converters wrote some as
    # plain text, so respell those. Control/user-defined tokens keep their text: they are matched verbatim.
    alphabet = bytes_to_unicode()
    alphabet_chars = set(alphabet.values())
    vocab: dict[str, int] = {}
    for index, (token, token_type) in enumerate(zip(tokens, types, strict=True)):
        if token_type == gguf.TokenType.NORMAL and not set(token) <= alphabet_chars:
            token = "".join(alphabet[byte] for byte in token.encode("utf-8"))
        vocab.setdefault(token, index)
    merges = [tuple(merge.split(" ", 1)) for merge in meta.get("tokenizer.ggml.merges", [])]

    pre = meta.get("tokenizer.ggml.pre", "default")
    backend = BackendTokenizer(models.BPE(vocab, merges, ignore_merges=pre in _IGNORE_MERGES))
    if pre in _BYTE_LEVEL_SPLITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_BYTE_LEVEL_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif pre in _DIGIT_THEN_GPT2:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    else:
        if pre not in ("gpt-2", "default"):
            log.warning("unknown GGUF pre-tokenizer %r; splitting text with GPT-2's rules", pre)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(meta: dict[str, Any]) -> BackendTokenizer:
    """A sentencepiece vocabulary as BPE with byte fallback, the way HF's Llama tokenizer runs it."""
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [gguf.TokenType.NORMAL] * len(tokens)
    vocab = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    else:
        merges = _merges_from_scores(tokens, meta["tokenizer.ggml.scores"], types)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    backend = BackendTokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))

    # Sentencepiece writes spaces as "▁" and does not split words apart. With add_space_prefix llama.cpp puts
    # a space before every stretch of text -- the start, and after each special token -- which decoding
    # removes again. A normalizer does exactly that (it runs on each stretch between added tokens);
    # `Metaspace` would not, as it skips the prefix when the text already starts with a space.
    space_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    steps = [normalizers.Prepend(_SPIECE_SPACE)] if space_prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", _SPIECE_SPACE)])
    steps = [decoders.Replace(_SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _merges_from_scores(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges a sentencepiece vocabulary implies: every way to cut a piece into two pieces, ordered by
    the score of the piece they make (sentencepiece merges the best-scoring pair first)."""
    normal = {
        token: index
        for index, (token, token_type) in enumerate(zip(tokens, types, strict=True))
        if token_type == gguf.TokenType.NORMAL
    }
    ranked = []
    for token, index in normal.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in normal and right in normal:
                ranked.append((-scores[index], normal[left], normal[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _add_control_tokens(backend: BackendTokenizer, tokens: list[str], types: list[int] | None) -> None:
    # Control tokens (and <unk>) are special: matched whole in text, skippable when decoding. User-defined
    # tokens (e.g. "<think>") are matched whole too but are ordinary text otherwise -- as in llama.cpp.
    special, user_defined = [], []
    for token, token_type in zip(tokens, types or [], strict=False):
        if not token:
            continue
        if token_type in (gguf.TokenType.CONTROL, gguf.TokenType.UNKNOWN):
            special.append(AddedToken(token, special=True, normalized=False))
        elif token_type == gguf.TokenType.USER_DEFINED:
            user_defined.append(AddedToken(token, special=False, normalized=False))
    backend.add_special_tokens(special)
    backend.add_tokens(user_defined)


def _bos_eos_processor(
    tokens: list[str], bos: int | None, eos: int | None
) -> processors.PostProcessor | None:
    if bos is None and eos is None:
        return None
    before = [tokens[bos]] if bos is not None else []
    after = [tokens[eos]] if eos is not None else []
    return processors.TemplateProcessing(
        single=[*before, "$A", *after],
        pair=[*before, "$A", *after, *before, "$B", *after],
        special_tokens=[(tokens[i], i) for i in {bos, eos} if i is not None],
    )


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: printable bytes stand for themselves, the rest map to code points from 256."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def _field_value(field: gguf.ReaderField) -> Any:
    # `field.contents()` exists only in newer gguf; indexing `parts` by `data` works everywhere and is fast.
    kind = field.types[0]
    if kind == gguf.GGUFValueType.ARRAY:
        if field.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [value.item() for i in field.data for value in field.parts[i]]
    if kind == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    return field.parts[field.data[0]][0].item()


