"""Adapters on the engine's models: which module an adapter's HF names mean (names.py) and the PEFT folder
format (peft_format.py). Nothing here imports peft."""

from glmstack.engine.adapters.names import Target, UnsupportedAdapterModel, hf_linear_targets
from glmstack.engine.adapters.peft_format import AdapterFileError, read_adapter, write_adapter

__all__ = ["AdapterFileError", "Target", "UnsupportedAdapterModel", "hf_linear_targets", "read_adapter",
           "write_adapter"]
