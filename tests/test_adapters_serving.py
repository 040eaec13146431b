"""Many LoRA adapters served on one loaded base: each adapter's logits against transformers + peft, a batch
mixing the base and two adapters against each request alone (float, int8 and int4 bases), prefix-cache
isolation between adapters, the API's adapter model names, and `glmstack merge`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

from glmstack import load
from glmstack.engine.adapters.lora import lora_step, merge_lora
from glmstack.engine.loading.catalog import resolve_model_path
from glmstack.engine.loading.checkpoint import load_model
from glmstack.engine.serving.core import EngineCore
from glmstack.engine.tokenization.gguf_vocab import tokenizer_from_gguf
from glmstack.protocol import EngineRequestError, GenerateRequest, SamplingParams
from glmstack.settings import Settings

GREEDY = SamplingParams(max_tokens=8, do_sample=False)


def tiny_base(folder: Path) -> Path:
    """A random two-layer Llama with the bundled model's tokenizer and chat template (so the engine can chat)."""
    tokenizer = tokenizer_from_gguf(resolve_model_path(None, Settings.from_env()))
    tokenizer.backend.save(str(folder / "tokenizer.json"))
    names = {i: name for name, i in tokenizer.special_tokens.items()} if isinstance(tokenizer.special_tokens,
                                                                                      dict) else {}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": tokenizer.chat_template, "eos_token": names.get(tokenizer.eos_token_id, "<|im_end|>"),
        "bos_token": names.get(tokenizer.bos_token_id)}))
    vocab = tokenizer.vocab_size
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    return folder


def lora_folder(folder: Path, seed: int, targets: tuple[str, ...], rank: int = 4, alpha: int = 16) -> Path:
    """A PEFT LoRA folder with random, nonzero A and B for `targets` of both layers."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
              "gate_proj": (128, 64), "up_proj": (128, 64), "down_proj": (64, 128)}
    tensors = {}
    for layer in range(2):
        for name in targets:
            part = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            out, inp = shapes[name]
            key = f"base_model.model.model.layers.{layer}.{part}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, inp, generator=gen) * 0.3
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, rank, generator=gen) * 0.3
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": sorted(targets),
        "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM", "base_model_name_or_path": None}))
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    base = root / "base"
    base.mkdir()
    return {
        "base": tiny_base(base),
        "a": lora_folder(root / "a", 1, ("q_proj", "v_proj")),
        "b": lora_folder(root / "b", 2, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                         "down_proj")),
    }


def peft_logits(files: dict[str, Path], adapter: str | None, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel

    model = transformers.LlamaForCausalLM.from_pretrained(files["base"], dtype=torch.float32).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, files[adapter]).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("adapter", ["a", "b"])
def test_adapter_logits_equal_peft_and_the_merged_model(files: dict[str, Path], adapter: str) -> None:
    from glmstack.engine.adapters.registry import AdapterRegistry

    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(12)[None]
    module = load_model(files["base"], device="cpu", dtype="float32").module
    loaded = AdapterRegistry(module).load(adapter, files[adapter])
    with torch.no_grad():
        base = module(ids, pos)
        with lora_step(module, {loaded.adapter: torch.arange(12)}):  # type: ignore[dict-item]
            ours = module(ids, pos)
        merge_lora(module, loaded.adapter)  # type: ignore[arg-type]
        merged = module(ids, pos)
    expected = peft_logits(files, adapter, ids)
    assert (ours - base).abs().max() > 0.1  # the adapter changes the logits
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=1e-4)


def run(core: EngineCore, requests: dict[str, tuple[list[int], str | None]]) -> dict[str, list[int]]:
    for rid, (prompt, adapter) in requests.items():
        core.add_request(rid, prompt, GREEDY, adapter=adapter)
    out: dict[str, list[int]] = {rid: [] for rid in requests}
    while core.has_work():
        for rid, event in core.step():
            out[rid] += event.token_ids
    return out


PROMPTS = {"base": (list(range(100, 137)), None), "a": (list(range(300, 321)), "a"),
           "b": (list(range(500, 529)), "b")}


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_mixed_batch_gives_each_row_what_it_gets_alone(files: dict[str, Path], quantize: str | None) -> None:
    model, _ = load(files["base"], device="cpu", quantize=quantize)
    model.adapters.load("a", files["a"])
    model.adapters.load("b", files["b"])
    alone = {rid: run(EngineCore(model), {rid: req})[rid] for rid, req in PROMPTS.items()}
    together = run(EngineCore(model), PROMPTS)
    assert together == alone
    # and the adapters do something: the base model's answer to adapter a's prompt differs
    assert run(EngineCore(model), {"x": (PROMPTS["a"][0], None)})["x"] != alone["a"]


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_a_native_step_applies_lora_as_the_module_path_does(files: dict[str, Path], quantize: str) -> None:
    """An int8/int4 serving step runs the native fused decoder, which adds the deltas itself (no hook fires
    there): its logits agree with the module path's, within bf16 rounding, and differ from the base's."""
    model, _ = load(files["base"], device="cpu", quantize=quantize)
    loaded = model.adapters.load("b", files["b"])
    prompt = PROMPTS["b"][0]
    core = EngineCore(model)
    core.add_request("r", prompt, GREEDY, adapter="b")
    served = core.runner.execute(core.scheduler.schedule(None))[0].float()
    ids, pos = torch.tensor([prompt]), torch.arange(len(prompt))[None]
    with torch.no_grad():
        base = model.module(ids, pos)[0, -1].float()
        with lora_step(model.module, {loaded.adapter: torch.arange(len(prompt))}):  # type: ignore[dict-item]
            module_path = model.module(ids, pos)[0, -1].float()
    assert (module_path - base).abs().max() > 0.3
    torch.testing.assert_close(served, module_path, atol=0.05, rtol=0.02)


def prefix_folder(folder: Path, seed: int, virtual_tokens: int = 5) -> Path:
    """A PEFT PREFIX_TUNING folder: `prompt_embeddings` [P, layers * 2 * kv_heads * head_dim] of the tiny base."""
    folder.mkdir(parents=True)
    flat = torch.randn(virtual_tokens, 2 * 2 * 2 * 16, generator=torch.Generator().manual_seed(seed))
    save_file({"prompt_embeddings": flat}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "PREFIX_TUNING", "num_virtual_tokens": virtual_tokens, "task_type": "CAUSAL_LM"}))
    return folder


def test_prefix_and_lora_adapters_share_a_batch_with_the_base(files: dict[str, Path], tmp_path: Path) -> None:
    model, _ = load(files["base"], device="cpu", dtype="float32")
    model.adapters.load("a", files["a"])
    model.adapters.load("p", prefix_folder(tmp_path / "p", 5))
    requests = {**PROMPTS, "b": (PROMPTS["b"][0], "p")}
    alone = {rid: run(EngineCore(model), {rid: req})[rid] for rid, req in requests.items()}
    assert run(EngineCore(model), requests) == alone
    assert run(EngineCore(model), {"x": (PROMPTS["b"][0], None)})["x"] != alone["b"]


def test_adapters_never_share_prefix_cache_blocks(files: dict[str, Path]) -> None:
    model, _ = load(files["base"], device="cpu", dtype="float32")
    model.adapters.load("a", files["a"])
    prompt = list(range(200, 250))  # three full blocks of 16
    cold = run(EngineCore(model), {"r": (prompt, "a")})["r"]
    core = EngineCore(model)
    run(core, {"base": (prompt, None)})
    hits = core.allocator.hits
    assert run(core, {"r": (prompt, "a")})["r"] == cold
    assert core.allocator.hits == hits  # nothing of the base's blocks was taken
    assert run(core, {"again": (prompt, "a")})["again"] == cold
    assert core.allocator.hits > hits  # the same adapter does reuse its own
    with pytest.raises(EngineRequestError):
        core.add_request("unknown", prompt, GREEDY, adapter="nope")


def test_served_adapter_names_answer_in_models_and_chat(files: dict[str, Path], tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from glmstack.api import create_app
    from glmstack.engine.serving.async_engine import AsyncEngine
    from glmstack.store import Store

    model, _ = load(files["base"], device="cpu", dtype="float32")
    engine = AsyncEngine(model)
    engine.load_adapter("tuned", str(files["b"]))
    messages = [{"role": "user", "content": "Hello there"}]

    async def engine_reply(adapter: str | None) -> str:
        request = GenerateRequest(f"direct-{adapter}", GREEDY, messages=messages, adapter=adapter)
        return "".join([e.text async for e in engine.generate(request)])

    try:
        direct = {name: asyncio.run(engine_reply(name)) for name in ("tuned", None)}
        assert direct["tuned"] != direct[None]
        with Store(f"sqlite:///{tmp_path / 'db.sqlite'}", home=tmp_path) as store:
            app = create_app(Settings(home=tmp_path, database_url="unused"), engine, store)
            with TestClient(app) as client:
                names = [m["id"] for m in client.get("/api/paas/v4/models").json()["data"]]
                assert "tuned" in names
                for name, expected in (("tuned", direct["tuned"]), ("glm-4", direct[None])):
                    body = {"model": name, "messages": messages, "do_sample": False, "max_tokens": 8}
                    reply = client.post("/api/paas/v4/chat/completions", json=body).json()
                    assert reply["choices"][0]["message"]["content"] == expected
                engine.unload_adapter("tuned")
                assert "tuned" not in [m["id"] for m in client.get("/api/paas/v4/models").json()["data"]]
                app.state.platform.usage.close()
                app.state.platform.indexer.stop()
    finally:
        engine.shutdown()


def test_merge_writes_a_checkpoint_equal_to_base_plus_adapter(files: dict[str, Path], tmp_path: Path) -> None:
    from glmstack.cli.merge import merge_checkpoint

    out = tmp_path / "merged"
    assert merge_checkpoint(files["base"], files["b"], out) == 14
    ids = torch.randint(0, 1000, (1, 10), generator=torch.Generator().manual_seed(4))
    expected = peft_logits(files, "b", ids)
    with torch.no_grad():
        ours = load_model(out, device="cpu", dtype="float32").module(ids, torch.arange(10)[None])
        theirs = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(ids).logits
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(theirs, expected, atol=1e-4, rtol=1e-4)
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()


def test_cli_chat_with_an_adapter_answers_as_load_with_that_adapter(files: dict[str, Path], tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from glmstack.cli.main import main

    monkeypatch.setenv("GLMSTACK_HOME", str(tmp_path))
    model, _ = load(files["base"], device="cpu", dtype="float32", adapter=files["b"])
    assert model.adapter == "b"
    expected = "".join(e.text for e in model.stream_messages([{"role": "user", "content": "hi"}],
                                                             SamplingParams(max_tokens=6, do_sample=False)))
    assert main(["chat", "-m", str(files["base"]), "--dtype", "float32", "--adapter", str(files["b"]), "-p", "hi",
                 "--temperature", "0", "--max-tokens", "6"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert main(["merge", str(files["base"]), str(files["b"]), "-o", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()
