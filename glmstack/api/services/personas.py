"""charglm-3 and emohaa (spec §2.2.3) on the served model: persona prompting, not separate models.

The hosted platform runs CharacterGLM and Emohaa as their own models; here the request's `meta` (who the bot
plays, who the user is) becomes a system message in front of the conversation, in the language of the
platform's own examples, and the served chat model answers in character. A small model plays a persona
about as well as it follows any system prompt.
"""

from __future__ import annotations

from typing import Any

from glmstack.api.errors import PlatformError
from glmstack.api.schemas.tools import PersonaMeta

PERSONA_MODELS = ("charglm-3", "emohaa")

CHARACTER_PROMPT = (
    "现在你将扮演{bot_name}，与{user_name}进行角色扮演对话。\n"
    "# {bot_name}的角色设定\n{bot_info}\n"
    "# {user_name}的信息\n{user_info}\n"
    "# 要求\n始终以{bot_name}的身份、语气和性格回答，不要提及你是AI或语言模型；"
    "回复自然、简洁，可以用括号描写动作和神态。"
)
# Emohaa is a listener first (Hill's helping model: exploration, insight, action), not an advice column.
EMOHAA_PROMPT = (
    "你是{bot_name}，一位温暖、专业的情感支持陪伴者，运用 Hill 助人理论（探索、领悟、行动）与{user_name}交谈。\n"
    "# 你的设定\n{bot_info}\n"
    "# {user_name}的信息\n{user_info}\n"
    "# 要求\n先倾听和共情，复述并确认对方的感受，用开放式问题帮助对方探索；不评判、不说教，需要时再温和地给出建议。"
)


def is_persona_model(model: str) -> bool:
    return model.lower() in PERSONA_MODELS


def persona_messages(model: str, meta: PersonaMeta | None, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation the served model sees for a charglm-3 / emohaa request: the persona's system message,
    then the user and assistant turns (the doc allows only those two roles)."""
    if meta is None:
        raise PlatformError(1213, f"{model} needs meta (user_info, bot_info, bot_name, user_name)", field="meta")
    for i, message in enumerate(messages):
        if message["role"] not in ("user", "assistant"):
            raise PlatformError(1214, f"{model} takes user and assistant messages only",
                                field=f"messages[{i}].role")
    template = EMOHAA_PROMPT if model.lower() == "emohaa" else CHARACTER_PROMPT
    system = template.format(bot_name=meta.bot_name, user_name=meta.user_name, bot_info=meta.bot_info,
                             user_info=meta.user_info)
    return [{"role": "system", "content": system}, *messages]
