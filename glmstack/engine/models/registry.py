"""Which model class handles which checkpoint.

Two dicts, mlx-lm style: config.json `architectures[0]` (or `model_type`) → module, and GGUF
`general.architecture` → module. Each module exposes `Model` (an nn.Module with a `config_class`). Adding an
architecture is one new file and one line per format here.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from glmstack.engine.errors import UnsupportedArchitectureError

# config.json "architectures"[0] -> module under glmstack.engine.models
HF_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
}

# GGUF general.architecture -> module
GGUF_ARCHITECTURES: dict[str, str] = {
    "llama": "llama",
    "qwen2": "llama",
}


def supported_architectures() -> list[str]:
    return sorted(set(HF_ARCHITECTURES) | {f"gguf:{name}" for name in GGUF_ARCHITECTURES})


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"glmstack.engine.models.{name}")


def resolve_hf(config: dict[str, Any]) -> ModuleType:
    """Pick the module for a config.json. Architectures with several generations under one model_type
    (ChatGLM-6B vs ChatGLM2/3/GLM-4 all say `chatglm`) are told apart by the module's own `resolve()`."""
    names = list(config.get("architectures") or [])
    for name in names:
        if name in HF_ARCHITECTURES:
            return _module(HF_ARCHITECTURES[name])
    model_type = config.get("model_type")
    if model_type in HF_MODEL_TYPES:
        return _module(HF_MODEL_TYPES[model_type])
    claimed = ", ".join(names) or f"model_type={model_type!r}"
    raise UnsupportedArchitectureError(
        f"unsupported architecture {claimed}; supported: {', '.join(supported_architectures())}"
    )


def resolve_gguf(arch: str) -> ModuleType:
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"unsupported GGUF architecture {arch!r}; supported: {', '.join(supported_architectures())}"
        )
    return _module(GGUF_ARCHITECTURES[arch])


# model_type fallback for configs without "architectures"
HF_MODEL_TYPES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
}
