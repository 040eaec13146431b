"""The GLM family's own tokenizers, loaded from the files the model repos ship -- no remote code, no hub.

    ChatGLM-6B (v1)       ice_text.model   sentencepiece + whitespace stand-ins, [gMASK] <sop> at the end
    ChatGLM2-6B / 3-6B    tokenizer.model  sentencepiece, specials appended after its vocab, [gMASK] sop first
    GLM-4-9B-chat (2024)  tokenizer.model  a tiktoken rank file ("base64(bytes) rank" per line), [gMASK] <sop>
    GLM-4-0414, -hf, 4.5  tokenizer.json   the `tokenizers` library (`load_tokenizer_json`)
    GGUF conversions      GGUF metadata    `tokenizer_from_gguf` (llama.cpp's "chatglm-spm" / "chatglm-bpe")

Architecture modules call one of these from their `load_tokenizer(ckpt)` hook (see `api.load`):

    load_glm_checkpoint_tokenizer(ckpt)     # GGUF metadata or a checkpoint folder, whichever ckpt is
    load_glm_tokenizer(folder, config)      # a folder: picks the file and the class from what is there

Every encoder here keeps special-token text in user content as plain text when `allow_special=False` (the
GLM chat formats encode all content that way and insert role ids themselves). Spec: glm-models.md 1.6, 2.6,
3.1, 6.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sentencepiece
import tiktoken

from glmstack.engine.errors import ModelFileError
from glmstack.engine.loading.json_files import read_json
from glmstack.engine.tokenization.base import Tokenizer
from glmstack.engine.tokenization.gguf_vocab import bytes_to_unicode, tokenizer_from_gguf
from glmstack.engine.tokenization.hf import load_tokenizer_json

if TYPE_CHECKING:
    from glmstack.engine.loading.checkpoint import Checkpoint

log = logging.getLogger(__name__)


# --- choosing the tokenizer ---------------------------------------------------------------------------------


def load_glm_checkpoint_tokenizer(ckpt: Checkpoint) -> Tokenizer:
    """The tokenizer of a GLM checkpoint: GGUF metadata for a .gguf, else the files in its folder. Shaped
    to be an architecture module's `load_tokenizer(ckpt)` hook as is."""
    if ckpt.format == "gguf":
        return tokenizer_from_gguf(ckpt.config)  # metadata already parsed and validated by loading.py
    folder = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    return load_glm_tokenizer(folder, ckpt.config)


def load_glm_tokenizer(folder: Path, config: dict[str, Any], *, role_tokens: bool | None = None) -> Tokenizer:
    """The tokenizer in a GLM checkpoint folder, chosen by the files present and their content.

    tokenizer.json wins (GLM-4-0414, the -hf conversions, GLM-4.5 ship one). Otherwise tokenizer.model is
    read as a tiktoken rank file (GLM-4-9B-chat) when it is text, else as sentencepiece (ChatGLM2/3); then
    ice_text.model (ChatGLM-6B). `config` is config.json; ChatGLM-6B takes its id offset from it.
    `role_tokens` forces (or forbids) ChatGLM3's role tokens on a ChatGLM2/3 tokenizer; by default they are
    added when the folder shows it is ChatGLM3 (see `_has_chatglm3_roles`).
    """
    folder = Path(folder)
    tokenizer_config = read_json(folder / "tokenizer_config.json", missing_ok=True)
    if (folder / "tokenizer.json").is_file():
        return load_tokenizer_json(folder)
    model = folder / "tokenizer.model"
    if model.is_file():
        if is_tiktoken_rank_file(model):
            return GLM4Tokenizer.from_file(model, tokenizer_config=tokenizer_config)
        if role_tokens is None:
            role_tokens = _has_chatglm3_roles(folder, tokenizer_config)
        template = tokenizer_config.get("chat_template")
        template = template if isinstance(template, str) else None
        return ChatGLM2Tokenizer.from_file(model, role_tokens=role_tokens, chat_template=template)
    ice_text = folder / "ice_text.model"
    if ice_text.is_file():
        sp = sentencepiece.SentencePieceProcessor(model_file=str(ice_text))
        return ChatGLMv1Tokenizer(sp, id_offset=_v1_id_offset(sp, config, tokenizer_config))
    raise ModelFileError(
        folder, "no GLM tokenizer here (expected tokenizer.json, tokenizer.model or ice_text.model)"
    )


def is_tiktoken_rank_file(path: Path) -> bool:
    """A tiktoken rank file starts with a "base64 rank" text line; a sentencepiece model is binary protobuf."""
    with open(path, "rb") as f:
        first_line = f.readline(4096).strip()
    return re.fullmatch(rb"[A-Za-z0-9+/]+={0,2} +\d+", first_line) is not None


def _has_chatglm3_roles(folder: Path, tokenizer_config: dict[str, Any]) -> bool:
    # ChatGLM2 and ChatGLM3 ship the same tokenizer.model and near-identical configs; only ChatGLM3's
    # tokenizer knows the role tokens. Its remote code (tokenization_chatglm.py, in every repo revision) and
    # later tokenizer_config.json (chat template, added tokens) name them; ChatGLM2's never do.
    config_text = json.dumps(tokenizer_config, ensure_ascii=False)
    if "<|user|>" in config_text or "<|observation|>" in config_text:
        return True
    code = folder / "tokenization_chatglm.py"
    if code.is_file():
        return "<|observation|>" in code.read_text(encoding="utf-8", errors="replace")
    log.warning(
        "%s: cannot tell ChatGLM2 from ChatGLM3 (no tokenization_chatglm.py, no role tokens in "
        "tokenizer_config.json); assuming ChatGLM2, without role tokens",
        folder,
    )
    return False


def _v1_id_offset(
    sp: sentencepiece.SentencePieceProcessor, config: dict[str, Any], tokenizer_config: dict[str, Any]
) -> int:
    # The March-2023 ChatGLM-6B put 20000 image tokens in front of the text vocab (all text ids +20000); the
    # "slim" revision has num_image_tokens 0 (spec 1.1). ice_text.model holds only the text pieces either way,
    # so the offset is where config.json puts [gMASK] (the spec's source of truth), else the tokenizer
    # config's num_image_tokens.
    gmask = config.get("gmask_token_id")
    if isinstance(gmask, int):
        return max(gmask - sp.PieceToId("[gMASK]"), 0)
    if isinstance(tokenizer_config.get("num_image_tokens"), int):
        return tokenizer_config["num_image_tokens"]
    return 0


def _split_on(text: str, pattern: re.Pattern[str] | None) -> Iterator[tuple[str, bool]]:
    """(piece, is_match) for the stretches of `text` between and at the matches of `pattern`."""
    if pattern is None:
        yield text, False
        return
    start = 0
    for match in pattern.finditer(text):
        if match.start() > start:
            yield text[start : match.start()], False
        yield match.group(), True
        start = match.end()
    if start < len(text):
        yield text[start:], False


def _alternation(tokens: Sequence[str]) -> re.Pattern[str] | None:
    # Longest first, so "[gMASK]" is not read as something shorter that it contains.
    ordered = sorted(tokens, key=len, reverse=True)
    return re.compile("|".join(re.escape(token) for token in ordered)) if ordered else None


# --- ChatGLM-6B (v1): ice_text.model ----------------------------------------------------------------------

V1_SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")
V1_MAX_BLANK = 80  # runs of 2..80 spaces have their own piece, <|blank_k|>


class ChatGLMv1Tokenizer(Tokenizer):
    """ChatGLM-6B's sentencepiece model with its whitespace pre-processing (spec 1.6).

    Newlines, tabs and runs of spaces become the pieces `<n>`, `<|tab|>` and `<|blank_k|>` before
    sentencepiece sees the text, and come back on decode: without this, code tokenizes completely
    differently. The GLM specials live inside the sentencepiece vocab; `add_special_tokens` appends
    `[gMASK] <sop>` (v1 marks the generation point at the *end*). Ids are sentencepiece ids + `id_offset`.
    """

    def __init__(self, sp: sentencepiece.SentencePieceProcessor, *, id_offset: int = 0) -> None:
        self.sp = sp
        self.id_offset = id_offset
        self.vocab_size = id_offset + sp.GetPieceSize()
        self.special_tokens = {}
        for token in V1_SPECIAL_TOKENS:
            piece_id = sp.PieceToId(token)
            if sp.IdToPiece(piece_id) == token:
                self.special_tokens[token] = piece_id + id_offset
        self.bos_token_id = self.special_tokens.get("<sop>")
        self.eos_token_id = self.special_tokens.get("<eop>")
        self.pad_token_id = self.token_to_id("<pad>")
        self._special_pattern = _alternation(list(self.special_tokens))
        # Whether the specials are control pieces (never matched in text) is unverified for the real file; if
        # any is a user-defined piece, sentencepiece would turn its text in user content into the special id.
        # Those are cut out and encoded by pieces instead (see `_encode_plain`).
        matched = [t for t in self.special_tokens if self.special_tokens[t] - id_offset in sp.encode(t)]
        self._matched_special_pattern = _alternation(matched)

    @classmethod
    def from_file(cls, path: Path, *, id_offset: int = 0) -> ChatGLMv1Tokenizer:
        return cls(sentencepiece.SentencePieceProcessor(model_file=str(path)), id_offset=id_offset)

    # The stand-ins, in the order the reference applies them: newline, tab, then the longest runs first.
    @staticmethod
    def preprocess(text: str) -> str:
        text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
        for length in range(V1_MAX_BLANK, 1, -1):
            text = text.replace(" " * length, f"<|blank_{length}|>")
        return text

    @staticmethod
    def postprocess(text: str) -> str:
        text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
        for length in range(2, V1_MAX_BLANK + 1):
            text = text.replace(f"<|blank_{length}|>", " " * length)
        return text

    def encode(self, text: str, *, add_special_tokens: bool = False, allow_special: bool = True) -> list[int]:
        ids: list[int] = []
        for piece, is_special in _split_on(text, self._special_pattern if allow_special else None):
            ids += [self.special_tokens[piece]] if is_special else self._encode_plain(piece)
        if add_special_tokens:
            ids += [self.special_tokens["[gMASK]"], self.special_tokens["<sop>"]]
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        text = self.preprocess(text)
        if self._matched_special_pattern is None or not self._matched_special_pattern.search(text):
            return [i + self.id_offset for i in self.sp.encode(text)]
        ids: list[int] = []
        for index, (piece, is_special) in enumerate(_split_on(text, self._matched_special_pattern)):
            # Only the very first stretch gets sentencepiece's dummy "▁": the rest continue the same text.
            encode = self.sp.encode if index == 0 else self._encode_continuation
            if is_special:  # "[gMASK]" as "[" + "gMASK]": neither half is a piece sentencepiece matches whole
                ids += encode(piece[:1]) + self._encode_continuation(piece[1:])
            else:
                ids += encode(piece)
        return [i + self.id_offset for i in ids]

    def _encode_continuation(self, text: str) -> list[int]:
        # The reference's own trick for "no dummy prefix": encode "<n>" + text and drop the "▁" and "<n>".
        return self.sp.encode("<n>" + text)[2:] if text else []

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        skipped = set(self.special_tokens.values()) if skip_special_tokens else set()
        size = self.sp.GetPieceSize()
        pieces = [
            i - self.id_offset
            for i in ids
            if i != self.pad_token_id and i not in skipped and 0 <= i - self.id_offset < size
        ]  # ids below the offset are the removed image tokens; above the vocab, embedding padding
        return self.postprocess(self.sp.decode(pieces))

    def token_to_id(self, token: str) -> int | None:
        piece_id = self.sp.PieceToId(token)
        return piece_id + self.id_offset if self.sp.IdToPiece(piece_id) == token else None

    def id_to_token(self, token_id: int) -> str | None:
        piece_id = token_id - self.id_offset
        return self.sp.IdToPiece(piece_id) if 0 <= piece_id < self.sp.GetPieceSize() else None


# --- ChatGLM2 / ChatGLM3: tokenizer.model (sentencepiece) ------------------------------------------------

V2_SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")  # "sop"/"eop" without brackets (sic)
V2_ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")  # ChatGLM3 only


class ChatGLM2Tokenizer(Tokenizer):
    """ChatGLM2/3's sentencepiece model (byte fallback) with the GLM specials appended after its vocab
    (spec 2.6): `[MASK]` = piece count, then `[gMASK]`, `[sMASK]`, `sop`, `eop` and, for ChatGLM3, the four
    role tokens -- 64789..64797 for the released vocab. They are not in the .model, so sentencepiece never
    produces them from text. `add_special_tokens` puts `[gMASK] sop` in *front*.

    With `allow_special`, the bracketed specials and role tokens in text become their ids, but not bare
    "sop"/"eop": those are ordinary words ("isopropyl"), and ChatGLM3's own special-token splitting only
    matches the role tokens too.
    """

    def __init__(
        self, sp: sentencepiece.SentencePieceProcessor, *, role_tokens: bool, chat_template: str | None = None
    ) -> None:
        self.sp = sp
        self.role_tokens = role_tokens
        self.chat_template = chat_template
        names = V2_SPECIAL_TOKENS + (V2_ROLE_TOKENS if role_tokens else ())
        self._sp_size = sp.GetPieceSize()
        self.special_tokens = {name: self._sp_size + i for i, name in enumerate(names)}
        self._special_names = {i: name for name, i in self.special_tokens.items()}
        self.vocab_size = self._sp_size + len(names)
        self.bos_token_id = sp.bos_id() if sp.bos_id() >= 0 else None
        self.eos_token_id = sp.eos_id() if sp.eos_id() >= 0 else None
        self.pad_token_id = sp.unk_id()  # ChatGLM2/3 pad with <unk> (id 0)
        self._special_pattern = _alternation([name for name in names if name not in ("sop", "eop")])

    @classmethod
    def from_file(
        cls, path: Path, *, role_tokens: bool, chat_template: str | None = None
    ) -> ChatGLM2Tokenizer:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        return cls(sp, role_tokens=role_tokens, chat_template=chat_template)

    def encode(self, text: str, *, add_special_tokens: bool = False, allow_special: bool = True) -> list[int]:
        # Each stretch between specials is its own sentencepiece call (its own dummy "▁"), as in ChatGLM3.
        ids = [self.special_tokens["[gMASK]"], self.special_tokens["sop"]] if add_special_tokens else []
        for piece, is_special in _split_on(text, self._special_pattern if allow_special else None):
            ids += [self.special_tokens[piece]] if is_special else self.sp.encode(piece)
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        # Sentencepiece runs between specials are decoded separately (each drops its leading "▁"), as the
        # reference does. ChatGLM3 writes the special text out so a caller can split on "<|assistant|>";
        # ChatGLM2 decodes every special to "". bos/eos/pad always decode to "".
        dropped = {self.bos_token_id, self.eos_token_id, self.pad_token_id}
        text: list[str] = []
        run: list[int] = []
        for token_id in ids:
            if token_id in self._special_names:
                text.append(self.sp.decode(run))
                run = []
                if self.role_tokens and not skip_special_tokens:
                    text.append(self._special_names[token_id])
            elif 0 <= token_id < self._sp_size and token_id not in dropped:
                run.append(token_id)
        text.append(self.sp.decode(run))
        return "".join(text)

    def token_to_id(self, token: str) -> int | None:
        if token in self.special_tokens:
            return self.special_tokens[token]
        piece_id = self.sp.PieceToId(token)
        return piece_id if self.sp.IdToPiece(piece_id) == token else None

    def id_to_token(self, token_id: int) -> str | None:
        if token_id in self._special_names:
            return self._special_names[token_id]
        return self.sp.IdToPiece(token_id) if 0 <= token_id < self._sp_size else None


# --- GLM-4-9B-chat: tokenizer.model as tiktoken ranks ------------------------------------------------------

# cl100k's split (the same as Llama 3's); needs Unicode property classes, which tiktoken has built in.
GLM4_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GLM4_SPECIAL_TOKENS = {  # the published ids (spec 3.1), right after the 151329 ranks
    token: 151329 + i
    for i, token in enumerate(
        (
            "<|endoftext|>",
            "[MASK]",
            "[gMASK]",
            "[sMASK]",
            "<sop>",
            "<eop>",
            "<|system|>",
            "<|user|>",
            "<|assistant|>",
            "<|observation|>",
            "<|begin_of_image|>",
            "<|end_of_image|>",
            "<|begin_of_video|>",
            "<|end_of_video|>",
        )
    )
}


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken rank file: one `base64(token bytes) rank` per line. Parsed here rather than with
    `tiktoken.load`, which copies every file it reads into a cache directory."""
    ranks: dict[bytes, int] = {}
    for line_no, line in enumerate(Path(path).read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as exc:
            raise ModelFileError(path, f"line {line_no} is not 'base64-token rank'") from exc
    return ranks


class GLM4Tokenizer(Tokenizer):
    """GLM-4-9B-chat's byte-level BPE, run by tiktoken (spec 3.1). Token strings (`id_to_token`) are spelled
    in GPT-2's byte alphabet, as in GLM-4's tokenizer.json and GGUF files, so ids and names agree across the
    three ways a GLM-4 tokenizer arrives. `add_special_tokens` puts `[gMASK] <sop>` in front."""

    def __init__(
        self,
        ranks: dict[bytes, int],
        *,
        special_tokens: dict[str, int] | None = None,
        chat_template: str | None = None,
    ) -> None:
        self.special_tokens = dict(GLM4_SPECIAL_TOKENS if special_tokens is None else special_tokens)
        self._ranks = ranks
        self._encoding = tiktoken.Encoding(
            name="glm4", pat_str=GLM4_PATTERN, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self._special_names = {i: name for name, i in self.special_tokens.items()}
        self.vocab_size = self._encoding.max_token_value + 1
        self.eos_token_id = self.special_tokens.get("<|endoftext|>")
        self.pad_token_id = self.eos_token_id
        self.chat_template = chat_template

    @classmethod
    def from_file(cls, path: Path, *, tokenizer_config: dict[str, Any] | None = None) -> GLM4Tokenizer:
        """The rank file plus tokenizer_config.json: its `added_tokens_decoder` is where the remote code
        gets the special ids from; the published table is the default."""
        tokenizer_config = tokenizer_config or {}
        special = dict(GLM4_SPECIAL_TOKENS)
        for token_id, added in (tokenizer_config.get("added_tokens_decoder") or {}).items():
            if isinstance(added, dict) and isinstance(added.get("content"), str):
                special[added["content"]] = int(token_id)
        template = tokenizer_config.get("chat_template")
        return cls(
            read_tiktoken_ranks(path),
            special_tokens=special,
            chat_template=template if isinstance(template, str) else None,
        )

    def encode(self, text: str, *, add_special_tokens: bool = False, allow_special: bool = True) -> list[int]:
        prefix = [self.special_tokens["[gMASK]"], self.special_tokens["<sop>"]] if add_special_tokens else []
        allowed: Any = "all" if allow_special else set()
        return prefix + self._encoding.encode(text, allowed_special=allowed, disallowed_special=())

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        # Padding rows of the embedding (151343..151551) have no token; they decode to nothing.
        kept = [
            i
            for i in ids
            if (i in self._special_names and not skip_special_tokens) or i in self._bytes_by_rank
        ]
        return self._encoding.decode_bytes(kept).decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> int | None:
        if token in self.special_tokens:
            return self.special_tokens[token]
        byte_of = self._byte_of_char
        if not all(char in byte_of for char in token):
            return None
        return self._ranks.get(bytes(byte_of[char] for char in token))

    def id_to_token(self, token_id: int) -> str | None:
        if token_id in self._special_names:
            return self._special_names[token_id]
        token = self._bytes_by_rank.get(token_id)
        return None if token is None else "".join(self._char_of_byte[byte] for byte in token)

    @cached_property
    def _bytes_by_rank(self) -> dict[int, bytes]:
        return {rank: token for token, rank in self._ranks.items()}

    @cached_property
    def _char_of_byte(self) -> dict[int, str]:
        return bytes_to_unicode()

    @cached_property
    def _byte_of_char(self) -> dict[str, int]:
        return {char: byte for byte, char in self._char_of_byte.items()}
