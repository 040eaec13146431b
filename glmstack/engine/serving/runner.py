"""Turns a scheduler `StepPlan` into one batched forward pass over the paged KV cache.

All scheduled tokens of all sequences are flattened into a single row ([1, N]) so every linear layer runs
once per step for the whole batch — that is where batching pays. Attention is the only per-sequence part:
the model's cache for the step is a `PagedAttentionBatch` (kv_cache.py), built here from the block tables,
which writes the new keys/values into their slots and gathers each sequence's context from its blocks.

Rows of one step may run with different adapters (engine/adapters/): a LoRA's delta is added to its own rows
for that step (`lora_step`: by hooks on the module path, between the kernel calls on the native one), a
P-Tuning adapter's prefix is attended by its own rows (`prefixes=`). A step without an adapter row does none
of this.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from glmstack.engine.adapters.lora import LoRAAdapter, lora_step
from glmstack.engine.kv_cache import PagedAttentionBatch, PagedDecode, PagedKVCache, PagedPrefill
from glmstack.engine.serving.scheduler import StepPlan


class ModelRunner:
    def __init__(self, model: nn.Module, kv: PagedKVCache, device: torch.device) -> None:
        self.model, self.kv, self.device = model, kv, device
        self.block_size = kv.block_size

    def _slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, end)]

    @torch.inference_mode()
    def execute(self, plan: StepPlan, cancelled: Callable[[], bool] | None = None) -> torch.Tensor:
        """Run the planned tokens; returns logits [S, V] for the chunks that sample, in plan order.
        Raises StepCancelled, having written only KV slots the scheduler has not yet counted as computed,
        when `cancelled()` turns true during the pass."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logit_rows: list[int] = []
        decode_contexts: list[list[int]] = []
        prefills: list[PagedPrefill] = []
        for chunk in plan.chunks:
            seq, start, n = chunk.seq, chunk.start, chunk.num_tokens
            row = len(ids)
            ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            slots.extend(self._slots(seq.block_table, start, start + n))
            if chunk.samples:
                logit_rows.append(row + n - 1)
            if n == 1 and start >= len(seq.prompt_ids) and not prefills:  # a generated token: decode
                decode_contexts.append(self._slots(seq.block_table, 0, start + 1))
            else:
                context = torch.tensor(self._slots(seq.block_table, 0, start + n), device=self.device)
                prefills.append(PagedPrefill(row, n, context, start, self.kv.block_size))
        decode = None
        if decode_contexts:
            lengths = [len(c) for c in decode_contexts]
            longest = max(lengths)
            # one tensor from a padded list: ~20x cheaper than a tensor per sequence
            gather = torch.tensor([c + [self.kv.pad_slot] * (longest - len(c)) for c in decode_contexts],
                                  dtype=torch.long, device=self.device)
            decode_lengths = torch.tensor(lengths, dtype=torch.long, device=self.device)
            decode_mask = (torch.arange(longest, device=self.device) < decode_lengths[:, None])[:, None, None]
            decode = PagedDecode(gather, decode_mask, decode_lengths)
        adapted: AbstractContextManager = nullcontext()
        prefixes = None
        if any(chunk.seq.adapter is not None for chunk in plan.chunks):
            adapted, prefixes = self._adapters(plan)
        batch = PagedAttentionBatch(self.kv, torch.tensor(slots, device=self.device), decode, prefills, cancelled,
                                    prefixes)
        input_ids = torch.tensor([ids], device=self.device)
        pos = torch.tensor([positions], device=self.device)
        # long: a step of nothing but a prompt's non-final chunk samples no row, and an empty list alone would
        # make a float tensor, which cannot index
        rows = torch.tensor(logit_rows, dtype=torch.long, device=self.device)
        with adapted:
            logits = self.model(input_ids, pos, batch, logit_rows=rows)
        return logits[0]

    def _adapters(self, plan: StepPlan) -> tuple[AbstractContextManager, list[Any] | None]:
        """For a step with adapter rows: the `lora_step` context that adds each LoRA's delta to its token rows
        (a no-op context when no row has a LoRA), and PagedAttentionBatch's `prefixes`, one per chunk (None
        when no chunk has a prefix adapter). Both in plan order, as `execute` lays out the rows."""
        lora_rows: dict[LoRAAdapter, list[int]] = {}
        prefixes: list[Any] = []
        row = 0
        for chunk in plan.chunks:
            adapter, n = chunk.seq.adapter, chunk.num_tokens
            if isinstance(adapter, LoRAAdapter):
                lora_rows.setdefault(adapter, []).extend(range(row, row + n))
            prefixes.append(None if isinstance(adapter, LoRAAdapter) else adapter)
            row += n
        groups = {a: torch.tensor(r, dtype=torch.long, device=self.device) for a, r in lora_rows.items()}
        adapted = lora_step(self.model, groups) if groups else nullcontext()
        return adapted, (prefixes if any(p is not None for p in prefixes) else None)
