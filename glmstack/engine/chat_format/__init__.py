"""Chat prompt formats: one module per prompt family (rendering and, later, tool-call parsing).

`chat_format_for(tokenizer)` picks the format for a loaded model.
"""

from glmstack.engine.chat_format.template import (
    ChatFormat,
    ChatPrompt,
    ChatTemplateError,
    PlainChatFormat,
    TemplateChatFormat,
    chat_format_for,
)

__all__ = [
    "ChatFormat",
    "ChatPrompt",
    "ChatTemplateError",
    "PlainChatFormat",
    "TemplateChatFormat",
    "chat_format_for",
]
