"""The interface the server uses: streamed deltas off the event loop, and abort."""

from __future__ import annotations

import asyncio
import time

import pytest

from lmserve import LLM, AsyncEngine, SamplingParams
from lmserve.errors import ContextLengthExceeded
from lmserve.models.loader import DEFAULT_MODEL_ID
from tests.conftest import chat_ids, track, untrack


@pytest.fixture(scope="module")
def async_engine():
    # Its own engine: an LLMEngine is driven by one thread only, and `smollm` is driven inline.
    llm = track(LLM(DEFAULT_MODEL_ID, dtype="float32"))
    engine = AsyncEngine(llm.engine)
    yield engine
    engine.shutdown()
    untrack(llm)


def test_stream_deltas_concatenate_to_offline_text(smollm, async_engine):
    ids = chat_ids(smollm, "Describe a sunrise in two sentences.")
    params = SamplingParams(max_tokens=40, temperature=0.0)
    offline = smollm.generate([ids], params)[0].outputs[0]

    async def run():
        deltas = []
        async for out in async_engine.generate("s1", ids, params):
            deltas += out.outputs
        return deltas

    deltas = asyncio.run(run())
    assert len(deltas) > 5, "output should arrive step by step"
    assert "".join(d.text for d in deltas) == offline.text
    assert sum((d.token_ids for d in deltas), []) == offline.token_ids
    assert deltas[-1].finish_reason == offline.finish_reason


def test_concurrent_streams(smollm, async_engine):
    questions = ["Name a fruit.", "Name a river.", "Name a planet.", "Name a tree.", "Name a bird."]

    async def one(i, q):
        text = ""
        params = SamplingParams(max_tokens=16, temperature=0.0)
        async for out in async_engine.generate(f"c{i}", chat_ids(smollm, q), params):
            text += "".join(o.text for o in out.outputs)
        return text

    async def run():
        return await asyncio.gather(*(one(i, q) for i, q in enumerate(questions)))

    texts = asyncio.run(run())
    expected = [o.outputs[0].text for o in smollm.generate([chat_ids(smollm, q) for q in questions],
                                                          SamplingParams(max_tokens=16, temperature=0.0))]
    assert texts == expected


def test_consumer_leaving_aborts_and_frees_blocks(smollm, async_engine):
    engine = async_engine.engine
    ids = chat_ids(smollm, "Write a very long essay about the history of Rome.")
    seen = {}

    async def run():
        agen = async_engine.generate("gone", ids, SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True))
        n = 0
        async for _ in agen:
            n += 1
            if n == 3:
                seen["request"] = engine.requests["gone"]  # still running: 3 of 400 tokens out
                break
        await agen.aclose()

    asyncio.run(run())
    deadline = time.monotonic() + 60.0  # generous: the engine thread notices on its next turn
    while engine.num_free_blocks != engine.num_blocks and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.num_free_blocks == engine.num_blocks
    assert not engine.has_unfinished()
    seq = seen["request"].seqs[0]
    assert seq.finish_reason == "abort", "the request ran on after its consumer left"
    assert seq.num_output_tokens < 400


def test_rejected_request_raises_and_engine_goes_on(smollm, async_engine):
    too_long = list(range(100, 100 + async_engine.engine.max_seq_len + 5))

    async def run():
        with pytest.raises(ContextLengthExceeded):
            async for _ in async_engine.generate("bad", too_long, SamplingParams(max_tokens=4)):
                pass
        out = []
        async for o in async_engine.generate("good", [1, 2, 3], SamplingParams(max_tokens=3, temperature=0.0)):
            out += o.outputs
        return out

    out = asyncio.run(run())
    assert out[-1].finished and async_engine.alive
