"""KV caches, behind one contract: `AttentionCache`.

A model forward takes `cache: AttentionCache | None` and calls `attention(q, k, v, layer, cache)` once per
layer, then `cache.advance(T)` once at the end. What the cache does with the new keys is its own business:

- `DenseKVCache`: one sequence (or a batch of equal-length ones) in contiguous tensors, grown in chunks so a
  short chat does not reserve the whole context window up front. Behind `model.chat` and the reference loop.
- `PagedAttentionBatch`: one serving step over the block pool (`PagedKVCache`): all scheduled tokens of all
  sequences flattened into a single row, each sequence attending to its own blocks.

Masks are the cache's job too: it knows which earlier tokens each new one may see, so model code stays plain
PyTorch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F


class AttentionCache(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
               scale: float | None = None) -> torch.Tensor:
        """Store this forward's k/v ([B, Hkv, T, D]) for `layer`, and return attention of q ([B, H, T, D])
        over everything the sequence may see ([B, H, T, Dv])."""
        ...

    def advance(self, num_tokens: int) -> None:
        """Called once per forward, after every layer attended: the new tokens are now part of the past."""
        ...


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, cache: AttentionCache | None,
              *, scale: float | None = None) -> torch.Tensor:
    """One layer's attention: through the cache, or plain causal attention over these tokens without one."""
    if cache is not None:
        return cache.attend(layer, q, k, v, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=q.shape[1] != k.shape[1],
                                          scale=scale)


class PrefixKV(Protocol):
    """A P-Tuning v2 prefix (adapters/prefix.py `PrefixAdapter`): extra keys and values per layer that every
    token of its sequence sees, unmasked and unrotated."""

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k [Hkv, P, D], v [Hkv, P, Dv]) of `layer`."""
        ...


def attend_with_prefix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                       prefix_v: torch.Tensor, mask: torch.Tensor | None, *, scale: float | None) -> torch.Tensor:
    """Attention of q [B, H, T, D] over [prefix; k, v] (k, v [B, Hkv, L, D]); prefix_k/v [Hkv, P, D] are the
    same for every batch row. `mask` [..., T, L] (True = may see) covers the sequence's own keys, None means all
    of them; the prefix columns are visible to every query."""
    b, p = q.shape[0], prefix_k.shape[1]
    keys = torch.cat([prefix_k.to(k.dtype).expand(b, -1, -1, -1), k], dim=2)
    values = torch.cat([prefix_v.to(v.dtype).expand(b, -1, -1, -1), v], dim=2)
    if mask is not None:
        mask = torch.cat([torch.ones(*mask.shape[:-1], p, dtype=torch.bool, device=mask.device), mask], dim=-1)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1],
                                          scale=scale)


class DenseKVCache:
    GROW_STEP = 256  # tokens added per reallocation; amortises copies without reserving the full context

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        batch_size: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        capacity: int = 0,
        value_head_dim: int | None = None,
    ) -> None:
        self.num_layers = num_layers
        self.length = 0  # tokens already committed (visible to the next forward)
        # What a model remembers about the sequence besides keys and values (ChatGLM-6B: its prompt layout).
        self.model_state: dict[str, Any] = {}
        self._shape = (batch_size, num_kv_heads)
        self._head_dim, self._value_head_dim = head_dim, value_head_dim or head_dim
        self._dtype, self._device = dtype, torch.device(device)
        self._capacity = 0
        self._mask: torch.Tensor | None = None  # this forward's causal mask, built by the first layer
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._reserve(max(capacity, 1))

    def _reserve(self, needed: int) -> None:
        if needed <= self._capacity:
            return
        new_capacity = ((needed + self.GROW_STEP - 1) // self.GROW_STEP) * self.GROW_STEP
        keys, values = [], []
        for i in range(self.num_layers):
            k = torch.empty(*self._shape, new_capacity, self._head_dim, dtype=self._dtype, device=self._device)
            v = torch.empty(*self._shape, new_capacity, self._value_head_dim, dtype=self._dtype, device=self._device)
            if self.keys:
                k[:, :, : self.length] = self.keys[i][:, :, : self.length]
                v[:, :, : self.length] = self.values[i][:, :, : self.length]
            keys.append(k)
            values.append(v)
        self.keys, self.values, self._capacity = keys, values, new_capacity

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k/v ([B, H, T, D]) after the committed prefix; return all keys/values so far."""
        end = self.length + k.shape[2]
        self._reserve(end)
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
               scale: float | None = None) -> torch.Tensor:
        new_tokens = q.shape[2]
        mask = None
        if self.length > 0 and new_tokens > 1:  # a later chunk: see the whole prefix, causal among the new
            if self._mask is None:
                self._mask = self.causal_mask(new_tokens, q.device)
            mask = self._mask
        k, v = self.update(layer, k, v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and new_tokens > 1,
                                              enable_gqa=q.shape[1] != k.shape[1], scale=scale)

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens
        self._mask = None

    def truncate(self, length: int) -> None:
        """Forget everything after `length` tokens (reuse a shared prefix for the next turn)."""
        self.length = min(self.length, length)
        self._mask = None

    def causal_mask(self, new_tokens: int, device: torch.device) -> torch.Tensor:
        """Boolean [T, L+T] mask: new token i sees the whole cached prefix and new tokens 0..i."""
        total = self.length + new_tokens
        rows = torch.arange(new_tokens, device=device)[:, None] + self.length
        return torch.arange(total, device=device)[None, :] <= rows

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


# ---- the serving engine's paged cache ----------------------------------------------------------------------


class StepCancelled(Exception):  # a signal, not an error: no "Error" suffix
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
class PagedPrefill:
    """One sequence's prompt chunk in a paged step."""

    start: int  # first row of this chunk in the flattened batch
    length: int
    context_slots: torch.Tensor  # [L] slots of the whole context, in position order
    position: int  # the chunk's first position in its sequence (L = position + length)
    block: int  # query block: prompt attention runs per block of positions [k·block, (k+1)·block)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, gqa: bool,
               scale: float | None, prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Causal attention of the chunk's queries q [1, H, n, D] over its context k, v [1, Hkv, L, D] (and,
        for a sequence with a P-Tuning prefix, over that prefix's keys and values [Hkv, P, D] first), one
        attention call per query block of positions, each over the keys up to its block's end. A block's
        call is then the same whether its prompt came cold, after a prefix-cache hit, or split into other
        chunks (the scheduler ends partial chunks on block boundaries), so its tokens' values are too: one
        SDPA over a whole chunk rounds differently with the chunk's length."""
        pieces = []
        pos, end = self.position, self.position + self.length
        while pos < end:
            stop = min((pos // self.block + 1) * self.block, end)
            rows = slice(pos - self.position, stop - self.position)
            mask = torch.arange(stop, device=q.device)[None, :] <= torch.arange(pos, stop, device=q.device)[:, None]
            if prefix is None:
                pieces.append(F.scaled_dot_product_attention(q[:, :, rows], k[:, :, :stop], v[:, :, :stop],
                                                             attn_mask=mask, enable_gqa=gqa, scale=scale))
            else:
                pieces.append(attend_with_prefix(q[:, :, rows], k[:, :, :stop], v[:, :, :stop], *prefix, mask,
                                                 scale=scale))
            pos = stop
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)


@dataclass
class PagedDecode:
    """The step's decoding sequences (one new token each, the first rows of the batch), padded to the longest
    context with the pool's zeroed pad slot."""

    gather: torch.Tensor  # [B, Lmax] slots of each sequence's context
    mask: torch.Tensor  # [B, 1, 1, Lmax] true where a slot belongs to the sequence
    lengths: torch.Tensor  # [B] context length of each sequence


@dataclass
class PagedAttentionBatch:
    """One serving step as the model's `cache`: `slots` [N] says where each new token's k/v go; decoding
    sequences share one padded attention call, each prefill chunk gets its own.

    `prefixes`: a P-Tuning v2 prefix (or None) per sequence of the step, in row order - the decoding sequences,
    then the prefill chunks - so the runner lists them in its plan's chunk order. A row with one also attends to
    its prefix; rows without are computed exactly as in a step without prefixes."""

    kv: PagedKVCache
    slots: torch.Tensor
    decode: PagedDecode | None = None
    prefills: list[PagedPrefill] = field(default_factory=list)
    cancelled: Callable[[], bool] | None = None
    prefixes: Sequence[PrefixKV | None] | None = None
    _attention_rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def decode_only(self) -> bool:
        """Every row is a sequence decoding one token (what the fused native decode takes)."""
        return self.decode is not None and not self.prefills

    @property
    def has_prefixes(self) -> bool:
        """Some row attends to a P-Tuning prefix (which the native kernels know nothing of)."""
        return self.prefixes is not None and any(p is not None for p in self.prefixes)

    def _prefix(self, row: int) -> PrefixKV | None:
        return None if self.prefixes is None else self.prefixes[row]

    def raise_if_cancelled(self) -> None:
        """StepCancelled once every sequence of the step is abandoned; checked between layers (by `attend`,
        or directly by a fused path that does not call it)."""
        if self.cancelled is not None and self.cancelled():
            raise StepCancelled

    def advance(self, num_tokens: int) -> None:
        """Positions are tracked by the scheduler; nothing to do."""

    def attention_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every row's context, for an attention that takes decoding and prompt rows alike (the native
        kernel): gather [G, Lmax] (the decoding sequences' rows, then one per prompt chunk, padded with the
        pool's pad slot), row_seq [N] (each row's gather row) and lengths [N] (each row's position + 1, so a
        prompt row sees the rows before it). Built once per step."""
        if self._attention_rows is None:
            rows: list[torch.Tensor] = []
            row_seq: list[torch.Tensor] = []
            lengths: list[torch.Tensor] = []
            device = self.slots.device
            if self.decode is not None:
                b = self.decode.lengths.shape[0]
                rows.extend(self.decode.gather)
                row_seq.append(torch.arange(b, device=device))
                lengths.append(self.decode.lengths)
            for p in self.prefills:
                row_seq.append(torch.full((p.length,), len(rows), dtype=torch.long, device=device))
                rows.append(p.context_slots)
                lengths.append(torch.arange(p.position + 1, p.position + p.length + 1, device=device))
            longest = max(r.shape[0] for r in rows)
            gather = torch.full((len(rows), longest), self.kv.pad_slot, dtype=torch.long, device=device)
            for i, r in enumerate(rows):
                gather[i, : r.shape[0]] = r
            self._attention_rows = (gather, torch.cat(row_seq), torch.cat(lengths))
        return self._attention_rows

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
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
        b = 0
        if self.decode is not None:
            b = self.decode.lengths.shape[0]
            qd = q[0, :, :b].transpose(0, 1).unsqueeze(2)  # [B, H, 1, D]
            kd = key_cache[self.decode.gather].transpose(1, 2)  # [B, Hkv, Lmax, D]
            vd = value_cache[self.decode.gather].transpose(1, 2)
            out = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=self.decode.mask, enable_gqa=gqa,
                                                 scale=scale)
            out = out.squeeze(2).transpose(0, 1)  # [H, B, Dv]
            if self.has_prefixes:
                out = self._decode_prefix_rows(layer, out, qd, key_cache, value_cache, scale)
            outs.append(out)
        for i, p in enumerate(self.prefills):
            qp = q[:, :, p.start : p.start + p.length]
            kp = key_cache[p.context_slots].transpose(0, 1).unsqueeze(0)  # [1, Hkv, L, D]
            vp = value_cache[p.context_slots].transpose(0, 1).unsqueeze(0)
            prefix = self._prefix(b + i)
            outs.append(p.attend(qp, kp, vp, gqa=gqa, scale=scale,
                                 prefix=None if prefix is None else prefix.kv(layer))[0])
        return torch.cat(outs, dim=1).unsqueeze(0) if len(outs) > 1 else outs[0].unsqueeze(0)

    def _decode_prefix_rows(self, layer: int, out: torch.Tensor, qd: torch.Tensor, key_cache: torch.Tensor,
                            value_cache: torch.Tensor, scale: float | None) -> torch.Tensor:
        """Recompute the decoding rows that have a prefix, each alone over [its prefix; its own context]; out
        [H, B, Dv] is the shared padded call's result. Redone rather than padding the prefixes into the shared
        call: that would change the call, and with it the rounding of the rows without a prefix."""
        assert self.decode is not None
        out = out.clone()
        for i in range(self.decode.lengths.shape[0]):
            prefix = self._prefix(i)
            if prefix is None:
                continue
            slots = self.decode.gather[i, : int(self.decode.lengths[i])]
            kr = key_cache[slots].transpose(0, 1).unsqueeze(0)  # [1, Hkv, L, D]
            vr = value_cache[slots].transpose(0, 1).unsqueeze(0)
            out[:, i] = attend_with_prefix(qd[i : i + 1], kr, vr, *prefix.kv(layer), None, scale=scale)[0, :, 0]
        return out
