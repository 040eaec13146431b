"""P-Tuning v2 as a training method (methods.py's `TrainingMethod`): THUDM's prefix tuning on the engine's own
model classes.

The base stays frozen; a `PrefixEncoder` (engine/adapters/prefix.py: `pre_seq_len` rows, optionally through a
two-layer MLP) is the only thing that trains. Each forward runs the encoder, splits its output into per-layer
keys and values, and hands them to the model through a `PrefixCache`, which puts them in front of every layer's
keys: unrotated, visible to every token, with the real tokens at positions 0, 1, ... - THUDM's
`get_prompt` / `past_key_values` semantics (spec 7.3). THUDM's scripts keep the encoder in fp32 whatever the
base's dtype, and apply Dropout(0.1) to the prefix in training; so does this, for their random start (a prefix
started from data trains without it: see `warm_start`).

Saved in the PEFT format (adapter_config.json, peft_type PREFIX_TUNING; adapter_model.safetensors with
`prompt_embeddings`, the encoder's output for every virtual token - what peft saves, so peft and LLaMA-Factory
load it, and the projection MLP is not needed at inference). `load_prefix_adapter` reads that and THUDM's own
checkpoints back for serving.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from glmstack.engine.adapters.peft_format import write_adapter
from glmstack.engine.adapters.prefix import (
    PEFT_KEY,
    PrefixAdapter,
    PrefixCache,
    PrefixEncoder,
    load_prefix_adapter,
)
from glmstack.engine.kv_cache import DenseKVCache
from glmstack.finetune.methods import MethodOptions

__all__ = ["Method", "load_prefix_adapter"]

PREFIX_DROPOUT = 0.1  # THUDM's get_prompt: Dropout(0.1) on the prefix keys/values, in training only


class Method:
    name = "ptuning"

    def __init__(self, options: MethodOptions, *, dropout: float = PREFIX_DROPOUT) -> None:
        if options.pre_seq_len <= 0:
            raise ValueError(f"pre_seq_len must be positive, not {options.pre_seq_len}")
        self.pre_seq_len, self.prefix_projection = options.pre_seq_len, options.prefix_projection
        if options.prefix_init not in ("random", "data"):
            raise ValueError(f"prefix_init is 'random' or 'data', not {options.prefix_init!r}")
        if options.prefix_init == "data" and options.prefix_projection:
            raise ValueError("prefix_init 'data' sets the prefix itself: it needs prefix_projection off")
        self.prefix_init = options.prefix_init
        # a prefix started from data is a context the model already reads; THUDM's dropout on its keys and values
        # wrecks it (bundled model, 512 tokens, before any step: loss 3.7 with dropout 0.1, 0.8 without)
        self.dropout = dropout if options.prefix_init == "random" else 0.0
        self._encoder: PrefixEncoder | None = None
        self._config: Any = None

    @property
    def encoder(self) -> PrefixEncoder:
        if self._encoder is None:
            raise RuntimeError("P-Tuning: attach(model) first")
        return self._encoder

    def attach(self, model: nn.Module) -> list[nn.Parameter]:
        """Freeze the whole base and create the prefix encoder (fp32, on the model's device)."""
        cfg = getattr(model, "config", None)
        if not all(hasattr(cfg, name) for name in ("num_layers", "num_kv_heads", "head_dim", "hidden_size")):
            raise ValueError(f"P-Tuning v2 needs a decoder with per-layer key/value heads; {type(model).__name__} "
                             "is not one (ChatGLM-6B's v1 network is not supported)")
        for param in model.parameters():
            param.requires_grad_(False)
        device = next(model.parameters()).device
        self._config = cfg
        self._encoder = PrefixEncoder.for_model(model, self.pre_seq_len,
                                                prefix_projection=self.prefix_projection).to(device)
        return list(self._encoder.parameters())

    @torch.no_grad()
    def warm_start(self, model: nn.Module, examples: Sequence[Sequence[int]]) -> None:
        """With prefix_init "data": the prefix becomes the keys and values the frozen model computes for the
        first pre_seq_len tokens of the training examples (in file order, joined), as if they preceded every
        example: a few-shot context the training then tunes. Measured on the bundled model (BENCHMARKS.md):
        THUDM's N(0, 1) start sits far from what the attention layers expect and the loss falls slowly; from
        real activations it starts where the model's own context lives."""
        if self.prefix_init != "data":
            return
        tokens = [token for example in examples for token in example][: self.pre_seq_len]
        if not tokens:
            raise ValueError("prefix_init 'data' needs training examples")
        tokens = (tokens * (self.pre_seq_len // len(tokens) + 1))[: self.pre_seq_len]
        cfg, weight = self._config, self.encoder.embedding.weight
        param = next(model.parameters())
        cache = DenseKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype=param.dtype, device=param.device,
                             capacity=self.pre_seq_len)
        ids = torch.tensor([tokens], device=param.device)
        was_training = model.training
        model.eval()
        # at positions -P..-1: the real tokens count from 0 (THUDM's layout, which serving keeps), so a rotary
        # model's query at position t sees these keys at the distances it would see them as a preceding context
        model(ids, torch.arange(-len(tokens), 0, device=param.device)[None], cache)
        model.train(was_training)
        per_layer = [kv[0, :, : self.pre_seq_len] for i in range(cfg.num_layers)
                     for kv in (cache.keys[i], cache.values[i])]  # 2L x [Hkv, P, D]: from_flat's order
        weight.copy_(torch.stack(per_layer).permute(2, 0, 1, 3).reshape(weight.shape).to(weight.dtype))

    def prefix(self, model: nn.Module) -> PrefixAdapter:
        """This step's prefix from the live encoder (differentiable), in the model's dtype."""
        flat = F.dropout(self.encoder(), self.dropout, training=model.training)
        dtype = next(model.parameters()).dtype
        cfg = self._config
        return PrefixAdapter.from_flat(flat.to(dtype), cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)

    def forward(self, model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor,
                logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        # positions as given: THUDM's real tokens count from 0 whatever the prefix length
        logits: torch.Tensor = model(input_ids, positions, PrefixCache(self.prefix(model)), logit_rows=logit_rows)
        return logits

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's own names: embedding.weight (+ trans.0/2.weight/bias with the projection)."""
        return {name: t.detach().clone() for name, t in self.encoder.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.encoder.load_state_dict(state)

    def save(self, directory: Path, base_model_path: Path) -> None:
        cfg = self._config
        with torch.no_grad():
            flat = self.encoder().float().cpu()
        # PrefixTuningConfig's fields as peft 0.21 writes them; token_dim and num_attention_heads are the
        # key/value heads' (peft's own choice for GQA models, huggingface/peft#1901)
        config = {
            "peft_type": "PREFIX_TUNING",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": str(base_model_path),
            "inference_mode": True,
            "num_virtual_tokens": self.pre_seq_len,
            "num_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_kv_heads,
            "token_dim": cfg.num_kv_heads * cfg.head_dim,
            "encoder_hidden_size": cfg.hidden_size,
            "prefix_projection": self.prefix_projection,
            "num_transformer_submodules": 1,
            "auto_mapping": None,
            "revision": None,
            "modules_to_save": None,
            "init_weights": None,
        }
        write_adapter(directory, config, {PEFT_KEY: flat})

