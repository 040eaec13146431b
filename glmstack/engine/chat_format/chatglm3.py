"""ChatGLM3-6B prompts: role tokens and a metadata line per message (spec 2.8, `build_chat_input`).

    [gMASK] sop
    per message:  <|role|> + encode(f"{metadata}\\n") + encode(content)
    then:         <|assistant|>

Each piece is encoded *separately*: sentencepiece puts its dummy "▁" in front of every piece (so "\\n" alone is
`[▁, <0x0A>]`), which is what the model was trained on; encoding the rendered text in one go gives other ids.
Content is encoded with special tokens off, so typed "<|user|>" stays text. There is no end-of-turn token:
the next role token ends a turn, and the model ends its answer with `<|user|>` or, for a tool call,
`<|observation|>` -- both stop generation, with eos.

Tools: a system message carrying `tools` gets them appended as `"\\n" + json.dumps(tools, indent=4,
ensure_ascii=False)`. `render(tools=...)` injects them like the official API server: a system message with
`DEFAULT_TOOLS_PROMPT` and the tools goes first, and the client's first system message is dropped
(`with_tools_message`). The model answers a call with `<|assistant|>{tool name}\\n` and a ```python
`tool_call(...)` block; parsing that, and rendering OpenAI `tool_calls` history back into it, belong to the
tool-call parser (not here yet). Tool results are `observation` messages (`tool`/`function` map to it).
"""

from __future__ import annotations

import json

from glmstack.engine.chat_format.base import ChatFormat, ChatPrompt, ChatTemplateError, message_text
from glmstack.engine.chat_format.chatglm import require_token
from glmstack.engine.tokenization.base import Tokenizer

DEFAULT_TOOLS_PROMPT = (
    "Answer the following questions as best as you can. You have access to the following tools:"
)
ROLES = ("system", "user", "assistant", "observation")
ROLE_ALIASES = {"tool": "observation", "function": "observation"}  # OpenAI names for tool results


def glm_role(message: dict) -> str:
    """The GLM role of a message (ChatGLM3 and GLM-4 share the four roles)."""
    role = str(message.get("role"))
    role = ROLE_ALIASES.get(role, role)
    if role not in ROLES:
        raise ChatTemplateError(f"unknown role {message.get('role')!r}; GLM roles are {', '.join(ROLES)}")
    return role


def with_tools_message(messages: list[dict], tools: list[dict], system_content: str | None) -> list[dict]:
    """The conversation with a system message carrying `tools` in front, as the official GLM API servers
    build it: the client's first system message is dropped in its favour."""
    rest = list(messages)
    first_system = next((i for i, message in enumerate(rest) if message.get("role") == "system"), None)
    if first_system is not None:
        del rest[first_system]
    return [{"role": "system", "content": system_content, "tools": tools}, *rest]


class RoleTokenChatFormat(ChatFormat):
    """What ChatGLM3 and GLM-4 share: turns open with a `<|role|>` token, user text is encoded with special
    tokens off, and the prompt ends with `<|assistant|>` when a reply is wanted."""

    role_ids: dict[str, int]
    dict_history = True

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False, allow_special=False)

    def _prompt(self, ids: list[int], text: list[str], add_generation_prompt: bool) -> ChatPrompt:
        if add_generation_prompt:
            ids.append(self.role_ids["assistant"])
            text.append("<|assistant|>")
        return ChatPrompt(token_ids=ids, text="".join(text), stop_token_ids=set(self.stop_token_ids))


class ChatGLM3ChatFormat(RoleTokenChatFormat):
    name = "chatglm3"

    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__(tokenizer)
        self.prefix_ids = [require_token(tokenizer, "[gMASK]"), require_token(tokenizer, "sop")]
        self.role_ids = {role: require_token(tokenizer, f"<|{role}|>") for role in ROLES}
        self.stop_token_ids = {self.role_ids["user"], self.role_ids["observation"]}
        if tokenizer.eos_token_id is not None:
            self.stop_token_ids.add(tokenizer.eos_token_id)

    def render(
        self, messages: list[dict], *, tools: list[dict] | None = None, add_generation_prompt: bool = True,
        thinking: bool | None = None,
    ) -> ChatPrompt:
        if tools:
            messages = with_tools_message(messages, tools, DEFAULT_TOOLS_PROMPT)
        ids = list(self.prefix_ids)
        text = ["[gMASK]sop"]
        for message in messages:
            role = glm_role(message)
            metadata = str(message.get("metadata") or "")
            content = message_text(message)
            if role == "system" and "tools" in message:
                content += "\n" + json.dumps(message["tools"], indent=4, ensure_ascii=False)
            ids += [self.role_ids[role], *self._encode(f"{metadata}\n"), *self._encode(content)]
            text.append(f"<|{role}|>{metadata}\n{content}")
        return self._prompt(ids, text, add_generation_prompt)
