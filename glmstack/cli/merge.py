"""`glmstack merge BASE ADAPTER -o OUT`: fold a LoRA adapter into a new safetensors checkpoint.

The merge is done on the checkpoint's own tensors, by the names the adapter uses (a PEFT LoRA names the
Hugging Face model's linears, which are the checkpoint's names): W += scale * B @ A, in float32, stored back in
the weight's dtype. The output is the base folder with those weights changed - same shards, same index,
same config and tokenizer files - so it loads in glmstack and in transformers as the base does, and runs as
fast as the base (no adapter at serving time).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from glmstack.settings import Settings

COMMANDS = {"merge"}


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("merge", help="fold a LoRA adapter into a new safetensors checkpoint")
    parser.add_argument("base", help="the base model the adapter was trained on (path or name; safetensors)")
    parser.add_argument("adapter", type=Path, help="the LoRA adapter folder (adapter_config.json + weights)")
    parser.add_argument("-o", "--output", required=True, type=Path, help="new folder to write (never overwritten)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from glmstack.engine.loading.catalog import resolve_model_path

    started = time.perf_counter()
    base = resolve_model_path(args.base, settings)
    merged = merge_checkpoint(base, args.adapter.expanduser(), args.output.expanduser())
    print(f"wrote {args.output} ({merged} weights changed) in {time.perf_counter() - started:.1f} s")
    return 0


def merge_checkpoint(base: Path, adapter: Path, output: Path) -> int:
    """Write `output`: `base` with `adapter` folded in. Returns how many weight tensors changed. Raises
    ValueError for a base that is not a safetensors folder, an adapter that is not a plain LoRA, or a LoRA
    naming a weight the checkpoint does not have."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from glmstack.engine.adapters.lora import lora_scale
    from glmstack.engine.adapters.peft_format import read_adapter
    from glmstack.engine.loading.quantized_checkpoint import saved_quantization

    if output.exists():
        raise ValueError(f"{output} already exists; choose a new folder")
    if not base.is_dir() or not any(base.glob("*.safetensors")):
        raise ValueError(f"{base}: merge needs a safetensors checkpoint folder (convert .bin with glmstack convert)")
    config = json.loads((base / "config.json").read_text()) if (base / "config.json").is_file() else {}
    if saved_quantization(config) is not None:
        raise ValueError(f"{base} is a quantized checkpoint; merge into the float model it came from")
    adapter_config, tensors = read_adapter(adapter)
    if str(adapter_config.get("peft_type", "")).upper() != "LORA" or adapter_config.get("use_dora"):
        raise ValueError(f"{adapter}: not a LoRA adapter (only LoRA folds into weights)")
    deltas: dict[str, tuple] = {}  # checkpoint weight name -> (A, B, scale)
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = tensors.get(key.replace(".lora_A.", ".lora_B."))
            if b is None:
                raise ValueError(f"{adapter}: {module} has no lora_B")
            deltas[f"{module}.weight"] = (a, b, lora_scale(adapter_config, module, a.shape[0]))
        elif not key.endswith(".lora_B.weight"):
            raise ValueError(f"{adapter}: {key} is not a LoRA weight of a linear")
    staging = output.with_name(f".{output.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for item in base.iterdir():
            if item.suffix != ".safetensors" and item.is_file():  # config, tokenizer, generation config, index
                shutil.copy2(item, staging / item.name)
        remaining = dict(deltas)
        for shard in sorted(base.glob("*.safetensors")):  # one shard in memory at a time
            with safe_open(str(shard), framework="pt") as f:
                metadata = f.metadata()
                out = {name: f.get_tensor(name) for name in f.keys()}
            for name in out.keys() & remaining.keys():
                a, b, scale = remaining.pop(name)
                w = out[name]
                if w.shape != (b.shape[0], a.shape[1]):
                    raise ValueError(f"{name}: the adapter's B @ A is {b.shape[0]}x{a.shape[1]}, the weight "
                                     f"{tuple(w.shape)}")
                out[name] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
            save_file(out, str(staging / shard.name), metadata=metadata)
        if remaining:
            raise ValueError(f"{adapter}: the checkpoint has no weight {sorted(remaining)[0]}")
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return len(deltas)
