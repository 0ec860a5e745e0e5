"""The compiled decode path (engine option `compile`) against the eager one on the bundled model.

One engine compiles once (float32, so the two paths may differ only by the order of float
operations: greedy agreement and a tight logit tolerance are meaningful); eager runs on the same
engine with the compiled path switched off. Kept lean: the compile is the cost (~1 min on 2 cores).
"""

from __future__ import annotations

import shutil

import pytest
import torch

from lmserve import SamplingParams
from lmserve.model_input import ModelInput
from tests.conftest import chat_ids

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="torch.compile on CPU needs a C++ compiler")

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three primes.",
           "Explain gravity to a child.", "def fibonacci(n):"]
TOKENS = 16


@pytest.fixture(scope="module")
def compiled_llm():
    from lmserve import LLM
    from lmserve.models.loader import DEFAULT_MODEL_ID
    from tests.conftest import track, untrack

    # No prefix caching: the logit test below writes cache blocks directly.
    llm = track(LLM(DEFAULT_MODEL_ID, dtype="float32", compile=True, num_kv_blocks=96,
                    enable_prefix_caching=False))
    compiled = llm.engine.runner.compiled
    assert compiled is not None
    assert compiled.wait(timeout=600), f"compile failed: {compiled.error}"
    yield llm
    untrack(llm)


def _generate(llm, compiled_on: bool, max_tokens: int = TOKENS) -> list[list[int]]:
    llm.engine.runner.compiled.enabled = compiled_on
    try:
        prompts = [chat_ids(llm, p) for p in PROMPTS]
        outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    finally:
        llm.engine.runner.compiled.enabled = True
    return [o.outputs[0].token_ids for o in outs]


def test_greedy_agrees_with_eager_and_eager_switch_is_exact(compiled_llm, smollm):
    compiled = compiled_llm.engine.runner.compiled
    before = compiled.steps
    with_compile = _generate(compiled_llm, True)
    assert compiled.steps - before >= TOKENS - 1, "decode steps did not take the compiled path"
    eager = _generate(compiled_llm, False)
    # float32: the paths differ only in the order of float operations (logits within 2e-4, the
    # family parity bound), far below these prompts' top-2 margins, so greedy agrees token for token.
    assert with_compile == eager
    # The switched-off path is the exact eager engine: the same tokens as an engine built without it.
    assert eager == _generate_plain(smollm)


def _generate_plain(llm) -> list[list[int]]:
    prompts = [chat_ids(llm, p) for p in PROMPTS]
    outs = llm.generate(prompts, SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]


def test_decode_logits_within_tolerance_without_recompiles(compiled_llm):
    from torch._dynamo.utils import counters

    llm = compiled_llm
    runner, compiled = llm.engine.runner, llm.engine.runner.compiled
    prompts = [chat_ids(llm, p) for p in PROMPTS]
    bs = runner.block_size
    graphs = counters["stats"]["unique_graphs"]
    tables, next_block = [], 0
    first_tokens, contexts = [], []
    compiled.enabled = False
    try:
        for ids in prompts:  # prefill each prompt eager into its own blocks
            width = -(-(len(ids) + 1) // bs)
            tables.append(list(range(next_block, next_block + width)))
            next_block += width
            logits = runner.execute(ModelInput(ids, [len(ids)], [0], [tables[-1]], 0, [len(ids) - 1]))
            first_tokens.append(int(logits[0].argmax()))
            contexts.append(len(ids))
    finally:
        compiled.enabled = True
    # Batch sizes 2..5 and tables of different widths: one graph covers them all.
    for n in (2, 5, 3):
        batch = ModelInput(first_tokens[:n], [1] * n, contexts[:n], tables[:n], n, list(range(n)))
        compiled.enabled = False
        eager = runner.execute(batch)
        compiled.enabled = True
        steps = compiled.steps
        out = runner.execute(batch)
        assert compiled.steps == steps + 1
        assert torch.equal(out.argmax(-1), eager.argmax(-1))
        torch.testing.assert_close(out, eager, atol=2e-4, rtol=0)
        # Rows sampled out of batch order (the sampler's order) come back in that order.
        rows = list(range(n))[::-1]
        reordered = runner.execute(ModelInput(first_tokens[:n], [1] * n, contexts[:n], tables[:n], n, rows))
        torch.testing.assert_close(reordered, eager[rows], atol=2e-4, rtol=0)
    assert counters["stats"]["unique_graphs"] == graphs, "a decode batch recompiled"
