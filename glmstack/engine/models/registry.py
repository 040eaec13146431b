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
    # ChatGLM-6B (v1) and ChatGLM2/3 / GLM-4-9B-chat share these names; chatglm.resolve() tells them apart.
    "ChatGLMModel": "chatglm",
    "ChatGLMForConditionalGeneration": "chatglm",
    "GlmForCausalLM": "chatglm",  # transformers' conversion of the same v2 weights (q/k/v split)
    "Glm4ForCausalLM": "glm4",  # GLM-4-0414 / GLM-Z1
    # GLM-4.5 / 4.6 MoE ("Glm4MoeForCausalLM", model_type glm4_moe, spec section 5) would go here: "glm4_moe".
}

# GGUF general.architecture -> module
GGUF_ARCHITECTURES: dict[str, str] = {
    "llama": "llama",
    "qwen2": "llama",
    "chatglm": "chatglm",  # llama.cpp's name for the v2 architecture (ChatGLM2/3, GLM-4-9B-chat)
    "glm4": "glm4",
    # llama.cpp "glm4moe" (GLM-4.5) would map to "glm4_moe".
}


def supported_architectures() -> list[str]:
    return sorted(set(HF_ARCHITECTURES) | {f"gguf:{name}" for name in GGUF_ARCHITECTURES})


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"glmstack.engine.models.{name}")


def resolve_hf(config: dict[str, Any]) -> ModuleType:
    """Pick the module for a config.json. Architectures with several generations under one model_type
    (ChatGLM-6B vs ChatGLM2/3/GLM-4 all say `chatglm`) are told apart by the module's own `resolve()`."""
    names = list(config.get("architectures") or [])
    model_type = config.get("model_type")
    found = next((HF_ARCHITECTURES[name] for name in names if name in HF_ARCHITECTURES), None)
    if found is None and model_type in HF_MODEL_TYPES:
        found = HF_MODEL_TYPES[model_type]
    if found is not None:
        module = _module(found)
        return module.resolve(config) if hasattr(module, "resolve") else module
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
    "chatglm": "chatglm",
    "glm": "chatglm",
    "glm4": "glm4",
}
