"""Chat prompt formats: one module per prompt family (rendering, and parsing the family's tool calls).

`chat_format_for(tokenizer)` picks the format for a model with a Jinja template; GLM models get theirs from
`glm_chat_format_for_model(tokenizer, config)` (or `glm_chat_format_for(tokenizer, generation)`).
"""

from glmstack.engine.chat_format.base import ChatFormat, ChatPrompt, ChatTemplateError, message_text
from glmstack.engine.chat_format.chatglm import ChatGLM2ChatFormat, ChatGLM6BChatFormat
from glmstack.engine.chat_format.chatglm3 import ChatGLM3ChatFormat, ChatGLM3Dialect, classic_tool_result
from glmstack.engine.chat_format.glm4 import GLM4ChatFormat, GLM4Dialect
from glmstack.engine.chat_format.glm45 import GLM45ChatFormat, GLM45Dialect
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
    "ChatGLM3Dialect",
    "ChatGLM6BChatFormat",
    "ChatPrompt",
    "ChatTemplateError",
    "GLM4ChatFormat",
    "GLM4Dialect",
    "GLM45ChatFormat",
    "GLM45Dialect",
    "PlainChatFormat",
    "TemplateChatFormat",
    "chat_format_for",
    "classic_tool_result",
    "detect_generation",
    "glm_chat_format_for",
    "glm_chat_format_for_model",
    "message_text",
]
