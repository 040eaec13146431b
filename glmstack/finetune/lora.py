"""LoRA on the engine's own models, with peft, saved as the PEFT adapter of the base's transformers model.

peft wraps `nn.Linear`s it finds by module name. Our models fuse linears that the transformers models keep
apart (llama.py's `qkv_proj` is q_proj | k_proj | v_proj, `gate_up_proj` is gate_proj | up_proj), so before
peft looks, each fused linear that holds a target is replaced by a `SplitLinear`: children named as the HF
linears (`q_proj`, `k_proj`, `v_proj`), each holding a view of its rows of the fused weight (no copy), whose
outputs are concatenated back in row order. A LoRA on `q_proj` then is exactly the LoRA a transformers model
gets there, and the only translation left is the name: the training path
(`model.layers.0.self_attn.qkv_proj.q_proj`) <-> the HF path (`model.layers.0.self_attn.q_proj`), both from
engine/adapters/names.py's table, which LoRA serving reads too.

The trained model keeps its SplitLinears: this module is for training (and for loading an adapter into a
model to check it), not for serving, which applies adapters per request on the fused linears.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from glmstack.engine.adapters.names import Target, default_lora_targets, hf_linear_targets
from glmstack.engine.adapters.peft_format import read_adapter, write_adapter
from glmstack.finetune.methods import MethodOptions

log = logging.getLogger(__name__)

ADAPTER = "default"  # peft's adapter name; it appears in parameter names, never in saved keys
PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the HF module path in saved keys


class SplitLinear(nn.Module):
    """A fused linear presented as the HF linears it fuses, for peft to find by name. Forward: each child on
    the input, outputs concatenated in row order (= the fused linear's output)."""

    def __init__(self, fused: nn.Linear, pieces: list[tuple[str, slice]]) -> None:
        super().__init__()
        self.order = [name for name, _ in sorted(pieces, key=lambda piece: piece[1].start)]
        for name, rows in pieces:
            child = nn.Linear(fused.in_features, rows.stop - rows.start, bias=fused.bias is not None,
                              device="meta")
            # views of the frozen fused weight: no second copy of the base model in memory
            child.weight = nn.Parameter(fused.weight[rows], requires_grad=False)
            if fused.bias is not None:
                child.bias = nn.Parameter(fused.bias[rows], requires_grad=False)
            self.add_module(name, child)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.get_submodule(name)(x) for name in self.order], dim=-1)


def _matches(hf_path: str, wanted: tuple[str, ...]) -> bool:
    """peft's rule for a list of target_modules: the whole path, or its last dotted components."""
    return any(hf_path == name or hf_path.endswith("." + name) for name in wanted)


class Method:
    """LoRA as a `TrainingMethod` (methods.py)."""

    name = "lora"

    def __init__(self, options: MethodOptions) -> None:
        self.options = options
        self.model: nn.Module | None = None
        self.training_to_hf: dict[str, str] = {}  # training module path -> HF module path
        self.target_names: list[str] = []  # what the saved config's target_modules says

    # ---- TrainingMethod -------------------------------------------------------------------------------

    def attach(self, model: nn.Module) -> list[nn.Parameter]:
        for param in model.parameters():
            param.requires_grad_(False)
        targets = hf_linear_targets(model)
        wanted = self.options.target_modules or default_lora_targets(model)
        selected = {hf: t for hf, t in targets.items() if _matches(hf, wanted)}
        unmatched = [name for name in wanted if not any(_matches(hf, (name,)) for hf in targets)]
        if unmatched:
            names = sorted({hf.rsplit(".", 1)[-1] for hf in targets})
            raise ValueError(f"target module(s) {', '.join(unmatched)} name no linear of this model; "
                             f"its linears are {', '.join(names)}")
        self.training_to_hf = self._present_as_hf(model, targets, selected)
        self.target_names = sorted({hf.rsplit(".", 1)[-1] for hf in selected})
        config = LoraConfig(r=self.options.lora_rank, lora_alpha=self.options.lora_alpha,
                            lora_dropout=self.options.lora_dropout, bias="none",
                            target_modules=sorted(self.training_to_hf))
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
        params = []
        for name, param in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                # trained in float32 whatever the base's dtype (peft casts the input to the adapter's dtype)
                param.data = param.data.float()
                param.requires_grad_(True)
                params.append(param)
            else:
                param.requires_grad_(False)
        self.model = model
        return params

    def warm_start(self, model: nn.Module, examples: Sequence[Sequence[int]]) -> None:
        """Nothing: LoRA's B starts at zero, so the adapted model starts as the base."""

    def forward(self, model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor,
                logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        logits: torch.Tensor = model(input_ids, positions, logit_rows=logit_rows)
        return logits

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA weights by their PEFT names (`base_model.model.<HF path>.lora_A.weight`)."""
        assert self.model is not None, "attach() first"
        state = {}
        for name, param in self.model.named_parameters():
            for kind in ("lora_A", "lora_B"):
                marker = f".{kind}.{ADAPTER}."
                if marker in name:
                    module, _, tail = name.partition(marker)
                    state[f"{PEFT_PREFIX}{self.training_to_hf[module]}.{kind}.{tail}"] = param.detach()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        assert self.model is not None, "attach() first"
        hf_to_training = {hf: path for path, hf in self.training_to_hf.items()}
        params = dict(self.model.named_parameters())
        expected = set(self.state_dict())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ValueError(f"adapter weights do not fit this model and targets: missing "
                             f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
        with torch.no_grad():
            for key, tensor in state.items():
                hf, kind, tail = _split_key(key)
                param = params[f"{hf_to_training[hf]}.{kind}.{ADAPTER}.{tail}"]
                if param.shape != tensor.shape:
                    raise ValueError(f"{key}: shape {tuple(tensor.shape)}, the model needs {tuple(param.shape)}")
                param.copy_(tensor)

    def save(self, directory: Path, base_model_path: Path) -> None:
        write_adapter(directory, self.adapter_config(base_model_path), self.state_dict())

    # ---- the PEFT config ------------------------------------------------------------------------------

    def adapter_config(self, base_model_path: Path) -> dict[str, Any]:
        """adapter_config.json as PeftModel.save_pretrained writes it for this LoRA on the HF model."""
        config = LoraConfig(r=self.options.lora_rank, lora_alpha=self.options.lora_alpha,
                            lora_dropout=self.options.lora_dropout, bias="none",
                            target_modules=self.target_names, task_type="CAUSAL_LM",
                            base_model_name_or_path=str(base_model_path))
        # through JSON once, so enums and sets come out as peft's own file has them
        result: dict[str, Any] = json.loads(json.dumps(config.to_dict(), default=_plain))
        return result

    # ---- presenting fused linears under HF names ------------------------------------------------------

    @staticmethod
    def _present_as_hf(model: nn.Module, targets: dict[str, Target],
                       selected: dict[str, Target]) -> dict[str, str]:
        """Split each fused linear that holds a selected target into its HF pieces; returns the training
        path of each selected target -> its HF path."""
        pieces_of: dict[str, list[tuple[str, slice]]] = {}
        for hf, target in targets.items():
            pieces_of.setdefault(target.module, []).append((hf.rsplit(".", 1)[-1], target.rows))
        paths = {}
        split_done: set[str] = set()
        for hf, target in selected.items():
            linear = model.get_submodule(target.module)
            if len(pieces_of[target.module]) == 1:  # a whole linear: adapted where it is
                paths[target.module] = hf
                continue
            if target.module not in split_done:
                if not isinstance(linear, nn.Linear):
                    raise ValueError(f"{target.module} is {type(linear).__name__}, not a float nn.Linear: "
                                     "LoRA training needs an unquantized model")
                parent, _, attr = target.module.rpartition(".")
                setattr(model.get_submodule(parent), attr, SplitLinear(linear, pieces_of[target.module]))
                split_done.add(target.module)
            paths[f"{target.module}.{hf.rsplit('.', 1)[-1]}"] = hf
        return paths


def _split_key(key: str) -> tuple[str, str, str]:
    """`base_model.model.<hf>.lora_A.weight` -> (hf, "lora_A", "weight")."""
    body = key.removeprefix(PEFT_PREFIX)
    for kind in ("lora_A", "lora_B"):
        hf, sep, tail = body.partition(f".{kind}.")
        if sep:
            return hf, kind, tail
    raise ValueError(f"{key}: not a LoRA weight name")


def _plain(value: Any) -> Any:
    if isinstance(value, set | frozenset | tuple):
        return sorted(value)
    return str(value)


UNSUPPORTED_CONFIG = ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform")


def load_adapter(model: nn.Module, directory: str | Path) -> Method:
    """Apply a PEFT LoRA adapter folder (ours, or one peft/LLaMA-Factory trained on the transformers model of
    the same base) to `model`; returns the attached method (model now computes base + adapter)."""
    config, tensors = read_adapter(directory)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{directory}: peft_type {config.get('peft_type')!r} is not a LoRA")
    used = [key for key in UNSUPPORTED_CONFIG if config.get(key)]
    if used or config.get("use_rslora"):
        raise ValueError(f"{directory}: LoRA options not supported here: {', '.join(used or ['use_rslora'])}")
    targets = config.get("target_modules") or ()
    if isinstance(targets, str):
        raise ValueError(f"{directory}: target_modules as a regular expression is not supported")
    options = MethodOptions(lora_rank=int(config["r"]), lora_alpha=int(config["lora_alpha"]),
                            lora_dropout=float(config.get("lora_dropout") or 0.0), target_modules=tuple(targets))
    method = Method(options)
    method.attach(model)
    # peft saves without the adapter name; some tools keep `.default` in the key
    method.load_state_dict({key.replace(f".{ADAPTER}.", "."): t for key, t in tensors.items()})
    return method
