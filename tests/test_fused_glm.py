"""The GLM family's native serving step (native/fused_decoder.py, `fused_glm_layers`): ChatGLM2/3 and
GLM-4-9B-chat `GLMBlock` (qkv bias, 2 KV groups) and GLM-4-0414 `Glm4Block` (sandwich norms), int8 and int4.

- the kernels' GLM pieces: paged attention with GLM's rotary (adjacent pairs over the first `rotary_dim` dims
  of each head) against the module path's `apply_interleaved_rotary` + SDPA, and `rms_norm_add`;
- a paged prefill and decode steps through `ModelRunner` on tiny random models: the fused path runs every
  step, its logits are the module path's within the kernels' tolerance (to fp32 rounding in fp32 models),
  and a row's logits are the same bits whatever else its step holds;
- a greedy request answers the same cold, prefix-cached and inside a batch of 16 (as test_same_answer.py
  does for Llama), on GLM-4-9B-chat's tiny checkpoint through `EngineCore`;
- unquantized linears or a LayerNorm config keep the module path, unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import test_glm_chat
import torch
import torch.nn.functional as F
from test_native_kernels import dequantized_copy, rel_err, tol
from test_same_answer import GREEDY, run

import glmstack
from glmstack.engine import native
from glmstack.engine.kv_cache import PagedKVCache
from glmstack.engine.models import chatglm
from glmstack.engine.models.chatglm import ChatGLMConfig, ChatGLMForCausalLM
from glmstack.engine.models.glm4 import Glm4ForCausalLM
from glmstack.engine.models.layers import apply_interleaved_rotary
from glmstack.engine.quant.quantize_model import quantize_model
from glmstack.engine.serving.core import EngineCore
from glmstack.engine.serving.runner import ModelRunner
from glmstack.engine.serving.scheduler import ScheduledChunk, Sequence, StepPlan

if "AVX512" not in torch.backends.cpu.get_cpu_capability():
    pytest.skip("the native kernels are built for AVX-512 CPUs only", allow_module_level=True)

checkpoint = test_glm_chat.checkpoint  # the tiny published-layout checkpoints, as a fixture of this module too


@pytest.fixture(scope="module")
def nk():
    module = native.kernels()
    assert module is not None, "AVX-512 CPU but the native kernels did not build (see the log)"
    return module


# ---- the kernels' GLM pieces -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotary_dim", [16, 32])  # half the head (every released GLM), the whole head
def test_paged_attention_with_glm_rotary_matches_the_module_path(nk, dtype, rotary_dim) -> None:
    g = torch.Generator().manual_seed(rotary_dim)
    heads, kv_heads, d, lengths = 6, 2, 32, [5, 1, 17, 40]
    b, slots_total = len(lengths), 96
    keys = torch.randn(slots_total, kv_heads, d, generator=g).to(dtype)
    values = torch.randn(slots_total, kv_heads, d, generator=g).to(dtype)
    perm = torch.randperm(slots_total, generator=g).tolist()
    starts = [sum(lengths[:i]) for i in range(b)]
    contexts = [perm[start : start + n] for start, n in zip(starts, lengths, strict=True)]  # new token's slot last
    qkv = torch.randn(b, (heads + 2 * kv_heads) * d, generator=g).to(dtype)
    # cos/sin as ChatGLMForCausalLM.forward makes them: [B, 1, T, R/2]; here one token per sequence
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    angles = torch.tensor([n - 1 for n in lengths], dtype=torch.float32)[:, None] * inv_freq  # [B, R/2]
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    # the reference: the module path's rotary ([B, H, T, D] with T = 1), then SDPA, on fp32 copies
    ref_k, ref_v = keys.float().clone(), values.float().clone()
    q, k, v = qkv.float().split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    c, s = cos.float()[:, None, None], sin.float()[:, None, None]
    q = apply_interleaved_rotary(q.view(b, heads, 1, d), c, s)[:, :, 0]
    k = apply_interleaved_rotary(k.view(b, kv_heads, 1, d), c, s)[:, :, 0].to(dtype).float()  # the cache's dtype
    v = v.view(b, kv_heads, d).to(dtype).float()
    refs = []
    for i, ctx in enumerate(contexts):
        ref_k[ctx[-1]], ref_v[ctx[-1]] = k[i], v[i]
        kk, vv = ref_k[ctx].transpose(0, 1)[None], ref_v[ctx].transpose(0, 1)[None]
        refs.append(F.scaled_dot_product_attention(q[i][None, :, None], kk, vv, enable_gqa=True).reshape(-1))
    longest = max(lengths)
    gather = torch.tensor([ctx + [0] * (longest - len(ctx)) for ctx in contexts])
    slots = torch.tensor([ctx[-1] for ctx in contexts])
    out = nk.paged_attention(qkv, cos, sin, keys, values, slots, gather, torch.tensor(lengths), heads, kv_heads,
                              1 / math.sqrt(d), None, rotary_dim)
    assert out.dtype == dtype and rel_err(out, torch.stack(refs)) < tol(dtype)
    for i, ctx in enumerate(contexts):  # the cache holds the module path's rotated k
        assert rel_err(keys[ctx[-1]], k[i]) < tol(dtype) and torch.equal(values[ctx[-1]].float(), v[i])
    with pytest.raises(RuntimeError, match="interleaved_rotary_dim"):
        nk.paged_attention(qkv, cos, sin, keys, values, slots, gather, torch.tensor(lengths), heads, kv_heads,
                            1.0, None, d + 2)
    with pytest.raises(RuntimeError, match="cos/sin"):  # the tables' width must be the rotary dims' half
        nk.paged_attention(qkv, cos, sin, keys, values, slots, gather, torch.tensor(lengths), heads, kv_heads,
                            1.0, None, rotary_dim - 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,width", [(1, 2048), (3, 100)])  # 100: a tail of 4 past the vectors of 16
def test_rms_norm_add_matches_torch(nk, dtype, rows, width) -> None:
    g = torch.Generator().manual_seed(width)
    x, residual = (torch.randn(rows, width, generator=g).to(dtype) for _ in range(2))
    weight = (1 + 0.2 * torch.randn(width, generator=g)).to(dtype)
    out = nk.rms_norm_add(x, weight, 1e-5, residual)
    ref = residual.float() + F.rms_norm(x.float(), (width,), weight.float(), 1e-5)
    assert out.dtype == dtype and rel_err(out, ref) < tol(dtype)


# ---- paged steps of tiny random models -----------------------------------------------------------------------

FAMILIES: dict[str, tuple[type[ChatGLMForCausalLM], ChatGLMConfig]] = {
    # ChatGLM2/3, GLM-4-9B-chat: GLMBlock, qkv bias, 2 KV groups, half of each head rotating
    "glm": (ChatGLMForCausalLM, ChatGLMConfig(vocab_size=300, hidden_size=128, ffn_hidden_size=192, num_layers=3,
                                              num_heads=4, num_kv_heads=2, head_dim=32, rotary_dim=16)),
    # GLM-4-0414: Glm4Block's sandwich norms, 4 query heads per KV group
    "glm4-0414": (Glm4ForCausalLM, ChatGLMConfig(vocab_size=300, hidden_size=128, ffn_hidden_size=160,
                                                 num_layers=3, num_heads=8, num_kv_heads=2, head_dim=16,
                                                 rotary_dim=8)),
}


def tiny_model(family: str, bits: int, dtype: torch.dtype, **config) -> ChatGLMForCausalLM:
    """Random weights large enough that greedy decoding doesn't repeat one token; norms and biases random
    too, so a norm or bias the fused path dropped or swapped would show."""
    cls, cfg = FAMILIES[family]
    torch.manual_seed(0)
    model = cls(ChatGLMConfig(**(cfg.__dict__ | config))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0).add_(torch.rand_like(p) * 0.2)
            elif name.endswith(".bias"):
                p.normal_(0, 0.5)
            else:
                p.normal_(0, 0.2)
    model.to(dtype)
    if bits:
        quantize_model(model, bits)
    return model


@pytest.fixture
def fused_calls(monkeypatch) -> Iterator[list[bool]]:
    """Whether each forward took the fused path (True) or the modules (False)."""
    calls: list[bool] = []
    real = chatglm.fused_glm_layers

    def spy(*args):  # type: ignore[no-untyped-def]
        result = real(*args)
        calls.append(result is not None)
        return result

    monkeypatch.setattr(chatglm, "fused_glm_layers", spy)
    yield calls


def module_path(monkeypatch) -> None:
    monkeypatch.setattr(chatglm, "fused_glm_layers", lambda *args: None)


def paged_logits(model: ChatGLMForCausalLM, prompts: list[list[int]], steps: int,
                 forced: list[list[int]] | None = None) -> tuple[torch.Tensor, list[list[int]]]:
    """Prefill the prompts in one step, then decode them together for `steps` steps (greedy, or the `forced`
    tokens). Returns every step's logits [steps + 1, B, V] and the tokens."""
    cfg = model.config
    dtype = next(model.parameters()).dtype
    kv = PagedKVCache(cfg.num_layers, 32, 8, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=torch.device("cpu"))
    runner = ModelRunner(model, kv, torch.device("cpu"))
    seqs = [Sequence(f"s{i}", list(p), 64, block_table=list(range(i * 8, i * 8 + 8))) for i, p in enumerate(prompts)]
    out = runner.execute(StepPlan([ScheduledChunk(s, 0, s.num_tokens) for s in seqs]))
    logits, tokens = [], [[] for _ in seqs]
    for step in range(steps + 1):
        if step:
            out = runner.execute(StepPlan([ScheduledChunk(s, s.num_tokens - 1, 1) for s in seqs]))
        logits.append(out.float())
        for i, s in enumerate(seqs):
            t = int(out[i].argmax()) if forced is None else forced[i][step]
            s.output_ids.append(t)
            tokens[i].append(t)
    return torch.stack(logits), tokens


PROMPTS = [[5, 17, 42, 99, 7], [250, 3, 3, 8, 12, 1, 77, 64, 9, 10, 11]]  # the second spans two blocks


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_step_matches_the_module_path(nk, monkeypatch, fused_calls, family, bits, dtype) -> None:
    model = tiny_model(family, bits, dtype)
    fast, tokens = paged_logits(model, PROMPTS, 10)
    assert fused_calls == [True] * 11  # the prefill step and every decode step
    reference, _ = paged_logits(dequantized_copy(model), PROMPTS, 10, forced=tokens)  # fp32 linears
    module_path(monkeypatch)
    slow, _ = paged_logits(model, PROMPTS, 10, forced=tokens)
    fast_err, slow_err = rel_err(fast, reference), rel_err(slow, reference)
    assert len({t for seq in tokens for t in seq}) > 6  # the decoding is not one repeated token
    if dtype == torch.bfloat16:
        # the module path rounds to bf16 between ops (norm, rotary, attention), the fused one only between
        # calls: both ~5-8% from the fp32 reference on these random weights, the fused one the closer
        assert fast_err < 0.1 and slow_err < 0.15
        assert fast_err < slow_err + 0.01
        return
    # fp32 throughout and the same kernels for the linears: the two paths differ where an activation rounds
    # to the other int8 code (the fused RMSNorm is computed in the kernel), else by fp32 rounding; both are
    # ~6% from the fp32 reference on these random weights (the VNNI path's int8 activations)
    assert rel_err(fast, slow) < 0.02 and fast_err < 0.08
    # greedy tokens are the reference's wherever its top two are not a near-tie
    top2 = reference.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > max(0.1, 3 * fast_err * reference.std().item())
    assert bool((fast.argmax(-1) == reference.argmax(-1))[clear].all())
    assert clear.float().mean() >= 0.4  # the comparison is not vacuous


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("bits", [8, 4])
def test_a_rows_logits_do_not_depend_on_its_step(nk, fused_calls, family, bits) -> None:
    """A sequence prefilled and decoded alone, or beside another: the same bits (the VNNI linears compute a
    row alone; attention reads only the row's own context)."""
    if not native.vnni_rows():
        pytest.skip("row-independent linears need the native kernels' VNNI path (AVX512-VNNI)")
    model = tiny_model(family, bits, torch.bfloat16)
    together, tokens = paged_logits(model, PROMPTS, 6)
    alone, _ = paged_logits(model, PROMPTS[1:], 6, forced=tokens[1:])
    assert all(fused_calls)
    assert torch.equal(together[:, 1:], alone)


def test_unquantized_or_layernorm_models_keep_the_module_path(monkeypatch, fused_calls) -> None:
    model = tiny_model("glm4-0414", 0, torch.float32)  # fp32 nn.Linear everywhere
    logits, tokens = paged_logits(model, PROMPTS, 3)
    # `rmsnorm: false` configs (LayerNorm) keep the modules even with native linears
    paged_logits(tiny_model("glm", 8, torch.float32, rmsnorm=False), PROMPTS, 1)
    assert fused_calls == [False] * 4 + [False] * 2
    module_path(monkeypatch)  # without the fused hook at all: the very same computation
    assert torch.equal(paged_logits(model, PROMPTS, 3, forced=tokens)[0], logits)


# ---- the same answer through the serving engine ---------------------------------------------------------------

@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_greedy_tokens_are_the_same_cold_cached_and_in_a_batch(checkpoint: Callable[[str], Path], fused_calls,
                                                               quantize: str) -> None:
    if not native.vnni_rows():
        pytest.skip("one numerics per precision needs the native kernels' VNNI path (AVX512-VNNI)")
    model, _ = glmstack.load(checkpoint("glm4-9b-chat"), device="cpu", quantize=quantize)
    g = torch.Generator().manual_seed(0)
    # token ids among the tiny model's own rows (test_glm_chat widens the rest of the vocabulary)
    prompts = [torch.randint(0, 128, (int(torch.randint(34, 42, (1,), generator=g)),), generator=g).tolist()
               for _ in range(16)]
    alone = [run(EngineCore(model, enable_prefix_caching=False), {"alone": ids})["alone"] for ids in prompts]
    assert all(fused_calls) and len({tuple(t) for t in alone}) > 8  # fused steps, 16 different answers

    core = EngineCore(model)
    assert run(core, {"cold": prompts[0]})["cold"] == alone[0]
    core.add_request("cached", prompts[0], GREEDY)
    seq = core.scheduler.waiting[-1]
    again: list[int] = []
    while core.has_work():
        for rid, event in core.step():
            again.extend(event.token_ids if rid == "cached" else [])
    assert seq.prefix_hit_tokens >= 32  # the prompt's full blocks came from the cache; its tail was computed
    assert again == alone[0]

    # 16 prompts of 34-41 tokens in a 512-token step budget: the first step prefills most of them (the last
    # one cut at a block boundary), the next mixes the first decodes with the remaining prompt chunks
    batched = run(EngineCore(model, step_target_seconds=None), {f"r{i}": prompts[i] for i in range(16)})
    assert sum(len(ids) for ids in prompts) > 512
    assert [batched[f"r{i}"] for i in range(16)] == alone
