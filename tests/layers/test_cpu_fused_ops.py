"""The C++ fused ops (layers/cpu_fused_ops.py) against the PyTorch ops they replace on the CPU.

In bfloat16 every op is held to bit equality with the PyTorch modules (measured: the norms' float32
sum of squares reduced in another order never moved a bf16 rounding on these inputs; should it, the
device check's tolerances below are the fallback). float16 keeps the Triton test's allowances.
Then the dispatch: half-type CPU tensors take the fused ops, float32 and LMSERVE_FUSED_OPS=0 do not,
and the bundled model gives the same greedy tokens with and without them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmserve.layers import cpu_fused_ops, fused
from lmserve.layers.activation import get_activation
from lmserve.layers.norm import GemmaRMSNorm, RMSNorm
from lmserve.layers.rotary import get_rope
from tests.support.cuda_engine_checks import check_fused_ops, ulps_apart


def test_the_kernels_build_here():
    """CI installs the compiler (.ci/compiler.sh): a build failure fails here, loudly."""
    assert cpu_fused_ops.available(), cpu_fused_ops._KERNELS.unavailable_reason()


@pytest.fixture
def pytorch_path(monkeypatch):
    """A function running `fn` with the layers on their PyTorch ops."""
    def run(fn):
        with monkeypatch.context() as m:
            m.setattr(fused, "use_fused", lambda x: False)
            return fn()
    return run


def test_device_check_holds_in_bfloat16_bit_for_bit():
    """tests/support/cuda_engine_checks.py's comparison on Llama-3-8B shapes (strided rows, the
    packed q/k views, the three activations), with our CPU kernels in bf16."""
    results = check_fused_ops("cpu", torch.bfloat16, kernels=cpu_fused_ops)
    assert {k: v for k, v in results.items() if v} == {}, "every op bit-equal to PyTorch's"


def test_device_check_holds_in_float16():
    check_fused_ops("cpu", torch.float16, kernels=cpu_fused_ops)  # asserts its own allowances


@pytest.mark.parametrize("style,rotary_dim", [("neox", 64), ("interleaved", 64), ("interleaved", 32), ("neox", 48)])
@pytest.mark.parametrize("table_dtype", [torch.bfloat16, torch.float32])
def test_rotary_partial_interleaved_and_promoting(pytorch_path, style, rotary_dim, table_dtype):
    """Partial rotation passes the other channels through; a float32 table (kept so, as DeepSeek's)
    promotes the result to float32, as PyTorch's mul and cat do."""
    rope = get_rope(64, 256, 10000.0, rotary_dim=rotary_dim, style=style, dtype=table_dtype, keep_dtype=True)
    qkv = torch.randn(5, 12 * 64).to(torch.bfloat16)
    x = qkv[:, :8 * 64].view(5, 8, 64)  # strided: a slice of a packed projection
    cos, sin = rope.lookup(torch.tensor([0, 3, 77, 200, 255]))
    ref = pytorch_path(lambda: rope.apply(x, cos, sin))
    got = rope.apply(x, cos, sin)
    assert got.dtype == ref.dtype and got.is_contiguous()
    assert torch.equal(got, ref)


@pytest.mark.parametrize("norm_class", [RMSNorm, GemmaRMSNorm])
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])
def test_norms_with_leading_dims_and_float32_weights(pytorch_path, norm_class, weight_dtype):
    norm = norm_class(200, 1e-6)
    with torch.no_grad():
        norm.weight.normal_(1.0 if norm_class is RMSNorm else 0.0, 0.4)
    norm = norm.to(weight_dtype)
    x = (3 * torch.randn(2, 3, 200)).to(torch.bfloat16)
    delta = torch.randn(2, 3, 200).to(torch.bfloat16)
    for ref, got in zip(pytorch_path(lambda: (norm(x), *norm.add_and_norm(x, delta))),
                        (norm(x), *norm.add_and_norm(x, delta))):
        assert got.dtype == ref.dtype and got.shape == ref.shape
        assert ulps_apart(ref, got).max() <= 1


@pytest.mark.parametrize("act", ["silu", "gelu_tanh", "gelu"])
def test_gated_activation_over_3d_rows(act):
    """act(gate) * up as GatedMLP computes it, over [2, 7, 2 * 96] (leading dims flattened)."""
    gate_up = (torch.rand(2, 7, 192) * 8 - 4).to(torch.bfloat16)
    ref = get_activation(act)(gate_up[..., :96]) * gate_up[..., 96:]
    got = cpu_fused_ops.gated_act(gate_up, 96, act)
    assert got.shape == ref.shape
    # gelu's erf/tanh come from libm here and PyTorch's own vector code there: a rounding of
    # act(gate) may land one way or the other (two ulps after the product), as for Triton's.
    apart = ulps_apart(ref, got)
    assert apart.max() <= (1 if act == "silu" else 2) and (apart > 0).float().mean() <= 0.01


def test_silu_over_the_whole_range():
    """The vectorized bf16 silu (AVX512: its own exp) against PyTorch's from -1e4 to 1e4: overflow
    to -0, underflow to x, infinities and NaN as PyTorch gives them."""
    gate = torch.cat([torch.linspace(-120, 120, 4001), torch.tensor([-1e4, 1e4, float("inf"), -float("inf"),
                                                                      float("nan"), 0.0, -0.0] * 3)])
    gate_up = torch.cat([gate, torch.full_like(gate, 1.5)]).to(torch.bfloat16)[None]
    ref = F.silu(gate_up[:, :gate.numel()]) * gate_up[:, gate.numel():]
    got = cpu_fused_ops.gated_act(gate_up, gate.numel(), "silu")
    assert torch.equal(got.isnan(), ref.isnan())
    apart = ulps_apart(ref.nan_to_num(), got.nan_to_num())
    assert apart.max() <= 1 and (apart > 0).float().mean() <= 0.001
    assert torch.equal(got[0, -17:].nan_to_num().signbit(), ref[0, -17:].nan_to_num().signbit())


def test_dispatch_by_dtype_and_switch(monkeypatch):
    assert fused.use_fused(torch.zeros(2, dtype=torch.bfloat16))
    assert fused.use_fused(torch.zeros(2, dtype=torch.float16))
    assert not fused.use_fused(torch.zeros(2)), "float32 keeps the reference ops"
    assert fused.ops(torch.zeros(2, dtype=torch.bfloat16)) is cpu_fused_ops
    monkeypatch.setenv("LMSERVE_FUSED_OPS", "0")
    fused._cpu_ops.cache_clear()
    try:
        assert not fused.use_fused(torch.zeros(2, dtype=torch.bfloat16))
    finally:
        monkeypatch.delenv("LMSERVE_FUSED_OPS")
        fused._cpu_ops.cache_clear()


def test_bundled_model_same_tokens_with_and_without(monkeypatch):
    """The bundled SmolLM2 in bf16 (the serving default): greedy tokens of a few prompts equal with
    the fused ops and with PyTorch's, and the fused ops were the ones that ran."""
    from lmserve import LLM, SamplingParams

    llm = LLM(dtype="bfloat16", num_kv_blocks=64)
    prompts = [llm.engine.encode(p, add_special_tokens=False)
               for p in ("The capital of France is", "def fibonacci(n):", "Once upon a time")]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    calls = []
    original = cpu_fused_ops.rms_norm
    monkeypatch.setattr(cpu_fused_ops, "rms_norm", lambda *a, **k: calls.append(1) or original(*a, **k))
    fused_tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert calls, "the fused norm ran"
    monkeypatch.setattr(fused, "use_fused", lambda x: False)
    reference = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert fused_tokens == reference


def test_dynamo_traces_past_the_cpu_kernels():
    """Under torch.compile the layers keep PyTorch's ops (Inductor fuses them itself): the check
    must not trace into the extension's loader, whose lock once stopped the compiled decode of every
    bf16 model ("Unsupported context manager")."""
    from lmserve.layers import fused

    x = torch.ones(2, 8, dtype=torch.bfloat16)
    compiled = torch.compile(lambda t: t * 2 if fused.use_fused(t) else t + 1, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), x + 1)
