"""The Engine in asyncio code (`Engine.agenerate`): streams from many tasks at once, more
than the loop's executor has workers, each give a sequential run's tokens; a task that
leaves its stream early, or is cancelled, frees the engine, and one cancelled while it
waited never runs its prompt."""

from __future__ import annotations

import asyncio
import concurrent.futures

import pytest

from edge_runtime import BadRequest, Chunk, Engine, GenerationRequest, GenerationResult, SamplingParams

GREEDY = SamplingParams(temperature=0.0)


def request(prompt: str, n: int = 12) -> GenerationRequest:
    return GenerationRequest(mode="complete", prompt=prompt, max_tokens=n, sampling=GREEDY)


@pytest.fixture(scope="module")
def engines(tiny_bundle):
    """The engine under test, and one that runs each request afresh (no prompt cache)."""
    return Engine.from_bundle(tiny_bundle), Engine.from_bundle(tiny_bundle, prompt_cache="off")


async def read(engine: Engine, req: GenerationRequest, leave_after: int | None = None) -> GenerationResult | None:
    text = []
    async for item in engine.agenerate(req):
        if isinstance(item, Chunk):
            text.append(item.text)
            if leave_after is not None and len(text) >= leave_after:
                return None  # the stream is left early
        else:
            assert item.text == "".join(text)
            return item
    raise AssertionError("the stream ended without a result")


def test_more_streams_than_executor_workers_each_get_a_sequential_runs_tokens(engines):
    """Each stepped through a two-worker pool (run_in_executor(None, next, it)), the third of these
    streams would wait in a worker for the engine that the first needs a worker to step: forever."""
    engine, fresh = engines
    prompts = [f"def handler_{i}(request):\n    " for i in range(8)]

    async def main() -> list[GenerationResult | None]:
        asyncio.get_running_loop().set_default_executor(concurrent.futures.ThreadPoolExecutor(2))
        return await asyncio.wait_for(asyncio.gather(*(
            read(engine, request(p, 16), leave_after=2 if i % 3 == 0 else None) for i, p in enumerate(prompts))), 60)

    results = asyncio.run(main())
    for i, (prompt, got) in enumerate(zip(prompts, results)):
        if i % 3 == 0:
            assert got is None
        else:
            assert got is not None and got.token_ids == fresh.complete(request(prompt, 16)).token_ids
    after = engine.complete(request("class Stack:\n    def push(self, x):\n"))
    assert after.token_ids == fresh.complete(request("class Stack:\n    def push(self, x):\n")).token_ids


def test_a_task_cancelled_while_waiting_for_the_engine_never_runs_its_prompt(engines):
    engine, fresh = engines
    holder_prompt, waiting_prompt = "def first(a, b):\n    return", "import os\nimport sys\n\ndef main():\n"
    holder = engine.generate(request(holder_prompt))
    next(holder)  # the engine is held by this open stream

    async def main() -> None:
        task = asyncio.create_task(read(engine, request(waiting_prompt)))
        await asyncio.sleep(0.3)  # its thread waits for the engine
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    holder.close()
    # the prompt cache keeps the last prompt that ran: the holder's (it shares only <s> with this one),
    # not the cancelled request's, whose whole prompt but its last id would be kept
    again = engine.complete(request(waiting_prompt))
    assert again.usage.cached_prompt_tokens == 1
    assert again.token_ids == fresh.complete(request(waiting_prompt)).token_ids


def test_a_cancelled_task_stops_its_stream_and_a_bad_request_raises_in_the_task(engines):
    engine, fresh = engines
    prompt = "def parse(line):\n    "

    async def main() -> GenerationResult | None:
        streaming = asyncio.Event()

        async def reader() -> None:  # cancelled mid-stream, after its first chunk
            async for _ in engine.agenerate(request("def long_one():\n", 400)):
                streaming.set()
                await asyncio.sleep(3600)

        task = asyncio.create_task(reader())
        await asyncio.wait_for(streaming.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(BadRequest, match="max_tokens"):
            await read(engine, request(prompt, 0))
        return await asyncio.wait_for(read(engine, request(prompt)), 30)

    got = asyncio.run(main())
    assert got is not None and got.token_ids == fresh.complete(request(prompt)).token_ids
