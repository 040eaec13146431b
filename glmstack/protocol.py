"""The engine <-> platform contract: plain dataclasses and the `Engine` verbs, standard library only, so the
HTTP side can describe a request and drive the engine without importing torch.

`glmstack.engine.serving.async_engine.AsyncEngine` implements `Engine`; `glmstack.api` sees nothing else of it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass
class SamplingParams:
    """How to pick tokens. `max_tokens=None` means "until a stop condition or the context is full"."""

    max_tokens: int | None = None
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0.0


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class ToolCallDelta:
    """A piece of a tool call the model is writing. The first piece of call `index` carries its `id` and
    `name`; `arguments` pieces, concatenated in order, are the call's arguments as a JSON string."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class GenerationEvent:
    """One step of a streamed generation: new reply text (possibly empty while a multi-byte character, a
    possible stop string or a possible tool call is held back), reasoning text (a thinking model's
    `<think>` part), tool-call pieces, and on the last event the finish reason."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "tool_calls"
    usage: Usage = field(default_factory=Usage)
    time_to_first_token: float | None = None
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


@dataclass
class GenerateRequest:
    """One generation the platform asks of the engine: chat `messages` (rendered with the model's own chat
    format) or raw `prompt_ids`."""

    request_id: str
    params: SamplingParams
    messages: list[dict] | None = None
    prompt_ids: list[int] | None = None
    # OpenAI/platform shapes, validated by the platform: tools [{"type": "function", "function": {name,
    # description, parameters}}, ...]; tool_choice "auto" | "none" | "required" | {"type": "function",
    # "function": {"name": ...}}; response_format {"type": "text" | "json_object"} | {"type": "json_schema",
    # "json_schema": {"name", "schema", "strict"}}; thinking True/False, None for the model's default.
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool = True  # False: at most one call per reply (OpenAI's parameter)
    response_format: dict | None = None
    thinking: bool | None = None
    # Batch lines and async tasks: scheduled after interactive requests (admitted, prefilled and kept
    # last), so a chat's first token does not wait behind a running batch.
    background: bool = False
    # A fine-tuned adapter loaded on the served base (`Engine.adapters()`), None for the base model itself.
    # Requests for different adapters share batches; an unknown name is refused (EngineRequestError).
    adapter: str | None = None


@dataclass
class GenerationDefaults:
    """The sampling a model's authors recommend, for requests that leave it out; None where they say nothing
    (the platform's documented defaults apply). `source` says where the values came from."""

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    source: str | None = None  # "generation_config.json", "GGUF general.sampling", "model card: <name>"


@dataclass
class ModelInfo:
    name: str
    architecture: str
    context_length: int
    device: str
    dtype: str
    quantization: str | None = None
    generation_defaults: GenerationDefaults = field(default_factory=GenerationDefaults)


class EngineRequestError(Exception):
    """A request the engine refuses; `kind` tells the platform which documented error to answer with."""

    kind = "invalid_request"


class PromptTooLongError(EngineRequestError):
    kind = "prompt_too_long"


class EngineOverloadedError(EngineRequestError):
    kind = "overloaded"


class InvalidConstraintError(EngineRequestError):
    """A JSON schema or tool definition the grammar compiler refuses; `field` names the request field
    (e.g. "response_format.json_schema.schema" or "tools[2].function.parameters")."""

    kind = "invalid_constraint"

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


class Engine(Protocol):
    """What the platform asks of a running engine."""

    def info(self) -> ModelInfo: ...

    def count_prompt_tokens(self, messages: list[dict[str, Any]]) -> int: ...

    def stats(self) -> dict[str, Any]: ...

    def generate(self, request: GenerateRequest) -> AsyncGenerator[GenerationEvent, None]:
        """Events as they are produced; the last one carries the finish reason and usage."""
        ...

    async def abort(self, request_id: str) -> None: ...


@runtime_checkable
class AdapterHost(Protocol):
    """The optional verbs of an engine that serves adapters (LoRA, P-Tuning v2) on its base: the platform
    checks for them (`isinstance(engine, AdapterHost)`) before adding a fine-tuned model while serving."""

    def load_adapter(self, name: str, path: str) -> None:
        """Serve the adapter folder at `path` as `name` from now on (replacing one of that name); raises
        EngineRequestError for a folder this base cannot serve."""
        ...

    def unload_adapter(self, name: str) -> bool:
        """Stop serving `name` to new requests; False if it was not loaded."""
        ...

    def adapters(self) -> list[str]: ...


@dataclass(frozen=True)
class EmbeddingModelInfo:
    """An embedding model as the platform sees it. `dimensions` is the model's own vector size;
    `matryoshka_dims` the smaller sizes it was trained to be truncated to (empty: none)."""

    name: str
    dimensions: int
    max_tokens: int
    matryoshka_dims: tuple[int, ...] = ()


@dataclass
class EmbeddingBatch:
    """Unit-length vectors of the model's own size, one per input text in order, and the tokens they took
    (what usage counts)."""

    vectors: list[list[float]]
    prompt_tokens: int


class Embedder(Protocol):
    """An embedding model the platform can call. `embed` is blocking (CPU-bound; it releases the GIL while
    the model runs): the platform calls it from a worker thread, never on the event loop."""

    def info(self) -> EmbeddingModelInfo: ...

    def embed(self, texts: list[str]) -> EmbeddingBatch: ...
