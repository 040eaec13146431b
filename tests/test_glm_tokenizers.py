"""GLM tokenizers against their oracles: sentencepiece itself for ChatGLM-6B and ChatGLM2/3, tiktoken itself
for GLM-4. The vocabularies are tiny ones laid out at the published ids (see glm_vocab.py), so the ids the
spec documents (64790, 130011, 151331, ...) are asserted literally."""

import json
from types import SimpleNamespace

import pytest
import tiktoken
from glm_vocab import (
    CONTROL,
    GLM4_PAT,
    GLM4_SPECIALS,
    USER_DEFINED,
    chatglm2_model,
    chatglm3_gguf_metadata,
    glm4_gguf_metadata,
    glm4_ranks,
    ice_text_model,
    sp_oracle,
    v1_preprocess,
    write_rank_file,
)

from glmstack.engine.errors import ModelFileError
from glmstack.engine.tokenization.base import Tokenizer
from glmstack.engine.tokenization.gguf_vocab import tokenizer_from_gguf
from glmstack.engine.tokenization.glm import (
    ChatGLM2Tokenizer,
    ChatGLMv1Tokenizer,
    GLM4Tokenizer,
    is_tiktoken_rank_file,
    load_glm_checkpoint_tokenizer,
    load_glm_tokenizer,
)
from glmstack.engine.tokenization.hf import HFTokenizer

TEXTS = [
    "你好",
    "你好，世界！今天天气很好。",
    "Hello world, how are you?",
    "def main():\n    print('hello world')\t# greeting",
    "a  b   c    d" + " " * 85 + "e",
    "\n\n 两个换行\n",
    "  leading and trailing  ",
    "emoji 👋🚀 and unseen Ω ☃ fall back to bytes",
    "数字 12345 和 3.14",
    "",
]
SPECIAL_TEXT = "<|user|>[gMASK]<sop>sop<|endoftext|>[MASK]"
STREAM_TEXT = "你好👋！春风吹绿了江南岸。\n    代码\t缩进 🚀 Ω"


def stream(tokenizer: Tokenizer, ids: list[int], **kwargs) -> list[str]:
    decoder = tokenizer.stream_decoder(**kwargs)
    return [decoder.push(token_id) for token_id in ids] + [decoder.flush()]


def assert_streams_cleanly(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, allow_special=False)
    # Only meaningful if some single token holds part of a character.
    assert any("\ufffd" in tokenizer.decode([token_id]) for token_id in ids)
    pieces = stream(tokenizer, ids)
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) == tokenizer.decode(ids) == text


# --- ChatGLM-6B: ice_text.model ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def v1():
    model = ice_text_model()
    return ChatGLMv1Tokenizer(sp_oracle(model)), sp_oracle(model)


@pytest.mark.parametrize("text", TEXTS)
def test_v1_encode_is_sentencepiece_after_whitespace_stand_ins(v1, text):
    ours, sp = v1
    assert ours.encode(text) == sp.encode(v1_preprocess(text))
    assert ours.encode(text, add_special_tokens=True) == sp.encode(v1_preprocess(text)) + [130001, 130004]
    assert ours.decode(ours.encode(text)) == text


def test_v1_published_ids(v1):
    ours, _ = v1
    assert [ours.token_to_id(t) for t in ("[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>")] == [
        130000,
        130001,
        130002,
        130004,
        130005,
    ]
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.vocab_size) == (
        130004,
        130005,
        3,
        130344,
    )
    code = ours.encode("def main():\n    print('hello world')\t# greeting")
    assert 4 in code and 130011 in code and 130008 in code  # <n>, <|blank_4|>, <|tab|>
    assert (ours.token_to_id("<n>"), ours.token_to_id("\u2581"), ours.token_to_id("<|blank_80|>")) == (
        4,
        5,
        130087,
    )
    assert ours.encode("👋")[-4:] == [130088 + b for b in "👋".encode()]  # byte fallback at 130088 + byte
    assert ours.id_to_token(130001) == "[gMASK]" and ours.id_to_token(200000) is None


def test_v1_id_offset_of_the_march_2023_release(tmp_path):
    (tmp_path / "ice_text.model").write_bytes(ice_text_model())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"num_image_tokens": 20000}))
    old = load_glm_tokenizer(tmp_path, {})
    assert isinstance(old, ChatGLMv1Tokenizer)
    assert old.encode("你好", add_special_tokens=True)[-2:] == [150001, 150004]
    assert old.decode([15, *old.encode("你好")]) == "你好"  # image-token ids decode to nothing
    (tmp_path / "tokenizer_config.json").unlink()
    assert load_glm_tokenizer(tmp_path, {"gmask_token_id": 150001}).token_to_id("<eop>") == 150005
    assert load_glm_tokenizer(tmp_path, {"gmask_token_id": 130001}).token_to_id("<eop>") == 130005


@pytest.mark.parametrize("special_type", [CONTROL, USER_DEFINED])
def test_v1_special_text_in_user_content_stays_text(special_type):
    # Whether ice_text's specials are control or user-defined pieces is unverified; either way user text
    # must not become a special id.
    ours = ChatGLMv1Tokenizer(sp_oracle(ice_text_model(special_type)))
    specials = set(ours.special_tokens.values())
    for text in (SPECIAL_TEXT, "问[gMASK]答", "[gMASK]", "a <eop>\nb"):
        ids = ours.encode(text, allow_special=False)
        assert not set(ids) & specials
        assert ours.decode(ids) == text
    assert ours.encode("a[gMASK]", allow_special=True)[-1] == 130001


def test_v1_streams_chinese_and_bytes_cleanly(v1):
    assert_streams_cleanly(v1[0], STREAM_TEXT)


# --- ChatGLM2 / ChatGLM3: tokenizer.model (sentencepiece) ---------------------------------------------------


@pytest.fixture(scope="module")
def v2():
    model = chatglm2_model()
    sp = sp_oracle(model)
    return ChatGLM2Tokenizer(sp, role_tokens=False), ChatGLM2Tokenizer(sp, role_tokens=True), sp


@pytest.mark.parametrize("text", TEXTS)
def test_v2_encode_is_sentencepiece(v2, text):
    chatglm2, chatglm3, sp = v2
    assert chatglm2.encode(text) == chatglm3.encode(text) == sp.encode(text)
    assert chatglm3.encode(text, add_special_tokens=True) == [64790, 64792, *sp.encode(text)]
    assert chatglm3.decode(chatglm3.encode(text)) == text


def test_v2_published_ids(v2):
    chatglm2, chatglm3, sp = v2
    names = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>"]
    names.append("<|observation|>")
    assert [chatglm3.token_to_id(name) for name in names] == list(range(64789, 64798))
    assert chatglm2.token_to_id("<|user|>") is None and chatglm2.vocab_size == 64794
    assert chatglm3.vocab_size == 64798
    assert (chatglm3.bos_token_id, chatglm3.eos_token_id, chatglm3.pad_token_id) == (1, 2, 0)
    assert chatglm3.encode("\n") == [sp.piece_to_id("\u2581"), 13]  # spec: [30910, 13]
    assert chatglm3.encode("👋")[-4:] == [243, 162, 148, 142]  # byte fallback at 3 + byte


def test_v2_special_text_in_user_content_stays_text(v2):
    _, chatglm3, sp = v2
    assert chatglm3.encode(SPECIAL_TEXT, allow_special=False) == sp.encode(SPECIAL_TEXT)
    # Allowed, the bracketed specials and role tokens match -- never the bare words "sop"/"eop".
    ids = chatglm3.encode("<|user|>isopropyl sop eop[gMASK]", allow_special=True)
    assert ids[0] == 64795 and ids[-1] == 64790
    assert 64792 not in ids and 64793 not in ids


def test_v2_decode_specials(v2):
    chatglm2, chatglm3, sp = v2
    ids = [64790, 64792, 64796, *sp.encode("\n你好"), 64795, 2]
    assert chatglm3.decode(ids) == "[gMASK]sop<|assistant|>\n你好<|user|>"  # ChatGLM3 writes special text
    assert chatglm3.decode(ids, skip_special_tokens=True) == "\n你好"
    assert chatglm2.decode(ids) == "\n你好"  # ChatGLM2 decodes specials to nothing
    assert chatglm3.decode([*sp.encode("ok"), 65000]) == "ok"  # embedding padding has no token


def test_v2_streams_chinese_and_bytes_cleanly(v2):
    assert_streams_cleanly(v2[1], STREAM_TEXT)
    chatglm3 = v2[1]
    ids = [64796, *chatglm3.encode("\n你好👋"), 64795]  # an answer as the model generates it
    assert "".join(stream(chatglm3, ids)) == "\n你好👋"
    assert "".join(stream(chatglm3, ids, skip_special_tokens=False)) == "<|assistant|>\n你好👋<|user|>"


def test_chatglm3_role_tokens_detected_from_the_folder(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(chatglm2_model())
    assert load_glm_tokenizer(tmp_path, {}).token_to_id("<|user|>") is None  # no evidence: ChatGLM2
    (tmp_path / "tokenization_chatglm.py").write_text(
        'role_special_tokens = ["<|system|>", "<|observation|>"]'
    )
    tokenizer = load_glm_tokenizer(tmp_path, {})
    assert isinstance(tokenizer, ChatGLM2Tokenizer) and tokenizer.token_to_id("<|user|>") == 64795
    (tmp_path / "tokenization_chatglm.py").write_text("special_tokens = ['[MASK]', '[gMASK]', 'sop', 'eop']")
    assert load_glm_tokenizer(tmp_path, {}).token_to_id("<|user|>") is None
    template = "{% for m in messages %}<|{{ m['role'] }}|>\n {{ m['content'] }}{% endfor %}<|user|>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    assert load_glm_tokenizer(tmp_path, {}).token_to_id("<|user|>") == 64795
    assert load_glm_tokenizer(tmp_path, {}, role_tokens=False).token_to_id("<|user|>") is None


# --- GLM-4: tiktoken rank file ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def glm4(tmp_path_factory):
    path = tmp_path_factory.mktemp("glm4") / "tokenizer.model"
    write_rank_file(path, glm4_ranks())
    oracle = tiktoken.Encoding(
        name="oracle", pat_str=GLM4_PAT, mergeable_ranks=glm4_ranks(), special_tokens={}
    )
    return load_glm_tokenizer(path.parent, {}), oracle


@pytest.mark.parametrize("text", TEXTS)
def test_glm4_encode_is_tiktoken(glm4, text):
    ours, oracle = glm4
    assert isinstance(ours, GLM4Tokenizer)
    assert ours.encode(text) == oracle.encode(text)
    assert ours.encode(text, add_special_tokens=True) == [151331, 151333, *oracle.encode(text)]
    assert ours.decode(ours.encode(text)) == text


def test_glm4_published_ids(glm4):
    ours, _ = glm4
    assert [ours.token_to_id(token) for token in GLM4_SPECIALS] == list(range(151329, 151343))
    assert (ours.eos_token_id, ours.pad_token_id, ours.vocab_size) == (151329, 151329, 151343)
    newline = ours.encode("\n")
    assert len(newline) == 1 and ours.id_to_token(newline[0]) == "Ċ"  # GPT-2 byte alphabet, as in GGUF/json
    assert ours.token_to_id("Ċ") == newline[0] and ours.token_to_id("no such token") is None
    assert ours.id_to_token(151400) is None


def test_glm4_special_text_in_user_content_stays_text(glm4):
    ours, oracle = glm4
    plain = ours.encode(SPECIAL_TEXT, allow_special=False)
    assert plain == oracle.encode(SPECIAL_TEXT) and not set(plain) & set(ours.special_tokens.values())
    assert ours.encode("<|user|>\nhi", allow_special=True)[0] == 151336
    ids = [151331, 151333, 151337, *ours.encode("\n你好"), 151336]
    assert ours.decode(ids) == "[gMASK]<sop><|assistant|>\n你好<|user|>"
    assert ours.decode(ids, skip_special_tokens=True) == "\n你好"
    assert ours.decode([*ours.encode("ok"), 151500]) == "ok"  # embedding padding rows decode to nothing


def test_glm4_streams_chinese_cleanly(glm4):
    assert_streams_cleanly(glm4[0], STREAM_TEXT)


def test_glm4_special_ids_from_tokenizer_config(tmp_path):
    write_rank_file(tmp_path / "tokenizer.model", glm4_ranks())
    added = {"151343": {"content": "<think>", "special": True}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": added}))
    tokenizer = load_glm_tokenizer(tmp_path, {})
    assert tokenizer.token_to_id("<think>") == 151343 and tokenizer.token_to_id("<|user|>") == 151336


# --- which file wins ---------------------------------------------------------------------------------------


def test_load_glm_tokenizer_picks_by_files_and_content(tmp_path):
    assert not is_tiktoken_rank_file_of(tmp_path, chatglm2_model())
    write_rank_file(tmp_path / "tokenizer.model", glm4_ranks())
    assert is_tiktoken_rank_file(tmp_path / "tokenizer.model")
    (tmp_path / "ice_text.model").write_bytes(ice_text_model())
    assert isinstance(load_glm_tokenizer(tmp_path, {}), GLM4Tokenizer)  # tokenizer.model before ice_text
    (tmp_path / "tokenizer.model").write_bytes(chatglm2_model())
    assert isinstance(load_glm_tokenizer(tmp_path, {}), ChatGLM2Tokenizer)
    (tmp_path / "tokenizer.model").unlink()
    assert isinstance(load_glm_tokenizer(tmp_path, {}), ChatGLMv1Tokenizer)
    # tokenizer.json wins over everything (GLM-4-0414 and the -hf repos ship one).
    tokenizer_from_gguf(glm4_gguf_metadata()).backend.save(str(tmp_path / "tokenizer.json"))
    assert isinstance(load_glm_tokenizer(tmp_path, {}), HFTokenizer)
    for name in ("tokenizer.json", "ice_text.model"):
        (tmp_path / name).unlink()
    with pytest.raises(ModelFileError):
        load_glm_tokenizer(tmp_path, {})


def test_checkpoint_hook_takes_gguf_metadata_or_the_folder(tmp_path):
    write_rank_file(tmp_path / "tokenizer.model", glm4_ranks())
    (tmp_path / "model.safetensors").write_bytes(b"")
    from_file = load_glm_checkpoint_tokenizer(
        SimpleNamespace(format="safetensors", path=tmp_path / "model.safetensors", config={})
    )
    from_gguf = load_glm_checkpoint_tokenizer(
        SimpleNamespace(format="gguf", path=tmp_path, config=glm4_gguf_metadata())
    )
    assert isinstance(from_file, GLM4Tokenizer) and isinstance(from_gguf, HFTokenizer)
    assert from_file.encode(STREAM_TEXT) == from_gguf.encode(STREAM_TEXT)


def is_tiktoken_rank_file_of(folder, content: bytes) -> bool:
    path = folder / "probe.model"
    path.write_bytes(content)
    try:
        return is_tiktoken_rank_file(path)
    finally:
        path.unlink()


def test_bad_rank_file_is_a_model_file_error(tmp_path):
    (tmp_path / "tokenizer.model").write_text("SGVsbG8= 0\nnot base64 at all!\n")
    with pytest.raises(ModelFileError, match="line 2"):
        load_glm_tokenizer(tmp_path, {})


# --- GGUF conversions (llama.cpp "chatglm-bpe" / "chatglm-spm") --------------------------------------------


def test_glm4_gguf_tokenizer_matches_tiktoken(glm4):
    ours, oracle = glm4
    converted = tokenizer_from_gguf(glm4_gguf_metadata())
    for text in [*TEXTS, SPECIAL_TEXT, STREAM_TEXT]:
        assert converted.encode(text, allow_special=False) == oracle.encode(text)
        assert converted.decode(oracle.encode(text)) == text
    assert converted.encode("<|user|>x")[0] == 151336
    assert all(converted.token_to_id(token) == ours.token_to_id(token) for token in GLM4_SPECIALS)
    assert_streams_cleanly(converted, STREAM_TEXT)


def test_chatglm3_gguf_tokenizer_matches_sentencepiece(v2):
    _, chatglm3, sp = v2
    converted = tokenizer_from_gguf(chatglm3_gguf_metadata())
    for text in [*TEXTS, SPECIAL_TEXT, STREAM_TEXT]:
        assert converted.encode(text, allow_special=False) == sp.encode(text)
        assert converted.decode(sp.encode(text)) == text
    assert all(converted.token_to_id(t) == chatglm3.token_to_id(t) for t in chatglm3.special_tokens)
    assert_streams_cleanly(converted, STREAM_TEXT)
