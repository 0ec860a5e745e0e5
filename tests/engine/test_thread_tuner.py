"""The CPU thread tuner (engine/thread_tuner.py): it runs the thread count whose steps measure
fastest, keeps trying the others, follows a neighbour that comes and goes, and never changes what
the engine computes."""

from __future__ import annotations

import pytest
import torch

from lmserve import LLM, SamplingParams
from lmserve.engine import thread_tuner
from lmserve.engine.thread_tuner import EXPLORE_EVERY, MAX_EXPLORE_EVERY, ThreadTuner, candidate_counts
from lmserve.models.loader import DEFAULT_MODEL_ID
from tests.conftest import track


def test_candidate_counts_go_from_all_cores_down():
    assert candidate_counts(1) == [1]
    assert candidate_counts(2) == [2, 1]
    assert candidate_counts(4) == [4, 3, 2, 1]
    assert candidate_counts(16) == [16, 15, 8, 1]


def _drive(tuner: ThreadTuner, step_seconds: dict[int, float], steps: int, tokens: int = 1) -> list[int]:
    """Run `steps` steps whose time depends only on the thread count; the counts chosen."""
    chosen = []
    for _ in range(steps):
        threads = tuner.choose(tokens)
        assert torch.get_num_threads() == threads  # set for the step...
        tuner.release(threads)
        assert torch.get_num_threads() == tuner.max_threads  # ... and put back after it
        tuner.observe(tokens, threads, step_seconds[threads])
        chosen.append(threads)
    return chosen


def test_follows_the_faster_count_as_a_neighbour_comes_and_goes():
    configured = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        tuner = ThreadTuner(2)
        quiet, busy = {2: 0.010, 1: 0.014}, {2: 0.050, 1: 0.015}
        chosen = _drive(tuner, quiet, 4 * EXPLORE_EVERY)[4:]  # after both counts' warm-up and first step
        assert chosen.count(2) >= len(chosen) - len(chosen) // EXPLORE_EVERY - 1  # quiet: all cores...
        assert 1 in chosen  # ... still trying the other now and then
        chosen = _drive(tuner, busy, 4 * MAX_EXPLORE_EVERY)
        # A neighbour took a core: within a few steps the tuner runs 1 thread, and as explorations
        # keep losing they grow rare (each 2-thread step costs 3x here).
        assert chosen[EXPLORE_EVERY:].count(2) <= 8, chosen.count(2)
        assert chosen[-MAX_EXPLORE_EVERY:].count(2) <= 1
        chosen = _drive(tuner, quiet, 3 * MAX_EXPLORE_EVERY)
        # ... and back on all cores at the first exploration after it left.
        tail = chosen[MAX_EXPLORE_EVERY + 2:]
        assert tail.count(2) >= len(tail) - len(tail) // EXPLORE_EVERY - 1
    finally:
        torch.set_num_threads(configured)


def test_step_sizes_are_measured_apart():
    torch.set_num_threads(2)
    tuner = ThreadTuner(2)
    # Decodes of one row are fastest on 1 thread, 256-token prefill chunks on 2.
    for _ in range(3 * EXPLORE_EVERY):
        for tokens, seconds in ((1, {2: 0.004, 1: 0.003}), (256, {2: 0.1, 1: 0.19})):
            threads = tuner.choose(tokens)
            tuner.release(threads)
            tuner.observe(tokens, threads, seconds[threads])
    snapshot = tuner.snapshot()
    assert snapshot["<=1 tokens"] == {1: 3.0, 2: 4.0}
    assert snapshot["<=256 tokens"] == {1: 190.0, 2: 100.0}
    assert tuner.choose(1) == 1 and tuner.choose(200) == 2
    tuner.release(1)


def test_applies_only_where_the_thread_count_is_ours(monkeypatch):
    torch.set_num_threads(2)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert ThreadTuner.for_engine(cpu, 1, threads_fixed=False, dtype=torch.bfloat16) is not None
    assert ThreadTuner.for_engine(cpu, 1, threads_fixed=False, dtype=torch.float32) is None  # sums split by threads
    assert ThreadTuner.for_engine(cpu, 1, threads_fixed=True) is None  # --threads N
    assert ThreadTuner.for_engine(cpu, 2, threads_fixed=False) is None  # tensor-parallel ranks set their own
    assert ThreadTuner.for_engine(cuda, 1, threads_fixed=False) is None
    monkeypatch.setenv(thread_tuner.ENV_OFF, "0")
    assert ThreadTuner.for_engine(cpu, 1, threads_fixed=False) is None


@pytest.mark.parametrize("quantization", ["none", "int4"])
def test_the_engine_explores_thread_counts_without_changing_a_logprob(monkeypatch, quantization):
    """The bundled model in bf16 (dense, and int4 as served by default) with the tuner exploring 1
    and 2 threads every other step gives the tokens and logprobs of a run with the tuner off, and
    leaves torch's thread count as configured."""
    torch.set_num_threads(2)
    prompts = ["Name three colours.", "What is the capital of France?"]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=1)
    monkeypatch.setattr(thread_tuner, "EXPLORE_EVERY", 2)
    llm = track(LLM(DEFAULT_MODEL_ID, dtype="bfloat16", quantization=quantization, quantized_max_rows=2))
    assert llm.engine.thread_tuner is not None

    def run():
        llm.engine.block_manager.reset_prefix_cache()  # both runs cold: a cached prompt rounds its first logits apart
        outs = [o.outputs[0] for o in llm.generate(prompts, params)]
        return [(o.token_ids, [e.logprob for e in o.logprobs]) for o in outs]

    tuned = run()
    snapshot = llm.engine.thread_tuner.snapshot()
    assert any(set(averages) == {1, 2} for averages in snapshot.values()), snapshot  # both counts ran
    assert torch.get_num_threads() == 2
    llm.engine.thread_tuner = None
    assert run() == tuned
