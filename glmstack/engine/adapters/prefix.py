"""P-Tuning v2 (prefix tuning) at inference and in training: every layer gets `pre_seq_len` extra keys and
values in front of the sequence's own, which every token attends to.

The layout is THUDM's (ChatGLM2/3 `PrefixEncoder` and `get_prompt`, spec 7.3), which PEFT's prefix tuning
shares: the encoder maps each of the P virtual tokens to one flat vector of `num_layers * 2 * kv_heads *
head_dim` numbers, read as [layer0 K, layer0 V, layer1 K, layer1 V, ...], each `kv_heads x head_dim`. Three
details that are easy to get wrong, all as THUDM does them:
- the prefix keys are used as they are: no rotary (they are concatenated to a layer's cache after the
  real keys were rotated);
- the real tokens keep positions 0, 1, ... (the prefix does not shift them; the caller passes positions);
- the prefix is always visible: every query sees all P prefix columns, then the usual causal window.

`PrefixCache` is the `AttentionCache` that does this for one sequence (a training forward, or generation on a
`DenseKVCache`); `PagedAttentionBatch` (kv_cache.py) takes a `PrefixAdapter` per sequence of a serving step.
Both attend through kv_cache.py's `attend_with_prefix`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glmstack.engine.adapters.peft_format import AdapterFileError, read_adapter
from glmstack.engine.kv_cache import DenseKVCache, attend_with_prefix
from glmstack.engine.loading.safetensors_file import data_start, read_tensor, validate_safetensors_header

# Names of THUDM's own P-Tuning v2 checkpoints (`PrefixTrainer(save_changed=True)` writes only these).
THUDM_PREFIX = "transformer.prefix_encoder."
# PEFT's prefix tuning saves the encoder's output for all virtual tokens under this one name.
PEFT_KEY = "prompt_embeddings"
READ_ADAPTER_NAMES = ("adapter_model.safetensors", "adapter_model.bin", "pytorch_model.bin")


class PrefixEncoder(nn.Module):
    """THUDM's v2 prefix encoder: `Embedding(P, kv)`, optionally through `Linear(kv, hidden) -> Tanh ->
    Linear(hidden, kv)` (`prefix_projection`), kv = num_layers * 2 * kv_heads * head_dim. The embedding is
    kv-wide even with the projection (unlike PEFT's, which is token_dim-wide): THUDM's checkpoints are."""

    def __init__(self, pre_seq_len: int, num_layers: int, kv_heads: int, head_dim: int, hidden_size: int,
                 *, prefix_projection: bool = False) -> None:
        super().__init__()
        self.pre_seq_len, self.num_layers = pre_seq_len, num_layers
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.prefix_projection = prefix_projection
        kv_size = num_layers * 2 * kv_heads * head_dim
        self.embedding = nn.Embedding(pre_seq_len, kv_size)
        self.trans: nn.Sequential | None = None
        if prefix_projection:
            self.trans = nn.Sequential(nn.Linear(kv_size, hidden_size), nn.Tanh(), nn.Linear(hidden_size, kv_size))

    @classmethod
    def for_model(cls, model: nn.Module, pre_seq_len: int, *, prefix_projection: bool = False) -> PrefixEncoder:
        cfg: Any = model.config
        return cls(pre_seq_len, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size,
                   prefix_projection=prefix_projection)

    def forward(self) -> torch.Tensor:
        """The flat prefix [P, num_layers * 2 * kv_heads * head_dim] for all P virtual tokens."""
        flat = self.embedding.weight  # = embedding(arange(P)), without building the index tensor
        return flat if self.trans is None else self.trans(flat)


class PrefixAdapter:
    """A prefix's keys and values per layer, split out of the flat encoder output once. Loaded for serving it is
    frozen (built under no_grad); in training it is rebuilt each forward from the live encoder, so gradients
    flow back through `kv`."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.keys, self.values = keys, values
        self.num_layers = len(keys)
        self.pre_seq_len = keys[0].shape[1] if keys else 0

    @classmethod
    def from_flat(cls, flat: torch.Tensor, num_layers: int, kv_heads: int, head_dim: int) -> PrefixAdapter:
        """flat [P, num_layers * 2 * kv_heads * head_dim] -> per layer k, v [kv_heads, P, head_dim]."""
        per_layer = flat.view(flat.shape[0], 2 * num_layers, kv_heads, head_dim).permute(1, 2, 0, 3)
        return cls([per_layer[2 * i] for i in range(num_layers)], [per_layer[2 * i + 1] for i in range(num_layers)])

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k [Hkv, P, D], v [Hkv, P, Dv]) of `layer`."""
        return self.keys[layer], self.values[layer]

    def to(self, device: torch.device | str, dtype: torch.dtype) -> PrefixAdapter:
        # contiguous: each layer's slice of the flat tensor is strided; attention reads it every step
        return PrefixAdapter([k.to(device, dtype).contiguous() for k in self.keys],
                             [v.to(device, dtype).contiguous() for v in self.values])


class PrefixCache:
    """An `AttentionCache` for one sequence with a prefix: wraps nothing (a plain forward over the given tokens,
    causal among them) or a `DenseKVCache` (generation: the real tokens' keys live there, the prefix is put in
    front at each attention)."""

    def __init__(self, prefix: PrefixAdapter, inner: DenseKVCache | None = None) -> None:
        self.prefix, self.inner = prefix, inner
        self._mask: torch.Tensor | None = None  # this forward's causal mask, built by the first layer

    @property
    def length(self) -> int:
        """Real tokens already cached (the prefix not counted: positions continue from here)."""
        return 0 if self.inner is None else self.inner.length

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
               scale: float | None = None) -> torch.Tensor:
        t = q.shape[2]
        if self._mask is None:
            rows = torch.arange(t, device=q.device)[:, None] + self.length
            self._mask = torch.arange(self.length + t, device=q.device)[None, :] <= rows
        if self.inner is not None:
            k, v = self.inner.update(layer, k, v)
        pk, pv = self.prefix.kv(layer)
        return attend_with_prefix(q, k, v, pk, pv, self._mask, scale=scale)

    def advance(self, num_tokens: int) -> None:
        if self.inner is not None:
            self.inner.advance(num_tokens)
        self._mask = None


# ---- loading: PEFT's prefix tuning and THUDM's own checkpoints ---------------------------------------------


def load_prefix_adapter(directory: Path | str, model: nn.Module) -> PrefixAdapter:
    """A saved prefix for `model` (an engine model whose config has num_layers, num_kv_heads, head_dim), in the
    model's dtype and on its device, ready for `PrefixCache` or `PagedAttentionBatch(prefixes=...)`.

    Either format: PEFT's (adapter_config.json with peft_type PREFIX_TUNING; `prompt_embeddings` is the
    encoder's output, so a projection MLP is already applied) or THUDM's P-Tuning v2 output (config.json with
    `pre_seq_len`, `transformer.prefix_encoder.*` in pytorch_model.bin or a safetensors file), whose encoder is
    run once here. Raises AdapterFileError (a ValueError) for a folder that is neither or does not fit."""
    path = Path(directory)
    config, tensors = _read(path)
    if config.get("peft_type") != "PREFIX_TUNING":
        raise AdapterFileError(f"{path}: peft_type {config.get('peft_type')!r} is not a prefix (PREFIX_TUNING)")
    cfg: Any = model.config
    flat = _peft_flat(path, config, tensors, cfg) if PEFT_KEY in tensors else _thudm_flat(path, config, tensors, cfg)
    width = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim
    if flat.dim() != 2 or flat.shape[1] != width:
        raise AdapterFileError(f"{path}: a prefix of shape {tuple(flat.shape)} does not fit this model: each virtual "
                               f"token needs {width} numbers (layers {cfg.num_layers} x 2 x kv heads "
                               f"{cfg.num_kv_heads} x head dim {cfg.head_dim})")
    param = next(model.parameters())
    with torch.no_grad():
        return PrefixAdapter.from_flat(flat.float(), cfg.num_layers, cfg.num_kv_heads, cfg.head_dim).to(
            param.device, param.dtype)


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """peft_format.read_adapter, plus THUDM folders written by a newer transformers' save_pretrained, whose
    weights are `model.safetensors` (read_adapter knows the adapter_model.* and pytorch_model.bin names)."""
    file = path / "model.safetensors"
    if not file.is_file() or any((path / name).is_file() for name in READ_ADAPTER_NAMES):
        return read_adapter(path)
    header, start = validate_safetensors_header(file), data_start(file)
    with open(file, "rb") as f:
        tensors = {key: read_tensor(f, info, start) for key, info in header.items() if key != "__metadata__"}
    model_config = read_json(path / "config.json") if (path / "config.json").is_file() else {}
    projection = model_config.get("prefix_projection", any(".trans." in key for key in tensors))
    config = {"peft_type": "PREFIX_TUNING", "prefix_projection": bool(projection),
              "num_virtual_tokens": model_config.get("pre_seq_len")}
    return config, tensors


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFileError(f"{path}: cannot read ({exc})") from None
    if not isinstance(value, dict):
        raise AdapterFileError(f"{path}: expected a JSON object")
    return value


def _peft_flat(path: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], cfg: Any) -> torch.Tensor:
    flat = tensors[PEFT_KEY]
    heads = config.get("num_attention_heads")
    if heads is not None and heads != cfg.num_kv_heads:
        # PEFT before its GQA fix (huggingface/peft#1901) sized a prefix by query heads: no use to a GQA model
        raise AdapterFileError(f"{path}: num_attention_heads {heads} differs from the model's {cfg.num_kv_heads} "
                               "key/value heads")
    if config.get("num_virtual_tokens") not in (None, flat.shape[0]):
        raise AdapterFileError(f"{path}: num_virtual_tokens {config['num_virtual_tokens']} but {flat.shape[0]} rows "
                               f"in {PEFT_KEY}")
    return flat


def _thudm_flat(path: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], cfg: Any) -> torch.Tensor:
    state = {key.split(THUDM_PREFIX, 1)[1]: t for key, t in tensors.items() if THUDM_PREFIX in key}
    if "embedding.weight" not in state:
        raise AdapterFileError(f"{path}: neither {PEFT_KEY} (PEFT) nor {THUDM_PREFIX}embedding.weight (THUDM)")
    pre_seq_len = state["embedding.weight"].shape[0]
    if config.get("num_virtual_tokens") not in (None, pre_seq_len):
        raise AdapterFileError(f"{path}: pre_seq_len {config['num_virtual_tokens']} but {pre_seq_len} prefix rows")
    encoder = PrefixEncoder(pre_seq_len, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size,
                            prefix_projection=bool(config.get("prefix_projection")))
    try:
        encoder.load_state_dict({key: t.float() for key, t in state.items()})
    except RuntimeError as exc:  # another model's shapes (or ChatGLM-6B's v1 encoder), a missing trans.*
        raise AdapterFileError(f"{path}: the prefix encoder does not fit this model: {exc}") from None
    with torch.no_grad():
        return encoder()
