"""A LoRA trained on glmstack's Llama is the PEFT adapter of the transformers model: peft loads it on
transformers' LlamaForCausalLM and gives the same logits; and an adapter peft trained there loads in glmstack."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import torch
from test_llama import tiny_llama

from glmstack.engine.adapters import hf_linear_targets, read_adapter
from glmstack.engine.loading.checkpoint import load_model
from glmstack.finetune.lora import Method, load_adapter
from glmstack.finetune.methods import MethodOptions

TOL = 1e-4
ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IDS = torch.randint(0, 160, (2, 12), generator=torch.Generator().manual_seed(3))
POSITIONS = torch.arange(12).expand(2, 12)


def test_trained_adapter_gives_transformers_the_same_logits(tmp_path: Path) -> None:
    reference = tiny_llama()
    reference.save_pretrained(tmp_path / "base")
    model = load_model(tmp_path / "base", device="cpu", dtype="float32").module
    torch.manual_seed(0)
    method = Method(MethodOptions(lora_rank=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL_LINEARS))
    params = method.attach(model)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    labels = torch.randint(0, 160, (2, 12), generator=torch.Generator().manual_seed(4))
    losses = []
    for _ in range(5):  # a few real steps, so lora_B is no longer zero
        logits = method.forward(model, IDS, POSITIONS)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 160), labels.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    method.save(tmp_path / "adapter", tmp_path / "base")

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == sorted(ALL_LINEARS)
    _, tensors = read_adapter(tmp_path / "adapter")
    assert "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight" in tensors
    assert "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight" in tensors

    with_adapter = peft.PeftModel.from_pretrained(reference, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = with_adapter(IDS).logits
        ours = model(IDS, POSITIONS)
    assert (ours - theirs).abs().max().item() <= TOL
    assert (ours - tiny_llama()(IDS).logits).abs().max().item() > 100 * TOL  # the adapter changed something


def test_adapter_trained_by_peft_loads_in_glmstack(tmp_path: Path) -> None:
    reference = tiny_llama()
    reference.save_pretrained(tmp_path / "base")
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0,
                             task_type="CAUSAL_LM")
    trained = peft.get_peft_model(reference, config)
    with torch.no_grad():  # stands in for training: every LoRA weight non-zero
        for name, param in trained.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2)
    trained.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        theirs = trained(IDS).logits

    model = load_model(tmp_path / "base", device="cpu", dtype="float32").module
    load_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        ours = model(IDS, POSITIONS)
    assert (ours - theirs).abs().max().item() <= TOL


def test_hf_targets_cover_the_fused_rows() -> None:
    model = load_model_free_llama()
    targets = hf_linear_targets(model)
    q, k, v = (targets[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv")
    assert q.module == k.module == v.module == "model.layers.0.self_attn.qkv_proj"
    assert (q.rows, k.rows, v.rows) == (slice(0, 64), slice(64, 96), slice(96, 128))
    gate, up = targets["model.layers.1.mlp.gate_proj"], targets["model.layers.1.mlp.up_proj"]
    assert (gate.module, gate.rows, up.rows) == ("model.layers.1.mlp.gate_up_proj", slice(0, 96), slice(96, 192))


def load_model_free_llama() -> torch.nn.Module:
    from glmstack.engine.models.llama import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=160, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16)
    return LlamaForCausalLM(config)
