"""ChatGLM's loading idiom, so the scripts users already have run with one changed import:

    from glmstack import AutoModel, AutoTokenizer      # was: from transformers import ...
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    model = AutoModel.from_pretrained(path, trust_remote_code=True).half().cuda()   # or .float() on a CPU
    model = model.eval()
    response, history = model.chat(tokenizer, "你好", history=[])

`trust_remote_code` is accepted and ignored: glmstack runs its own model code and executes nothing from the
checkpoint. The model loads on the CPU in float32, as transformers does without `torch_dtype`, and `.half()`,
`.float()`, `.cuda()`, `.to()` and `.quantize(4)` move or convert it in place (see `ChatModel`). Names
resolve as `glmstack.load` resolves them (a path, a name under $GLMSTACK_HOME/models, or None for the default
model); nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from glmstack.engine.classic import ChatModel, load, tokenizer_for
from glmstack.engine.loading.catalog import resolve_model_path
from glmstack.engine.loading.checkpoint import open_checkpoint
from glmstack.engine.tokenization.base import Tokenizer
from glmstack.settings import Settings

# transformers' from_pretrained arguments that change nothing here (where to look, how to load into memory)
_HARMLESS = {"revision", "local_files_only", "low_cpu_mem_usage", "use_fast", "cache_dir", "resume_download"}


def _refuse(kind: str, kwargs: dict[str, Any]) -> None:
    unknown = sorted(set(kwargs) - _HARMLESS)
    if unknown:
        raise TypeError(f"{kind}.from_pretrained() got arguments glmstack does not support: {', '.join(unknown)}")


class AutoTokenizer:
    @staticmethod
    def from_pretrained(name_or_path: str | Path | None = None, *, trust_remote_code: bool = False,
                        **kwargs: Any) -> Tokenizer:
        """The checkpoint's tokenizer, without reading its weights."""
        _refuse("AutoTokenizer", kwargs)
        path = resolve_model_path(None if name_or_path is None else str(name_or_path), Settings.from_env())
        return tokenizer_for(open_checkpoint(path))


class AutoModel:
    @staticmethod
    def from_pretrained(name_or_path: str | Path | None = None, *, trust_remote_code: bool = False,
                        torch_dtype: str | torch.dtype | None = None, device_map: str | None = None,
                        **kwargs: Any) -> ChatModel:
        """The model on the CPU (or where `device_map` says: "auto", "cpu", "cuda"), in `torch_dtype` or its
        stored precision; floats either way: `.quantize(8 or 4)` after, as ChatGLM's READMEs do."""
        _refuse("AutoModel", kwargs)
        device = "cpu" if device_map is None else str(device_map)
        # without torch_dtype transformers loads float32, and ChatGLM's scripts then call .half() or .float()
        model, _ = load(name_or_path, device=device, dtype="float32" if torch_dtype is None else torch_dtype)
        return model


AutoModelForCausalLM = AutoModel  # GLM-4's READMEs load it under this name
