"""JSON from model files (config.json, shard indexes, tokenizer configs, safetensors headers): UTF-8, no
duplicate keys, bounded nesting and size. Every JSON file a checkpoint brings is read through here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from glmstack.engine.errors import ModelFileError


def parse_json(path: Path, raw: bytes, what: str, offset: int | None = None) -> Any:
    """JSON from a model file: UTF-8, no duplicate keys, no nesting deep enough to exhaust the stack."""
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        problem = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ModelFileError(path, f"{what} is not valid JSON: {problem}", offset=offset) from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return data


MAX_JSON_BYTES = 64 * 1024 * 1024  # config.json and shard indexes; a 100k-tensor index is ~10 MB


def read_json(path: Path, *, missing_ok: bool = False) -> dict[str, Any]:
    """A JSON object from a file of at most MAX_JSON_BYTES; `{}` for a missing file when `missing_ok`."""
    if not path.is_file():
        if missing_ok:
            return {}
        raise ModelFileError(path, "file is missing")
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise ModelFileError(path, f"file is {size} bytes, over the {MAX_JSON_BYTES}-byte limit for JSON")
    data = parse_json(path, path.read_bytes(), "file")
    if not isinstance(data, dict):
        raise ModelFileError(path, "expected a JSON object")
    return data


