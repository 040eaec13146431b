"""What a fine-tuning method is to the trainer: `TrainingMethod`, and `method_for(name, options)` choosing one.

A method decides which parameters train and how a forward runs with them; the trainer (trainer.py) owns
everything else - data, batches, loss, optimizer, checkpoints, DDP - and never looks inside a method.

- LoRA (lora.py): low-rank updates on the model's linears, saved in the PEFT format.
- P-Tuning v2 (ptuning.py): trained per-layer prefix keys/values, passed to the model through an
  `AttentionCache` that prepends them (engine/kv_cache.py), saved as THUDM's `prefix_encoder` checkpoint.

The contract, in the order the trainer calls it:

    method = method_for("lora", options)
    params = method.attach(model)          # once, before the optimizer exists; base weights frozen
    logits = method.forward(model, ids, positions)   # [B, T] -> [B, T, V], every training/validation step
    state = method.state_dict()            # into each checkpoint (only what trains)
    method.load_state_dict(state)          # on --resume, after attach()
    method.save(directory, base_model_path)  # the final adapter (and a copy in each checkpoint)

`forward` receives the model the trainer holds, which under DDP is the DDP wrapper's module: a method keeps
its trainable parameters either inside the model (LoRA) or returns them from `attach` (the trainer
registers those with DDP itself), so it never needs to know about distribution.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

METHODS = ("lora", "ptuning")


@dataclass(frozen=True)
class MethodOptions:
    """The command line's method settings; each method reads its own."""

    # LoRA (PEFT's names and defaults; target_modules are the HF module names of the base's architecture,
    # e.g. q_proj,v_proj for Llama or query_key_value for ChatGLM; empty: the architecture's attention q/v)
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = field(default_factory=tuple)
    # P-Tuning v2 (THUDM's names)
    pre_seq_len: int = 128
    prefix_projection: bool = False
    # "random": THUDM's N(0, 1) embedding; "data": the frozen model's own keys/values of the training data's
    # first pre_seq_len tokens (prefix tuning's init from real activations, Li & Liang 2021 section 7.2)
    prefix_init: str = "random"


class TrainingMethod(Protocol):
    name: str  # "lora" / "ptuning": what the events and the adapter's config say

    def attach(self, model: nn.Module) -> list[nn.Parameter]:
        """Make `model` train this way: freeze its own weights, add (or create) the trainable ones.
        Returns every parameter the optimizer updates, each once."""
        ...

    def warm_start(self, model: nn.Module, examples: Sequence[Sequence[int]]) -> None:
        """A data-dependent start for the new weights (token ids of the training examples), after attach();
        a resumed run then loads its checkpoint over it."""
        ...

    def forward(self, model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor,
                logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] for input_ids, positions [B, T] (right-padded rows; padding is masked in the
        loss, and causal attention keeps it from touching the real tokens); [B, len(logit_rows), V] for just
        those positions (the model's head runs on nothing else)."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable tensors, by names stable across processes (a checkpoint is resumed elsewhere)."""
        ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def save(self, directory: Path, base_model_path: Path) -> None:
        """Write the adapter into `directory` (created; written whole or not at all), recording the base."""
        ...


class MethodUnavailable(RuntimeError):
    """The method named on the command line cannot be used here."""


def method_for(name: str, options: MethodOptions) -> TrainingMethod:
    """The method by its command-line name. Each lives in its own module, imported only when chosen: LoRA
    brings peft (and with it transformers)."""
    if name not in METHODS:
        raise MethodUnavailable(f"unknown method {name!r}; use one of {', '.join(METHODS)}")
    module_name = {"lora": "glmstack.finetune.lora", "ptuning": "glmstack.finetune.ptuning"}[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            raise MethodUnavailable(f"--method {name} is not available in this version of glmstack "
                                    f"({module_name} is missing)") from None
        if e.name == "peft":
            raise MethodUnavailable("LoRA training needs peft: pip install 'glmstack[finetune]'") from None
        raise
    method: TrainingMethod = module.Method(options)
    return method
