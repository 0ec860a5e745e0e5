"""GPTQ and AWQ int4 checkpoints (written by tests/support/int4_checkpoints.py from the formats' layouts,
not from our loader) serve what a dense model of the same dequantized weights serves.

Tolerance: the int4 kernel takes bf16 activations and reads each group's scale and zero in bf16
(rounding fp16 scales by up to 2^-9 relative), so the float32 logits agree with the dense float32
reference to ATOL (measured: up to ~4e-2 by the last steps on these tiny widened models). The
greedy tokens agree over 32 steps, except that a request may take the other token where the
reference's best two are within TIE of each other (a tie at this precision: these random
models' logits are close together); its later steps are then not comparable.
"""

from __future__ import annotations

import pytest
import torch

from lmserve.errors import CheckpointError
from lmserve.layers.quantization.gptq import GPTQLinearMethod
from tests.support.family_checkpoints import STEPS, build_llama, build_qwen2, serve_waves_greedy
from tests.support.int4_checkpoints import write_int4_pair

ATOL = 5e-2
TIE = 1e-1

CASES = {
    "llama-gptq-g32-asym": (build_llama, "gptq", dict(group=32)),
    "llama-gptq-g32-sym-desc_act": (build_llama, "gptq", dict(group=32, sym=True, desc_act=True)),
    "qwen2-gptq-per-channel": (lambda d: build_qwen2(d, yarn=False), "gptq", dict(group=-1)),
    "qwen2-awq-g64": (lambda d: build_qwen2(d, yarn=False), "awq", dict(group=64)),
}


def _same_greedy(reference, got, atol=ATOL, steps=STEPS) -> int:
    """Logits within atol and tokens equal up to near ties; returns the steps compared."""
    compared = 0
    for (ref_tokens, ref_logits), (tokens, logits) in zip(reference, got, strict=True):
        assert len(tokens) == steps
        for step, (ref_row, row) in enumerate(zip(ref_logits, logits)):
            torch.testing.assert_close(row, ref_row, atol=atol, rtol=0)
            compared += 1
            if tokens[step] != ref_tokens[step]:
                top2 = ref_row.topk(2).values
                assert float(top2[0] - top2[1]) < TIE, f"step {step}: a clear winner differs"
                break
    return compared


@pytest.mark.parametrize("case", CASES, ids=str)
def test_int4_checkpoint_matches_its_dequantized_dense_model(case, tmp_path):
    build, fmt, options = CASES[case]
    build(tmp_path / "dense")
    write_int4_pair(tmp_path / "dense", tmp_path / "q", tmp_path / "ref", fmt, **options)
    _, reference = serve_waves_greedy(tmp_path / "ref", STEPS)
    engine, got = serve_waves_greedy(tmp_path / "q", STEPS)
    layers = [m for m in engine.model.modules() if isinstance(getattr(m, "quant_method", None), GPTQLinearMethod)]
    assert len(layers) == 4 * 3  # qkv, o, gate_up, down in every layer
    assert _same_greedy(reference, got) >= 0.5 * STEPS * len(reference)


def test_a_3_bit_gptq_checkpoint_fails_at_load_in_one_line(tmp_path):
    build_llama(tmp_path / "dense")
    write_int4_pair(tmp_path / "dense", tmp_path / "q", tmp_path / "ref", "gptq")
    import json

    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 3
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    from lmserve.engine.llm_engine import LLMEngine

    with pytest.raises(CheckpointError, match="gptq: 3-bit checkpoints are not supported") as e:
        LLMEngine(str(tmp_path / "q"), dtype="float32", num_kv_blocks=8)
    assert "\n" not in str(e.value)


def test_gptq_desc_act_at_tp2_matches_one_rank(tmp_path):
    """Tensor parallelism slices the packed tensors as it slices a dense weight: column-parallel
    layers their output columns (qweight's n side, qzeros by 8 columns), row-parallel ones their
    input rows (qweight by 8 rows, g_idx), keeping every group's scales under desc_act. The
    kernel's partial sums are all-reduced per rank, and where the VNNI kernel runs it rounds the
    activations to int8 per block of 32 while a slice it cannot take runs the exact dequantized
    product: logits agree to ~5e-2 (~1e-2 with torch's bf16 kernel)."""
    build_qwen2(tmp_path / "dense", yarn=False)
    write_int4_pair(tmp_path / "dense", tmp_path / "q", tmp_path / "ref", "gptq", group=32, desc_act=True)
    _, reference = serve_waves_greedy(tmp_path / "q", 6)
    engine, got = serve_waves_greedy(tmp_path / "q", 6, tensor_parallel_size=2)
    try:
        assert engine.executor.group.size == 2
        for (ref_tokens, ref_logits), (tokens, logits) in zip(reference, got, strict=True):
            for step, (ref_row, row) in enumerate(zip(ref_logits, logits)):
                torch.testing.assert_close(row, ref_row, atol=6e-2, rtol=0)
                if tokens[step] != ref_tokens[step]:
                    top2 = ref_row.topk(2).values
                    assert float(top2[0] - top2[1]) < 0.12, f"step {step}: a clear winner differs"
                    break
    finally:
        engine.shutdown()
