"""Synthetic GLM-4 checkpoints of real size (random weights, the GLM-4-0414 architecture) for the load, memory
and speed benchmarks: a bf16 safetensors folder as ZhipuAI publishes them, and a GGUF with the tensor types of
llama.cpp's Q4_K_M preset, which llama.cpp and glmstack both read.

    python benchmarks/synthetic_glm.py --size 1.5b --out DIR      # writes DIR/glm4-1.5b/ and DIR/glm4-1.5b.Q4_K_M.gguf

Written a tensor at a time (a 6B checkpoint never exists in memory here). The tokenizer is the tests' tiny
GLM-4 vocabulary laid out at the real ids (tests/glm_vocab.py) inside a 151,552-row embedding: prompts
tokenize as GLM-4 prompts do, and the weights do not care what the tokens spell.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

import gguf
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

VOCAB = 151552
SIZES = {  # GLM-4-9B-0414's shape, narrowed/shortened to the parameter counts the issue names
    "1.5b": {"hidden": 2048, "layers": 18, "heads": 16, "kv_heads": 2, "intermediate": 6912},
    "6b": {"hidden": 4096, "layers": 24, "heads": 32, "kv_heads": 2, "intermediate": 13696},
}
HEAD_DIM = 128
STD = 0.02


def config(size: str) -> dict:
    s = SIZES[size]
    return {
        "architectures": ["Glm4ForCausalLM"], "model_type": "glm4", "vocab_size": VOCAB,
        "hidden_size": s["hidden"], "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"], "head_dim": HEAD_DIM, "intermediate_size": s["intermediate"],
        "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "attention_bias": True,
        "max_position_embeddings": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "hidden_act": "silu", "eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329,
        "bos_token_id": None, "initializer_range": STD, "attention_dropout": 0.0,
    }  # fmt: skip


def hf_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, heads, kv, ff = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], \
        cfg["intermediate_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "post_self_attn_layernorm.weight": (h,), p + "post_mlp_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (heads * HEAD_DIM, h), p + "self_attn.q_proj.bias": (heads * HEAD_DIM,),
            p + "self_attn.k_proj.weight": (kv * HEAD_DIM, h), p + "self_attn.k_proj.bias": (kv * HEAD_DIM,),
            p + "self_attn.v_proj.weight": (kv * HEAD_DIM, h), p + "self_attn.v_proj.bias": (kv * HEAD_DIM,),
            p + "self_attn.o_proj.weight": (h, heads * HEAD_DIM),
            p + "mlp.gate_up_proj.weight": (2 * ff, h), p + "mlp.down_proj.weight": (h, ff),
        }  # fmt: skip
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (VOCAB, h)}
    return shapes


def parameters(size: str) -> int:
    total = 0
    for shape in hf_shapes(config(size)).values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def _random_bf16(shape: tuple[int, ...], seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    if len(shape) == 1:
        return (1 + 0.1 * torch.randn(shape, generator=g)).to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    return (STD * torch.randn(shape, generator=g)).to(torch.bfloat16).view(torch.int16).numpy().tobytes()


def write_safetensors_checkpoint(folder: Path, size: str, shard_bytes: int = 4 << 30) -> Path:
    """A bf16 Glm4ForCausalLM folder: config.json, tokenizer files, sharded model-0000N-of-0000M.safetensors."""
    from glm_vocab import glm4_gguf_metadata

    from glmstack.engine.tokenization.gguf_vocab import tokenizer_from_gguf

    cfg = config(size)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = hf_shapes(cfg)
    shards: list[list[str]] = [[]]
    used = 0
    for name, shape in shapes.items():
        nbytes = 2 * int(np.prod(shape))
        if used and used + nbytes > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    weight_map = {}
    for index, names in enumerate(shards):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name in names:
            nbytes = 2 * int(np.prod(shapes[name]))
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / file, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for seed, name in enumerate(names):
                f.write(_random_bf16(shapes[name], hash((size, name)) % (1 << 31) + seed))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    tokenizer_from_gguf(glm4_gguf_metadata()).backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast",
         "chat_template": GLM4_TEMPLATE}))
    return folder


GLM4_TEMPLATE = (
    "[gMASK]<sop>{%- for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{%- endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


# ---- GGUF with llama.cpp's Q4_K_M tensor types -------------------------------------------------------------

Q = gguf.GGMLQuantizationType
_SCALE = {Q.Q4_K: 2e-5, Q.Q5_K: 1e-5, Q.Q6_K: 5e-6, Q.Q5_0: 1e-3, Q.Q8_0: 1.5e-4}  # d (dmin): weights ~0.01-0.03
# K-quants need rows of whole 256-weight super-blocks; llama.cpp falls back per tensor otherwise (GLM-4's
# ffn_down, 13,696 wide): Q4_K -> Q5_0, Q6_K -> Q8_0
_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q6_K: Q.Q8_0}


def q4_k_m_type(name: str, layer: int, layers: int) -> gguf.GGMLQuantizationType:
    """llama.cpp's llama_tensor_get_type for LLAMA_FTYPE_MOSTLY_Q4_K_M, for the tensors a GLM-4 has: Q6_K for
    output, attn_v and ffn_down in the "more bits" layers (first and last eighth, every third between), Q4_K
    otherwise."""
    more_bits = layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2
    if name == "output.weight" or (name.endswith(("attn_v.weight", "ffn_down.weight")) and more_bits):
        return Q.Q6_K
    return Q.Q4_K


def _with_fallback(qtype: gguf.GGMLQuantizationType, columns: int) -> gguf.GGMLQuantizationType:
    return _FALLBACK[qtype] if columns % 256 and qtype in _FALLBACK else qtype


def _random_blocks(qtype: gguf.GGMLQuantizationType, shape: tuple[int, int], seed: int) -> np.ndarray:
    """Random K-quant blocks (any bytes are valid blocks) with small scales, as uint8 [rows, row bytes]."""
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(rows * cols // block, type_size), dtype=np.uint8)
    d = (_SCALE[qtype] * rng.uniform(0.5, 1.5, size=(data.shape[0], 2))).astype(np.float16).view(np.uint8)
    if qtype == Q.Q6_K:
        data[:, -2:] = d[:, :2]  # d is the block's last field
    elif qtype in (Q.Q5_0, Q.Q8_0):
        data[:, :2] = d[:, :2]  # d leads the block
    else:
        data[:, :4] = d  # d and dmin lead the block
    return data.reshape(rows, -1)


def write_gguf(path: Path, size: str) -> Path:
    """The same architecture as a llama.cpp `glm4` GGUF with Q4_K_M's types (token_embd Q4_K as well)."""
    from glm_vocab import glm4_gguf_metadata

    cfg = config(size)
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    writer = gguf.GGUFWriter(str(path), "glm4")
    writer.add_block_count(layers)
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(h)
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_dimension_count(HEAD_DIM // 2)
    writer.add_rope_freq_base(cfg["rope_theta"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    vocab = glm4_gguf_metadata()
    padding = VOCAB - len(vocab["tokenizer.ggml.tokens"])  # real GLM-4 files list all 151,552 rows
    vocab["tokenizer.ggml.tokens"] += [f"[PAD{VOCAB - padding + i}]" for i in range(padding)]
    vocab["tokenizer.ggml.token_type"] += [gguf.TokenType.UNUSED] * padding
    for key, value in vocab.items():
        _add_metadata(writer, key, value)
    tensors: dict[str, tuple[tuple[int, ...], gguf.GGMLQuantizationType]] = {}
    for name, shape in hf_shapes(cfg).items():
        ours = _gguf_name(name)
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else -1
        qtype = Q.F32 if len(shape) == 1 else _with_fallback(q4_k_m_type(ours, layer, layers), shape[1])
        tensors[ours] = (shape, qtype)
    for name, (shape, qtype) in tensors.items():
        if qtype == Q.F32:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), 4 * int(np.prod(shape)))
        else:
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            byte_shape = (shape[0], shape[1] // block * type_size)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for seed, (shape, qtype) in enumerate(tensors.values()):
        if qtype == Q.F32:
            values = (1 + 0.1 * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)
            writer.write_tensor_data(values)
        else:
            writer.write_tensor_data(_random_blocks(qtype, (shape[0], shape[1]), seed))
    writer.close()
    return path


def _add_metadata(writer: gguf.GGUFWriter, key: str, value: object) -> None:
    if key.startswith("general.architecture"):
        return
    if isinstance(value, list):
        writer.add_array(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    else:
        writer.add_float32(key, float(value))  # type: ignore[arg-type]


_GGUF_LAYER = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "post_self_attn_layernorm": "post_attention_norm", "post_mlp_layernorm": "post_ffw_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}  # fmt: skip


def _gguf_name(name: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if name in top:
        return top[name]
    _, _, index, rest = name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{index}.{_GGUF_LAYER[module]}.{kind}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="1.5b")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", choices=["safetensors", "gguf"], default=None)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"GLM-4 {args.size}: {parameters(args.size) / 1e9:.2f}B parameters")
    if args.only != "gguf":
        print(write_safetensors_checkpoint(args.out / f"glm4-{args.size}", args.size))
    if args.only != "safetensors":
        print(write_gguf(args.out / f"glm4-{args.size}.Q4_K_M.gguf", args.size))


if __name__ == "__main__":
    main()
