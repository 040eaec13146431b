"""The `retrieval` tool of chat (spec §3.3): before the model answers, the knowledge base is searched for the
user's question and the best chunks are put in front of it through the prompt template.

    tools: [{"type": "retrieval", "retrieval": {"knowledge_id": "...", "prompt_template": "..."}}]

`{{knowledge}}` becomes the retrieved chunks and `{{question}}` the last user message; the filled template
replaces that message. Without a template the documentation's own (its only example) is used. The reply names
the chunks it was given in a top-level `retrieval` list (the platform documents no field for this; SDKs keep
unknown fields).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool

from glmstack.api.auth import Caller
from glmstack.api.deps import Platform
from glmstack.api.errors import PlatformError
from glmstack.api.schemas.chat import ChatCompletionRequest
from glmstack.api.services.knowledge import get_base, require_vectors
from glmstack.knowledge.indexer import embedding_model_for
from glmstack.knowledge.retrieval import Retriever
from glmstack.store.knowledge import ChunkHit

DEFAULT_PROMPT_TEMPLATE = (
    '从文档\n"""\n{{knowledge}}\n"""\n中找问题\n"""\n{{question}}\n"""\n'
    "的答案，找到答案就仅使用文档语句回答问题，找不到答案就用自身知识回答并且告诉用户该信息不是来自文档。\n"
    "不要复述问题，直接开始回答。"
)
TOP_K = 5
MAX_TEMPLATE_CHARS = 8000


@dataclass
class Grounding:
    """What retrieval found for one request, and how it changes the messages."""

    question_index: int
    prompt: str
    hits: list[ChunkHit]
    knowledge_id: str

    def apply(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        grounded = [dict(m) for m in messages]
        grounded[self.question_index]["content"] = self.prompt
        return grounded

    def references(self) -> list[dict[str, Any]]:
        return [{"knowledge_id": self.knowledge_id, "document_id": h.document_id, "chunk_id": h.chunk_id,
                 "position": h.position, "score": round(h.score, 6), "text": h.text} for h in self.hits]


def _question(body: ChatCompletionRequest) -> tuple[int, str]:
    for index in range(len(body.messages) - 1, -1, -1):
        message = body.messages[index]
        if message.role == "user":
            content = message.content
            if isinstance(content, list):
                content = "".join(part.text or "" for part in content if part.type == "text")
            if content and content.strip():
                return index, content
    raise PlatformError(1214, "the retrieval tool needs a user message to search for", field="messages")


def _tool(body: ChatCompletionRequest) -> tuple[str, str] | None:
    """(knowledge_id, prompt_template) of the request's retrieval tool; None without one."""
    for i, tool in enumerate(body.tools or []):
        if tool.type != "retrieval":
            continue
        options = (tool.model_extra or {}).get("retrieval")
        if not isinstance(options, dict) or not isinstance(options.get("knowledge_id"), str) \
                or not options["knowledge_id"]:
            raise PlatformError(1213, "the retrieval tool needs retrieval.knowledge_id",
                                field=f"tools[{i}].retrieval.knowledge_id")
        template = options.get("prompt_template") or DEFAULT_PROMPT_TEMPLATE
        if not isinstance(template, str) or len(template) > MAX_TEMPLATE_CHARS:
            raise PlatformError(1214, f"a string of at most {MAX_TEMPLATE_CHARS} characters",
                                field=f"tools[{i}].retrieval.prompt_template")
        return options["knowledge_id"], template
    return None


async def ground(platform: Platform, caller: Caller, body: ChatCompletionRequest) -> Grounding | None:
    """Searches the knowledge base of the request's retrieval tool (None: the request has none)."""
    if body.tool_choice == "none":
        return None
    tool = _tool(body)
    if tool is None:
        return None
    knowledge_id, template = tool
    require_vectors(platform)
    base = await get_base(platform, caller, knowledge_id)
    index, question = _question(body)
    embedder = platform.embedders.get(embedding_model_for(base.embedding_id) or "")
    retriever = Retriever(platform.store.knowledge, embedder)
    hits = await run_in_threadpool(retriever.search, knowledge_id, question, TOP_K)
    knowledge = "\n\n".join(hit.text for hit in hits)
    # str.replace, not format(): the template and the chunks may hold braces of their own
    prompt = template.replace("{{knowledge}}", knowledge).replace("{{question}}", question)
    return Grounding(index, prompt, hits, knowledge_id)
