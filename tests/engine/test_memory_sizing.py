"""KV cache sizing on a GPU (engine/memory.py): the arithmetic on plain numbers, the option's
validation, and the profiling step itself, run through the real model on CPU."""

from __future__ import annotations

import pytest

from lmserve import LLM, SamplingParams
from lmserve.engine.kv_sizing import profile_step
from lmserve.engine.memory import (
    GiB,
    MemoryReading,
    blocks_for,
    kv_cache_blocks,
    kv_cache_bytes,
    peak_in_use,
    profile_sequence_lengths,
)
from lmserve.engine.model_runner import ModelRunner
from lmserve.engine.options import EngineConfig, check_utilization
from lmserve.models.loader import DEFAULT_MODEL_ID

MiB = 1 << 20


def test_peak_in_use_adds_what_torch_does_not_hold_and_drops_the_profile_cache():
    # 80 GiB device: 15 GiB of weights live, the step peaked at 15 + 0.25 (its cache) + 2 GiB,
    # and the driver reports 16 GiB used afterwards: 1 GiB is not torch's (context, workspaces).
    reading = MemoryReading(total=80 * GiB, free=64 * GiB, torch_allocated=15 * GiB,
                            torch_peak=15 * GiB + 256 * MiB + 2 * GiB, profile_kv=256 * MiB)
    assert peak_in_use(reading) == 15 * GiB + 2 * GiB + 1 * GiB
    # Another process holding 10 GiB of the device counts against the fraction too.
    shared = MemoryReading(total=80 * GiB, free=54 * GiB, torch_allocated=15 * GiB,
                           torch_peak=17 * GiB, profile_kv=0)
    assert peak_in_use(shared) == 17 * GiB + 11 * GiB
    # The driver can report a little less in use than torch holds (rounding): never negative.
    odd = MemoryReading(total=8 * GiB, free=7 * GiB, torch_allocated=GiB + MiB, torch_peak=2 * GiB, profile_kv=0)
    assert peak_in_use(odd) == 2 * GiB


def test_kv_cache_gets_the_rest_of_the_fraction():
    assert kv_cache_bytes(80 * GiB, 0.9, 18 * GiB) == int(80 * GiB * 0.9) - 18 * GiB
    assert kv_cache_bytes(80 * GiB, 1.0, 18 * GiB) == 62 * GiB
    budget = kv_cache_bytes(141 * GiB, 0.5, 20 * GiB)
    assert budget == int(141 * GiB * 0.5) - 20 * GiB
    # An 8B Llama in bf16: 32 layers x 8 KV heads x 128 dims x 2 (K, V) x 2 bytes x 16 tokens.
    per_block = 32 * 8 * 128 * 2 * 2 * 16
    assert kv_cache_blocks(62 * GiB, per_block, 0.9) == 62 * GiB // per_block == 31744


@pytest.mark.parametrize("total, utilization, in_use", [(80 * GiB, 0.9, 72 * GiB), (80 * GiB, 0.2, 30 * GiB),
                                                        (24 * GiB, 0.9, 40 * GiB)])
def test_no_room_for_the_cache_names_the_option_and_the_numbers(total, utilization, in_use):
    with pytest.raises(ValueError, match="gpu_memory_utilization") as err:
        kv_cache_bytes(total, utilization, in_use)
    message = str(err.value)
    assert f"{in_use / GiB:.2f} GiB" in message and f"of {total / GiB:.2f} GiB" in message
    assert "leaves none for the KV cache" in message


def test_less_than_one_block_is_an_error():
    assert kv_cache_blocks(3 * MiB, MiB, 0.9) == 3
    with pytest.raises(ValueError, match="less than one block"):
        kv_cache_blocks(MiB - 1, MiB, 0.9)


@pytest.mark.parametrize("value", [0, 0.0, -0.5, 1.01, 2, True, "0.9", None, float("nan")])
def test_utilization_outside_zero_to_one_is_refused(value):
    with pytest.raises(ValueError, match=r"gpu_memory_utilization must be a fraction in \(0, 1\]"):
        check_utilization(value)


@pytest.mark.parametrize("value", [0, -0.5, 1.01, True, "0.9", float("nan")])
def test_llm_keyword_utilization_outside_zero_to_one_is_refused(value):
    """The check guards the LLM(...) keyword path (the config file's text goes through pydantic)."""
    with pytest.raises(ValueError, match=r"gpu_memory_utilization must be a fraction in \(0, 1\]"):
        EngineConfig.from_options(gpu_memory_utilization=value)


def test_utilization_inside_zero_to_one_is_kept():
    assert check_utilization(1) == 1.0 and check_utilization(0.05) == 0.05


def test_profile_step_lengths_fill_the_token_budget_within_the_context():
    assert profile_sequence_lengths(2048, 8192) == [2048]
    assert profile_sequence_lengths(2048, 2049) == [2048]
    assert profile_sequence_lengths(2048, 2048) == [2047, 1]  # a sequence leaves room for one new token
    assert profile_sequence_lengths(1000, 301) == [300, 300, 300, 100]
    assert blocks_for([2048], 16) == 128 and blocks_for([300, 300, 300, 100], 16) == 19 * 3 + 7


def test_a_bad_utilization_fails_before_anything_loads():
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        LLM(DEFAULT_MODEL_ID, gpu_memory_utilization=0.0)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        LLM(DEFAULT_MODEL_ID, gpu_memory_utilization=1.5)


def test_the_profiling_step_runs_through_the_real_model_beside_a_serving_engine(make_llm):
    # What a GPU runs before sizing its cache, here on CPU: the full token budget through the model
    # (three prefills, since this context is shorter than the budget) with its own temporary
    # cache, then the sampler over max_num_seqs rows. The engine's own cache and blocks are
    # untouched, and it still generates.
    llm = make_llm(max_num_batched_tokens=300, max_num_seqs=8, max_model_len=128, num_kv_blocks=32)
    engine, cfg = llm.engine, llm.engine.engine_config
    per_block = ModelRunner.kv_bytes_per_block(engine.model, cfg.block_size, engine.dtype)
    before = [part.clone() for part in engine.runner.kv_caches[0]]
    assert profile_sequence_lengths(300, 128) == [127, 127, 46]
    assert profile_step(cfg, engine.executor, engine.model_config, engine.dtype, engine.device,
                        engine.max_model_len) == blocks_for([127, 127, 46], cfg.block_size) * per_block
    assert all(a.equal(b) for a, b in zip(before, engine.runner.kv_caches[0]))
    assert engine.num_free_blocks == engine.num_blocks
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=4, temperature=0.0))[0].outputs[0]
    assert len(out.token_ids) == 4
