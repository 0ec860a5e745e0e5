"""CPU graphs (engine/cpu_graphs.py): decode steps replayed from recorded operator calls must give
what the eager forward gives, bit for bit, and anything a recording cannot repeat must stay eager.

The family parity test (tests/models/test_family_parity.py) also checks that replayed steps were
among those it compared with transformers, for every dense family.
"""

from __future__ import annotations

import pytest
import torch

from lmserve import SamplingParams
from lmserve.engine import cpu_graphs
from lmserve.engine.cpu_graphs import CpuDecodeGraphs, NotRecordable, OpRecorder

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "def fibonacci(n):",
           "List three colours."]  # four: a size of the ladder, so no padding rows


def _generate(llm, on: bool, prompts=PROMPTS, tokens: int = 12):
    graphs = llm.engine.runner.cpu_graphs
    graphs.enabled = on
    # Cold prompts every time: a cached one would start decoding from its last prompt token, through
    # the decode kernel instead of the prefill's attention (equal within rounding, not bit for bit).
    llm.engine.block_manager.reset_prefix_cache()
    try:
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, logprobs=3)
        outs = llm.generate([llm.engine.encode(p) for p in prompts], params)
    finally:
        graphs.enabled = True
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


def _replay(fn, record_args, replay_args):
    """fn recorded on record_args; then, once the inputs hold replay_args' values, its replay and
    its eager result on them."""
    with torch.inference_mode():
        recorder = OpRecorder()
        with recorder:
            out = fn(*record_args)
        program, value = recorder.program(out)
        for buffer, new in zip(record_args, replay_args):
            buffer.copy_(new)
        return program.run(value), fn(*record_args)


@pytest.mark.parametrize("quantization", ["int4", "none"])
def test_replayed_decode_equals_eager_on_the_bundled_model(make_llm, quantization):
    """The serving default (bf16 with int4 products, fused ops, the Q8_0 head) and plain bf16: four
    sequences of different lengths, tokens and top logprobs identical with the graphs on and off."""
    llm = make_llm(dtype="bfloat16", quantization=quantization, num_kv_blocks=64)
    graphs = llm.engine.runner.cpu_graphs
    assert isinstance(graphs, CpuDecodeGraphs)
    eager = _generate(llm, False)
    assert graphs.steps == 0
    replayed = _generate(llm, True)
    assert graphs.state[4] == CpuDecodeGraphs.REPLAY
    assert graphs.steps >= 1  # after WARM_STEPS eager steps, a recorded and a validated one
    assert replayed == eager
    # A batch of one, recorded on its own, on the same engine.
    assert _generate(llm, True, PROMPTS[:1], 8) == _generate(llm, False, PROMPTS[:1], 8)
    assert graphs.state[1] == CpuDecodeGraphs.REPLAY
    # Three sequences replay the recording of four, the last row padding (scratch block): the same
    # tokens; the logprobs within float rounding, since the products see four rows instead of three.
    steps = graphs.steps
    padded, alone = _generate(llm, True, PROMPTS[:3]), _generate(llm, False, PROMPTS[:3])
    assert graphs.steps > steps and 3 not in graphs.state
    for (tokens, logprobs), (eager_tokens, eager_logprobs) in zip(padded, alone):
        assert tokens == eager_tokens
        torch.testing.assert_close([lp.logprob for lp in logprobs], [lp.logprob for lp in eager_logprobs],
                                   rtol=1e-3, atol=1e-3)


def _eager_and_replayed_with(llm, wrap, prompts, caplog):
    """Tokens with the graphs off, then on, while the LM head is `wrap(the model's own)`."""
    model = llm.engine.runner.model
    model.compute_logits = wrap(model.compute_logits)
    try:
        eager = _generate(llm, False, prompts, 8)
        with caplog.at_level("WARNING", logger="lmserve.engine"):
            replayed = _generate(llm, True, prompts, 8)
    finally:
        del model.compute_logits
    return eager, replayed


def test_a_value_baked_into_the_recording_keeps_that_size_eager(make_llm, caplog):
    """A forward that reads a value on the host and feeds it back as a constant records fine but
    replays stale: the validating step sees the difference, and the size stays eager."""
    llm = make_llm(num_kv_blocks=64)
    honest = _generate(llm, False, PROMPTS[:2], 8)
    # A host read (tolist) turned back into a tensor: frozen by a recording.
    eager, replayed = _eager_and_replayed_with(
        llm, lambda head: lambda h: head(h) + torch.tensor(h[:, 0].tolist()).unsqueeze(1) * 0.5, PROMPTS[:2], caplog)
    graphs = llm.engine.runner.cpu_graphs
    assert graphs.state[2] == CpuDecodeGraphs.EAGER and graphs.steps == 0
    assert "differs from the eager forward" in caplog.text
    assert replayed == eager != honest


def test_a_recording_that_reads_the_host_turns_the_graphs_off(make_llm, caplog):
    """A forward that reads a Python number from a tensor cannot be recorded: the graphs go off for
    every size, with the reason logged, and the tokens are the eager ones."""
    llm = make_llm(num_kv_blocks=64)
    eager, replayed = _eager_and_replayed_with(
        llm, lambda head: lambda h: head(h) * (1.0 if float(h.abs().sum()) > 0 else 2.0), PROMPTS[:1], caplog)
    graphs = llm.engine.runner.cpu_graphs
    assert "value read on the host" in graphs.failed and "CPU graphs: off" in caplog.text
    assert replayed == eager and graphs.steps == 0
    assert _generate(llm, True, PROMPTS[1:], 8) and graphs.steps == 0  # other sizes stay eager too


def test_moe_models_decode_eager(tmp_path):
    """MoE layers read their expert counts on the host: no graphs for them."""
    from lmserve.engine.llm_engine import LLMEngine
    from tests.support.family_checkpoints import build_qwen2_moe

    build_qwen2_moe(tmp_path)
    engine = LLMEngine(str(tmp_path), dtype="float32", num_kv_blocks=16)
    assert engine.runner.cpu_graphs is None
    assert "MoE" in cpu_graphs.unsupported_reason(engine.runner.model)


def test_replay_handles_list_returns_optional_lists_numbers_and_in_place_ops():
    def fn(x, idx):
        a, b = x.chunk(2, dim=-1)  # one Tensor[] return
        picked = a[idx]  # aten.index: a Tensor?[] argument holding an earlier result
        scaled = idx * 2.5  # an int tensor times a Python float: float32 (a wrapped number), not float64
        total = picked.sum(0)
        total.mul_(3)  # in place on an intermediate
        return torch.cat([picked * scaled.unsqueeze(1), b[: idx.shape[0]]], dim=1) + total.repeat(2)

    replayed, eager = _replay(fn, (torch.randn(6, 8), torch.tensor([4, 1, 3])),
                              (torch.randn(6, 8), torch.tensor([0, 5, 2])))
    assert replayed.dtype == torch.float32 and replayed.shape == (3, 8)
    torch.testing.assert_close(replayed, eager, rtol=0, atol=0)


def test_a_python_number_read_back_is_refused():
    def fn(x):
        return x * float(x.sum())  # .item(): the recording would freeze it

    with torch.inference_mode(), pytest.raises(NotRecordable, match="value read on the host"), OpRecorder():
        fn(torch.ones(3))
