"""Chat prompt formats: one module per prompt family (rendering and, later, tool-call parsing).

`chat_format_for(tokenizer)` picks the format for a model with a Jinja template; GLM models get theirs from
`glm_chat_format_for_model(tokenizer, config)` (or `glm_chat_format_for(tokenizer, generation)`).
"""

from glmstack.engine.chat_format.base import ChatFormat, ChatPrompt, ChatTemplateError, message_text
from glmstack.engine.chat_format.chatglm import ChatGLM2ChatFormat, ChatGLM6BChatFormat
from glmstack.engine.chat_format.chatglm3 import ChatGLM3ChatFormat
from glmstack.engine.chat_format.glm4 import GLM4ChatFormat
from glmstack.engine.chat_format.glm_family import (
    GLM_CHAT_FORMATS,
    detect_generation,
    glm_chat_format_for,
    glm_chat_format_for_model,
)
from glmstack.engine.chat_format.template import PlainChatFormat, TemplateChatFormat, chat_format_for

__all__ = [
    "GLM_CHAT_FORMATS",
    "ChatFormat",
    "ChatGLM2ChatFormat",
    "ChatGLM3ChatFormat",
    "ChatGLM6BChatFormat",
    "ChatPrompt",
    "ChatTemplateError",
    "GLM4ChatFormat",
    "PlainChatFormat",
    "TemplateChatFormat",
    "chat_format_for",
    "detect_generation",
    "glm_chat_format_for",
    "glm_chat_format_for_model",
    "message_text",
]
