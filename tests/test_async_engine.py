"""The asyncio face of the engine: streaming, concurrency, abort on disconnect."""

from __future__ import annotations

import asyncio

import pytest

from glmstack.engine.serving.async_engine import AsyncEngine
from glmstack.protocol import GenerateRequest, SamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=[True, False], ids=["batched", "sequential"])
def engine(request, bundled):
    model, _ = bundled
    eng = AsyncEngine(model, batched=request.param)
    yield eng
    eng.shutdown()


def chat(request_id: str, text: str, **params) -> GenerateRequest:
    return GenerateRequest(request_id, SamplingParams(do_sample=False, **params),
                           messages=[{"role": "user", "content": text}])


def test_stream_matches_reference_loop(engine) -> None:
    async def run() -> str:
        return "".join([e.text async for e in engine.generate(chat("a", "Name three fruits.", max_tokens=16))])

    text = asyncio.run(run())
    expected = "".join(e.text for e in engine.model.stream_messages(
        [{"role": "user", "content": "Name three fruits."}], SamplingParams(do_sample=False, max_tokens=16)))
    assert text == expected and text


def test_concurrent_requests_all_finish(engine) -> None:
    async def one(i: int) -> tuple[str, str | None]:
        last = None
        async for event in engine.generate(chat(f"c{i}", f"Count to {i + 2}.", max_tokens=8)):
            last = event
        return last.finish_reason, last.usage.completion_tokens

    async def all_of_them() -> list[tuple[str, str | None]]:
        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(4))), 120)

    results = asyncio.run(all_of_them())
    assert all(reason in ("stop", "length") and 0 < n <= 8 for reason, n in results)


def test_disconnect_aborts_and_frees_the_slot(engine) -> None:
    async def run() -> None:
        stream = engine.generate(chat("gone", "Write a long story about a dragon.", max_tokens=400))
        got = 0
        async for _ in stream:
            got += 1
            if got == 3:
                break  # the client hung up
        await stream.aclose()
        def idle() -> bool:
            stats = engine.stats()
            return stats["waiting"] == 0 and stats["running"] == 0 and stats.get("kv_blocks_in_use", 0) == 0

        for _ in range(100):
            if idle():
                break
            await asyncio.sleep(0.05)
        assert idle(), engine.stats()
        # the next request is served
        text = "".join([e.text async for e in engine.generate(chat("next", "Say hi.", max_tokens=4))])
        assert text

    asyncio.run(asyncio.wait_for(run(), 120))
