"""ChatGLM2/3 / GLM-4-9B-chat (v2) and GLM-4-0414 logits against transformers on the same random weights.

The v2 weights are written in the original THUDM layout; the oracle is transformers' GlmForCausalLM with the
state dict renamed by spec 9.2 (written out here, independently of the engine's own mapping). The same
weights are also loaded from transformers' converted layout and from GGUF files.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

from glmstack.engine.describe import describe
from glmstack.engine.errors import ModelFileError, UnsupportedArchitectureError
from glmstack.engine.generation import new_cache
from glmstack.engine.loading.checkpoint import load_model
from glmstack.engine.models import chatglm, chatglm_v1, glm4, registry

TOL = 1e-4
V, H, LAYERS, HEADS, GROUPS, D, FFN = 128, 64, 2, 4, 2, 16, 96


def thudm_config(**overrides) -> dict:
    cfg = dict(
        architectures=["ChatGLMModel"],
        model_type="chatglm",
        num_layers=LAYERS,
        hidden_size=H,
        num_attention_heads=HEADS,
        kv_channels=D,
        multi_query_attention=True,
        multi_query_group_num=GROUPS,
        ffn_hidden_size=FFN,
        padded_vocab_size=V,
        seq_length=256,
        layernorm_epsilon=1e-5,
        rmsnorm=True,
        add_qkv_bias=True,
        add_bias_linear=False,
        apply_residual_connection_post_layernorm=False,
        post_layer_norm=True,
        torch_dtype="float32",
    )
    cfg.update(overrides)
    return cfg


def thudm_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random v2 weights named as the remote-code checkpoints (spec 2.5); norms and biases random too."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 0.1) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    qkv = (HEADS + 2 * GROUPS) * D
    sd = {
        "transformer.embedding.word_embeddings.weight": rnd(V, H, scale=1.0),
        "transformer.rotary_pos_emb.inv_freq": torch.rand(D // 4, generator=g),  # junk: must be dropped
        "transformer.encoder.final_layernorm.weight": 1 + rnd(H),
        "transformer.output_layer.weight": rnd(V, H),
    }
    for i in range(LAYERS):
        p = f"transformer.encoder.layers.{i}."
        sd |= {
            p + "input_layernorm.weight": 1 + rnd(H),
            p + "self_attention.query_key_value.weight": rnd(qkv, H),
            p + "self_attention.query_key_value.bias": rnd(qkv, scale=0.5),
            p + "self_attention.dense.weight": rnd(H, HEADS * D),
            p + "post_attention_layernorm.weight": 1 + rnd(H),
            p + "mlp.dense_h_to_4h.weight": rnd(2 * FFN, H),
            p + "mlp.dense_4h_to_h.weight": rnd(H, FFN),
        }
    return sd


def write_thudm(path: Path, sd: dict[str, torch.Tensor], **config) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(thudm_config(**config)))
    save_file(sd, str(path / "model.safetensors"))
    return path


def to_transformers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Spec 9.2: the v2 state dict onto GlmForCausalLM names (query_key_value split into q/k/v)."""
    top = {
        "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
        "transformer.encoder.final_layernorm.weight": "model.norm.weight",
        "transformer.output_layer.weight": "lm_head.weight",
    }
    layer = {
        "input_layernorm.weight": "input_layernorm.weight",
        "self_attention.dense.weight": "self_attn.o_proj.weight",
        "post_attention_layernorm.weight": "post_attention_layernorm.weight",
        "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
        "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
    }
    out = {}
    for name, t in sd.items():
        if name in top:
            out[top[name]] = t
        elif name.startswith("transformer.encoder.layers."):
            i, rest = name.split(".")[3], name.split(".", 4)[4]
            if rest.startswith("self_attention.query_key_value."):
                kind = rest.rsplit(".", 1)[1]
                q, k, v = t.split([HEADS * D, GROUPS * D, GROUPS * D])
                for proj, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                    out[f"model.layers.{i}.self_attn.{proj}.{kind}"] = part
            else:
                out[f"model.layers.{i}.{layer[rest]}"] = t
    return out


def glm_oracle(sd: dict[str, torch.Tensor], rope_ratio: float = 1.0) -> transformers.GlmForCausalLM:
    cfg = transformers.GlmConfig(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=GROUPS,
        head_dim=D,
        partial_rotary_factor=0.5,
        rms_norm_eps=1e-5,
        rope_theta=10000.0 * rope_ratio,
        max_position_embeddings=256,
        attention_bias=True,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        attn_implementation="eager",
    )
    model = transformers.GlmForCausalLM(cfg).eval()
    model.load_state_dict(to_transformers(sd), strict=True)
    return model


def tiny_glm4(seed: int = 0) -> transformers.Glm4ForCausalLM:
    cfg = transformers.Glm4Config(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=GROUPS,
        head_dim=D,
        partial_rotary_factor=0.5,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=256,
        attention_bias=True,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = transformers.Glm4ForCausalLM(cfg).eval()
    with torch.no_grad():  # random norms and biases, so a swapped or dropped one shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.normal_(0, 0.5)
    return model


def reference_logits(model: transformers.PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def our_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    model = load_model(path, device="cpu", dtype="float32").module
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1])[None])


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, V, (1, 12), generator=torch.Generator().manual_seed(3))


# ---- v2 (ChatGLM2/3, GLM-4-9B-chat) --------------------------------------------------------------------


@pytest.mark.parametrize("rope_ratio", [1, 500])
def test_thudm_layout_matches_transformers(tmp_path: Path, ids: torch.Tensor, rope_ratio: int) -> None:
    sd = thudm_weights()
    path = write_thudm(tmp_path / "m", sd, rope_ratio=rope_ratio)
    diff = (our_logits(path, ids) - reference_logits(glm_oracle(sd, rope_ratio), ids)).abs().max().item()
    assert diff <= TOL


def test_transformers_layout_loads_the_same_model(tmp_path: Path, ids: torch.Tensor) -> None:
    oracle = glm_oracle(thudm_weights(), rope_ratio=500)
    oracle.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "glm"
    diff = (our_logits(tmp_path, ids) - reference_logits(oracle, ids)).abs().max().item()
    assert diff <= TOL


# llama.cpp tensor names (gguf.TensorNameMap for arch chatglm / glm4).
GGUF_TOP = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output"}
GGUF_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "post_self_attn_layernorm": "post_attention_norm",
    "post_mlp_layernorm": "post_ffw_norm",
}


def transformers_to_gguf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in sd.items():
        module, kind = name.removeprefix("model.").rsplit(".", 1)
        if module.startswith("layers."):
            _, i, rest = module.split(".", 2)
            out[f"blk.{i}.{GGUF_LAYER[rest]}.{kind}"] = t
        else:
            out[f"{GGUF_TOP[module]}.{kind}"] = t
    return out


def thudm_to_gguf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fused attn_qkv, as converted from a ChatGLMModel checkpoint."""
    out = transformers_to_gguf(to_transformers(sd))
    for i in range(LAYERS):
        for kind in ("weight", "bias"):
            parts = [out.pop(f"blk.{i}.attn_{x}.{kind}") for x in "qkv"]
            out[f"blk.{i}.attn_qkv.{kind}"] = torch.cat(parts)
    return out


def write_gguf(path: Path, tensors: dict[str, torch.Tensor], arch: str, rope_theta: float) -> None:
    """What llama.cpp's converter writes: no q/k permutation, fused ffn_up, metadata `<arch>.*`."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(H)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(GROUPS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(D // 2)
    writer.add_rope_freq_base(rope_theta)
    writer.add_token_list([f"t{i}" for i in range(V)])  # and no <arch>.vocab_size, like real chatglm files
    for name, t in tensors.items():
        writer.add_tensor(name, t.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("split_qkv", [False, True])
def test_chatglm_gguf_matches_transformers(tmp_path: Path, ids: torch.Tensor, split_qkv: bool) -> None:
    sd = thudm_weights()
    path = tmp_path / "tiny.gguf"
    tensors = transformers_to_gguf(to_transformers(sd)) if split_qkv else thudm_to_gguf(sd)
    write_gguf(path, tensors, "chatglm", rope_theta=5e6)
    diff = (our_logits(path, ids) - reference_logits(glm_oracle(sd, rope_ratio=500), ids)).abs().max().item()
    assert diff <= TOL


def cached_equals_full(path: Path, ids: torch.Tensor) -> None:
    model = load_model(path, device="cpu", dtype="float32").module
    with torch.no_grad():
        full = model(ids, torch.arange(ids.shape[1])[None])
        cache = new_cache(model, torch.device("cpu"), torch.float32, capacity=4)
        pieces = [model(ids[:, :5], torch.arange(5)[None], cache)]
        pieces.append(model(ids[:, 5:9], torch.arange(5, 9)[None], cache))  # a chunk on top of a cache
        for t in range(9, ids.shape[1]):
            pieces.append(model(ids[:, t : t + 1], torch.tensor([[t]]), cache))
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= TOL


def test_chatglm_cached_decode_equals_full_forward(tmp_path: Path, ids: torch.Tensor) -> None:
    cached_equals_full(write_thudm(tmp_path / "m", thudm_weights(), rope_ratio=500), ids)


# ---- GLM-4-0414 (sandwich norms) -------------------------------------------------------------------


def test_glm4_matches_transformers(tmp_path: Path, ids: torch.Tensor) -> None:
    ref = tiny_glm4()
    ref.save_pretrained(tmp_path)
    diff = (our_logits(tmp_path, ids) - reference_logits(ref, ids)).abs().max().item()
    assert diff <= TOL


def test_glm4_gguf_matches_transformers(tmp_path: Path, ids: torch.Tensor) -> None:
    ref = tiny_glm4()
    path = tmp_path / "glm4.gguf"
    write_gguf(path, transformers_to_gguf(ref.state_dict()), "glm4", rope_theta=10000.0)
    diff = (our_logits(path, ids) - reference_logits(ref, ids)).abs().max().item()
    assert diff <= TOL
    info = describe(path)
    assert info["implementation"] == "glm4" and info["parameters"] == ref.num_parameters()


def test_glm4_cached_decode_equals_full_forward(tmp_path: Path, ids: torch.Tensor) -> None:
    tiny_glm4().save_pretrained(tmp_path)
    cached_equals_full(tmp_path, ids)


# ---- missing tensors, routing, unsupported configs --------------------------------------------------------


def test_thudm_missing_tensor_is_named(tmp_path: Path) -> None:
    sd = thudm_weights()
    del sd["transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"]
    with pytest.raises(ModelFileError, match=r"missing 1 tensors.*layers\.1\.mlp\.dense_4h_to_h\.weight"):
        load_model(write_thudm(tmp_path / "m", sd), device="cpu", dtype="float32")


def test_transformers_layout_missing_k_proj_is_named(tmp_path: Path) -> None:
    sd = to_transformers(thudm_weights())
    del sd["model.layers.0.self_attn.k_proj.weight"]
    glm_oracle(thudm_weights()).config.save_pretrained(tmp_path)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelFileError, match=r"layers\.0\.self_attention\.query_key_value\.weight"):
        load_model(tmp_path, device="cpu", dtype="float32")


def test_glm4_missing_sandwich_norm_is_named(tmp_path: Path) -> None:
    ref = tiny_glm4()
    ref.config.save_pretrained(tmp_path)
    sd = {k: v for k, v in ref.state_dict().items() if k != "model.layers.1.post_mlp_layernorm.weight"}
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelFileError, match=r"layers\.1\.post_mlp_layernorm\.weight"):
        load_model(tmp_path, device="cpu", dtype="float32")


V1_CONFIG = dict(  # THUDM/chatglm-6b config.json (spec 1.1)
    architectures=["ChatGLMModel"],
    model_type="chatglm",
    torch_dtype="float16",
    vocab_size=130528,
    hidden_size=4096,
    inner_hidden_size=16384,
    num_layers=28,
    num_attention_heads=32,
    layernorm_epsilon=1e-05,
    max_sequence_length=2048,
    position_encoding_2d=True,
    use_cache=True,
    bos_token_id=130004,
    eos_token_id=130005,
    mask_token_id=130000,
    gmask_token_id=130001,
    pad_token_id=3,
)
CHATGLM2_CONFIG = thudm_config(  # THUDM/chatglm2-6b (spec 2.1)
    num_layers=28,
    hidden_size=4096,
    num_attention_heads=32,
    kv_channels=128,
    multi_query_group_num=2,
    ffn_hidden_size=13696,
    padded_vocab_size=65024,
    seq_length=32768,
    torch_dtype="float16",
)
GLM4_9B_CHAT_CONFIG = dict(  # THUDM/glm-4-9b-chat (spec 2.1, 3)
    CHATGLM2_CONFIG,
    num_layers=40,
    num_hidden_layers=40,
    padded_vocab_size=151552,
    seq_length=131072,
    rope_ratio=500,
    layernorm_epsilon=1.5625e-07,
    torch_dtype="bfloat16",
)


@pytest.mark.parametrize("arch", ["ChatGLMModel", "ChatGLMForConditionalGeneration", None])
def test_resolve_tells_chatglm_v1_from_v2(arch: str | None) -> None:
    def cfg(base: dict) -> dict:
        out = dict(base)
        if arch is None:
            out.pop("architectures")  # model_type alone
        else:
            out["architectures"] = [arch]
        return out

    assert registry.resolve_hf(cfg(V1_CONFIG)) is chatglm_v1
    assert registry.resolve_hf(cfg(GLM4_9B_CHAT_CONFIG)) is chatglm
    assert chatglm.resolve(V1_CONFIG) is chatglm_v1 and chatglm.resolve(CHATGLM2_CONFIG) is chatglm


def test_registry_routes_transformers_and_gguf_names() -> None:
    assert registry.resolve_hf({"architectures": ["GlmForCausalLM"], "model_type": "glm"}) is chatglm
    assert registry.resolve_hf({"architectures": ["Glm4ForCausalLM"], "model_type": "glm4"}) is glm4
    assert registry.resolve_hf({"model_type": "glm4"}) is glm4
    assert registry.resolve_gguf("chatglm") is chatglm and registry.resolve_gguf("glm4") is glm4


def test_unsupported_chatglm_configs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedArchitectureError, match="quantization_bit=4"):
        load_model(write_thudm(tmp_path / "q", thudm_weights(), quantization_bit=4), device="cpu")
    with pytest.raises(UnsupportedArchitectureError, match="add_bias_linear"):
        load_model(write_thudm(tmp_path / "b", thudm_weights(), add_bias_linear=True), device="cpu")


# ---- inspect -------------------------------------------------------------------------------------------


def test_describe_published_configs_match_spec_section_11(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(V1_CONFIG))
    v1 = describe(tmp_path)  # a checkpoint folder holding only config.json
    assert v1["implementation"] == "chatglm_v1" and v1["context_length"] == 2048
    assert v1["parameters"] == pytest.approx(6.173e9, rel=1e-3)  # lm_head shares the embedding
    assert v1["kv_cache_bytes_per_token"] == 448 * 1024

    assert describe(CHATGLM2_CONFIG)["parameters"] == 6_243_584_000

    path = tmp_path / "glm-4-9b-chat.json"
    path.write_text(json.dumps(GLM4_9B_CHAT_CONFIG))
    glm = describe(path, device="cpu")
    assert glm["parameters"] == 9_399_951_360 and glm["context_length"] == 131072
    gb = {k: v / 1e9 for k, v in glm["memory_bytes"].items()}
    assert gb["fp16"] == gb["bf16"] == pytest.approx(18.80, abs=0.01)
    # as quantize_model on CPU: int8 head (int4 too), bf16 scales (and int4 zeros, groups of 32), the embedding's
    # rows int8 / int4 too (1.24 GB in bf16 -> 0.62 / 0.39), bf16 norms and biases
    assert gb["int8"] == pytest.approx(9.40, abs=0.01)
    assert gb["int4"] == pytest.approx(6.11, abs=0.01)
    assert glm["kv_cache_bytes_per_token"] == 40 * 1024
