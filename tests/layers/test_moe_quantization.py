"""MoE experts under weight-only int8 / int4 (layers/moe.py through the quantization seam): each
expert's gate_up and down weights are quantized once loaded and the routed dispatch multiplies
with them; the result is the dense dispatch over the quantized grids' own values."""

from __future__ import annotations

import pytest
import torch

from lmserve.layers.moe import FusedExperts
from lmserve.layers.quantization.int4_kernel import KERNEL_DTYPE
from lmserve.layers.quantization.weight_only import WeightOnlyExpertsMethod, int4_grid_of
from tests.support.family_checkpoints import build_qwen2_moe, serve_waves_greedy


def _grid_values(w: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "int4":
        return int4_grid_of(w.float()).dequantize()
    scale = (w.float().abs().amax(dim=1) / 127.0).clamp(min=1e-12).to(KERNEL_DTYPE).float()
    return torch.round(w.float() / scale[:, None]).clamp(-127, 127) * scale[:, None]


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_experts_compute_the_dense_dispatch_of_their_grids(kind):
    torch.manual_seed(0)
    experts = FusedExperts(num_experts=4, hidden=64, intermediate=32)
    reference = FusedExperts(num_experts=4, hidden=64, intermediate=32)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.1)
        experts.down_proj.normal_(0, 0.1)
        for name in ("gate_up_proj", "down_proj"):
            stacked = getattr(experts, name)
            getattr(reference, name).copy_(torch.stack([_grid_values(stacked[e], kind) for e in range(4)]))
    assert WeightOnlyExpertsMethod.refusal(kind, experts) is None
    experts.quant_method = WeightOnlyExpertsMethod(kind)
    experts.quant_method.process_weights_after_loading(experts)
    assert experts.gate_up_proj.numel() == 0 and experts.down_proj.numel() == 0  # the dense weights are freed
    x = torch.randn(7, 64)
    ids = torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0], [0, 2], [1, 3], [2, 0]])
    weights = torch.rand(7, 2)
    got = experts(x, weights, ids)
    # The kernels take bf16 activations (and return bf16): compare with the same input rounding.
    expected = reference(x.to(KERNEL_DTYPE).float(), weights, ids)
    assert float((got - expected).norm() / expected.norm()) < 2e-2


def test_a_moe_model_loads_with_int8_experts(tmp_path):
    build_qwen2_moe(tmp_path)
    _, dense = serve_waves_greedy(tmp_path, 4)
    engine, got = serve_waves_greedy(tmp_path, 4, quantization="int8")
    moe = [m for m in engine.model.modules() if isinstance(m, FusedExperts)]
    assert moe and all(isinstance(m.quant_method, WeightOnlyExpertsMethod) for m in moe)
    for (_, ref_logits), (_, logits) in zip(dense, got, strict=True):
        rel = (logits[0] - ref_logits[0]).norm() / ref_logits[0].norm()
        assert rel < 0.03  # int8 per channel on every projection (int4: ~20% on these random weights)
