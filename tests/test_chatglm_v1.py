"""ChatGLM-6B (GLM v1). No library implements it, so the oracle is a plain reference written here from the
spec's equations (sections 1.2-1.4), checked piece by piece and as a whole forward."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from glmstack.engine.errors import ModelFileError
from glmstack.engine.generation import new_cache
from glmstack.engine.loading.checkpoint import load_model
from glmstack.engine.models import chatglm_v1
from glmstack.engine.models.chatglm_v1 import ChatGLMv1Config, positions_2d, prefix_mask, prompt_layout

TOL = 1e-4
V, H, LAYERS, HEADS, INNER = 64, 64, 2, 4, 128
MASK, GMASK, SOP, EOP = 58, 59, 60, 61
CONFIG = dict(
    architectures=["ChatGLMModel"],
    model_type="chatglm",
    vocab_size=V,
    hidden_size=H,
    inner_hidden_size=INNER,
    num_layers=LAYERS,
    num_attention_heads=HEADS,
    layernorm_epsilon=1e-5,
    max_sequence_length=64,
    position_encoding_2d=True,
    bos_token_id=SOP,
    eos_token_id=EOP,
    mask_token_id=MASK,
    gmask_token_id=GMASK,
    pad_token_id=3,
)


def v1_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights named as in the released checkpoint (spec 1.5)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 0.1) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    emb = rnd(V, H, scale=1.0)
    sd = {
        "transformer.word_embeddings.weight": emb,
        "transformer.final_layernorm.weight": 1 + rnd(H),
        "transformer.final_layernorm.bias": rnd(H),
        "lm_head.weight": emb.clone(),  # the released lm_head holds the embedding's values
    }
    for i in range(LAYERS):
        p = f"transformer.layers.{i}."
        sd |= {
            p + "input_layernorm.weight": 1 + rnd(H),
            p + "input_layernorm.bias": rnd(H),
            p + "attention.query_key_value.weight": rnd(3 * H, H),
            p + "attention.query_key_value.bias": rnd(3 * H, scale=0.5),
            p + "attention.dense.weight": rnd(H, H),
            p + "attention.dense.bias": rnd(H),
            p + "attention.rotary_emb.inv_freq": torch.rand(H // HEADS // 4, generator=g),  # ignored
            p + "post_attention_layernorm.weight": 1 + rnd(H),
            p + "post_attention_layernorm.bias": rnd(H),
            p + "mlp.dense_h_to_4h.weight": rnd(INNER, H),
            p + "mlp.dense_h_to_4h.bias": rnd(INNER),
            p + "mlp.dense_4h_to_h.weight": rnd(H, INNER),
            p + "mlp.dense_4h_to_h.bias": rnd(H),
        }
    return sd


# ---- the reference, straight from the spec ---------------------------------------------------------------


def spec_positions(ids: list[int]) -> tuple[list[int], list[int]]:
    ctx = ids.index(SOP)
    m = ids.index(GMASK) if GMASK in ids else ids.index(MASK)
    return [t if t < ctx else m for t in range(len(ids))], [
        0 if t < ctx else t - ctx + 1 for t in range(len(ids))
    ]


def spec_mask(ids: list[int]) -> torch.Tensor:
    """True = masked: causal, plus every row sees columns [0, ctx)."""
    allowed = torch.tril(torch.ones(len(ids), len(ids), dtype=torch.bool))
    allowed[:, : ids.index(SOP)] = True
    return ~allowed


def spec_rotary(x: torch.Tensor, pos: list[int]) -> torch.Tensor:
    """Rotate-half over one 2-D half: element j pairs with j + half/2; inv_freq rounded to fp16."""
    dim = x.shape[-1]
    inv_freq = (1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)).half().float()
    freqs = torch.tensor(pos, dtype=torch.float32)[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [S, 1, dim]
    x1, x2 = x[..., : dim // 2], x[..., dim // 2 :]
    return x * emb.cos() + torch.cat((-x2, x1), dim=-1) * emb.sin()


def reference_logits(
    sd: dict[str, torch.Tensor], ids: list[int], alpha: float = math.sqrt(56)
) -> torch.Tensor:
    d, seqlen = H // HEADS, len(ids)
    pos, block = spec_positions(ids)
    mask = spec_mask(ids)

    def ln(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (H,), sd[name + ".weight"], sd[name + ".bias"], 1e-5)

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ sd[name + ".weight"].T + sd[name + ".bias"]

    x = sd["transformer.word_embeddings.weight"][ids]
    for i in range(LAYERS):
        p = f"transformer.layers.{i}."
        h = ln(x, p + "input_layernorm")
        qkv = linear(h, p + "attention.query_key_value").view(seqlen, HEADS, 3 * d)  # per-head q|k|v
        q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
        q = torch.cat((spec_rotary(q[..., : d // 2], pos), spec_rotary(q[..., d // 2 :], block)), dim=-1)
        k = torch.cat((spec_rotary(k[..., : d // 2], pos), spec_rotary(k[..., d // 2 :], block)), dim=-1)
        # The reference's own numerics: scale q by 1/(sqrt(d)(i+1)), mask with -10000, multiply back by (i+1).
        scores = torch.einsum("snd,tnd->nst", q / (math.sqrt(d) * (i + 1)), k)
        scores = scores.masked_fill(mask, -10000.0) * (i + 1)
        ctx = torch.einsum("nst,tnd->snd", scores.float().softmax(-1), v).reshape(seqlen, H)
        x = h * alpha + linear(ctx, p + "attention.dense")
        h = ln(x, p + "post_attention_layernorm")
        u = linear(h, p + "mlp.dense_h_to_4h")
        gelu = 0.5 * u * (1 + torch.tanh(0.7978845608028654 * u * (1 + 0.044715 * u * u)))
        x = h * alpha + linear(gelu, p + "mlp.dense_4h_to_h")
    return ln(x, "transformer.final_layernorm") @ sd["lm_head.weight"].T


# ---- components ------------------------------------------------------------------------------------------

PROMPT = [11, 23, 7, 42, 5, 19, 33, GMASK, SOP]  # tokens, then [gMASK] <sop> at the END (v1 layout)
GENERATED = [8, 27, 14]


def test_2d_positions_follow_the_spec() -> None:
    cfg = ChatGLMv1Config.from_hf(CONFIG)
    ids = PROMPT + GENERATED
    prefix, mask_position = prompt_layout(torch.tensor([ids]), cfg)
    assert prefix.tolist() == [8] and mask_position.tolist() == [7]
    pos, block = positions_2d(torch.arange(len(ids))[None], prefix, mask_position)
    # every token from <sop> on sits at [gMASK]'s position
    assert pos[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 7, 7, 7, 7]
    assert block[0].tolist() == [0] * 8 + [1, 2, 3, 4]  # <sop> = 1, first generated = 2
    assert (pos[0].tolist(), block[0].tolist()) == spec_positions(ids)
    with_mask = [11, 23, MASK, 7, SOP]  # [MASK] stands in when there is no [gMASK]
    assert prompt_layout(torch.tensor([with_mask]), cfg)[1].tolist() == [2]


def test_prefix_mask_is_bidirectional_before_sop() -> None:
    ids = PROMPT + GENERATED
    ours = prefix_mask(torch.arange(len(ids))[None], torch.tensor([8]), len(ids))[0, 0]
    assert torch.equal(ours, ~spec_mask(ids))
    assert ours[0, 7] and not ours[8, 9]  # the first token sees [gMASK]; <sop> does not see the future
    # a decoding step (row 12 of a cached sequence) sees everything before it
    step = prefix_mask(torch.tensor([[12]]), torch.tensor([8]), 13)
    assert bool(step.all())


def test_2d_rotary_rotates_each_half_with_its_own_position() -> None:
    cfg = ChatGLMv1Config.from_hf(CONFIG)
    model = chatglm_v1.Model(cfg)
    x = torch.randn(1, 1, 1, cfg.head_dim)  # [B, heads, T, d]
    pos, block = torch.tensor([[5]]), torch.tensor([[3]])
    ours = chatglm_v1.rotate_2d(x, model._rotary((pos, block), torch.float32))
    half = cfg.head_dim // 2
    want = torch.cat((spec_rotary(x[0, :, :, :half], [5]), spec_rotary(x[0, :, :, half:], [3])), dim=-1)
    assert torch.allclose(ours[0], want, atol=1e-6)
    assert torch.equal(model.inv_freq, model.inv_freq.half().float())  # fp16-rounded, as trained


def test_residual_scale_is_sqrt_56_whatever_the_depth(tmp_path: Path) -> None:
    assert chatglm_v1.RESIDUAL_ALPHA == math.sqrt(2 * 28)
    sd = v1_weights()
    ids = PROMPT + GENERATED
    # Guard: the sqrt(2 * num_layers) a 2-layer model might suggest gives visibly different logits.
    assert (
        reference_logits(sd, ids) - reference_logits(sd, ids, alpha=math.sqrt(2 * LAYERS))
    ).abs().max() > 1e-2


# ---- the whole model -------------------------------------------------------------------------------------


def write_checkpoint(path: Path, sd: dict[str, torch.Tensor], fmt: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(CONFIG))
    if fmt == "safetensors":
        save_file(sd, str(path / "model.safetensors"))
    else:
        torch.save(sd, path / "pytorch_model.bin")  # how ChatGLM-6B is actually shipped
    return path


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_forward_matches_spec_reference(tmp_path: Path, fmt: str) -> None:
    sd = v1_weights()
    model = load_model(write_checkpoint(tmp_path / "m", sd, fmt), device="cpu", dtype="float32").module
    assert isinstance(model, chatglm_v1.ChatGLMv1ForCausalLM) and model.prefill_chunk is None
    rows = [PROMPT + GENERATED, [30, 12, 9, 44, GMASK, SOP, 21, 17, 3, 40, 52, 6]]  # different prefix lengths
    with torch.no_grad():
        ours = model(torch.tensor(rows), torch.arange(12).expand(2, 12))
    for b, ids in enumerate(rows):
        assert (ours[b] - reference_logits(sd, ids)).abs().max().item() <= TOL


def test_cached_decode_equals_full_forward(tmp_path: Path) -> None:
    model = load_model(
        write_checkpoint(tmp_path / "m", v1_weights(), "safetensors"), device="cpu", dtype="float32"
    ).module
    ids = torch.tensor([PROMPT + GENERATED])
    with torch.no_grad():
        full = model(ids, torch.arange(ids.shape[1])[None])
        cache = new_cache(model, torch.device("cpu"), torch.float32, capacity=4)
        n = len(PROMPT)
        pieces = [model(ids[:, :n], torch.arange(n)[None], cache)]  # the whole prompt at once
        for t in range(n, ids.shape[1]):
            pieces.append(model(ids[:, t : t + 1], torch.tensor([[t]]), cache, last_only=True))
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= TOL


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    sd = v1_weights()
    del sd["transformer.layers.1.attention.dense.bias"]
    with pytest.raises(ModelFileError, match=r"missing 1 tensors.*layers\.1\.attention\.dense\.bias"):
        load_model(write_checkpoint(tmp_path / "m", sd, "safetensors"), device="cpu", dtype="float32")


def test_long_prompt_prefills_in_one_forward(tmp_path: Path, monkeypatch) -> None:
    """The generation loop must not chunk a v1 prompt: its prefix attends bidirectionally."""
    from glmstack.engine import generation

    monkeypatch.setattr(generation, "PREFILL_CHUNK", 4)  # would split the prompt for any chunked model
    model = load_model(
        write_checkpoint(tmp_path / "m", v1_weights(), "safetensors"), device="cpu", dtype="float32"
    ).module
    ids = [30, 12, 9, 44, 7, 19, 25, 11, 13, GMASK, SOP]
    cache = new_cache(model, torch.device("cpu"), torch.float32, capacity=4)
    last = generation.prefill(model, ids, cache, torch.device("cpu"))
    with torch.no_grad():
        full = model(torch.tensor([ids]), torch.arange(len(ids))[None])
    assert (last - full[0, -1]).abs().max().item() <= TOL
