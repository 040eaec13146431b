"""`model.chat` / `stream_chat` end to end for every GLM family, and the stop tokens that end their answers.

Each family is a tiny random model written to tmp in its published on-disk layout -- config.json, weights,
and the tokenizer files next to them as the THUDM repos ship them (ice_text.model; tokenizer.model as
sentencepiece or tiktoken text; tokenizer.json + tokenizer_config.json for GLM-4-0414) -- and loaded with
`glmstack.load`. Weights come from the model tests' builders (hidden size 64), with the vocabulary widened
to the published size so the special ids (64790, 130005, 151336, ...) are real rows. The expected prompts are
written out by hand, with sentencepiece / tiktoken themselves encoding the text between the GLM marks.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import tiktoken
import torch
from glm_vocab import (
    GLM4_PAT,
    GLM4_SPECIALS,
    chatglm2_model,
    glm4_gguf_metadata,
    glm4_ranks,
    ice_text_model,
    sp_oracle,
    v1_preprocess,
    write_rank_file,
)
from safetensors.torch import save_file
from test_chatglm_v1 import CONFIG as V1_TINY_CONFIG
from test_chatglm_v1 import v1_weights
from test_glm_models import thudm_weights, tiny_glm4, write_thudm

import glmstack
from glmstack.engine.classic import ChatModel
from glmstack.engine.models.chatglm_v1 import ChatGLMv1ForCausalLM
from glmstack.engine.tokenization.base import Tokenizer
from glmstack.engine.tokenization.gguf_vocab import tokenizer_from_gguf
from glmstack.protocol import GenerationEvent, SamplingParams

FAMILIES = ["chatglm-6b", "chatglm2", "chatglm3", "glm4-9b-chat", "glm4-0414"]
CONTEXT = 2048
SYSTEM = "你是一个乐于助人的助手。"
GREEDY = dict(do_sample=False, max_new_tokens=6)

# ChatGLM2 and ChatGLM3 ship the same tokenizer.model; their tokenization_chatglm.py tells them apart.
V2_TOKENIZER_CODE = 'special_tokens = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]\n'
V3_TOKENIZER_CODE = (
    'role_special_tokens = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]\n'
    'special_tokens = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"] + role_special_tokens\n'
)
CHATGLM3_TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}[gMASK]sop<|{{ message['role'] }}|>\n"
    " {{ message['content'] }}{% else %}<|{{ message['role'] }}|>\n {{ message['content'] }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Shipped in tokenizer_config.json like the repo does; the engine renders GLM-4-9B-chat prompts in code.
GLM4_9B_CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for item in messages %}{% if item['role'] in ['system', 'user', 'assistant', "
    "'observation'] %}<|{{ item['role'] }}|>{{ item['metadata'] if item['metadata'] is defined else '' }}\n"
    "{{ item['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# GLM-4-9B-0414's chat template, its tools block left out: system messages go first, whatever their place.
GLM4_0414_TEMPLATE = (
    "[gMASK]<sop>{%- for msg in messages %}{%- if msg.role == 'system' %}<|system|>\n{{ msg.content }}"
    "{%- endif %}{%- endfor %}{%- for message in messages if message.role != 'system' %}"
    "{%- set role = message['role'] %}{%- set content = message['content'] %}"
    "{%- set meta = message.get('metadata', '') %}{%- if role == 'user' %}<|user|>\n{{ content }}"
    "{%- elif role == 'assistant' and not meta %}<|assistant|>\n{{ content }}"
    "{%- elif role == 'assistant' and meta %}<|assistant|>{{ meta }} \n{{ content }}"
    "{%- elif role == 'observation' %}<|observation|>\n{{ content }}{%- endif %}{%- endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


# ---- the checkpoints ---------------------------------------------------------------------------------------


def widen(weight: torch.Tensor, vocab: int, *, random_rows: bool) -> torch.Tensor:
    """`weight` ([tiny vocab, hidden]) grown to `vocab` rows. Input embeddings get random rows, so every
    prompt token has its own vector; output layers get zero rows, so greedy decoding picks among the tiny
    builder's rows -- ids that are real text tokens in every GLM vocabulary -- and the reply has text."""
    extra = vocab - weight.shape[0]
    g = torch.Generator().manual_seed(vocab)
    rows = (
        torch.randn(extra, weight.shape[1], generator=g)
        if random_rows
        else torch.zeros(extra, weight.shape[1])
    )
    return torch.cat([weight, rows])


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")


def chatglm_6b(folder: Path) -> None:
    sd = v1_weights()
    # The tied lm_head holds the embedding's values: both widen with zeros, so padded ids never win.
    sd["transformer.word_embeddings.weight"] = widen(
        sd["transformer.word_embeddings.weight"], 130528, random_rows=False
    )
    sd["lm_head.weight"] = sd["transformer.word_embeddings.weight"].clone()
    config = dict(V1_TINY_CONFIG, vocab_size=130528, max_sequence_length=CONTEXT, bos_token_id=130004)
    config |= dict(eos_token_id=130005, mask_token_id=130000, gmask_token_id=130001, pad_token_id=3)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "config.json", config)
    torch.save(sd, folder / "pytorch_model.bin")  # ChatGLM-6B ships .bin files
    (folder / "ice_text.model").write_bytes(ice_text_model())
    write_json(
        folder / "tokenizer_config.json",
        {"bos_token": "<sop>", "eos_token": "</s>", "eop_token": "<eop>", "gmask_token": "[gMASK]",
         "mask_token": "[MASK]", "pad_token": "<pad>", "unk_token": "<unk>", "num_image_tokens": 0,
         "remove_space": False, "do_lower_case": False, "tokenizer_class": "ChatGLMTokenizer"},
    )  # fmt: skip


def v2_weights(vocab: int) -> dict[str, torch.Tensor]:
    sd = thudm_weights()
    embedding, output = "transformer.embedding.word_embeddings.weight", "transformer.output_layer.weight"
    sd[embedding] = widen(sd[embedding], vocab, random_rows=True)
    sd[output] = widen(sd[output], vocab, random_rows=False)
    return sd


def chatglm2(folder: Path, *, chatglm3: bool = False) -> None:
    write_thudm(folder, v2_weights(65024), padded_vocab_size=65024, seq_length=CONTEXT, eos_token_id=2,
                pad_token_id=0)  # fmt: skip
    (folder / "tokenizer.model").write_bytes(chatglm2_model())
    (folder / "tokenization_chatglm.py").write_text(V3_TOKENIZER_CODE if chatglm3 else V2_TOKENIZER_CODE)
    tokenizer_config = {"remove_space": False, "do_lower_case": False, "tokenizer_class": "ChatGLMTokenizer"}
    if chatglm3:
        tokenizer_config |= {"chat_template": CHATGLM3_TEMPLATE, "eos_token": "</s>", "pad_token": "<unk>"}
    write_json(folder / "tokenizer_config.json", tokenizer_config)


def glm4_9b_chat(folder: Path) -> None:
    write_thudm(folder, v2_weights(151552), padded_vocab_size=151552, seq_length=CONTEXT, rope_ratio=500,
                eos_token_id=[151329, 151336, 151338], pad_token_id=151329)  # fmt: skip
    write_rank_file(folder / "tokenizer.model", glm4_ranks())  # tiktoken ranks as text, despite the name
    added = {str(151329 + i): {"content": token, "special": True} for i, token in enumerate(GLM4_SPECIALS)}
    write_json(
        folder / "tokenizer_config.json",
        {"added_tokens_decoder": added, "chat_template": GLM4_9B_CHAT_TEMPLATE, "eos_token": "<|endoftext|>",
         "pad_token": "<|endoftext|>", "remove_space": False, "do_lower_case": False,
         "tokenizer_class": "ChatGLM4Tokenizer"},
    )  # fmt: skip


def glm4_0414(folder: Path) -> None:
    model = tiny_glm4()
    sd = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    sd["model.embed_tokens.weight"] = widen(sd["model.embed_tokens.weight"], 151552, random_rows=True)
    sd["lm_head.weight"] = widen(sd["lm_head.weight"], 151552, random_rows=False)
    config = model.config.to_dict() | {"architectures": ["Glm4ForCausalLM"], "vocab_size": 151552}
    config |= {
        "max_position_embeddings": CONTEXT,
        "eos_token_id": [151329, 151336, 151338],
        "pad_token_id": 151329,
    }
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "config.json", config)
    save_file(sd, str(folder / "model.safetensors"))
    tokenizer_from_gguf(glm4_gguf_metadata()).backend.save(str(folder / "tokenizer.json"))
    write_json(
        folder / "tokenizer_config.json",
        {"chat_template": GLM4_0414_TEMPLATE, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
         "clean_up_tokenization_spaces": False, "do_lower_case": False, "remove_space": False,
         "model_max_length": 128000, "padding_side": "left", "tokenizer_class": "PreTrainedTokenizerFast"},
    )  # fmt: skip


BUILDERS: dict[str, Callable[[Path], None]] = {
    "chatglm-6b": chatglm_6b,
    "chatglm2": chatglm2,
    "chatglm3": lambda folder: chatglm2(folder, chatglm3=True),
    "glm4-9b-chat": glm4_9b_chat,
    "glm4-0414": glm4_0414,
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The folder of a family's tiny checkpoint, written on first use."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = tmp_path_factory.mktemp(family)
            BUILDERS[family](built[family])
        return built[family]

    return get


@pytest.fixture(scope="module")
def loaded(checkpoint: Callable[[str], Path]) -> Callable[[str], tuple[ChatModel, Tokenizer]]:
    """`glmstack.load` of a family's checkpoint, once per module (tests must not change its weights)."""
    models: dict[str, tuple[ChatModel, Tokenizer]] = {}

    def get(family: str) -> tuple[ChatModel, Tokenizer]:
        if family not in models:
            models[family] = glmstack.load(checkpoint(family), device="cpu", dtype="float32")
        return models[family]

    return get


# ---- the expected prompts, by hand -------------------------------------------------------------------------


def expected_prompt(family: str, query: str, *, system: str | None = None) -> list[int]:
    """A first turn's prompt ids as each family's reference code builds it (spec 1.7, 2.7, 2.8, 3.2)."""
    if family == "chatglm-6b":  # no system prompt; a first question alone has no round markers
        return [*sp_oracle(ice_text_model()).encode(v1_preprocess(query)), 130001, 130004]
    sp = sp_oracle(chatglm2_model())
    if family == "chatglm2":  # no system prompt
        return [64790, 64792, *sp.encode(f"[Round 1]\n\n问：{query}\n\n答：")]
    if family == "chatglm3":  # <|role|> then "\n" and the content, each encoded on its own
        turns = ([(64794, system)] if system else []) + [(64795, query)]
        return [
            64790,
            64792,
            *[i for role, text in turns for i in [role, *sp.encode("\n"), *sp.encode(text)]],
            64796,
        ]
    tik = tiktoken.Encoding(name="oracle", pat_str=GLM4_PAT, mergeable_ranks=glm4_ranks(), special_tokens={})
    turns = ([(151335, system)] if system else []) + [(151336, query)]
    return [151331, 151333, *[i for role, text in turns for i in [role, *tik.encode("\n" + text)]], 151337]


@contextmanager
def prompts_seen(model: ChatModel) -> Iterator[list[list[int]]]:
    """The prompt ids of every generation started while in the block (what the engine is asked to continue,
    whichever path then runs it)."""
    seen: list[list[int]] = []
    generate = model.stream_generate

    def recording(prompt_ids, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(list(prompt_ids))
        return generate(prompt_ids, *args, **kwargs)

    model.stream_generate = recording  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        del model.stream_generate  # the class's method again


# ---- chat and stream_chat ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_with_tuple_history(loaded, family: str) -> None:
    model, tokenizer = loaded(family)
    assert model.context_length == CONTEXT
    with prompts_seen(model) as seen:
        response, history = model.chat(tokenizer, "你好", history=[], **GREEDY)
    assert isinstance(response, str) and response
    # from an empty history, ChatGLM3 and GLM-4-9B-chat answer with role dicts, as ChatGLM3's own chat() does
    dicts = family in ("chatglm3", "glm4-9b-chat")
    turn = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": response}]
    assert history == (turn if dicts else [("你好", response)])
    assert seen[0] == model.chat_format.render([{"role": "user", "content": "你好"}]).token_ids
    assert seen[0] == expected_prompt(family, "你好")
    assert len(seen) == 1  # one generation

    again, history = model.chat(tokenizer, "再见", history=[("你好", response)], **GREEDY)
    assert isinstance(again, str) and history == [("你好", response), ("再见", again)]


@pytest.mark.parametrize("family", FAMILIES)
def test_dict_history_comes_back_as_dicts(loaded, family: str) -> None:
    model, tokenizer = loaded(family)
    pairs = [("你好", "你好！有什么可以帮你的吗？")]
    dicts = [{"role": "user", "content": pairs[0][0]}, {"role": "assistant", "content": pairs[0][1]}]
    before = copy.deepcopy(dicts)
    with prompts_seen(model) as from_dicts:
        response, history = model.chat(tokenizer, "北京今天天气怎么样？", history=dicts, **GREEDY)
    turn = [{"role": "user", "content": "北京今天天气怎么样？"}, {"role": "assistant", "content": response}]
    assert history == [*dicts, *turn] and dicts == before  # the caller's list is left as it was
    with prompts_seen(model) as from_pairs:
        same, _ = model.chat(tokenizer, "北京今天天气怎么样？", history=pairs, **GREEDY)
    assert from_dicts[0] == from_pairs[0] and same == response


@pytest.mark.parametrize("family", FAMILIES)
def test_stream_chat_grows_to_the_chat_response(loaded, family: str) -> None:
    model, tokenizer = loaded(family)
    streamed = list(
        model.stream_chat(tokenizer, "写一首关于春天的诗", history=[("你好", "你好！")], **GREEDY)
    )
    responses = [response for response, _ in streamed]
    assert len(set(responses)) > 1, "the reply should arrive in more than one piece"
    assert all(later.startswith(earlier) for earlier, later in zip(responses, responses[1:], strict=False))
    final, history = model.chat(tokenizer, "写一首关于春天的诗", history=[("你好", "你好！")], **GREEDY)
    assert responses[-1] == final and streamed[-1][1] == history
    assert all(h[:-1] == [("你好", "你好！")] and h[-1] == ("写一首关于春天的诗", r) for r, h in streamed)


@pytest.mark.parametrize("family", FAMILIES)
def test_system_prompt(loaded, family: str) -> None:
    """ChatGLM-6B and ChatGLM2 have no system prompt and leave it out; the others render it."""
    model, tokenizer = loaded(family)
    with prompts_seen(model) as seen:
        response, history = model.chat(tokenizer, "你好", history=[], system=SYSTEM, **GREEDY)
    dicts = family in ("chatglm3", "glm4-9b-chat")  # see test_chat_with_tuple_history
    turn = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": response}]
    assert isinstance(response, str) and history == (turn if dicts else [("你好", response)])
    assert seen[0] == expected_prompt(family, "你好", system=SYSTEM)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "你好"}]
    assert seen[0] == model.chat_format.render(messages).token_ids


def test_glm4_0414_uses_its_own_template(loaded) -> None:
    model, _ = loaded("glm4-0414")
    assert model.chat_format.name == "template"
    # The 0414 template puts system messages first wherever they stand; GLM-4-9B-chat's format would not.
    messages = [{"role": "user", "content": "你好"}, {"role": "system", "content": SYSTEM}]
    assert model.chat_format.render(messages).token_ids == expected_prompt("glm4-0414", "你好", system=SYSTEM)
    assert {loaded(family)[0].chat_format.name for family in FAMILIES[:4]} == {
        "chatglm-6b", "chatglm2", "chatglm3", "glm4"
    }  # fmt: skip


# ---- stop tokens -------------------------------------------------------------------------------------------


def force_next_token(model: ChatModel, token_id: int) -> None:
    """Make greedy decoding pick `token_id` after any prompt: the final norm's output is made the same
    positive vector whatever the input, and the output layer has one non-zero row, so that id's logit is
    positive and every other logit is 0. Forcing again replaces the previous choice."""
    module = model.module
    with torch.no_grad():
        if isinstance(module, ChatGLMv1ForCausalLM):
            # LayerNorm has a bias: weight 0, bias 1 outputs ones, and the tied lm_head is set row by row.
            module.transformer.final_layernorm.weight.zero_()
            module.transformer.final_layernorm.bias.fill_(1.0)
            output = module.lm_head.weight
        else:
            # RMSNorm has no bias: zero every sublayer's output projection so the residual stream is just the
            # embedding, and give every token the same all-ones embedding.
            for layer in module.transformer.encoder.layers:
                layer.self_attention.dense.weight.zero_()
                layer.mlp.dense_4h_to_h.weight.zero_()
            module.transformer.embedding.word_embeddings.weight.fill_(1.0)
            module.transformer.encoder.final_layernorm.weight.fill_(1.0)
            output = module.transformer.output_layer.weight
        output.zero_()
        output[token_id] = 1.0


@pytest.fixture(scope="module")
def forced(checkpoint: Callable[[str], Path]) -> Callable[[str, int], ChatModel]:
    """A family's model, loaded apart from the `loaded` ones, forced to answer `token_id` next."""
    models: dict[str, ChatModel] = {}

    def get(family: str, token_id: int) -> ChatModel:
        if family not in models:
            models[family] = glmstack.load(checkpoint(family), device="cpu", dtype="float32")[0]
        force_next_token(models[family], token_id)
        return models[family]

    return get


def chat_events(model: ChatModel, max_tokens: int) -> list[GenerationEvent]:
    messages = [{"role": "user", "content": "你好"}]
    return list(model.stream_messages(messages, SamplingParams(max_tokens=max_tokens, do_sample=False)))


STOPS = [
    ("chatglm-6b", 130005),  # <eop>
    ("chatglm2", 2),  # </s>
    ("chatglm3", 2),
    ("chatglm3", 64795),  # <|user|>
    ("chatglm3", 64797),  # <|observation|>
    *[
        (family, token_id)
        for family in ("glm4-9b-chat", "glm4-0414")
        for token_id in (151329, 151336, 151338)
    ],
]


@pytest.mark.parametrize(("family", "token_id"), STOPS)
def test_stop_token_ends_the_answer_at_once(forced, family: str, token_id: int) -> None:
    model = forced(family, token_id)
    assert token_id in model.chat_format.stop_token_ids
    events = chat_events(model, max_tokens=8)
    assert [(e.text, e.token_ids, e.finish_reason) for e in events] == [("", [], "stop")]
    assert events[-1].usage.completion_tokens == 0
    assert model.chat(None, "你好", history=[("a", "b")], do_sample=False) == ("", [("a", "b"), ("你好", "")])


@pytest.mark.parametrize("family", FAMILIES)
def test_an_ordinary_token_runs_to_max_tokens(loaded, forced, family: str) -> None:
    ordinary = loaded(family)[1].encode("好", allow_special=False)[-1]
    model = forced(family, ordinary)
    events = chat_events(model, max_tokens=5)
    assert events[-1].finish_reason == "length" and events[-1].usage.completion_tokens == 5
    assert [token for event in events for token in event.token_ids] == [ordinary] * 5
    assert "".join(event.text for event in events) == model.tokenizer.decode([ordinary] * 5)
