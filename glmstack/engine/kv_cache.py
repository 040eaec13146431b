"""KV caches.

`DenseKVCache` is the simple contiguous cache behind `model.chat` and the reference generation loop: one
sequence (or a batch of equal-length sequences), grown in chunks so a short chat does not reserve the whole
context window up front.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
        self._shape = (batch_size, num_kv_heads)
        self._head_dim, self._value_head_dim = head_dim, value_head_dim or head_dim
        self._dtype, self._device = dtype, torch.device(device)
        self._capacity = 0
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

    def advance(self, num_tokens: int) -> None:
        """Called once per forward after every layer wrote its k/v."""
        self.length += num_tokens

    def truncate(self, length: int) -> None:
        """Forget everything after `length` tokens (reuse a shared prefix for the next turn)."""
        self.length = min(self.length, length)

    def causal_mask(self, new_tokens: int, device: torch.device) -> torch.Tensor:
        """Boolean [T, L+T] mask: new token i sees the whole cached prefix and new tokens 0..i."""
        total = self.length + new_tokens
        rows = torch.arange(new_tokens, device=device)[:, None] + self.length
        return torch.arange(total, device=device)[None, :] <= rows

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


def cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer: int,
    cache: object | None,
    mask: torch.Tensor | None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention for one layer, wherever the keys live. q: [B, H, T, D], k/v: [B, Hkv, T, D] (new tokens).

    - no cache: plain causal attention over these tokens;
    - a `DenseKVCache`: append, then attend over the whole cached sequence (`mask` covers the prefix);
    - a paged batch (runner.PagedAttentionBatch): it writes the slots and attends per sequence itself.
    """
    attend = getattr(cache, "attend", None)
    if attend is not None:
        return attend(layer, q, k, v, scale=scale)
    if cache is not None:
        k, v = cache.update(layer, k, v)  # type: ignore[attr-defined]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1,
                                          enable_gqa=q.shape[1] != k.shape[1], scale=scale)
