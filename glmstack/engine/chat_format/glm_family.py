"""Which GLM prompt format a model needs, and the format itself.

ChatGLM-6B, ChatGLM2, ChatGLM3 and GLM-4-9B-chat all say model_type "chatglm", and ChatGLM2 and ChatGLM3
even share config fields and the sentencepiece file; what tells them apart is the tokenizer's special
tokens. GLM-4.5 (`glm4_moe`) keeps GLM-4's role tokens and adds `<arg_key>`/`<arg_value>` for its XML calls.
Architecture modules use this from their `chat_format_for(tokenizer, config)` hook:

    def chat_format_for(tokenizer, config):
        return glm_chat_format_for_model(tokenizer, config)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from glmstack.engine.chat_format.base import ChatFormat, ChatTemplateError
from glmstack.engine.chat_format.chatglm import ChatGLM2ChatFormat, ChatGLM6BChatFormat
from glmstack.engine.chat_format.chatglm3 import ChatGLM3ChatFormat
from glmstack.engine.chat_format.glm4 import GLM4ChatFormat
from glmstack.engine.chat_format.glm45 import GLM45ChatFormat
from glmstack.engine.tokenization.base import Tokenizer

GLM_CHAT_FORMATS: dict[str, type[ChatFormat]] = {
    "chatglm-6b": ChatGLM6BChatFormat,
    "chatglm2": ChatGLM2ChatFormat,
    "chatglm3": ChatGLM3ChatFormat,
    "glm4": GLM4ChatFormat,
    "glm45": GLM45ChatFormat,
}


def detect_generation(config: Mapping[str, Any] | Any, tokenizer: Tokenizer) -> str:
    """ "chatglm-6b", "chatglm2", "chatglm3", "glm4" or "glm45", from the tokenizer's special tokens (spec 1.6,
    2.6, 3.1, 5.2): GLM-4.5 has GLM-4's tokens plus `<arg_key>`/`<arg_value>`; GLM-4 spells `<sop>` with
    brackets and has role tokens; ChatGLM2/3 spell `sop` bare, and only
    ChatGLM3 has role tokens; ChatGLM-6B has `<sop>` and no role tokens. A config.json dict (or GGUF
    metadata) is consulted only when the tokenizer is not a GLM one; other config objects are ignored."""

    def has(token: str) -> bool:
        return tokenizer.token_to_id(token) is not None

    if has("[gMASK]"):
        # Checked in this order because "sop" can also be an ordinary word piece in the larger vocabularies.
        if has("<sop>") and has("<|user|>"):
            return "glm45" if has("<arg_key>") and has("<arg_value>") else "glm4"
        if has("<sop>") and has("<eop>"):
            return "chatglm-6b"
        if has("sop"):
            return "chatglm3" if has("<|user|>") else "chatglm2"
    if isinstance(config, Mapping):
        if "position_encoding_2d" in config or "inner_hidden_size" in config:
            return "chatglm-6b"
        if config.get("model_type") in ("glm", "glm4") or config.get("general.architecture") == "glm4":
            return "glm4"
    raise ChatTemplateError(
        "cannot tell which GLM generation this is: the tokenizer has no GLM special tokens"
    )


def glm_chat_format_for(tokenizer: Tokenizer, generation: str) -> ChatFormat:
    """The prompt format of a GLM generation ("chatglm-6b", "chatglm2", "chatglm3", "glm4", "glm45")."""
    if generation not in GLM_CHAT_FORMATS:
        raise ValueError(f"unknown GLM generation {generation!r}; known: {', '.join(GLM_CHAT_FORMATS)}")
    return GLM_CHAT_FORMATS[generation](tokenizer)


def glm_chat_format_for_model(tokenizer: Tokenizer, config: Mapping[str, Any] | Any) -> ChatFormat:
    """`glm_chat_format_for` with the generation detected: the shape of the `chat_format_for` hook."""
    return glm_chat_format_for(tokenizer, detect_generation(config, tokenizer))
