"""Sanity checks on the sizes a model's config declares, before a model is built from them.

The model is built on the meta device, so `hidden_size = 10**9` or `block_count = 10**8` costs nothing until
something allocates for it (or builds ten million layer objects). Every declared size must be a positive
integer under a generous cap, and where the file's tensor shapes are known it must agree with them: a width
no tensor has, or more layers than the file holds tensors for, is refused as a `ModelFileError` naming the
field.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from glmstack.engine.errors import ModelFileError

# meaning -> (cap, config.json names, GGUF names after the "<architecture>." prefix). The caps are several
# times the largest published models (126 layers, hidden 16384, vocabularies of 256k, 10M-token contexts).
SIZE_FIELDS: dict[str, tuple[int, tuple[str, ...], tuple[str, ...]]] = {
    "layers": (1024, ("num_hidden_layers", "num_layers", "n_layer"), ("block_count",)),
    "hidden": (1 << 17, ("hidden_size", "n_embd"), ("embedding_length",)),
    "ffn": (1 << 20, ("intermediate_size", "ffn_hidden_size", "inner_hidden_size"), ("feed_forward_length",)),
    "vocab": (1 << 22, ("vocab_size", "padded_vocab_size"), ("vocab_size",)),
    "heads": (1 << 12, ("num_attention_heads", "n_head"), ("attention.head_count",)),
    "kv_heads": (1 << 12, ("num_key_value_heads", "multi_query_group_num"), ("attention.head_count_kv",)),
    "head_dim": (1 << 14, ("head_dim", "kv_channels"), ("attention.key_length", "attention.value_length")),
    "context": (
        1 << 24,
        ("max_position_embeddings", "seq_length", "max_sequence_length"),
        ("context_length",),
    ),
}
# Sizes that are the length of some tensor dimension in any dense checkpoint.
_TENSOR_SIZES = ("hidden", "ffn", "vocab")
_EMBEDDINGS = ("embed_tokens.weight", "word_embeddings.weight", "token_embd.weight", "wte.weight")
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|blk|h|layer)\.(\d+)\.")


def check_declared_sizes(
    path: Path,
    config: Mapping[str, Any],
    *,
    gguf_arch: str | None = None,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    names: Iterable[str] | None = None,
) -> None:
    """Refuse a config whose sizes are not positive integers under the caps, or disagree with the tensors.

    `gguf_arch` says the config is GGUF metadata (keys prefixed by the architecture); `shapes` are the file's
    tensor shapes when known (GGUF, safetensors); `names` the tensor names when only those are (a `.bin`
    index).
    """
    declared = _declared(path, config, gguf_arch)
    if shapes:
        largest = max((max(shape) for shape in shapes.values() if shape), default=0)
        for meaning in _TENSOR_SIZES:
            for field, value in declared.get(meaning, []):
                if value > largest:
                    raise ModelFileError(
                        path,
                        f"{field} = {value}, but no tensor in the file has a dimension "
                        f"that large (the largest is {largest})",
                        field=field,
                    )
        embedding = next((s for n, s in shapes.items() if n.endswith(_EMBEDDINGS) and len(s) == 2), None)
        for field, value in declared.get("hidden", []) if embedding else []:
            if value != embedding[1]:
                raise ModelFileError(
                    path,
                    f"{field} = {value} does not match the embedding's width {embedding[1]}",
                    field=field,
                )
        names = shapes.keys()
    if names is not None:
        indices = [int(m.group(1)) for m in map(_LAYER_INDEX.search, names) if m]
        # No layer tensors at all is left to the loader, which names the tensors it misses.
        present = max(indices) + 1 if indices else None
        for field, value in declared.get("layers", []):
            if present is not None and value > present:
                raise ModelFileError(
                    path,
                    f"{field} = {value}, but the file holds tensors for only {present} layers",
                    field=field,
                )


def _declared(
    path: Path, config: Mapping[str, Any], gguf_arch: str | None
) -> dict[str, list[tuple[str, int]]]:
    """meaning -> [(field, value)] for every size field present, each checked to be an integer in range."""
    found: dict[str, list[tuple[str, int]]] = {}
    for meaning, (cap, hf_names, gguf_names) in SIZE_FIELDS.items():
        fields = [f"{gguf_arch}.{name}" for name in gguf_names] if gguf_arch is not None else list(hf_names)
        for field in fields:
            value = config.get(field)
            if value is None:
                continue
            # GGUF may give a per-layer list (heads, feed-forward width; 0 for a layer without one).
            per_layer = gguf_arch is not None and isinstance(value, list) and bool(value)
            values, low = (value, 0) if per_layer else ([value], 1)
            for item in values:
                if not isinstance(item, int) or isinstance(item, bool) or not low <= item <= cap:
                    raise ModelFileError(
                        path, f"{field} = {item!r} is not an integer from {low} to {cap}", field=field
                    )
            found.setdefault(meaning, []).append((field, max(values)))
    return found
