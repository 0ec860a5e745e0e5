"""The fused-MoE Triton path (layers/triton_moe.py) against FusedExperts' eager path, on CPU under
Triton's interpreter (tests/conftest.py sets it): the expert alignment, the two grouped GEMMs at
decode-sized and prefill-sized batches, whole tiny Qwen2-MoE and DeepSeek-V2 checkpoints with the
CUDA dispatch forced, and the kernel compiled for sm_90."""

from __future__ import annotations

import pytest
import torch

from lmserve.layers import triton_moe
from lmserve.layers.moe import FusedExperts
from tests.support.triton_dispatch import force_triton


def test_align_groups_every_pair_once_by_expert():
    g = torch.Generator().manual_seed(0)
    experts, k, block = 6, 3, 4
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(11)])
    ids[:5, 0] = 2  # one expert with more pairs than a block
    sorted_pairs, block_experts, num_rows = triton_moe.align_by_expert(ids, experts, block)
    n = ids.numel()
    rows = int(num_rows)
    assert rows % block == 0 and sorted_pairs.numel() >= rows and rows <= n + experts * (block - 1)
    assert (sorted_pairs[rows:] == n).all(), "rows past the padded total are padding"
    valid = sorted_pairs[:rows][sorted_pairs[:rows] < n]
    assert sorted(valid.tolist()) == list(range(n)), "every (token, slot) pair exactly once"
    flat = ids.reshape(-1)
    for b in range(rows // block):
        pairs = sorted_pairs[b * block:(b + 1) * block]
        pairs = pairs[pairs < n]
        assert len(pairs) and (flat[pairs] == block_experts[b]).all(), "a block holds one expert's pairs"
        assert pairs.tolist() == sorted(pairs.tolist()), "stable: a run keeps token order"


def _experts(num_experts: int, hidden: int, intermediate: int, activation: str, dtype, seed: int) -> FusedExperts:
    g = torch.Generator().manual_seed(seed)
    experts = FusedExperts(num_experts, hidden, intermediate, activation)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, hidden**-0.5, generator=g)
        experts.down_proj.normal_(0, intermediate**-0.5, generator=g)
    return experts.to(dtype)


def _routing(tokens: int, num_experts: int, k: int, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, num_experts, generator=g)
    weights, ids = scores.topk(k, dim=-1)
    return weights.to(dtype), ids


# tokens, experts, k, hidden, intermediate, activation: decode-sized (16-row blocks, most
# experts idle), prefill-sized (64-row blocks), sizes that are no tile's multiple, gelu_tanh.
CASES = [(3, 8, 2, 64, 48, "silu"), (150, 8, 3, 72, 40, "silu"), (40, 5, 2, 24, 20, "gelu_pytorch_tanh")]


@pytest.mark.parametrize("tokens, num_experts, k, hidden, intermediate, activation", CASES,
                         ids=["decode", "prefill", "odd-sizes"])
def test_fused_experts_match_the_eager_path(tokens, num_experts, k, hidden, intermediate, activation):
    experts = _experts(num_experts, hidden, intermediate, activation, torch.float32, 1)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(2))
    # DeepSeek keeps its routing weights in float32 whatever the activations' dtype.
    weights, ids = _routing(tokens, num_experts, k, torch.float32, 3)
    ref = experts(x, weights, ids)
    got = triton_moe.fused_experts(x, experts.gate_up_proj, experts.down_proj, weights, ids, experts.act_kind)
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)


def test_fused_experts_in_half_precision_within_rounding():
    experts = _experts(8, 64, 32, "silu", torch.float16, 4)
    x = torch.randn(20, 64, generator=torch.Generator().manual_seed(5)).to(torch.float16)
    weights, ids = _routing(20, 8, 2, torch.float16, 6)
    ref = experts(x, weights, ids)
    got = triton_moe.fused_experts(x, experts.gate_up_proj, experts.down_proj, weights, ids, experts.act_kind)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-3, rtol=2e-3)


def test_no_tokens():
    experts = _experts(4, 16, 16, "silu", torch.float32, 0)
    x = torch.zeros(0, 16)
    out = triton_moe.fused_experts(x, experts.gate_up_proj, experts.down_proj, torch.zeros(0, 2),
                                   torch.zeros(0, 2, dtype=torch.int64), "silu")
    assert out.shape == (0, 16)


STEPS = 6


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v2"])
def test_moe_model_on_the_fused_kernel_matches_the_eager_path(family, tmp_path, monkeypatch):
    """The tiny Qwen2-MoE (shared expert with its gate, a dense layer) and DeepSeek-V2 (grouped
    routing, routed scaling, shared experts) checkpoints with the CUDA dispatch forced: every MoE
    layer runs the grouped GEMMs; the same greedy tokens as the eager experts, logits within
    float32 reduction-order noise, through chunked prefill, a prefix hit and decode."""
    from tests.support import family_checkpoints
    from tests.support.family_checkpoints import assert_same_greedy_run, serve_waves_greedy

    getattr(family_checkpoints, f"build_{family}")(tmp_path)
    _, reference = serve_waves_greedy(tmp_path, STEPS)
    calls = []
    original = triton_moe.fused_experts
    monkeypatch.setattr(triton_moe, "fused_experts", lambda *a, **k: calls.append(1) or original(*a, **k))
    force_triton(monkeypatch)
    _, got = serve_waves_greedy(tmp_path, STEPS)
    assert calls, "the MoE layers took the fused kernel"
    assert_same_greedy_run(reference, got, STEPS)


_COMPILE_FOR_SM90 = """
from lmserve.layers import triton_moe as M

for dt in ("bf16", "fp32"):
    for pairs in (6, 4096):
        cfg = M._config(pairs, 64)
        meta = {name: cfg.pop(name) for name in ("num_warps", "num_stages")}
        for div, weighted in ((6, False), (1, True)):
            constexprs = {"A_ROWS_PER_PAIR_DIV": div, "MUL_WEIGHT": weighted,
                          "PRECISION": "ieee" if dt == "fp32" else "tf32", **cfg}
            sig = {"a_ptr": "*" + dt, "b_ptr": "*" + dt, "c_ptr": "*" + dt, "weights_ptr": "*fp32",
                   "sorted_pairs_ptr": "*i64", "block_experts_ptr": "*i64", "num_rows_ptr": "*i64",
                   **{n: "i32" for n in ("N", "K", "num_pairs", "stride_am", "stride_be", "stride_bn", "stride_cm")},
                   **{n: "constexpr" for n in constexprs}}
            kernel = triton.compile(ASTSource(fn=M._grouped_gemm_kernel, signature=sig, constexprs=constexprs),
                                    target=GPUTarget("cuda", 90, 32), options=meta)
            # Shared memory is checked only at launch: an H100/H200 block may use up to 227 KiB.
            assert kernel.asm["ptx"] and kernel.metadata.shared <= 227 * 1024, (dt, pairs, kernel.metadata.shared)
"""


def test_grouped_gemm_compiles_for_sm90(tmp_path):
    from tests.support.sm90_compile import compile_for_sm90_in_child

    compile_for_sm90_in_child(_COMPILE_FOR_SM90, tmp_path)
