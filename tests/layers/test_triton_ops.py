"""The fused Triton kernels (layers/triton_ops.py) against the PyTorch code they replace on CUDA.

Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py) runs the very kernels on CPU
tensors. float32 and float16 only: the interpreter cannot do bfloat16 arithmetic. In float16 the
rotary kernel is bit-equal to PyTorch's ops; the norms' rounded value may differ by one ulp (the
fp32 sum of squares is reduced in another order); the activations use exp/erf from another math library than
PyTorch's CPU kernels (and on the GPU, another again), so a rounding can land one way or the
other: silu is held to bit equality on moderate inputs, the gelus to two ulps on few elements.
Inputs are strided views where the models pass views (the q/k heads of a packed qkv projection).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmserve.layers import fused, triton_ops
from lmserve.layers.moe import FusedExperts
from lmserve.layers.norm import GemmaRMSNorm, RMSNorm
from lmserve.layers.rotary import get_rope
from tests.support.cuda_engine_checks import ulps_apart
from tests.support.triton_dispatch import force_triton

# Far below zero e^-x overflows to inf (act = x / inf = -0, the right limit); numpy warns.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

@pytest.fixture(autouse=True)
def pytorch_reference(monkeypatch):
    """The layers' PyTorch ops are the reference here: half-type CPU tensors would otherwise take
    the C++ fused ops (tests/layers/test_cpu_fused_ops.py holds those to the same ops)."""
    monkeypatch.setattr(fused, "use_fused", lambda x: False)


ACTIVATIONS = {
    "silu": F.silu,
    "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"),
    "gelu": F.gelu,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hidden", [72, 200, 4096])
@pytest.mark.parametrize("norm_class", [RMSNorm, GemmaRMSNorm])
def test_rms_norm_matches_module(norm_class, hidden, dtype):
    g = torch.Generator().manual_seed(hidden)
    norm = norm_class(hidden, 1e-6)
    with torch.no_grad():
        mean = 0.0 if norm_class is GemmaRMSNorm else 1.0
        norm.weight.copy_(mean + 0.5 * torch.randn(hidden, generator=g))
    norm = norm.to(dtype)
    # A column slice of a wider activation: rows strided, as a split projection output is.
    wide = (3 * torch.randn(9, 3 * hidden, generator=g)).to(dtype)
    x = wide[:, hidden:2 * hidden]
    ref = norm(x)
    got = triton_ops.rms_norm(x, norm.weight, norm.eps, gemma=norm_class is GemmaRMSNorm)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    else:
        # A one-ulp flip of Llama's rounded normalized value is up to two ulps after the scale.
        apart = ulps_apart(ref, got)
        assert apart.max() <= (1 if norm_class is GemmaRMSNorm else 2) and (apart > 0).float().mean() <= 0.01
    # Leading dims are flattened: a [2, 3, hidden] input gives the same rows.
    x3 = x[:6].reshape(2, 3, hidden)
    assert torch.equal(triton_ops.rms_norm(x3, norm.weight, norm.eps, norm_class is GemmaRMSNorm),
                       got[:6].reshape(2, 3, hidden))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("norm_class", [RMSNorm, GemmaRMSNorm])
def test_add_and_norm_fused_equals_add_then_norm(norm_class, dtype):
    """The residual add in the norm's launch: the sum bit-equal to PyTorch's `x + delta` (one
    rounding of the fp32 sum), the norm of it as the plain kernel gives it."""
    hidden = 200
    g = torch.Generator().manual_seed(7)
    norm = norm_class(hidden, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(0.5 * torch.randn(hidden, generator=g) + (0.0 if norm_class is GemmaRMSNorm else 1.0))
    norm = norm.to(dtype)
    x = (3 * torch.randn(9, hidden, generator=g)).to(dtype)
    wide = torch.randn(9, 3 * hidden, generator=g).to(dtype)
    delta = wide[:, hidden:2 * hidden]  # a strided view, as an attention output slice may be
    total, normed = triton_ops.rms_norm(x, norm.weight, norm.eps, gemma=norm.gemma, delta=delta)
    assert torch.equal(total, x + delta)
    assert torch.equal(normed, triton_ops.rms_norm(x + delta, norm.weight, norm.eps, gemma=norm.gemma))
    # The module's CPU path is the reference: the same sum, the norm as close as the plain
    # kernel's is (test_rms_norm_matches_module: the fp32 sum of squares in another order).
    ref_total, ref_normed = norm.add_and_norm(x, delta)
    assert torch.equal(ref_total, total)
    if dtype == torch.float32:
        torch.testing.assert_close(normed, ref_normed, atol=1e-6, rtol=1e-6)
    else:
        assert ulps_apart(ref_normed, normed).max() <= 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("intermediate", [200, 1100])  # 1100: two column blocks, the second masked
def test_gated_act_matches_pytorch(activation, intermediate, dtype):
    g = torch.Generator().manual_seed(intermediate)
    rows = 6
    if dtype == torch.float32:
        gate = 3 * torch.randn(rows, intermediate, generator=g)
    else:
        # Moderate gates: far below zero 1 + tanh / 1 + erf cancel, and the libraries' last bits
        # decide the half-precision rounding.
        gate = torch.rand(rows, intermediate, generator=g) * 6.5 - 2.5
    up = torch.randn(rows, intermediate, generator=g)
    padded = torch.cat([gate, up, torch.randn(rows, 3)], dim=1).to(dtype)  # row stride 2I + 3
    gate_up = padded[:, :2 * intermediate]
    ref = ACTIVATIONS[activation](gate_up[:, :intermediate]) * gate_up[:, intermediate:]
    got = triton_ops.gated_act(gate_up, intermediate, activation)
    assert got.dtype == dtype and got.shape == (rows, intermediate)
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    elif activation == "silu":
        assert torch.equal(got, ref)
    else:
        apart = ulps_apart(ref, got)
        assert apart.max() <= 2 and (apart > 0).float().mean() <= 0.02


def test_gated_act_rounds_the_activation_before_the_product():
    """PyTorch materializes act(gate) in the dtype: the kernel rounds it there too, which differs
    from rounding the fp32 product once on many elements."""
    g = torch.Generator().manual_seed(7)
    gate_up = (torch.rand(8, 512, generator=g) * 6.5 - 2.5).to(torch.float16)
    got = triton_ops.gated_act(gate_up, 256, "silu")
    gate, up = gate_up.float().chunk(2, dim=-1)
    once = (F.silu(gate) * up).to(torch.float16)
    twice = (F.silu(gate).to(torch.float16).float() * up).to(torch.float16)
    # A few elements may flip on exp's last bit; rounding once would differ on many.
    assert (got != twice).sum() * 10 < (got != once).sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("style", ["neox", "interleaved"])
@pytest.mark.parametrize("head_dim, rotary_dim", [(64, 64), (64, 32), (24, 12)])
def test_rotary_matches_apply(head_dim, rotary_dim, style, dtype):
    g = torch.Generator().manual_seed(head_dim + rotary_dim)
    heads, kv_heads, t = 6, 2, 5
    rope = get_rope(head_dim, 256, 10000.0, rotary_dim=rotary_dim, style=style, dtype=dtype)
    # The q/k heads of a packed qkv projection, as models/llama.py rotates them.
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    x = qkv[:, :(heads + kv_heads) * head_dim].view(t, heads + kv_heads, head_dim)
    cos, sin = rope.lookup(torch.tensor([0, 3, 17, 100, 255]))
    ref = rope.apply(x, cos, sin)
    got = triton_ops.rotary(x, cos, sin, rotary_dim, style)
    assert got.is_contiguous() and got.dtype == ref.dtype
    assert torch.equal(got, ref)


def test_rotary_promotes_like_pytorch():
    """A float32 table (kept so, as DeepSeek's) with float16 activations: the products promote to
    float32 and the passed-through channels are widened, as PyTorch's mul and cat do."""
    rope = get_rope(32, 64, 10000.0, rotary_dim=16, style="interleaved", dtype=torch.float32)
    x = torch.randn(3, 4, 32).to(torch.float16)
    cos, sin = rope.lookup(torch.tensor([1, 9, 60]))
    ref = rope.apply(x, cos, sin)
    got = triton_ops.rotary(x, cos, sin, 16, "interleaved")
    assert got.dtype == ref.dtype == torch.float32
    assert torch.equal(got, ref)


def test_cpu_tensors_never_take_triton():
    assert not fused.use_triton(torch.zeros(2)) and not fused.use_triton(torch.zeros(2, dtype=torch.bfloat16))


def test_layers_dispatch_to_the_kernels(monkeypatch):
    """With the CUDA condition forced, every layer routes through its kernel (float16 MoE experts
    with gelu_tanh, a Gemma norm, rotary): same results as the PyTorch path."""
    g = torch.Generator().manual_seed(3)
    experts = FusedExperts(4, 32, 24, activation="gelu_pytorch_tanh")
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.3, generator=g)
        experts.down_proj.normal_(0, 0.3, generator=g)
    experts = experts.to(torch.float16)
    x = torch.randn(5, 32, generator=g).to(torch.float16)
    weights, ids = torch.rand(5, 2, generator=g).to(torch.float16), torch.tensor([[0, 1], [2, 3]] * 2 + [[1, 3]])
    norm = GemmaRMSNorm(32, 1e-6).to(torch.float16)
    rope = get_rope(16, 32, 10000.0, dtype=torch.float16)
    q = torch.randn(5, 2, 16, generator=g).to(torch.float16)
    cos, sin = rope.lookup(torch.arange(5))

    def run():
        return experts(x, weights, ids), norm(x), rope.apply(q, cos, sin)

    reference = run()
    calls = []
    for name in ("rms_norm", "gated_act", "rotary"):
        original = getattr(triton_ops, name)
        monkeypatch.setattr(triton_ops, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    force_triton(monkeypatch)
    got = run()
    assert {"rms_norm", "gated_act", "rotary"} <= set(calls)
    # The experts run as grouped GEMMs (layers/triton_moe.py): float32 accumulation and the
    # routing weight on the unrounded product, so near-zero outputs may differ by more ulps.
    torch.testing.assert_close(got[0], reference[0], atol=2e-3, rtol=2e-3)
    for ref, out in zip(reference[1:], got[1:]):
        apart = ulps_apart(ref, out)
        assert apart.max() <= 2


STEPS = 6


def test_model_on_the_fused_kernels_matches_the_pytorch_path(tmp_path, monkeypatch):
    """A whole model with the CUDA dispatch forced on CPU: the tiny GLM (partial interleaved rotary
    over the packed q/k views, Llama norms, silu) through chunked prefill, a prefix hit and
    decode. Same greedy tokens, logits within float32 reduction-order noise. (One family keeps
    the file fast; Gemma's norms and gelu, MoE experts: the tests above.)"""
    from tests.support.family_checkpoints import assert_same_greedy_run, build_glm_hf, serve_waves_greedy

    build_glm_hf(tmp_path)
    _, reference = serve_waves_greedy(tmp_path, STEPS)
    calls = set()
    for name in ("rms_norm", "gated_act", "rotary"):
        original = getattr(triton_ops, name)
        monkeypatch.setattr(triton_ops, name, lambda *a, _f=original, _n=name, **k: calls.add(_n) or _f(*a, **k))
    force_triton(monkeypatch)
    _, got = serve_waves_greedy(tmp_path, STEPS)
    assert calls == {"rms_norm", "gated_act", "rotary"}
    assert_same_greedy_run(reference, got, STEPS)


# Every kernel compiled for an H100 in bfloat16 (tests/support/sm90_compile.py says why).
_COMPILE_FOR_SM90 = """
from lmserve.layers import triton_ops as T

def ints(*names):
    return {name: "i32" for name in names}

for gemma in (False, True):
    for add in (False, True):
        compile_for_sm90(T._rms_norm_kernel, {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16",
                         "delta_ptr": "*bf16", "sum_ptr": "*bf16",
                         **ints("stride_x", "stride_out", "stride_delta", "stride_sum", "n_cols"), "eps": "fp32"},
                         {"GEMMA": gemma, "ADD": add, "BLOCK": 4096}, num_warps=8)
for code in (0, 1, 2):
    compile_for_sm90(T._gated_act_kernel, {"gate_up_ptr": "*bf16", "out_ptr": "*bf16",
                     **ints("stride_in", "stride_out", "n_cols")}, {"ACTIVATION": code, "BLOCK": 1024})
for dt, head_dim, half, interleaved in (("bf16", 128, 64, False), ("bf16", 128, 32, True), ("fp32", 64, 32, True)):
    compile_for_sm90(T._rotary_kernel, {"x_ptr": "*" + dt, "cos_ptr": "*" + dt, "sin_ptr": "*" + dt,
                     "out_ptr": "*" + dt, **ints("stride_xt", "stride_xh", "stride_cos", "stride_sin", "num_heads")},
                     {"HEAD_DIM": head_dim, "HALF": half, "INTERLEAVED": interleaved, "BLOCK_H": 32,
                      "BLOCK_HALF": half, "BLOCK_REST": max(head_dim - 2 * half, 1)}, enable_fp_fusion=False)
"""


def test_kernels_compile_for_sm90_in_bfloat16(tmp_path):
    from tests.support.sm90_compile import compile_for_sm90_in_child

    compile_for_sm90_in_child(_COMPILE_FOR_SM90, tmp_path)


def test_device_check_of_the_fused_ops_runs_here():
    """tests/support/cuda_engine_checks.py's check (bf16, CUDA graph, kernel count on a GPU) in its CPU form:
    float16 under the interpreter, so the script a device run calls cannot rot unseen."""
    from tests.support.cuda_engine_checks import check_fused_ops

    results = check_fused_ops("cpu", torch.float16, kernels=triton_ops)
    assert results["fused_rotary_max_ulps"] == 0
