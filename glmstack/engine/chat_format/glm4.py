"""GLM-4-9B-chat prompts (spec 3.2): the chat template of glm-4-9b-chat, built in code, and GLM-4's tool dialect.

    [gMASK]<sop>
    per message with "tools":        <|system|> + encode("\n" + SELF_INTRO + TOOLS_HEADER + tool sections)
    per message with content:        <|role|>   + encode(f"{metadata}\n{content}")
    then:                            <|assistant|>

Role tokens and `[gMASK]<sop>` go in by id; each stretch of text between them is encoded on its own with
special tokens off -- the ids of the rendered template tokenized with its special tokens, except that text a
user typed never becomes a control token. Messages with empty content render nothing (so does a "forced
tool choice" prefill). No end-of-turn token: the model ends an answer with `<|user|>` (or `<|endoftext|>`) and
a tool call with `<|observation|>`; all three stop generation.

Tools: `render(tools=...)` puts `{"role": "system", "content": None, "tools": tools}` first, the way the
template reads tools; a client system message is kept and renders after the tools block as its own
`<|system|>` turn (the template's behaviour; the official demo server drops it instead). Function tools are
shown as their `function` object in JSON (indent 4, key order kept, non-ASCII kept); the built-in `python`,
`simple_browser` and `cogview` tools have fixed texts; other tool types are skipped like the template does.

`GLM4Dialect` is how GLM-4 (and GLM-4-0414 / GLM-Z1) write calls: the reply after `<|assistant|>` is either
`\n` + an answer or `{name}\n{arguments JSON}` followed by `<|observation|>`. It turns OpenAI history into
that shape (one `{"role": "assistant", "metadata": name, "content": arguments}` per call, `tool` results as
`observation`), parses replies as they stream, and writes the llguidance grammar a reply must follow.
"""

from __future__ import annotations

import json

from glmstack.engine.chat_format.base import (
    ChatPrompt,
    ContentOnly,
    ReplyDelta,
    ReplyParser,
    ToolDialect,
    message_text,
)
from glmstack.engine.chat_format.chatglm import require_token
from glmstack.engine.chat_format.chatglm3 import ROLE_ALIASES, ROLES, RoleTokenChatFormat, glm_role
from glmstack.engine.chat_format.glm_tools import (
    arguments_text,
    chosen_functions,
    function_tools,
    lark_json,
    lark_literal,
    metadata_line_grammar,
    new_call_id,
    parameters_schema,
)
from glmstack.engine.tokenization.base import Tokenizer
from glmstack.protocol import ToolCallDelta

# The texts below are verbatim from THUDM's glm-4-9b-chat template rendered as transformers renders it (spec 3.2):
# its `trim_blocks` eats the newline after each `{% if tool['type'] == ... %}`, so a section opens with ONE
# newline before `## name`. `FUNCTION` takes the name and the JSON.
SELF_INTRO = "你是一个名为 GLM-4 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，你的任务是针对用户的问题和要求提供适当的答复和支持。"
TOOLS_HEADER = "\n\n# 可用工具"
FUNCTION = "\n## {name}\n\n{json_indent4}\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
PYTHON = (
    "\n## python\n\n当你向 `python` 发送包含 Python 代码的消息时，该代码将会在一个有状态的 Jupyter notebook 环境中执行。"
    "\n`python` 返回代码执行的输出，或在执行 60 秒后返回超时。"
    "\n`/mnt/data` 将会持久化存储你的文件。在此会话中，`python` 无法访问互联网。不要使用 `python` 进行任何网络请求或者在线 API 调用，这些在线内容的访问将不会成功。"
)
SIMPLE_BROWSER = (
    "\n## simple_browser\n\n你可以使用 `simple_browser` 工具。该工具支持以下函数："
    "\n`search(query: str, recency_days: int)`：使用搜索引擎进行查询并显示结果，可以使用 `recency_days` 参数控制搜索内容的时效性。"
    "\n`mclick(ids: list[int])`：获取一系列指定 id 的页面内容。每次调用时，须选择3-10个页面。选择多个角度的页面，同时尽可能选择可信任的信息来源。考虑到部分页面是无法加载的，你也可以多打开一些可能有用的页面而不用担心内容过多。"
    "\n`open_url(url: str)`：打开指定的 URL。"
    "\n\n使用 `【{引用 id}†{引用文本}】` 来引用内容。"
    "\n\n操作步骤：1. 使用 `search` 来获得信息列表; 2. 使用 `mclick` 来获取指定 ID 页面的内容; 3. 根据获得的内容进行回复。在回复中应当引用信息来源。"
    "\n 如果用户提供了 URL，也可以用 `open_url` 直接打开页面。"
    "\n如果初次搜索结果没有找到合适的信息，也可以再次使用 `search` 进行搜索。"
)
COGVIEW = (
    "\n## cogview\n\n如果用户的请求中包含了对图像的描述，你可以使用 `cogview` 来生成图像并展示给用户。你需要向 `cogview` 发送图像描述，规则："
    "\n- 发送给 `cogview` 的消息必须使用英语。用户的中文描述必须完全翻译为英语。"
    "\n- 应当尽可能详细地描述图像生成的需求，需求描述约 100 英文单词。"
    "\n- 保持用户原始描述的意图。不要虚构内容或者没见过的人物。"
    "\n- 如无特殊说明，所在地为中国，持有中国立场并遵循中国社会主义价值观。"
)
# THUDM's jinja template (tokenizer_config.json, verified spec 3.2) says "ChatGLM" where the older Python override
# and some demos say "GLM-4": ChatGLM is the default, and a model's own template picks when it has one.
SELF_INTRO_CHATGLM = SELF_INTRO.replace("名为 GLM-4 的", "名为 ChatGLM 的")
BUILTIN_TOOLS = {"python": PYTHON, "simple_browser": SIMPLE_BROWSER, "cogview": COGVIEW}
# What ends a GLM-4 answer (generation_config.json's eos_token_id): a new user turn, eos, or a tool call.
STOP_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")


def tools_system_text(tools: list[dict], self_intro: str = SELF_INTRO_CHATGLM) -> str:
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
    """OpenAI history as GLM-4 templates read it (spec 3.3): assistant `tool_calls` become one assistant
    message per call with the function name as metadata and the arguments JSON as content (the message's own
    text is dropped, as the official server does); `tool`/`function` results become `observation` messages;
    None content becomes "" (the 0414 templates call `.split` on it). Other messages pass through."""
    expanded = []
    for message in messages:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            for call in message["tool_calls"]:
                function = call.get("function") or {}
                arguments = arguments_text(function.get("arguments"))
                expanded.append({"role": "assistant", "metadata": function.get("name", ""), "content": arguments})
            continue
        if role in ROLE_ALIASES or message.get("content") is None:
            message = {**message, "role": ROLE_ALIASES.get(str(role), role), "content": message.get("content") or ""}
        expanded.append(message)
    return expanded


class GLM4ReplyParser(ReplyParser):
    """A GLM-4 reply as it streams. Until its first line is complete, text that could still be a tool name is
    held back; `{name}\\n{` with a name among the tools is a call (the official parser's test: the second
    line starts with "{"), anything else is content. An answer's leading "\\n" is dropped, as the official
    server does. A call's arguments are passed on as written, valid JSON or not; the model then stops."""

    def __init__(self, names: set[str]) -> None:
        self.names = names
        self.calls = 0
        self._mode = "undecided"  # then "content" or "call"
        self._held = ""

    def push(self, text: str) -> ReplyDelta:
        if self._mode == "content":
            return ReplyDelta(content=text)
        if self._mode == "call":
            return ReplyDelta(tool_calls=[ToolCallDelta(index=0, arguments=text)] if text else [])
        self._held += text
        return self._decide(final=False)

    def finish(self) -> ReplyDelta:
        return self._decide(final=True) if self._mode == "undecided" else ReplyDelta()

    def _decide(self, final: bool) -> ReplyDelta:
        held = self._held
        if not held:
            return ReplyDelta()
        if held.startswith("\n"):
            return self._content(held[1:])
        newline = held.find("\n")
        if newline < 0:
            if not final and self._could_be_name(held):
                return ReplyDelta()
            return self._content(held)
        name, arguments = held[:newline].strip(), held[newline + 1 :]
        if name not in self.names:
            return self._content(held)
        if not arguments:
            return self._content(held) if final else ReplyDelta()
        if not arguments.startswith("{"):
            return self._content(held)
        self._mode, self._held, self.calls = "call", "", 1
        header = ToolCallDelta(index=0, id=new_call_id(), name=name, arguments="")
        return ReplyDelta(tool_calls=[header, ToolCallDelta(index=0, arguments=arguments)])

    def _could_be_name(self, held: str) -> bool:
        prefix = held.strip()
        return any(name.startswith(prefix) for name in self.names)

    def _content(self, text: str) -> ReplyDelta:
        self._mode, self._held = "content", ""
        return ReplyDelta(content=text)


class GLM4Dialect(ToolDialect):
    """GLM-4's `{name}\\n{arguments JSON}` tool calls (GLM-4-9B-chat, GLM-4-0414, GLM-Z1)."""

    name = "glm4"

    def reply_parser(self, tools: list[dict]) -> ReplyParser:
        names = {function["name"] for function in function_tools(tools)}
        return GLM4ReplyParser(names) if names else ContentOnly()

    def tool_grammar(self, tools: list[dict], tool_choice: str | dict | None, *,
                     parallel: bool = True) -> str | None:
        """The reply's grammar. "auto": `\\n` + free text, or a call; "required": a call to any tool; named: a
        call to that one. A call is the name, a newline and a JSON object following the function's `parameters`
        schema; after it the grammar accepts only end of generation (`<|observation|>` must be among the
        matcher's eos ids)."""
        functions, required = chosen_functions(tools, tool_choice)
        if not functions:
            return None
        return metadata_line_grammar(functions, required, lambda _, function: (
            f"{lark_literal(function['name'] + chr(10))} {lark_json(parameters_schema(function))}", []))

    def template_messages(self, messages: list[dict], tools: list[dict] | None) -> list[dict]:
        return expand_tool_calls(messages)


class GLM4ChatFormat(RoleTokenChatFormat):
    name = "glm4"

    def __init__(self, tokenizer: Tokenizer, *, self_intro: str | None = None) -> None:
        super().__init__(tokenizer)
        self.prefix_ids = [require_token(tokenizer, "[gMASK]"), require_token(tokenizer, "<sop>")]
        self.role_ids = {role: require_token(tokenizer, f"<|{role}|>") for role in ROLES}
        self.stop_token_ids = {require_token(tokenizer, token) for token in STOP_TOKENS}
        template = tokenizer.chat_template or ""
        default_intro = SELF_INTRO if SELF_INTRO in template else SELF_INTRO_CHATGLM
        self.self_intro = self_intro if self_intro is not None else default_intro
        self.dialect = GLM4Dialect()

    def render(
        self, messages: list[dict], *, tools: list[dict] | None = None, add_generation_prompt: bool = True,
        thinking: bool | None = None,
    ) -> ChatPrompt:
        if tools:
            messages = [{"role": "system", "content": None, "tools": tools}, *messages]
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

    def reply_parser(self, *, tools: list[dict] | None = None, thinking: bool | None = None) -> ReplyParser:
        return self.dialect.reply_parser(tools) if tools else ContentOnly()

    def tool_grammar(self, tools: list[dict], tool_choice: str | dict | None, *,
                     parallel: bool = True) -> str | None:
        return self.dialect.tool_grammar(tools, tool_choice, parallel=parallel)
