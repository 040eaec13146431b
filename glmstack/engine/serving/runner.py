"""Turns a scheduler `StepPlan` into one batched forward pass over the paged KV cache.

All scheduled tokens of all sequences are flattened into a single row ([1, N]) so every linear layer runs
once per step for the whole batch — that is where batching pays. Attention is the only per-sequence part:
`PagedAttentionBatch.attend` writes the new keys/values into their slots, then gathers each sequence's
context from its blocks. Decoding sequences (one query each) share one padded, masked attention call;
prefill chunks get one call each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from glmstack.engine.serving.scheduler import StepPlan


class StepCancelled(Exception):  # noqa: N818 — a signal, not an error
    """Raised inside a forward pass when every sequence of the step has been abandoned (see `attend`)."""


class PagedKVCache:
    """The block pool's storage: per layer, keys and values for `num_blocks * block_size` token slots."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 *, dtype: torch.dtype, device: torch.device, value_head_dim: int | None = None) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        # Left uninitialised (torch.empty), so the budget costs memory only as slots are first written:
        # attention only ever reads slots its sequence wrote, or the pad block. RSS therefore climbs
        # toward start + budget as prefix caching keeps finished blocks, then stays there. One extra
        # block past the pool is kept at zero: padded decode gathers read it.
        self.pad_slot = num_blocks * block_size
        slots = self.pad_slot + block_size
        self.keys = [torch.empty(slots, num_kv_heads, head_dim, dtype=dtype, device=device)
                     for _ in range(num_layers)]
        self.values = [torch.empty(slots, num_kv_heads, value_head_dim or head_dim, dtype=dtype, device=device)
                       for _ in range(num_layers)]
        for t in self.keys + self.values:
            t[self.pad_slot :].zero_()

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


@dataclass
class _Prefill:
    start: int  # first row of this chunk in the flattened batch
    length: int
    context_slots: torch.Tensor  # [L] slots of the whole context, in position order
    mask: torch.Tensor | None  # [n, L] causal-with-offset; None when the chunk is the whole context


class PagedAttentionBatch:
    """What the model sees as its `cache` during a batched step (see `attend`)."""

    length = 0  # the models' dense-cache masking logic is skipped: masks are built here per sequence

    def __init__(self, kv: PagedKVCache, slots: torch.Tensor, num_decode: int,
                 decode_gather: torch.Tensor | None, decode_mask: torch.Tensor | None,
                 prefills: list[_Prefill], decode_lengths: torch.Tensor | None = None,
                 cancelled: Callable[[], bool] | None = None) -> None:
        self.kv, self.slots = kv, slots
        self.num_decode, self.decode_gather, self.decode_mask = num_decode, decode_gather, decode_mask
        self.decode_lengths = decode_lengths  # [B] context length of each decoding sequence (native path)
        self.prefills = prefills
        self.cancelled = cancelled

    def raise_if_cancelled(self) -> None:
        """StepCancelled once every sequence of the step is abandoned; models call it between layers
        (through `attend`, or directly on a fused path that does not call `attend`)."""
        if self.cancelled is not None and self.cancelled():
            raise StepCancelled

    def advance(self, num_tokens: int) -> None:
        """Positions are tracked by the scheduler; nothing to do."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float | None = None) -> torch.Tensor:
        """q: [1, H, N, D]; k, v: [1, Hkv, N, D] for the N new tokens. Returns [1, H, N, Dv].

        Every architecture calls this once per layer, which makes it the place to give up a step nobody
        waits for any more: a 512-token prefill chunk takes a second on two cores, and a client that hung
        up should get its KV blocks back within a layer, not a chunk."""
        self.raise_if_cancelled()
        key_cache, value_cache = self.kv.keys[layer], self.kv.values[layer]
        key_cache.index_copy_(0, self.slots, k[0].transpose(0, 1).to(key_cache.dtype))
        value_cache.index_copy_(0, self.slots, v[0].transpose(0, 1).to(value_cache.dtype))
        gqa = q.shape[1] != k.shape[1]
        outs = []
        if self.num_decode:
            b = self.num_decode
            qd = q[0, :, :b].transpose(0, 1).unsqueeze(2)  # [B, H, 1, D]
            kd = key_cache[self.decode_gather].transpose(1, 2)  # [B, Hkv, Lmax, D]
            vd = value_cache[self.decode_gather].transpose(1, 2)
            out = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=self.decode_mask, enable_gqa=gqa,
                                                 scale=scale)
            outs.append(out.squeeze(2).transpose(0, 1))  # [H, B, Dv]
        for p in self.prefills:
            qp = q[:, :, p.start : p.start + p.length]
            kp = key_cache[p.context_slots].transpose(0, 1).unsqueeze(0)  # [1, Hkv, L, D]
            vp = value_cache[p.context_slots].transpose(0, 1).unsqueeze(0)
            out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=p.mask, is_causal=p.mask is None,
                                                 enable_gqa=gqa, scale=scale)
            outs.append(out[0])
        return torch.cat(outs, dim=1).unsqueeze(0) if len(outs) > 1 else outs[0].unsqueeze(0)


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
        prefills: list[_Prefill] = []
        for chunk in plan.chunks:
            seq, start, n = chunk.seq, chunk.start, chunk.num_tokens
            row = len(ids)
            ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            slots.extend(self._slots(seq.block_table, start, start + n))
            if chunk.samples:
                logit_rows.append(row + n - 1)
            if n == 1 and start > 0 and not prefills:
                decode_contexts.append(self._slots(seq.block_table, 0, start + 1))
            else:
                context = torch.tensor(self._slots(seq.block_table, 0, start + n), device=self.device)
                mask = None
                if start > 0:
                    q_pos = torch.arange(start, start + n, device=self.device)[:, None]
                    mask = torch.arange(start + n, device=self.device)[None, :] <= q_pos
                prefills.append(_Prefill(row, n, context, mask))
        decode_gather = decode_mask = decode_lengths = None
        if decode_contexts:
            lengths = [len(c) for c in decode_contexts]
            longest = max(lengths)
            # one tensor from a padded list: ~20x cheaper than a tensor per sequence
            gather = torch.tensor([c + [self.kv.pad_slot] * (longest - len(c)) for c in decode_contexts],
                                  dtype=torch.long, device=self.device)
            decode_lengths = torch.tensor(lengths, dtype=torch.long, device=self.device)
            decode_mask = (torch.arange(longest, device=self.device) < decode_lengths[:, None])[:, None, None]
            decode_gather = gather
        batch = PagedAttentionBatch(self.kv, torch.tensor(slots, device=self.device), len(decode_contexts),
                                    decode_gather, decode_mask, prefills, decode_lengths, cancelled)
        input_ids = torch.tensor([ids], device=self.device)
        pos = torch.tensor([positions], device=self.device)
        # long: a step of nothing but a prompt's non-final chunk samples no row, and an empty list alone would
        # make a float tensor, which cannot index
        rows = torch.tensor(logit_rows, dtype=torch.long, device=self.device)
        logits = self.model(input_ids, pos, batch, logit_rows=rows)
        return logits[0]
