"""Grammar-constrained decoding on the bundled model: JSON-schema replies that parse and validate (jsonschema is
the oracle), free requests untouched beside constrained ones, and schemas the compiler refuses named by field."""

from __future__ import annotations

import asyncio
import json
import random
import time

import jsonschema
import llguidance
import pytest
from glm_vocab import CORPUS, chatglm2_model, glm4_ranks, ice_text_model, sp_oracle, write_rank_file

from glmstack.engine.chat_format.base import ChatFormat, ChatPrompt
from glmstack.engine.constrained.grammar import SCHEMA_FIELD, Constraints, lark_grammar
from glmstack.engine.constrained.vocabulary import ll_tokenizer, token_bytes
from glmstack.engine.serving.async_engine import AsyncEngine
from glmstack.engine.serving.core import EngineCore
from glmstack.engine.tokenization.glm import ChatGLM2Tokenizer, ChatGLMv1Tokenizer, load_glm_tokenizer
from glmstack.protocol import GenerateRequest, InvalidConstraintError, SamplingParams

pytestmark = pytest.mark.slow

COLOURS = ["red", "green", "blue", "amber"]


def make_schema(rng: random.Random, depth: int = 0) -> dict:
    """A small object schema whose every instance is short: bounded strings, numbers and arrays, no extra
    properties, so a constrained reply always closes within a few dozen tokens."""
    props: dict[str, dict] = {}
    kinds = ["string", "integer", "number", "boolean", "enum", "array"] + (["object"] if depth == 0 else [])
    for i in range(rng.randint(1, 3 if depth == 0 else 2)):
        kind = rng.choice(kinds)
        if kind == "string":
            spec: dict = {"type": "string", "minLength": rng.randint(0, 2), "maxLength": rng.randint(3, 6)}
        elif kind == "integer":
            spec = {"type": "integer", "minimum": -rng.randint(0, 50), "maximum": rng.randint(1, 999)}
        elif kind == "number":
            spec = {"type": "number", "minimum": 0, "maximum": 100, "multipleOf": 0.25}
        elif kind == "boolean":
            spec = {"type": "boolean"}
        elif kind == "enum":
            spec = {"enum": COLOURS[: rng.randint(1, 4)]}
        elif kind == "array":
            item = rng.choice([{"type": "integer", "minimum": 0, "maximum": 9},
                               {"type": "string", "maxLength": 4}, {"enum": COLOURS}])
            spec = {"type": "array", "items": item, "minItems": rng.randint(0, 1), "maxItems": rng.randint(1, 2)}
        else:
            spec = make_schema(rng, depth + 1)
        props[f"{kind[:3]}_{i}"] = spec
    required = rng.sample(sorted(props), rng.randint(0, len(props)))
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


SCHEMAS = [make_schema(random.Random(seed)) for seed in range(50)]


def json_schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": True}}


def prompt(model, text: str) -> list[int]:
    return model.render_chat([{"role": "user", "content": text}], 256)[0]


def run_all(core: EngineCore) -> dict[str, tuple[str, list[int], str]]:
    text: dict[str, str] = {}
    tokens: dict[str, list[int]] = {}
    done: dict[str, tuple[str, list[int], str]] = {}
    while core.has_work():
        for rid, event in core.step():
            text[rid] = text.get(rid, "") + event.text
            tokens.setdefault(rid, []).extend(event.token_ids)
            if event.finish_reason:
                done[rid] = (text[rid], tokens[rid], event.finish_reason)
    return done


@pytest.fixture(scope="module")
def core(bundled) -> EngineCore:
    model, _ = bundled
    return EngineCore(model, kv_cache_bytes=256 << 20, max_batch_tokens=1024, max_running=128)


# ---- the tokenizer bridge -----------------------------------------------------------------------------------


def test_bundled_vocabulary_matches_llguidances_own_loader(bundled) -> None:
    _, tokenizer = bundled
    ours = ll_tokenizer(tokenizer, [tokenizer.eos_token_id])
    theirs = llguidance.LLTokenizer(tokenizer.backend.to_str(), eos_token=tokenizer.eos_token_id)
    assert all(ours.decode_bytes([i]) == theirs.decode_bytes([i]) for i in range(tokenizer.vocab_size))
    assert ours is ll_tokenizer(tokenizer, [tokenizer.eos_token_id])  # built once


@pytest.fixture(scope="module")
def glm_tokenizers(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("glm4")
    write_rank_file(folder / "tokenizer.model", glm4_ranks())
    return {
        "chatglm-6b": ChatGLMv1Tokenizer(sp_oracle(ice_text_model())),
        "chatglm2": ChatGLM2Tokenizer(sp_oracle(chatglm2_model()), role_tokens=True),
        "glm4": load_glm_tokenizer(folder, {}),
    }


@pytest.mark.parametrize("name", ["chatglm-6b", "chatglm2", "glm4"])
def test_glm_vocabularies_spell_text_back(glm_tokenizers, name: str) -> None:
    """Every GLM tokenizer's ids, read through the bridge's bytes, spell the text they encode (sentencepiece
    adds its dummy leading space)."""
    tokenizer = glm_tokenizers[name]
    tokens, special = token_bytes(tokenizer)
    for text in CORPUS:
        ids = tokenizer.encode(text, allow_special=False)
        assert not special & set(ids)
        spelled = b"".join(tokens[i] for i in ids).decode()
        assert spelled.removeprefix(" ") == text.removeprefix(" "), text


def test_special_tokens_never_come_from_grammar_text(bundled) -> None:
    model, tokenizer = bundled
    constraints = Constraints(tokenizer, model.chat_format, model.chat_format.stop_token_ids)
    matcher = constraints.compile(lark_grammar('start: /(.|\\n)*/'), "test")
    allowed = llguidance.numpy.allocate_token_bitmask(1, tokenizer.vocab_size)
    llguidance.numpy.fill_next_token_bitmask(matcher, allowed)
    bits = [(int(allowed[0, i // 32]) >> (i % 32)) & 1 for i in range(tokenizer.vocab_size)]
    for name, token_id in tokenizer.special_tokens.items():
        assert bits[token_id] == (token_id in model.chat_format.stop_token_ids), name
    assert sum(bits) > tokenizer.vocab_size - 100  # every text token is allowed


# ---- replies that follow a schema ---------------------------------------------------------------------------


def test_fifty_schemas_greedy_and_sampled(bundled, core: EngineCore) -> None:
    model, _ = bundled
    ids = prompt(model, "Describe an item as JSON.")  # one prompt: prefix caching prefills it once
    for i, schema in enumerate(SCHEMAS):
        for mode, params in (("greedy", SamplingParams(do_sample=False, max_tokens=120)),
                             ("sampled", SamplingParams(temperature=0.9, top_p=0.95, seed=i, max_tokens=120))):
            grammar = core.constraints.matcher_for(response_format=json_schema(schema))
            core.add_request(f"{mode}{i}", ids, params, grammar=grammar)
    done = run_all(core)
    assert len(done) == 100
    for rid, (text, _, finish) in done.items():
        schema = SCHEMAS[int(rid.removeprefix("greedy").removeprefix("sampled"))]
        assert finish == "stop", (rid, text)
        jsonschema.validate(json.loads(text), schema)
    assert core.allocator.num_in_use == 0


def test_json_object_is_an_object(bundled, core: EngineCore) -> None:
    model, _ = bundled
    grammar = core.constraints.matcher_for(response_format={"type": "json_object"})
    core.add_request("obj", prompt(model, "Give me a JSON object about a cat."),
                     SamplingParams(do_sample=False, max_tokens=300, stop=["\n\n\n"]), grammar=grammar)
    text, _, finish = run_all(core)["obj"]
    if finish == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # a small model may write a long object; what it wrote is still the start of one
        assert text.startswith("{")


def test_free_request_beside_constrained_ones_is_unchanged(bundled, core: EngineCore) -> None:
    model, _ = bundled
    free = prompt(model, "What is the capital of France?")
    greedy = SamplingParams(do_sample=False, max_tokens=24)
    core.add_request("alone", free, greedy)
    alone = run_all(core)["alone"]
    core.add_request("free", free, greedy)
    for i in range(3):
        grammar = core.constraints.matcher_for(response_format=json_schema(SCHEMAS[i]))
        core.add_request(f"c{i}", prompt(model, f"JSON {i}"), greedy, grammar=grammar)
    done = run_all(core)
    assert done["free"] == alone


def test_constrained_reply_still_honours_stop_strings(bundled, core: EngineCore) -> None:
    model, _ = bundled
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}}, "required": ["name"]}
    grammar = core.constraints.matcher_for(response_format=json_schema(schema))
    core.add_request("s", prompt(model, "Name a dog in JSON."), SamplingParams(do_sample=False, max_tokens=50,
                     stop=['"name"']), grammar=grammar)
    text, _, finish = run_all(core)["s"]
    assert (text, finish) == ("{", "stop")


def test_a_schema_is_compiled_once(bundled, core: EngineCore) -> None:
    schema = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(60)}}
    before = core.constraints.compiled
    first = core.constraints.matcher_for(response_format=json_schema(schema))
    second = core.constraints.matcher_for(response_format=json_schema(schema))
    assert core.constraints.compiled == before + 1
    assert first is not second  # each request advances its own copy


# ---- refusals, named by field, before anything is queued ------------------------------------------------------

BAD_SCHEMAS = [
    {"type": "strin"},
    {"type": 5},
    {"type": "object", "properties": [1, 2]},
    {"type": "string", "pattern": "(("},
    {"$ref": "#/$defs/missing"},
    "not an object",
    {"type": "array", "items": {"type": "object", "required": 7}},
]


@pytest.mark.parametrize("schema", BAD_SCHEMAS, ids=range(len(BAD_SCHEMAS)))
def test_bad_schema_names_the_field(core: EngineCore, schema) -> None:
    with pytest.raises(InvalidConstraintError) as error:
        core.constraints.matcher_for(response_format=json_schema(schema))
    assert error.value.field == SCHEMA_FIELD
    assert str(error.value)


def test_bad_response_format_shapes(core: EngineCore) -> None:
    with pytest.raises(InvalidConstraintError) as error:
        core.constraints.matcher_for(response_format={"type": "yaml"})
    assert error.value.field == "response_format.type"
    with pytest.raises(InvalidConstraintError) as error:
        core.constraints.matcher_for(response_format={"type": "json_schema"})
    assert error.value.field == "response_format.json_schema"
    assert core.constraints.matcher_for(response_format={"type": "text"}) is None


def test_async_engine_refuses_before_queueing(bundled) -> None:
    model, _ = bundled
    engine = AsyncEngine(model, kv_cache_bytes=32 << 20)

    async def main() -> None:
        request = GenerateRequest("bad", SamplingParams(max_tokens=4), messages=[{"role": "user", "content": "hi"}],
                                  response_format=json_schema({"type": "strin"}))
        with pytest.raises(InvalidConstraintError) as error:
            async for _ in engine.generate(request):
                pass
        assert error.value.field == SCHEMA_FIELD
        assert engine.stats()["waiting"] == 0 and engine.stats()["running"] == 0

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


def _timed(call):
    started = time.perf_counter()
    try:
        result = call()
    except InvalidConstraintError as exc:
        result = exc
    elapsed = time.perf_counter() - started
    print(f"{elapsed * 1000:.1f} ms -> {type(result).__name__}")
    return result, elapsed


def test_hostile_schemas_answer_quickly(core: EngineCore) -> None:
    """A recursive $ref compiles (JSON grammars may recurse), a self-referencing $ref and a megabyte of
    schema answer with a matcher or an error; none takes long (the bound here is generous: CI is shared)."""
    recursive = {"$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"},
                                                                     "next": {"$ref": "#/$defs/node"}},
                                    "required": ["v"]}}, "$ref": "#/$defs/node"}
    self_ref = {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}
    huge = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "d" * 40}
                                             for i in range(16_000)}}
    wordy = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "d" * 11_000}
                                              for i in range(100)}}
    assert len(json.dumps(huge)) > 1 << 20 and len(json.dumps(wordy)) > 1 << 20
    nested: dict = {"type": "integer"}
    for _ in range(5000):
        nested = {"type": "array", "items": nested}
    results = {name: _timed(lambda s=schema: core.constraints.matcher_for(response_format=json_schema(s)))
               for name, schema in [("recursive", recursive), ("self_ref", self_ref), ("huge", huge),
                                    ("wordy", wordy), ("nested", nested)]}
    assert not isinstance(results["recursive"][0], Exception)
    assert not isinstance(results["wordy"][0], Exception)
    for result, elapsed in results.values():
        assert elapsed < 10
        if isinstance(result, InvalidConstraintError):
            assert result.field == SCHEMA_FIELD


class _JsonCallFormat(ChatFormat):
    """Wraps a real format; its tool grammar is a JSON call `{"name": ..., "arguments": {...}}`."""

    name = "json-calls"

    def __init__(self, inner: ChatFormat) -> None:
        super().__init__(inner.tokenizer)
        self.inner = inner
        self.stop_token_ids = inner.stop_token_ids

    def render(self, messages, *, tools=None, add_generation_prompt=True, thinking=None) -> ChatPrompt:
        return self.inner.render(messages, add_generation_prompt=add_generation_prompt)

    def tool_grammar(self, tools, tool_choice, *, parallel=True):
        calls = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                   "arguments": t["function"].get("parameters", {})},
                  "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
        return f"start: %json {json.dumps({'anyOf': calls})}"


def test_tool_grammar_failure_names_the_tool(bundled) -> None:
    model, tokenizer = bundled
    constraints = Constraints(tokenizer, _JsonCallFormat(model.chat_format), model.chat_format.stop_token_ids)
    good = {"type": "function", "function": {"name": "ok", "parameters": {"type": "object"}}}
    bad = {"type": "function", "function": {"name": "bad", "parameters": {"type": "objekt"}}}
    with pytest.raises(InvalidConstraintError) as error:
        constraints.matcher_for(tools=[good, good, bad], tool_choice="required")
    assert error.value.field == "tools[2].function.parameters"
    assert constraints.matcher_for(tools=[good, bad], tool_choice="none") is None


@pytest.mark.parametrize("parameters", [5, "object", {"type": "object", "properties": {"a": {"type": 7}}},
                                        {"type": "object", "required": "a"}])
def test_wrongly_typed_tool_parameters_name_the_tool(bundled, parameters) -> None:
    model, tokenizer = bundled
    constraints = Constraints(tokenizer, _JsonCallFormat(model.chat_format), model.chat_format.stop_token_ids)
    good = {"type": "function", "function": {"name": "ok", "parameters": {"type": "object"}}}
    bad = {"type": "function", "function": {"name": "bad", "parameters": parameters}}
    with pytest.raises(InvalidConstraintError) as error:
        constraints.matcher_for(tools=[good, bad], tool_choice="auto")
    assert error.value.field == "tools[1].function.parameters"


def test_128_tools_compile_quickly(bundled) -> None:
    model, tokenizer = bundled
    constraints = Constraints(tokenizer, _JsonCallFormat(model.chat_format), model.chat_format.stop_token_ids)
    tools = [{"type": "function", "function": {"name": f"tool_{i}", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"]}}} for i in range(128)]
    result, elapsed = _timed(lambda: constraints.matcher_for(tools=tools, tool_choice="required"))
    assert isinstance(result, llguidance.LLMatcher) and elapsed < 10
