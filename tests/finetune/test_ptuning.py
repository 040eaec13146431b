"""P-Tuning v2: the prefix attention against independent references (THUDM's past_key_values semantics on a
plain DenseKVCache; peft on the transformers model), training only the prefix, the saved formats (PEFT's and
THUDM's own checkpoints), and per-row prefixes in one paged serving step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from glmstack.engine.adapters.prefix import PrefixAdapter, PrefixCache, PrefixEncoder, load_prefix_adapter
from glmstack.engine.kv_cache import (
    DenseKVCache,
    PagedAttentionBatch,
    PagedDecode,
    PagedKVCache,
    PagedPrefill,
)
from glmstack.engine.loading.checkpoint import load_model
from glmstack.engine.models.chatglm import ChatGLMConfig, ChatGLMForCausalLM
from glmstack.finetune.methods import MethodOptions
from glmstack.finetune.ptuning import Method

TOL = 1e-5
V, P = 96, 3  # vocabulary, virtual tokens


def tiny_glm(seed: int = 0) -> ChatGLMForCausalLM:
    """A random ChatGLM2/3-style network (GQA: 4 heads over 2 key/value groups, half-rotary heads)."""
    torch.manual_seed(seed)
    config = ChatGLMConfig(vocab_size=V, hidden_size=32, ffn_hidden_size=48, num_layers=2, num_heads=4,
                           num_kv_heads=2, head_dim=8, rotary_dim=4)
    model = ChatGLMForCausalLM(config).eval()
    with torch.no_grad():  # random norms too, so a layer mix-up would show
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight"):
                param.normal_(1.0, 0.2)
    return model


def random_prefix(model: torch.nn.Module, seed: int = 1, projection: bool = False) -> PrefixAdapter:
    torch.manual_seed(seed)
    encoder = PrefixEncoder.for_model(model, P, prefix_projection=projection)
    cfg = model.config
    with torch.no_grad():
        return PrefixAdapter.from_flat(encoder() * 0.5, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)


def reference_logits(model: torch.nn.Module, prefix: PrefixAdapter, ids: torch.Tensor) -> torch.Tensor:
    """THUDM's semantics written plainly: the prefix keys/values are the layer's past (as `get_prompt` hands them
    over as past_key_values, unrotated), and the real tokens run on top of that past at positions 0.. ."""
    cfg = model.config
    cache = DenseKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, batch_size=ids.shape[0])
    for layer in range(cfg.num_layers):
        k, v = prefix.kv(layer)
        cache.update(layer, k.expand(ids.shape[0], -1, -1, -1), v.expand(ids.shape[0], -1, -1, -1))
    cache.advance(P)
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1]).expand_as(ids), cache)


def ids_of(length: int, seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- attention with a prefix ------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 2])
def test_prefix_cache_forward_matches_past_key_values_reference(batch: int) -> None:
    model = tiny_glm()
    prefix = random_prefix(model)
    ids = ids_of(7, seed=2, batch=batch)
    with torch.no_grad():
        ours = model(ids, torch.arange(7).expand_as(ids), PrefixCache(prefix))
        plain = model(ids, torch.arange(7).expand_as(ids))
    assert (ours - reference_logits(model, prefix, ids)).abs().max().item() <= TOL
    assert (ours - plain).abs().max().item() > 1e-2  # the prefix does change what the model says


def test_generation_on_dense_cache_equals_the_full_forward() -> None:
    model = tiny_glm()
    prefix = random_prefix(model, projection=True)
    ids = ids_of(11, seed=3)
    cfg = model.config
    with torch.no_grad():
        full = model(ids, torch.arange(11)[None], PrefixCache(prefix))
        cache = PrefixCache(prefix, DenseKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, capacity=2))
        pieces = [model(ids[:, :4], torch.arange(4)[None], cache),
                  model(ids[:, 4:8], torch.arange(4, 8)[None], cache)]  # a prompt chunk on top of the cache
        for t in range(8, 11):  # decoding: positions continue from the real tokens, not from P
            assert cache.length == t
            pieces.append(model(ids[:, t : t + 1], torch.tensor([[t]]), cache))
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= TOL


# ---- training -----------------------------------------------------------------------------------------------


def test_a_prefix_started_from_data_is_the_models_own_context() -> None:
    """prefix_init "data": with the prefix made from tokens T, the model reading X at its own positions 0.. (as
    training and serving run it) gives what it gives reading T then X - the prefix holds exactly T's keys and
    values, rotated as keys P positions before X's, layer by layer."""
    model = tiny_glm()
    method = Method(MethodOptions(pre_seq_len=P, prefix_init="data"))
    method.attach(model)
    context, ids = ids_of(P, seed=5), ids_of(6, seed=6)
    method.warm_start(model, [context[0, :2].tolist(), context[0, 2:].tolist()])  # joined across examples
    model.eval()
    with torch.no_grad():
        prefixed = method.forward(model, ids, torch.arange(6)[None])
        whole = model(torch.cat([context, ids], dim=1), torch.arange(P + 6)[None])[:, P:]
    assert torch.allclose(prefixed, whole, atol=TOL)
    with pytest.raises(ValueError, match="prefix_projection"):
        Method(MethodOptions(pre_seq_len=P, prefix_init="data", prefix_projection=True))


@pytest.mark.parametrize("projection", [False, True])
def test_only_the_prefix_encoder_trains_and_the_loss_falls(projection: bool) -> None:
    model = tiny_glm()
    method = Method(MethodOptions(pre_seq_len=P, prefix_projection=projection))
    params = method.attach(model)
    assert not any(p.requires_grad for p in model.parameters())
    assert {id(p) for p in params} == {id(p) for p in method.encoder.parameters()}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = ids_of(10, seed=4, batch=2)
    positions = torch.arange(10).expand_as(ids)
    optimizer = torch.optim.Adam(params, lr=0.1)
    model.train()
    losses = []
    for _ in range(12):
        logits = method.forward(model, ids[:, :-1], positions[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        assert all(p.grad is None for p in model.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())


def test_method_state_dict_resumes_the_same_prefix() -> None:
    model = tiny_glm()
    first = Method(MethodOptions(pre_seq_len=P, prefix_projection=True))
    first.attach(model)
    second = Method(MethodOptions(pre_seq_len=P, prefix_projection=True))
    second.attach(tiny_glm())
    second.load_state_dict(first.state_dict())
    ids = ids_of(6, seed=5)
    with torch.no_grad():
        assert torch.equal(first.forward(model, ids, torch.arange(6)[None]),
                           second.forward(model, ids, torch.arange(6)[None]))


# ---- saved formats ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("projection", [False, True])
def test_save_then_load_gives_the_same_logits(tmp_path: Path, projection: bool) -> None:
    model = tiny_glm()
    method = Method(MethodOptions(pre_seq_len=P, prefix_projection=projection))
    method.attach(model)
    method.save(tmp_path / "adapter", Path("/models/tiny"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == P
    assert (config["num_layers"], config["num_attention_heads"], config["token_dim"]) == (2, 2, 16)
    assert config["prefix_projection"] is projection
    loaded = load_prefix_adapter(tmp_path / "adapter", model)
    assert loaded.pre_seq_len == P
    ids = ids_of(8, seed=6)
    with torch.no_grad():
        trained = method.forward(model, ids, torch.arange(8)[None])  # eval(): no dropout
        served = model(ids, torch.arange(8)[None], PrefixCache(loaded))
    assert (trained - served).abs().max().item() <= TOL


def thudm_layout(flat: torch.Tensor, layers: int, heads: int, dim: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """ChatGLM2's get_prompt: view [P, 2L, heads, d], permute to [2L, P, heads, d], chunks of 2 per layer."""
    per = flat.view(flat.shape[0], 2 * layers, heads, dim).permute(1, 0, 2, 3).split(2)
    return [(kv[0].transpose(0, 1), kv[1].transpose(0, 1)) for kv in per]  # as [heads, P, d]


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
@pytest.mark.parametrize("projection", [False, True])
def test_thudm_checkpoint_loads(tmp_path: Path, fmt: str, projection: bool) -> None:
    model = tiny_glm()
    torch.manual_seed(7)
    encoder = PrefixEncoder.for_model(model, P, prefix_projection=projection)
    state = {f"transformer.prefix_encoder.{name}": t for name, t in encoder.state_dict().items()}
    folder = tmp_path / "ptuning"
    folder.mkdir()
    # what ptuning/main.py leaves: the model's config with pre_seq_len, and only the trained tensors
    (folder / "config.json").write_text(json.dumps({"model_type": "chatglm", "pre_seq_len": P,
                                                    "prefix_projection": projection}))
    if fmt == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:
        save_file(state, str(folder / "model.safetensors"))
    loaded = load_prefix_adapter(folder, model)
    with torch.no_grad():
        expected = thudm_layout(encoder(), 2, 2, 8)
    for layer, (k, v) in enumerate(expected):
        got_k, got_v = loaded.kv(layer)
        assert torch.allclose(got_k, k, atol=1e-6) and torch.allclose(got_v, v, atol=1e-6)


def test_a_prefix_for_another_model_is_refused(tmp_path: Path) -> None:
    other = ChatGLMForCausalLM(ChatGLMConfig(vocab_size=V, hidden_size=32, ffn_hidden_size=48, num_layers=3,
                                             num_heads=4, num_kv_heads=2, head_dim=8, rotary_dim=4))
    method = Method(MethodOptions(pre_seq_len=P))
    method.attach(other)
    method.save(tmp_path / "adapter", Path("other"))
    with pytest.raises(ValueError, match="does not fit this model"):
        load_prefix_adapter(tmp_path / "adapter", tiny_glm())


def test_saved_adapter_gives_the_same_logits_in_peft(tmp_path: Path) -> None:
    """The PEFT file on transformers' Llama through peft itself. One convention differs: peft counts the real
    tokens' positions from P (it shifts position_ids by num_virtual_tokens), THUDM's ChatGLM code - and so the
    engine - from 0. With our positions shifted by P the logits are peft's: the file, its layout (per layer K then
    V, key/value heads) and the attention are the same."""
    peft = pytest.importorskip("peft")
    import transformers

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)).eval()
    hf.save_pretrained(tmp_path / "base")
    ours = load_model(tmp_path / "base", device="cpu", dtype="float32").module
    method = Method(MethodOptions(pre_seq_len=P))
    method.attach(ours)
    with torch.no_grad():
        method.encoder.embedding.weight.mul_(0.5)
    method.save(tmp_path / "adapter", tmp_path / "base")
    ids = ids_of(9, seed=8)
    with torch.no_grad():
        expected = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter"))(input_ids=ids).logits
        got = ours(ids, torch.arange(P, P + 9)[None], PrefixCache(load_prefix_adapter(tmp_path / "adapter", ours)))
    assert (got - expected).abs().max().item() <= 1e-5


# ---- per-row prefixes in a paged serving step ---------------------------------------------------------------

BLOCK = 4


def slots(blocks: list[int], start: int, end: int) -> list[int]:
    return [blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, end)]


def paged_step(model: ChatGLMForCausalLM, kv: PagedKVCache, rows: list[tuple[list[int], list[int], int, bool]],
               prefixes: list[PrefixAdapter | None] | None) -> torch.Tensor:
    """One step as runner.py builds it: rows (token ids, block table, first position, decoding?), decoding rows
    first. Returns logits [N, V] of every token of the step."""
    ids, positions, new_slots, decode_contexts, prefills = [], [], [], [], []
    for tokens, blocks, start, decoding in rows:
        row = len(ids)
        ids += tokens
        positions += range(start, start + len(tokens))
        new_slots += slots(blocks, start, start + len(tokens))
        if decoding:
            decode_contexts.append(slots(blocks, 0, start + 1))
        else:
            context = torch.tensor(slots(blocks, 0, start + len(tokens)))
            prefills.append(PagedPrefill(row, len(tokens), context, start, BLOCK))
    decode = None
    if decode_contexts:
        longest = max(len(c) for c in decode_contexts)
        gather = torch.tensor([c + [kv.pad_slot] * (longest - len(c)) for c in decode_contexts])
        lengths = torch.tensor([len(c) for c in decode_contexts])
        decode = PagedDecode(gather, (torch.arange(longest) < lengths[:, None])[:, None, None], lengths)
    batch = PagedAttentionBatch(kv, torch.tensor(new_slots), decode, prefills, prefixes=prefixes)
    with torch.no_grad():
        return model(torch.tensor([ids]), torch.tensor([positions]), batch)[0]


def alone(model: ChatGLMForCausalLM, prefix: PrefixAdapter | None, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]), torch.arange(len(ids))[None],
                     None if prefix is None else PrefixCache(prefix))[0]


def copy_pool(kv: PagedKVCache) -> PagedKVCache:
    twin = PagedKVCache(2, 16, BLOCK, 2, 8, dtype=torch.float32, device=torch.device("cpu"))
    for mine, theirs in zip(twin.keys + twin.values, kv.keys + kv.values, strict=True):
        mine.copy_(theirs)
    return twin


def test_paged_rows_with_and_without_a_prefix_each_match_their_sequence_alone() -> None:
    model = tiny_glm()
    prefix_a, prefix_c = random_prefix(model, seed=11), random_prefix(model, seed=12, projection=True)
    a, b, c = ids_of(7, seed=20)[0].tolist(), ids_of(6, seed=21)[0].tolist(), ids_of(5, seed=22)[0].tolist()
    blocks_a, blocks_b, blocks_c = [0, 1, 2], [3, 4, 5], [6, 7]
    kv = PagedKVCache(2, 16, BLOCK, 2, 8, dtype=torch.float32, device=torch.device("cpu"))

    # step 1: A's prompt (with a prefix) and B's (without), two prefill chunks
    step1 = paged_step(model, kv, [(a[:6], blocks_a, 0, False), (b[:5], blocks_b, 0, False)], [prefix_a, None])
    assert (step1[:6] - alone(model, prefix_a, a[:6])).abs().max().item() <= TOL
    assert (step1[6:] - alone(model, None, b[:5])).abs().max().item() <= TOL

    # step 2: A and B decode while C (another prefix) prefills - prefixes listed in row order
    before = copy_pool(kv)
    rows = [([a[6]], blocks_a, 6, True), ([b[5]], blocks_b, 5, True), (c, blocks_c, 0, False)]
    step2 = paged_step(model, kv, rows, [prefix_a, None, prefix_c])
    assert (step2[0] - alone(model, prefix_a, a)[-1]).abs().max().item() <= TOL
    assert (step2[1] - alone(model, None, b)[-1]).abs().max().item() <= TOL
    assert (step2[2:] - alone(model, prefix_c, c)).abs().max().item() <= TOL

    # B's row is computed exactly as in a step where nobody has a prefix
    without = paged_step(model, copy_pool(before), rows, None)
    assert torch.equal(paged_step(model, copy_pool(before), rows, [prefix_a, None, prefix_c])[1], without[1])
