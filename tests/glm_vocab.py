"""Tiny GLM vocabularies built in the test process, laid out at the published ids (spec 1.6, 2.6, 3.1).

The sentencepiece models are trained small (a few hundred pieces) and then re-laid out by rewriting the model
protobuf: pieces moved to the ids the real files use and unused filler pieces added, so that e.g. ChatGLM2's
appended `[gMASK]` lands on 64790 and ChatGLM-6B's `<|blank_4|>` on 130011, exactly as in the real files.
Encoding behaviour is unchanged by the move (sentencepiece merges by score, not by id), and the oracle is
always sentencepiece itself on the very same model bytes.
"""

from __future__ import annotations

import base64
import io
import struct
from functools import lru_cache
from pathlib import Path

import gguf
import sentencepiece
from tiktoken._educational import bpe_train

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # sentencepiece piece types

CORPUS = [
    "你好，世界！今天天气很好，我们一起去公园散步吧。",
    "你好！有什么可以帮你的吗？我是一个人工智能助手。",
    "机器学习是人工智能的一个分支，深度学习又是机器学习的一个分支。",
    "北京是中国的首都，上海是中国最大的城市。请问北京今天天气怎么样？",
    "写一首关于春天的诗。春风吹绿了江南岸，桃花开满了山坡。",
    "Hello world, how are you today? I'm fine, thanks for asking.",
    "The quick brown fox jumps over the lazy dog while the weather is nice.",
    "def main():\n    print('hello world')  # greeting\n\treturn 0",
    "Numbers like 2024 and 3.14159 appear in text, as do emails and URLs.",
    "问：你好\n答：你好！\n[Round 1]",
]

# GLM-4's split, written out here rather than imported, so the oracle does not share our constant.
GLM4_PAT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GLM4_SPECIALS = [
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
    "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
    "<|end_of_video|>",
]  # fmt: skip


# --- sentencepiece model protobuf: just enough of the wire format to move pieces around ----------------------


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _put_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def read_pieces(model: bytes) -> tuple[list[tuple[str, float, int]], bytes]:
    """(piece, score, type) for each piece of a ModelProto, and its other fields as raw bytes."""
    pieces, rest, pos = [], bytearray(), 0
    while pos < len(model):
        start = pos
        key, pos = _varint(model, pos)
        length, pos = _varint(model, pos)  # every ModelProto field is a length-delimited message
        body, pos = model[pos : pos + length], pos + length
        if key >> 3 != 1:
            rest += model[start:pos]
            continue
        piece, score, kind, at = "", 0.0, NORMAL, 0
        while at < len(body):
            field_key, at = _varint(body, at)
            if field_key == (1 << 3 | 2):
                size, at = _varint(body, at)
                piece, at = body[at : at + size].decode("utf-8"), at + size
            elif field_key == (2 << 3 | 5):
                score, at = struct.unpack("<f", body[at : at + 4])[0], at + 4
            elif field_key == (3 << 3 | 0):
                kind, at = _varint(body, at)
            else:
                raise ValueError(f"unexpected SentencePiece field {field_key}")
        pieces.append((piece, score, kind))
    return pieces, bytes(rest)


def write_model(pieces: list[tuple[str, float, int]], rest: bytes) -> bytes:
    out = bytearray()
    for piece, score, kind in pieces:
        text = piece.encode("utf-8")
        body = b"\x0a" + _put_varint(len(text)) + text + b"\x15" + struct.pack("<f", score)
        body += b"\x18" + _put_varint(kind)
        out += b"\x0a" + _put_varint(len(body)) + body
    return bytes(out) + rest


def _fillers(count: int) -> list[tuple[str, float, int]]:
    # Two private-use characters no test text contains: never produced, and no half of one is a piece.
    return [(chr(0xF0000 + i // 60000) + chr(0x100000 + i % 60000), -1e6, NORMAL) for i in range(count)]


def _train(vocab_size: int, **options) -> bytes:
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        # One line per sentence: like the real files, newline is no piece of its own (it falls back to a byte).
        sentence_iterator=iter([line for text in CORPUS for line in text.split("\n")] * 5),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
        **options,
    )
    return model.getvalue()


@lru_cache
def chatglm2_model() -> bytes:
    """ChatGLM2/3's tokenizer.model layout: <unk> <s> </s>, bytes at 3..258, text pieces, 64789 pieces in all
    (so the appended specials start at 64789)."""
    pieces, rest = read_pieces(_train(500))
    assert [p for p, _, _ in pieces[:4]] == ["<unk>", "<s>", "</s>", "<0x00>"]
    return write_model(pieces + _fillers(64789 - len(pieces)), rest)


V1_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
V1_WHITESPACE = ["<|tab|>"] + [f"<|blank_{k}|>" for k in range(2, 81)]


@lru_cache
def ice_text_model(special_type: int = CONTROL) -> bytes:
    """ChatGLM-6B's ice_text.model layout: 0 <unk>, 3 <pad>, 4 <n>, 5 ▁, text, specials at 130000..130007,
    <|tab|> 130008, <|blank_2..80|> 130009..130087, bytes 130088..130343 (130344 pieces)."""
    model = _train(
        800,
        pad_id=3,
        control_symbols=V1_SPECIALS,
        user_defined_symbols=["<n>", *V1_WHITESPACE],
    )
    pieces, rest = read_pieces(model)
    by_name = {piece[0]: piece for piece in pieces}
    head = [by_name[name] for name in ("<unk>", "<s>", "</s>", "<pad>", "<n>", "\u2581")]
    tail_names = {*V1_SPECIALS, *V1_WHITESPACE}
    text = [p for p in pieces if p not in head and p[0] not in tail_names and p[2] != BYTE]
    specials = [(name, 0.0, special_type) for name in V1_SPECIALS]
    whitespace = [by_name[name] for name in V1_WHITESPACE]
    byte_pieces = [by_name[f"<0x{b:02X}>"] for b in range(256)]
    body = head + text
    return write_model(body + _fillers(130000 - len(body)) + specials + whitespace + byte_pieces, rest)


def v1_preprocess(text: str) -> str:
    """ChatGLM-6B's whitespace stand-ins (spec 1.6), written out independently of the code under test."""
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for k in range(80, 1, -1):
        text = text.replace(" " * k, f"<|blank_{k}|>")
    return text


def sp_oracle(model: bytes) -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_proto=model)


# --- GLM-4: tiktoken ranks ---------------------------------------------------------------------------------


@lru_cache
def glm4_ranks() -> dict[bytes, int]:
    """A byte-level BPE trained by tiktoken's own reference trainer: 256 bytes + merges, GLM-4's split."""
    return bpe_train("\n".join(CORPUS * 3), 420, GLM4_PAT, visualise=None)


def write_rank_file(path: Path, ranks: dict[bytes, int]) -> None:
    lines = [
        f"{base64.b64encode(token).decode()} {rank}"
        for token, rank in sorted(ranks.items(), key=lambda x: x[1])
    ]
    path.write_text("\n".join(lines) + "\n")


def bytes_to_unicode() -> dict[int, str]:
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    # What transformers' TikTokenConverter does: rebuild each token from lower-ranked pieces; the last two
    # pieces are its merge.
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda x: x[1]):
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            best_rank, i = min(
                (ranks.get(parts[i] + parts[i + 1], 1 << 62), i) for i in range(len(parts) - 1)
            )
            if best_rank >= rank:
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


def glm4_gguf_metadata() -> dict:
    """GGUF tokenizer metadata the way llama.cpp's converter writes GLM-4-9B-chat ("chatglm-bpe")."""
    ranks = glm4_ranks()
    alphabet = bytes_to_unicode()

    def spell(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    by_rank = {rank: token for token, rank in ranks.items()}
    tokens = [spell(by_rank[i]) if i in by_rank else f"[PAD{i}]" for i in range(151329)]
    types = [gguf.TokenType.NORMAL if i in by_rank else gguf.TokenType.UNUSED for i in range(151329)]
    tokens += GLM4_SPECIALS
    types += [gguf.TokenType.CONTROL] * len(GLM4_SPECIALS)
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "chatglm-bpe",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": [f"{spell(a)} {spell(b)}" for a, b in _merges_from_ranks(ranks)],
        "tokenizer.ggml.eos_token_id": 151329,
        "tokenizer.ggml.eot_token_id": 151336,
        "tokenizer.ggml.unknown_token_id": 151329,
        "tokenizer.ggml.padding_token_id": 151329,
        "tokenizer.ggml.add_bos_token": False,
    }


def chatglm3_gguf_metadata() -> dict:
    """GGUF tokenizer metadata the way llama.cpp's converter writes ChatGLM3 ("chatglm-spm")."""
    sp = sp_oracle(chatglm2_model())

    def kind(i: int) -> int:
        if sp.is_unknown(i):
            return gguf.TokenType.UNKNOWN
        if sp.is_control(i):
            return gguf.TokenType.CONTROL
        return gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.NORMAL

    size = sp.get_piece_size()
    specials = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>"]
    specials.append("<|observation|>")
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "chatglm-spm",
        "tokenizer.ggml.tokens": ["<unk>", "<bos>", "<eos>"]
        + [sp.id_to_piece(i) for i in range(3, size)]
        + specials,
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(size)] + [0.0] * len(specials),
        "tokenizer.ggml.token_type": [kind(i) for i in range(size)]
        + [gguf.TokenType.CONTROL] * len(specials),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
    }
