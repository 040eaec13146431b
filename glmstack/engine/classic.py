"""The classic Python surface ChatGLM users know:

    from glmstack import load
    model, tokenizer = load("path-or-name", device="auto")
    response, history = model.chat(tokenizer, "你好", history=[])
    for response, history in model.stream_chat(tokenizer, "Tell me more", history):
        ...

History is either ChatGLM-6B/2 style `[(query, response), ...]` or ChatGLM3 style
`[{"role": ..., "content": ...}, ...]`, and comes back in the form it was given.

Context policy: when the rendered prompt does not leave room for the reply (`max_new_tokens`, default 256,
capped at a quarter of the context), the oldest history turns are dropped — the system prompt is always kept.
If the system prompt and the current query alone do not fit, `ContextLengthError` is raised.
"""

from __future__ import annotations

import builtins
import collections
import copy
import dataclasses
import logging
import threading
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from glmstack.engine import native
from glmstack.engine.adapters.registry import AdapterRegistry
from glmstack.engine.chat_format import ChatFormat, chat_format_for
from glmstack.engine.chat_format.chatglm3 import classic_tool_result
from glmstack.engine.errors import ContextLengthError
from glmstack.engine.generation import generate_stream
from glmstack.engine.loading.catalog import resolve_model_path
from glmstack.engine.loading.checkpoint import (
    Checkpoint,
    LoadedModel,
    load_model,
    open_checkpoint,
    pick_device,
    resolve_architecture,
    return_freed_memory,
    stored_precision,
)
from glmstack.engine.loading.generation_config import generation_defaults
from glmstack.engine.loading.quantized_checkpoint import saved_quantization
from glmstack.engine.native import NativeOptions
from glmstack.engine.quant.int4 import DEFAULT_GROUP_SIZE
from glmstack.engine.quant.quantize_model import quantize_model
from glmstack.engine.serving.core import EngineCore, RequestTooLargeError
from glmstack.engine.tokenization.base import Tokenizer
from glmstack.engine.tokenization.gguf_vocab import tokenizer_from_gguf
from glmstack.engine.tokenization.hf import load_tokenizer_json
from glmstack.protocol import GenerationEvent, SamplingParams
from glmstack.settings import QUANTIZE_CHOICES, Settings

log = logging.getLogger(__name__)

DEFAULT_REPLY_RESERVE = 256

History = list[tuple[str, str]] | list[dict[str, Any]]


class ChatModel:
    """A loaded model plus what it needs to chat: tokenizer and chat format."""

    def __init__(self, loaded: LoadedModel, tokenizer: Tokenizer, chat_format: ChatFormat, name: str) -> None:
        self.loaded = loaded
        self.generation_defaults = generation_defaults(loaded.checkpoint)
        self.module = loaded.module
        self.config = loaded.module.config
        self.tokenizer = tokenizer
        self.chat_format = chat_format
        self.name = name
        self.device = loaded.device
        self.dtype = loaded.dtype
        self._engine: LocalEngine | None = None  # made on first use
        # the adapters this base serves (the server picks one per request), and the one the classic calls
        # (chat, stream_chat, generate) run with: `load(..., adapter=DIR)`; None for the base itself
        self.adapters = AdapterRegistry(self.module)
        self.adapter: str | None = None
        self._half_requested = False  # .half() on CPU chose bf16; a following .cuda() makes it fp16

    @property
    def context_length(self) -> int:
        return int(self.config.context_length)

    def quantize(self, bits: int, *, group_size: int = DEFAULT_GROUP_SIZE) -> ChatModel:
        """ChatGLM's `model.quantize(bits)` (spec 7.2): 8 or 4 makes the decoder layers' linears int8 / int4
        weight-only in place (the output head goes int8 too), 0 does nothing, a second call logs "already
        quantized". Returns self — also for 0, where ChatGLM returns None. See engine/quant/."""
        # Weights the loader kept in the file's own int4 blocks (keep_int4) go in as they are.
        prequantized, self.loaded.prequantized = self.loaded.prequantized, {}
        quantize_model(self.module, bits, group_size=group_size, prequantized=prequantized)
        return self

    # ---- the chain THUDM's READMEs use: .half().cuda(), .float(), .to(device), .eval() ----------------------

    def half(self) -> ChatModel:
        """float16 on a GPU. On CPU bfloat16 instead: the same memory, and CPUs multiply bf16 natively (AVX512-BF16,
        AMX) where fp16 matmuls are emulated."""
        self._move(dtype=torch.float16 if self.device.type != "cpu" else torch.bfloat16)
        self._half_requested = self.device.type == "cpu"
        return self

    def bfloat16(self) -> ChatModel:
        return self._move(dtype=torch.bfloat16)

    def float(self) -> ChatModel:  # ChatGLM's name (torch's Module.float)
        return self._move(dtype=torch.float32)

    def cuda(self, device: int | str | None = None) -> ChatModel:
        if not torch.cuda.is_available():
            raise RuntimeError("model.cuda(): this machine has no CUDA device (PyTorch sees none); "
                               "leave it out to run on the CPU")
        target = torch.device("cuda" if device is None else device if isinstance(device, str) else f"cuda:{device}")
        # ChatGLM's `.half().cuda()` on a CPU-loaded model: on the GPU, half is fp16
        dtype = torch.float16 if self._half_requested else None
        return self._move(device=target, dtype=dtype)

    def cpu(self) -> ChatModel:
        return self._move(device=torch.device("cpu"))

    def to(self, *args: Any, **kwargs: Any) -> ChatModel:
        """`.to(device)`, `.to(dtype)` or both, as torch's Module.to takes them."""
        device = kwargs.pop("device", None)
        dtype = kwargs.pop("dtype", None)
        if kwargs:
            raise TypeError(f"model.to() does not take {', '.join(sorted(kwargs))}")
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            else:
                device = arg
        if device is not None and torch.device(device).type == "cuda":
            self.cuda(torch.device(device).index)
            device = None
        return self._move(device=None if device is None else torch.device(device), dtype=dtype)

    def eval(self) -> ChatModel:
        self.module.eval()
        return self

    def _move(self, *, device: torch.device | None = None, dtype: torch.dtype | None = None) -> ChatModel:
        """Weights to `device` / `dtype` in place (quantized weights keep their integer codes). The serving
        engine's KV pool is sized and typed for the old place, so it is rebuilt on next use."""
        self._half_requested = False
        device, dtype = device or self.device, dtype or self.dtype
        if device == self.device and dtype == self.dtype:
            return self
        if device != self.device and getattr(self.module, "quantization", None):
            # int4 weights are packed for the device they were quantized on (the CPU kernels' layout differs)
            raise ValueError(f"this model was quantized on {self.device}: move it first, then quantize "
                             f"(model.half().cuda().quantize(4)), or load it with quantize= on the device")
        self.module.to(device=device, dtype=dtype)
        self.module.__dict__.pop("_native_plan_cache", None)  # it holds the old weight tensors
        self.device = self.loaded.device = device
        self.dtype = self.loaded.dtype = dtype
        self._engine = None
        return self

    def __repr__(self) -> str:
        return (f"ChatModel({self.name!r}, arch={type(self.module).__name__}, device={self.device}, "
                f"dtype={self.dtype}, context={self.context_length})")

    # ---- raw generation --------------------------------------------------------------------------------

    def stream_generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                        stop_token_ids: set[int] | None = None, *, tools: list[dict] | None = None
                        ) -> Iterator[GenerationEvent]:
        """Generate on the serving engine, the server's own fast path (paged KV, native decode, prefix reuse
        across a conversation's turns); models it cannot run (ChatGLM-6B, whose prompt attends
        bidirectionally) and requests larger than its KV pool take the reference loop. With `tools` (the
        prompt offered them), the reply is parsed into content and tool calls and a call's arguments are
        constrained to its function's schema, as the server does."""
        stops = set(self.chat_format.stop_token_ids) if stop_token_ids is None else set(stop_token_ids)
        if len(prompt_ids) >= self.context_length:
            raise ContextLengthError(len(prompt_ids), self.context_length)
        if getattr(self.module, "supports_paged", True):
            engine = self._local_engine()
            options: dict[str, Any] = {"adapter": self.adapter}
            if tools:
                options["reply_parser"] = self.chat_format.reply_parser(tools=tools)
                options["grammar"] = engine.core.constraints.matcher_for(tools=tools, tool_choice="auto")
            try:
                return engine.generate(list(prompt_ids), params, stops, **options)
            except RequestTooLargeError:
                if self.adapter is not None:
                    raise
                log.info("request larger than the KV pool: generating on the reference loop")
        if self.adapter is not None:  # adapters are applied per row of the serving engine's steps only
            raise ValueError(f"{type(self.module).__name__} runs on the reference loop, which serves no adapter")
        return generate_stream(self.module, self.tokenizer, prompt_ids, params, context_length=self.context_length,
                               stop_token_ids=stops, device=self.device, dtype=self.dtype)

    def _local_engine(self) -> LocalEngine:
        if self._engine is None:
            self._engine = LocalEngine(self)
        return self._engine

    def generate(self, prompt: str, params: SamplingParams | None = None) -> str:
        """Plain completion of raw text (no chat template)."""
        ids = self.tokenizer.encode(prompt, add_special_tokens=True, allow_special=False)
        return "".join(e.text for e in self.stream_generate(ids, params or SamplingParams(do_sample=False)))

    # ---- chat ------------------------------------------------------------------------------------------

    def render_chat(self, messages: list[dict[str, Any]], reserve: int, *, tools: list[dict] | None = None,
                    thinking: bool | None = None) -> tuple[list[int], list[dict[str, Any]]]:
        """Render messages (and the tools offered) to prompt ids, dropping the oldest non-system turns until
        `reserve` tokens fit."""
        messages = list(messages)
        budget = self.context_length - reserve
        while True:
            ids = self.chat_format.render(messages, tools=tools, thinking=thinking).token_ids
            if len(ids) <= budget:
                return ids, messages
            first_turn = next((i for i, m in enumerate(messages) if m.get("role") != "system"), None)
            last_user = max(i for i, m in enumerate(messages) if m.get("role") != "system")
            if first_turn is None or first_turn >= last_user:
                raise ContextLengthError(
                    len(ids), self.context_length,
                    f"prompt is {len(ids)} tokens; with {reserve} tokens reserved for the reply it does not fit "
                    f"the {self.context_length}-token context even with all history dropped",
                )
            # drop the oldest turn: the first non-system message and everything up to the next user message
            end = first_turn + 1
            while end < last_user and messages[end].get("role") != "user":
                end += 1
            log.info("context full: dropping %d oldest history message(s)", end - first_turn)
            del messages[first_turn:end]

    def stream_messages(self, messages: list[dict[str, Any]], params: SamplingParams,
                        max_length: int | None = None, *, tools: list[dict] | None = None,
                        thinking: bool | None = None) -> Iterator[GenerationEvent]:
        """Chat on OpenAI-style messages: render (with the tools offered), fit the context (dropping old
        turns), generate. The text comes back unparsed: callers split it with `chat_format.reply_parser`."""
        reserve = min(params.max_tokens or DEFAULT_REPLY_RESERVE, self.context_length // 4)
        prompt_ids, _ = self.render_chat(messages, reserve, tools=tools, thinking=thinking)
        if max_length is not None:
            # ChatGLM's max_length counts prompt and reply together
            if max_length <= len(prompt_ids):
                raise ContextLengthError(len(prompt_ids), max_length,
                                         f"prompt is {len(prompt_ids)} tokens, not below max_length={max_length}")
            params = dataclasses.replace(
                params, max_tokens=min(params.max_tokens or max_length, max_length - len(prompt_ids)))
        return self.stream_generate(prompt_ids, params, tools=tools)

    def stream_chat(
        self,
        tokenizer: Tokenizer | None,
        query: str,
        history: History | None = None,
        *,
        system: str | None = None,
        role: str = "user",
        max_length: int | None = None,
        max_new_tokens: int | None = None,
        do_sample: bool = True,
        top_p: builtins.float = 0.8,  # (builtins: `float` in this class body is ChatModel.float)
        temperature: builtins.float = 0.8,
        top_k: int = 0,
        stop: list[str] | None = None,
        seed: int | None = None,
        tools: list[dict] | None = None,
        past_key_values: Any = None,
        return_past_key_values: bool = False,
        num_beams: int = 1,
        logits_processor: Any = None,
        **unsupported: Any,
    ) -> Iterator[Any]:
        """Yields (response so far, history including this turn), ChatGLM style; with
        `return_past_key_values=True`, (response, history, past_key_values) as ChatGLM2/3's demos unpack.
        past_key_values is an opaque handle here, taken and given back: the engine's prefix cache is what
        reuses the earlier turns (their blocks stay cached), so passing it back or not changes nothing.

        Tools, as ChatGLM3 takes them: `tools=[...]`, or a system message in `history` that carries
        `"tools"`; bare `{name, description, parameters}` or OpenAI's `{"type": "function", ...}`. A reply
        that calls one ends as ChatGLM3's does, with `{"name": ..., "parameters": {...}}` as the response
        (the call goes into the history; answer it with `role="observation"`)."""
        if unsupported:
            raise TypeError(f"stream_chat() got keyword arguments glmstack does not support: "
                            f"{', '.join(sorted(unsupported))}")
        if num_beams != 1:
            raise ValueError(f"num_beams={num_beams}: beam search is not supported (sampling or greedy only)")
        if logits_processor is not None and len(logits_processor) > 0:
            raise ValueError("logits_processor is not supported: the engine samples on its own (temperature, "
                             "top_p, top_k, stop)")
        for response, new_history in self._stream_chat(tokenizer, query, history, system=system, role=role,
                                                       max_length=max_length, max_new_tokens=max_new_tokens,
                                                       do_sample=do_sample, top_p=top_p, temperature=temperature,
                                                       top_k=top_k, stop=stop, seed=seed, tools=tools):
            if return_past_key_values:
                yield response, new_history, PastKeyValues(new_history)
            else:
                yield response, new_history

    def _stream_chat(self, tokenizer: Tokenizer | None, query: str, history: History | None, *,
                     system: str | None, role: str, max_length: int | None, max_new_tokens: int | None,
                     do_sample: bool, top_p: builtins.float, temperature: builtins.float, top_k: int,
                     stop: list[str] | None,
                     seed: int | None, tools: list[dict] | None = None) -> Iterator[tuple[Any, History]]:
        history = list(history or [])
        tuple_style = _is_tuple_history(history) and not (not history and self.chat_format.dict_history)
        messages = _to_messages(history, tuple_style)
        if system is not None:
            messages = [m for m in messages if m.get("role") != "system"]
            messages.insert(0, {"role": "system", "content": system})
        messages, tools = _tools_from_history(messages, tools)
        if tools and tuple_style:  # a call goes into the history as a message: ChatGLM3's dict history
            if history:
                raise ValueError("tools need a history of {'role', 'content'} dicts, not (query, response) pairs")
            tuple_style = False
        messages.append({"role": role, "content": query})
        params = SamplingParams(max_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                top_p=top_p, top_k=top_k, stop=list(stop or []), seed=seed)
        response = ""
        calls: dict[int, dict[str, Any]] = {}
        for event in self.stream_messages(messages, params, max_length=max_length, tools=tools):
            for piece in event.tool_calls:
                call = calls.setdefault(piece.index, {"id": piece.id, "type": "function",
                                                      "function": {"name": piece.name or "", "arguments": ""}})
                call["function"]["arguments"] += piece.arguments
            if event.text:
                response += event.text
                yield response, _with_turn(history, tuple_style, role, query, response)
        if not calls:
            yield response, _with_turn(history, tuple_style, role, query, response)
            return
        first = calls[min(calls)]["function"]
        new_history: list[Any] = list(_with_turn(history, tuple_style, role, query, response))
        new_history[-1] = {"role": "assistant", "content": response,
                           "tool_calls": [calls[i] for i in sorted(calls)]}
        yield classic_tool_result(first["name"], first["arguments"]), new_history

    def chat(self, tokenizer: Tokenizer | None, query: str, history: History | None = None,
             **kwargs: Any) -> tuple[Any, History]:
        """(response, history): the response is the reply's text, or for a tool call ChatGLM3's
        `{"name", "parameters"}` (see stream_chat)."""
        if kwargs.pop("return_past_key_values", False):
            raise TypeError("chat() returns (response, history); stream_chat() is the one that can return "
                            "past_key_values")
        last: tuple[Any, History] | None = None
        for last in self.stream_chat(tokenizer, query, history, **kwargs):  # noqa: B007 - we want the final one
            pass
        assert last is not None  # stream_chat always yields the finished turn
        return last


class PastKeyValues:
    """What `stream_chat(..., return_past_key_values=True)` gives back for ChatGLM2/3's demos to pass in
    again: the conversation it belongs to, not tensors (the serving engine keeps the keys and values in its
    paged pool and finds them by the conversation's tokens)."""

    def __init__(self, history: History) -> None:
        self.turns = len(history)

    def __repr__(self) -> str:
        return f"PastKeyValues(turns={self.turns})"


class LocalEngine:
    """The serving engine inside the classic API: a caller's generator steps it in the caller's thread.
    Generators may be interleaved (or run on several threads): each step's events for other requests wait
    in their own queues."""

    def __init__(self, model: ChatModel) -> None:
        self.core = EngineCore(model)
        self._lock = threading.Lock()
        self._queues: dict[str, collections.deque[GenerationEvent]] = {}

    def generate(self, prompt_ids: list[int], params: SamplingParams, stop_token_ids: set[int],
                 **options: Any) -> Iterator[GenerationEvent]:
        """`options`: EngineCore.add_request's `grammar` and `reply_parser`."""
        request_id = uuid.uuid4().hex
        with self._lock:
            self.core.add_request(request_id, prompt_ids, params, stop_token_ids, **options)  # refusals raise
            self._queues[request_id] = collections.deque()
        return self._events(request_id)

    def _events(self, request_id: str) -> Iterator[GenerationEvent]:
        queue = self._queues[request_id]
        try:
            while True:
                while not queue:
                    with self._lock:
                        if not queue:
                            for rid, event in self.core.step():
                                if rid in self._queues:
                                    self._queues[rid].append(event)
                event = queue.popleft()
                yield event
                if event.finish_reason is not None:
                    return
        finally:  # finished, or abandoned (a closed generator, Ctrl-C): free its KV blocks either way
            with self._lock:
                self.core.abort(request_id)
                del self._queues[request_id]


def _is_tuple_history(history: Sequence[Any]) -> bool:
    if not history:
        return True
    if all(isinstance(h, (tuple, list)) and len(h) == 2 for h in history):
        return True
    if all(isinstance(h, dict) and "role" in h for h in history):
        return False
    raise ValueError("history must be a list of (query, response) pairs or of {'role', 'content'} dicts")


def _to_messages(history: Sequence[Any], tuple_style: bool) -> list[dict[str, Any]]:
    if not tuple_style:
        return [copy.deepcopy(dict(h)) for h in history]
    messages: list[dict[str, Any]] = []
    for query, response in history:
        messages += [{"role": "user", "content": query}, {"role": "assistant", "content": response}]
    return messages


def _tools_from_history(messages: list[dict[str, Any]], tools: list[dict] | None
                        ) -> tuple[list[dict[str, Any]], list[dict] | None]:
    """ChatGLM3 offers tools in a system message of the history (`{"role": "system", "content": ...,
    "tools": [...]}`): they come out of it and are offered like `tools=`, in OpenAI's shape."""
    found = list(tools or [])
    kept = []
    for message in messages:
        if message.get("role") == "system" and "tools" in message:
            found += message.get("tools") or []
            message = {k: v for k, v in message.items() if k != "tools"}
            if not message.get("content"):
                continue
        kept.append(message)
    wrapped = [t if "type" in t else {"type": "function", "function": t} for t in found]
    return kept, wrapped or None


def _with_turn(history: list[Any], tuple_style: bool, role: str, query: str, response: str) -> History:
    if tuple_style:
        return [tuple(h) for h in history] + [(query, response)]
    return copy.deepcopy(history) + [{"role": role, "content": query}, {"role": "assistant", "content": response}]


def load_tokenizer(loaded: LoadedModel) -> Tokenizer:
    return tokenizer_for(loaded.checkpoint, loaded.arch_module)


def tokenizer_for(ckpt: Checkpoint, arch_module: ModuleType | None = None) -> Tokenizer:
    """The tokenizer of an opened checkpoint (its architecture resolved from the config when not given); no
    weights are read."""
    if arch_module is None:
        arch_module = resolve_architecture(ckpt)
    custom = getattr(arch_module, "load_tokenizer", None)
    if custom is not None:
        return custom(ckpt)
    if ckpt.format == "gguf":
        return tokenizer_from_gguf(ckpt.config)  # GGUF metadata, already parsed and validated
    folder = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    return load_tokenizer_json(folder)


def load(
    name_or_path: str | Path | None = None,
    *,
    device: str = "auto",
    dtype: str | torch.dtype = "auto",
    progress: bool = False,
    quantize: str | None = None,
    settings: Settings | None = None,
    adapter: str | Path | None = None,
) -> tuple[ChatModel, Tokenizer]:
    """Load a model by path or name (see `resolve_model_path`); returns `(model, tokenizer)`.

    `settings` (default: `Settings.from_env()`, the GLMSTACK_* variables) gives the model when none is named,
    the models folder, and the native-kernel options.

    `quantize="int8"` or `"int4"` quantizes the weights after loading (`ChatModel.quantize`); `"auto"` keeps
    the precision the file stores (a Q4_0/Q4_1 GGUF runs as int4, Q8_0 as int8: `stored_precision`), which is
    what `glmstack serve` and `glmstack chat` do unless told otherwise; None or "none" loads floats. On CPU,
    dtype "auto" then means bfloat16 rather than float32 for a quantized model: the CPU int8/int4 kernels
    compute in bf16 (their fp32 versions are scalar loops), so fp32 activations would only be cast at every
    quantized linear.

    `adapter`: a LoRA or P-Tuning v2 folder trained on this base; the model's classic calls run with it
    (`model.adapter`, loaded under the folder's name in `model.adapters`).
    """
    if quantize not in (None, *QUANTIZE_CHOICES):
        raise ValueError(f"unknown quantize={quantize!r}; use None or one of {', '.join(QUANTIZE_CHOICES)}")
    settings = Settings.from_env() if settings is None else settings
    native.configure(NativeOptions(settings.native, settings.native_dir, settings.vnni))
    path = resolve_model_path(None if name_or_path is None else str(name_or_path), settings)
    checkpoint = open_checkpoint(path)
    if quantize == "auto":
        quantize = stored_precision(checkpoint)
    saved = saved_quantization(checkpoint.config)
    if saved is not None and quantize != f"int{saved['bits']}":
        # `glmstack quantize` wrote it: its linears exist only in that precision
        log.warning("%s is an int%d checkpoint; it runs as int%d (quantize=%s ignored)", path, saved["bits"],
                    saved["bits"], quantize)
        quantize = f"int{saved['bits']}"
    bits = {"int8": 8, "int4": 4}.get(quantize or "none", 0)
    if bits and dtype == "auto" and pick_device(device).type == "cpu":
        dtype = torch.bfloat16
    # quantized as each weight is read (never the whole model in floats); a GGUF's own blocks kept where they map
    loaded = load_model(checkpoint, device=device, dtype=dtype, progress=progress, quantize=bits)
    tokenizer = load_tokenizer(loaded)
    custom_format = getattr(loaded.arch_module, "chat_format_for", None)
    chat_format = custom_format(tokenizer, loaded.module.config) if custom_format else chat_format_for(tokenizer)
    name = path.stem if path.is_file() else path.name
    model = ChatModel(loaded, tokenizer, chat_format, name)
    if bits:
        model.quantize(bits)
    if adapter is not None:
        model.adapter = model.adapters.load(Path(adapter).name, adapter).name
    return_freed_memory()
    return model, tokenizer
