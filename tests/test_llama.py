"""Llama-family logits against transformers on the same random weights, via safetensors and GGUF files."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

from glmstack.engine.generation import new_cache
from glmstack.engine.loading.checkpoint import load_model, open_checkpoint, stored_precision
from glmstack.engine.models.llama import permute_qk
from glmstack.engine.quant.int4 import quantize_int4
from glmstack.engine.quant.prequantized import int4_weights_from_gguf
from glmstack.engine.quant.quantize_model import quantize_model

TOL = 1e-4


# Both tiny models share this shape: small enough to build in milliseconds, with grouped-query attention.
TINY_SHAPE = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)


def tiny_llama(**overrides) -> transformers.PreTrainedModel:
    cfg = dict(TINY_SHAPE, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    cfg.update(overrides)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    return model


def tiny_qwen2() -> transformers.PreTrainedModel:
    torch.manual_seed(1)
    cfg = transformers.Qwen2Config(**TINY_SHAPE, tie_word_embeddings=True)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # random biases so a dropped bias would show
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model


def reference_logits(model: transformers.PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def our_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    loaded = load_model(path, device="cpu", dtype="float32")
    pos = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        return loaded.module(ids, pos)


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 160, (1, 12), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("tied", [False, True])
def test_llama_safetensors_matches_transformers(tmp_path: Path, ids: torch.Tensor, tied: bool) -> None:
    ref = tiny_llama(tie_word_embeddings=tied)
    ref.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    diff = (our_logits(tmp_path, ids) - reference_logits(ref, ids)).abs().max().item()
    assert diff <= TOL


def test_llama_sharded_safetensors(tmp_path: Path, ids: torch.Tensor) -> None:
    ref = tiny_llama()
    ref.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    diff = (our_logits(tmp_path, ids) - reference_logits(ref, ids)).abs().max().item()
    assert diff <= TOL


def test_qwen2_qkv_bias_matches_transformers(tmp_path: Path, ids: torch.Tensor) -> None:
    ref = tiny_qwen2()
    ref.save_pretrained(tmp_path)
    diff = (our_logits(tmp_path, ids) - reference_logits(ref, ids)).abs().max().item()
    assert diff <= TOL


def test_legacy_bin_loads_weights_only(tmp_path: Path, ids: torch.Tensor) -> None:
    ref = tiny_llama()
    ref.config.save_pretrained(tmp_path)
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    diff = (our_logits(tmp_path, ids) - reference_logits(ref, ids)).abs().max().item()
    assert diff <= TOL


# ---- GGUF --------------------------------------------------------------------------------------------

HF_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def write_gguf(
    model: transformers.PreTrainedModel,
    path: Path,
    arch: str,
    quant: gguf.GGMLQuantizationType | None = None,
    rope_freqs: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Write a GGUF the way llama.cpp's convert_hf_to_gguf.py does (permuting Llama q/k rows). Returns the
    HF-named weights as the file really holds them (after any quantization round trip)."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    writer.add_vocab_size(cfg.vocab_size)
    effective: dict[str, np.ndarray] = {}
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = tensor.float()
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
            w = permute_qk(w, heads)
        if name.startswith("model.layers."):
            _, _, index, rest = name.split(".", 3)
            gguf_name = f"blk.{index}.{HF_TO_GGUF[rest]}"
        else:
            gguf_name = {
                "model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight",
            }[name]
        array = w.numpy().astype(np.float32)
        if quant is not None and array.ndim == 2:
            packed = gguf.quants.quantize(array, quant)
            writer.add_tensor(gguf_name, packed, raw_dtype=quant)
            array = gguf.quants.dequantize(packed, quant)
        else:
            writer.add_tensor(gguf_name, array)
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            array = permute_back(array, cfg, name)
        effective[name] = array
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return effective


def use_file_weights(ref: transformers.PreTrainedModel, effective: dict[str, np.ndarray]) -> None:
    """The oracle gets the very weights the file holds (after the quantization round trip)."""
    ref.load_state_dict(
        {k: torch.from_numpy(v.copy()).reshape(ref.state_dict()[k].shape) for k, v in effective.items()},
        strict=False,
    )


def permute_back(array: np.ndarray, cfg, name: str) -> np.ndarray:
    heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
    t = torch.from_numpy(array)
    return t.reshape(heads, t.shape[0] // heads // 2, 2, t.shape[1]).swapaxes(1, 2).reshape(t.shape).numpy()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_f32_matches_transformers(tmp_path: Path, ids: torch.Tensor, arch: str) -> None:
    ref = tiny_llama() if arch == "llama" else tiny_qwen2()
    path = tmp_path / "tiny.gguf"
    write_gguf(ref, path, arch)
    diff = (our_logits(path, ids) - reference_logits(ref, ids)).abs().max().item()
    assert diff <= TOL


def test_gguf_without_unpermute_would_differ(tmp_path: Path, ids: torch.Tensor) -> None:
    """Guards the test above: the permutation really changes q/k, so skipping the undo is caught."""
    ref = tiny_llama()
    w = ref.model.layers[0].self_attn.q_proj.weight.detach()
    assert not torch.equal(permute_qk(w, 4), w)


@pytest.mark.parametrize(
    "quant",
    [
        gguf.GGMLQuantizationType.Q8_0,
        gguf.GGMLQuantizationType.Q4_0,
        gguf.GGMLQuantizationType.Q4_1,
        gguf.GGMLQuantizationType.F16,
    ],
)
def test_gguf_quantized_dequantizes_exactly(tmp_path: Path, ids: torch.Tensor, quant) -> None:
    ref = tiny_llama()
    path = tmp_path / "tiny-q.gguf"
    effective = write_gguf(ref, path, "llama", quant=quant)
    use_file_weights(ref, effective)
    diff = (our_logits(path, ids) - reference_logits(ref, ids)).abs().max().item()
    assert diff <= TOL


def test_cached_decode_equals_full_forward(tmp_path: Path, ids: torch.Tensor) -> None:
    ref = tiny_llama()
    ref.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, device="cpu", dtype="float32")
    model = loaded.module
    with torch.no_grad():
        full = model(ids, torch.arange(ids.shape[1])[None])
        cache = new_cache(model, torch.device("cpu"), torch.float32, capacity=4)  # forces regrowth
        pieces = [model(ids[:, :5], torch.arange(5)[None], cache)]
        pieces.append(model(ids[:, 5:9], torch.arange(5, 9)[None], cache))  # chunk on top of a cache
        for t in range(9, ids.shape[1]):
            pieces.append(model(ids[:, t : t + 1], torch.tensor([[t]]), cache))
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= TOL


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
    "rope_theta": 500000.0,
}


def test_llama3_rope_scaling_safetensors_and_gguf(tmp_path: Path) -> None:
    """Llama 3.1 scaling: from config.json's rope_scaling, and from a GGUF's rope_freqs divisors."""
    from glmstack.engine.models.llama import LlamaConfig, rope_inv_freq

    ref = tiny_llama(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)
    ids = torch.randint(0, 160, (1, 100), generator=torch.Generator().manual_seed(5))  # beyond 32 positions
    ref.save_pretrained(tmp_path / "st")
    assert (our_logits(tmp_path / "st", ids) - reference_logits(ref, ids)).abs().max().item() <= TOL

    cfg = LlamaConfig.from_hf(ref.config.to_dict())
    scaled = rope_inv_freq(cfg)
    plain = rope_inv_freq(
        LlamaConfig.from_hf(
            {**ref.config.to_dict(), "rope_scaling": None, "rope_parameters": {"rope_theta": 500000.0}}
        )
    )
    assert not torch.allclose(scaled, plain)
    path = tmp_path / "l3.gguf"
    write_gguf(ref, path, "llama", rope_freqs=(plain / scaled).numpy())
    assert (our_logits(path, ids) - reference_logits(ref, ids)).abs().max().item() <= TOL


@pytest.mark.parametrize(("quant", "precision"), [
    (gguf.GGMLQuantizationType.Q4_0, "int4"),
    (gguf.GGMLQuantizationType.Q4_1, "int4"),
    (gguf.GGMLQuantizationType.Q8_0, "int8"),
    (gguf.GGMLQuantizationType.F16, None),
])
def test_a_quantized_gguf_runs_in_its_own_precision(tmp_path: Path, ids: torch.Tensor, quant, precision) -> None:
    """`quantize="auto"` (the server's default) keeps a Q4 GGUF in int4 and a Q8_0 one in int8, and the quantized
    model's logits stay within the kernels' tolerance of the file's dequantized weights run in fp32."""
    ref = tiny_llama()
    path = tmp_path / "tiny-q.gguf"
    effective = write_gguf(ref, path, "llama", quant=quant)
    use_file_weights(ref, effective)
    ckpt = open_checkpoint(path)
    assert stored_precision(ckpt) == precision
    if precision is None:
        return
    bits = {"int8": 8, "int4": 4}[precision]
    loaded = load_model(ckpt, device="cpu", dtype="bfloat16", quantize=bits)
    # every layer linear is quantized as it is read (int4: the file's own blocks, q/k/v and gate/up fused,
    # Llama's q/k rows un-permuted; nothing is requantized); the untied head too, int8, and the embedding
    assert len(loaded.prequantized) == 2 * 4 + 2
    assert all(w.is_meta for n, w in loaded.module.named_parameters() if n.endswith("proj.weight"))
    report = quantize_model(loaded.module, bits, prequantized=loaded.prequantized)
    assert report.skipped == {} and len(report.quantized) == 2 * 4 + 1  # every layer linear and the head
    with torch.no_grad():
        ours = loaded.module(ids, torch.arange(ids.shape[1])[None]).float()
    expected = reference_logits(ref, ids)
    relative = ((ours - expected).norm() / expected.norm()).item()
    # bf16 activations; int8 requantizes Q8_0's 32-weight blocks per row; int4 keeps the file's groups
    assert relative < (0.03 if precision == "int8" else 0.02), relative
    assert bool((ours.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9)


def test_requantizing_q4_1_blocks_gives_back_their_codes() -> None:
    """Why Q4_1 maps exactly: its blocks span codes 0..15 by construction (d = (max - min) / 15, m = min), so
    int4's min/max grouping at 32 finds the same scale and offset again."""
    weights = torch.randn(48, 256, generator=torch.Generator().manual_seed(5)).numpy()
    packed = gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q4_1)
    exact = int4_weights_from_gguf(packed, gguf.GGMLQuantizationType.Q4_1, (48, 256))
    stored = torch.from_numpy(gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.Q4_1).reshape(48, 256))
    requantized = quantize_int4(stored.float(), 32, torch.float32)
    assert torch.equal(requantized.codes, exact.codes)
    assert torch.allclose(requantized.dequantize(), stored.float(), atol=1e-6)
