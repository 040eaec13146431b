"""LoRA at inference time: many adapters on one loaded base, applied per row of a batched serving step.

A PEFT LoRA names the HF model's own linears (`q_proj`, `k_proj`, ...), but ours are fused (`qkv_proj` is
rows [q | k | v], `gate_up_proj` is [gate | up]); `names.hf_linear_targets` says which engine module and which
of its output rows each HF linear is. A loaded adapter keeps, per engine module, one `LoRAModule`: the pieces'
A matrices stacked ([R, in]) and their B matrices, scaled, placed in their own output rows of a zero matrix
([out, R]) - so q, k and v of a layer cost two small matmuls together, not six.

Applying it: for one step, `lora_step(model, groups)` registers a forward hook on every module some adapter of
the step targets; the hook adds `(x[rows] @ A.T) @ B.T` to those rows of the module's output, for each
adapter and the token rows that run with it. Hooks fire around any module's `__call__`, so this works the same
on `nn.Linear` and on the int8/int4 linears (the delta is computed in the activations' dtype, from the
unquantized A and B). They exist only during a step that has a LoRA row, so a base-only step pays nothing. The
native fused decoder (int8/int4 bases) calls kernels, not modules, so no hook fires there: the same shares,
keyed by module, go to it as `ADAPTER_STEP` and it adds the deltas between its kernel calls, to the LoRA rows
only (native/fused_decoder.py) - base rows beside them run exactly as in a base-only step.

`merge_lora` folds an adapter into float weights (`glmstack merge`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from glmstack.engine.adapters.names import hf_linear_targets
from glmstack.engine.adapters.peft_format import read_adapter
from glmstack.engine.native.fused_decoder import ADAPTER_STEP

_PREFIX = "base_model.model."
# The output heads: they see only the step's sampling rows (runner.py `logit_rows`), not its token rows, and a
# quantized head runs through `native_forward`, around which no hook fires.
_HEADS = ("lm_head", "transformer.output_layer")


@dataclass
class LoRAModule:
    """One engine linear's share of an adapter: output += (x @ a.T) @ b.T."""

    a: torch.Tensor  # [R, in]: every piece's A, stacked
    b: torch.Tensor  # [out, R]: each piece's B * scale in its own output rows, zero elsewhere

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        if self.a.dtype != x.dtype or self.a.device != x.device:  # the model moved (.half(), .cuda()) since
            self.a, self.b = self.a.to(x), self.b.to(x)
        return (x @ self.a.T) @ self.b.T


@dataclass(eq=False)  # compared and hashed by identity: one load is one adapter
class LoRAAdapter:
    name: str
    path: Path
    modules: dict[str, LoRAModule] = field(default_factory=dict)  # engine module path -> its share


def lora_scale(config: Mapping[str, Any], hf_module: str, rank: int) -> float:
    """PEFT's scale for one module: lora_alpha / r (or / sqrt(r) with rsLoRA), with `alpha_pattern`
    overriding alpha for modules whose path ends with a pattern (PEFT matches `(.*\\.)?pattern$`)."""
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?{pattern}$", hf_module):
            alpha = value
            break
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def is_lora_dir(path: Path) -> bool:
    """A PEFT LoRA folder (anything else is left to the prefix loader)."""
    config = path / "adapter_config.json"
    return config.is_file() and str(json.loads(config.read_text()).get("peft_type", "")).upper() == "LORA"


def load_lora(name: str, path: str | Path, model: nn.Module) -> LoRAAdapter:
    """Read a PEFT LoRA folder for `model` (the engine module of the base it was trained on), on the model's
    device and dtype. Raises ValueError for what it cannot apply exactly (DoRA, LoRA on embeddings or the head,
    modules_to_save, a linear the model lacks, shapes that do not fit)."""
    path = Path(path)
    config, tensors = read_adapter(path)
    if config.get("use_dora"):
        raise ValueError(f"{path}: DoRA adapters are not supported")
    targets = hf_linear_targets(model)
    pieces: dict[str, list[tuple[slice, torch.Tensor, torch.Tensor]]] = {}
    for key in sorted(tensors):
        if not key.endswith(".lora_A.weight"):
            if not key.endswith(".lora_B.weight"):
                raise ValueError(f"{path}: {key} is not a LoRA weight (only lora_A/lora_B of linears are served)")
            continue
        hf_module = key.removeprefix(_PREFIX).removesuffix(".lora_A.weight")
        a, b = tensors[key], tensors.get(key.replace(".lora_A.", ".lora_B."))
        target = targets.get(hf_module)
        if target is not None and target.module in _HEADS:
            raise ValueError(f"{path}: LoRA on the output head ({hf_module}) is not served")
        if b is None or target is None:
            problem = "has no lora_B" if b is None else "is not a linear of this model"
            raise ValueError(f"{path}: {hf_module} {problem}")
        rank = a.shape[0]
        scale = lora_scale(config, hf_module, rank)
        out_features, in_features = _features(model, target.module)
        rows = range(out_features)[target.rows]
        if b.shape != (len(rows), rank) or a.shape[1] != in_features:
            raise ValueError(f"{path}: {hf_module}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit the base")
        pieces.setdefault(target.module, []).append((target.rows, a.float(), b.float() * scale))
    weight = next(model.parameters())
    dtype = weight.dtype if weight.is_floating_point() else torch.float32
    adapter = LoRAAdapter(name, path)
    for module_path, parts in pieces.items():
        a = torch.cat([p[1] for p in parts])
        b = torch.zeros(_features(model, module_path)[0], a.shape[0])
        col = 0
        for piece_rows, _, piece_b in parts:  # block pieces: each piece's B in its rows and its own rank columns
            b[piece_rows, col : col + piece_b.shape[1]] = piece_b
            col += piece_b.shape[1]
        adapter.modules[module_path] = LoRAModule(a.to(weight.device, dtype), b.to(weight.device, dtype))
    if not adapter.modules:
        raise ValueError(f"{path}: the adapter has no LoRA weights")
    return adapter


def _features(model: nn.Module, module_path: str) -> tuple[int, int]:
    """(out_features, in_features) of a linear: nn.Linear and the quantized linears alike."""
    module = model.get_submodule(module_path)
    return cast(int, module.out_features), cast(int, module.in_features)


@contextmanager
def lora_step(model: nn.Module, groups: Mapping[LoRAAdapter, torch.Tensor]) -> Iterator[None]:
    """Within this block, `model`'s forward adds each adapter's delta to its token rows (`groups`: adapter ->
    long tensor of row indices into the flattened [N, hidden] step): by hooks on the module path, and through
    `ADAPTER_STEP` on the native fused decoder."""
    by_module: dict[str, list[tuple[torch.Tensor, LoRAModule]]] = {}
    for adapter, rows in groups.items():
        for module_path, share in adapter.modules.items():
            by_module.setdefault(module_path, []).append((rows, share))

    def hook(shares: list[tuple[torch.Tensor, LoRAModule]]) -> Any:
        def add_deltas(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            x = args[0].reshape(-1, args[0].shape[-1])
            # in place where we can: the output is this call's own (a quantized linear may hand back a view
            # of its scratch buffer, still only this call's result)
            y = output if output.is_contiguous() else output.contiguous()
            y2 = y.view(-1, y.shape[-1])
            for rows, share in shares:
                y2.index_add_(0, rows, share.delta(x.index_select(0, rows)))
            return y
        return add_deltas

    modules = {model.get_submodule(path): shares for path, shares in by_module.items()}
    handles = [module.register_forward_hook(hook(shares)) for module, shares in modules.items()]
    model.__dict__[ADAPTER_STEP] = modules  # for the native fused decoder, which calls no module
    try:
        yield
    finally:
        model.__dict__.pop(ADAPTER_STEP, None)
        for handle in handles:
            handle.remove()


@torch.no_grad()
def merge_lora(model: nn.Module, adapter: LoRAAdapter) -> None:
    """Fold `adapter` into `model`'s weights (W += B·A, in float32 then cast back). Float linears only: a
    quantized base would round the delta into its int8/int4 grid, which is not the adapter any more."""
    for module_path, share in adapter.modules.items():
        module = model.get_submodule(module_path)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{module_path} is {type(module).__name__}; merge into a float (unquantized) model")
        w = module.weight
        w.copy_((w.float() + share.b.float() @ share.a.float()).to(w.dtype))
