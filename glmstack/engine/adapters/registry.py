"""The adapters a loaded base serves, by name: LoRA (lora.py) and P-Tuning v2 prefixes (prefix.py).

Loading reads the files and builds the adapter's tensors on the caller's thread (the platform adds an `ft:`
model while the engine is serving); only the swap into the table takes the lock, so the engine thread never
waits for a load. A request holds its adapter object from admission to its end: unloading (or reloading under
the same name) affects new requests only. Each load gets a process-unique `key`, which roots the prefix-cache
hash chain of its requests (scheduler.py): an adapter reloaded under an old name never meets blocks computed
with the old weights.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from glmstack.engine.adapters.lora import LoRAAdapter, is_lora_dir, load_lora

_keys = itertools.count(1)


@dataclass(frozen=True, eq=False)
class LoadedAdapter:
    name: str
    key: int  # unique per load in this process (see the module docstring)
    adapter: object  # a LoRAAdapter or a prefix.PrefixAdapter

    @property
    def is_lora(self) -> bool:
        return isinstance(self.adapter, LoRAAdapter)


class AdapterRegistry:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._lock = threading.Lock()
        self._loaded: dict[str, LoadedAdapter] = {}

    def load(self, name: str, path: str | Path) -> LoadedAdapter:
        """Load the adapter folder at `path` as `name` (replacing one of that name). A PEFT LoRA folder is a
        LoRA; anything else goes to the P-Tuning loader (PEFT PREFIX_TUNING, THUDM's prefix_encoder).
        Raises ValueError (or FileNotFoundError) for a folder it cannot serve on this base."""
        if not name:
            raise ValueError("an adapter needs a name")
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such adapter folder")
        adapter: object
        if is_lora_dir(path):
            adapter = load_lora(name, path, self.model)
        else:
            from glmstack.engine.adapters.prefix import load_prefix_adapter  # only for a prefix adapter

            adapter = load_prefix_adapter(path, self.model)
        loaded = LoadedAdapter(name, next(_keys), adapter)
        with self._lock:
            self._loaded[name] = loaded
        return loaded

    def unload(self, name: str) -> bool:
        """Forget `name` (requests already running keep it to their end). False if it was not loaded."""
        with self._lock:
            return self._loaded.pop(name, None) is not None

    def get(self, name: str) -> LoadedAdapter | None:
        with self._lock:
            return self._loaded.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._loaded)
