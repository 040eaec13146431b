"""GLM-4-9B-chat prompts (spec 3.2): the chat template of glm-4-9b-chat, built in code.

    [gMASK]<sop>
    per message with "tools":        <|system|> + encode("\n" + SELF_INTRO + TOOLS_HEADER + tool sections)
    per message with content:        <|role|>   + encode(f"{metadata}\n{content}")
    then:                            <|assistant|>

Role tokens and `[gMASK]<sop>` go in by id; each stretch of text between them is encoded on its own with
special tokens off -- the ids of the rendered template tokenized with its special tokens, except that text a
user typed never becomes a control token. Messages with empty content render nothing (so does a "forced
tool choice" prefill). No end-of-turn token: the model ends an answer with `<|user|>` (or `<|endoftext|>`) and
a tool call with `<|observation|>`; all three stop generation.

Tools: `render(tools=...)` puts `{"role": "system", "content": None, "tools": tools}` first and drops the
client's first system message, as the official server does (spec 3.3). Function tools are shown as their
`function` object in JSON (indent 4, key order kept, non-ASCII kept); the built-in `python`,
`simple_browser` and `cogview` tools have fixed texts; other tool types are skipped like the template does.
Assistant history with OpenAI `tool_calls` becomes one `<|assistant|>{name}\n{arguments}` message per call,
and `tool` results are `observation` messages. Parsing the model's `name\n{json}` calls is the tool-call
parser's job (not here yet).
"""

from __future__ import annotations

import json

from glmstack.engine.chat_format.base import ChatPrompt, message_text
from glmstack.engine.chat_format.chatglm import require_token
from glmstack.engine.chat_format.chatglm3 import ROLES, RoleTokenChatFormat, glm_role, with_tools_message
from glmstack.engine.tokenization.base import Tokenizer

# The texts below are verbatim from the reference (spec 3.2); `FUNCTION` takes the name and the JSON.
SELF_INTRO = "你是一个名为 GLM-4 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，你的任务是针对用户的问题和要求提供适当的答复和支持。"
TOOLS_HEADER = "\n\n# 可用工具"
FUNCTION = "\n\n## {name}\n\n{json_indent4}\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
PYTHON = (
    "\n\n## python\n\n当你向 `python` 发送包含 Python 代码的消息时，该代码将会在一个有状态的 Jupyter notebook 环境中执行。"
    "\n`python` 返回代码执行的输出，或在执行 60 秒后返回超时。"
    "\n`/mnt/data` 将会持久化存储你的文件。在此会话中，`python` 无法访问互联网。不要使用 `python` 进行任何网络请求或者在线 API 调用，这些在线内容的访问将不会成功。"
)
SIMPLE_BROWSER = (
    "\n\n## simple_browser\n\n你可以使用 `simple_browser` 工具。该工具支持以下函数："
    "\n`search(query: str, recency_days: int)`：使用搜索引擎进行查询并显示结果，可以使用 `recency_days` 参数控制搜索内容的时效性。"
    "\n`mclick(ids: list[int])`：获取一系列指定 id 的页面内容。每次调用时，须选择3-10个页面。选择多个角度的页面，同时尽可能选择可信任的信息来源。考虑到部分页面是无法加载的，你也可以多打开一些可能有用的页面而不用担心内容过多。"
    "\n`open_url(url: str)`：打开指定的 URL。"
    "\n\n使用 `【{引用 id}†{引用文本}】` 来引用内容。"
    "\n\n操作步骤：1. 使用 `search` 来获得信息列表; 2. 使用 `mclick` 来获取指定 ID 页面的内容; 3. 根据获得的内容进行回复。在回复中应当引用信息来源。"
    "\n 如果用户提供了 URL，也可以用 `open_url` 直接打开页面。"
    "\n如果初次搜索结果没有找到合适的信息，也可以再次使用 `search` 进行搜索。"
)
COGVIEW = (
    "\n\n## cogview\n\n如果用户的请求中包含了对图像的描述，你可以使用 `cogview` 来生成图像并展示给用户。你需要向 `cogview` 发送图像描述，规则："
    "\n- 发送给 `cogview` 的消息必须使用英语。用户的中文描述必须完全翻译为英语。"
    "\n- 应当尽可能详细地描述图像生成的需求，需求描述约 100 英文单词。"
    "\n- 保持用户原始描述的意图。不要虚构内容或者没见过的人物。"
    "\n- 如无特殊说明，所在地为中国，持有中国立场并遵循中国社会主义价值观。"
)
# The template exported into GGUF files (and third-party copies) says "ChatGLM" where the Python override and
# the official demos say "GLM-4"; which one the final glm-4-9b-chat repo carries is unverified. A model's own
# template picks, when it has one.
SELF_INTRO_CHATGLM = SELF_INTRO.replace("名为 GLM-4 的", "名为 ChatGLM 的")
BUILTIN_TOOLS = {"python": PYTHON, "simple_browser": SIMPLE_BROWSER, "cogview": COGVIEW}
# What ends a GLM-4 answer (generation_config.json's eos_token_id): a new user turn, eos, or a tool call.
STOP_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")


def tools_system_text(tools: list[dict], self_intro: str = SELF_INTRO) -> str:
    """The system text that lists the tools (after `<|system|>\\n`)."""
    sections = []
    for tool in tools:
        kind = tool.get("type")
        if kind == "function":
            function = tool["function"]
            body = json.dumps(function, ensure_ascii=False, indent=4)
            sections.append(FUNCTION.format(name=function["name"], json_indent4=body))
        elif kind in BUILTIN_TOOLS:
            sections.append(BUILTIN_TOOLS[kind])
    return self_intro + TOOLS_HEADER + "".join(sections)


def expand_tool_calls(messages: list[dict]) -> list[dict]:
    """OpenAI assistant `tool_calls` as GLM-4 sees them: one assistant message per call, the function name as
    metadata and the arguments JSON as content (spec 3.3). Other messages pass through."""
    expanded = []
    for message in messages:
        if message.get("role") != "assistant" or not message.get("tool_calls"):
            expanded.append(message)
            continue
        for call in message["tool_calls"]:
            function = call.get("function") or {}
            arguments = function.get("arguments", "")
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments, ensure_ascii=False)
            expanded.append({"role": "assistant", "metadata": function.get("name", ""), "content": arguments})
    return expanded


class GLM4ChatFormat(RoleTokenChatFormat):
    name = "glm4"

    def __init__(self, tokenizer: Tokenizer, *, self_intro: str | None = None) -> None:
        super().__init__(tokenizer)
        self.prefix_ids = [require_token(tokenizer, "[gMASK]"), require_token(tokenizer, "<sop>")]
        self.role_ids = {role: require_token(tokenizer, f"<|{role}|>") for role in ROLES}
        self.stop_token_ids = {require_token(tokenizer, token) for token in STOP_TOKENS}
        template = tokenizer.chat_template or ""
        default_intro = SELF_INTRO_CHATGLM if SELF_INTRO_CHATGLM in template else SELF_INTRO
        self.self_intro = self_intro if self_intro is not None else default_intro

    def render(
        self, messages: list[dict], *, tools: list[dict] | None = None, add_generation_prompt: bool = True,
        thinking: bool | None = None,
    ) -> ChatPrompt:
        if tools:
            messages = with_tools_message(messages, tools, None)
        ids = list(self.prefix_ids)
        text = ["[gMASK]<sop>"]
        for message in expand_tool_calls(messages):
            role = glm_role(message)
            if message.get("tools") is not None:
                tools_text = tools_system_text(message["tools"], self.self_intro)
                ids += [self.role_ids["system"], *self._encode("\n" + tools_text)]
                text.append(f"<|system|>\n{tools_text}")
            content = message_text(message)
            if content:
                body = f"{message.get('metadata') or ''}\n{content}"
                ids += [self.role_ids[role], *self._encode(body)]
                text.append(f"<|{role}|>{body}")
        return self._prompt(ids, text, add_generation_prompt)
