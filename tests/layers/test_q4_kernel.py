"""The int4 x int8 VNNI kernel (layers/q4_kernel.py): its packing keeps the grid exactly, its
products are what the grid times the int8-rounded activations give (computed here in float64,
independently), torch.compile traces it, and the torch-kernel fallback layout still works."""

from __future__ import annotations

import pytest
import torch

from lmserve.layers import q4_kernel

needs_kernel = pytest.mark.skipif(not q4_kernel.available(), reason=f"{q4_kernel.unavailable_reason()}")


def _grid(n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scale = torch.rand(n, k // 32, generator=g) * 0.01 + 1e-3
    zero = torch.randn(n, k // 32, generator=g) * 0.01
    return codes, scale, zero


def _reference(x: torch.Tensor, codes, d, m) -> torch.Tensor:
    """Q8_1 rounding of x per block of 32 (scale amax / 127, round half to even), then the grid
    w = d * q + m, all in float64."""
    rows, k = x.shape
    xb = x.double().reshape(rows, k // 32, 32)
    dx = xb.abs().amax(dim=-1, keepdim=True).float().div(127.0).double()  # the kernel's float32 scale
    inv = torch.where(dx > 0, 127.0 / xb.abs().amax(dim=-1, keepdim=True).float().double(), torch.zeros_like(dx))
    qx = torch.round((xb.float() * inv.float()).double()).clamp(-127, 127)
    w = codes.double().reshape(-1, k // 32, 32) * d.double()[..., None] + m.double()[..., None]
    return torch.einsum("rbi,nbi->rn", qx * dx, w)


@needs_kernel
@pytest.mark.parametrize("k", [32, 32 * 5, 576])
@pytest.mark.parametrize("n", [16, 48])  # one tile of 16 output rows, several
def test_packing_keeps_the_grid_and_products_match_an_independent_reference(k, n):
    codes, scale, zero = _grid(n, k)
    qweight, sz = q4_kernel.pack_int4(codes, scale, zero)
    assert qweight.shape == (n // 16, k // 2 * 16) and sz.dtype == torch.float16 and sz.numel() == 2 * n * k // 32
    d, m = scale.half().float(), (zero - 8 * scale).half().float()
    expected_w = (codes.float() - 8).reshape(n, -1, 32) * d[..., None] + (m + 8 * d)[..., None]
    torch.testing.assert_close(q4_kernel.dequantize_int4(qweight, sz, k), expected_w.reshape(n, k), atol=1e-6,
                               rtol=1e-5)
    for rows in (1, 2, 3, 8, 9, 19):  # 1-8 rows per pass over a weight tile, and more than one pass
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
        ref = _reference(x, codes, d, m)
        got = q4_kernel.int4_linear(x, qweight, sz)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-4)
        got_bf16 = q4_kernel.int4_linear(x.bfloat16(), qweight, sz)
        assert got_bf16.dtype == torch.bfloat16
        torch.testing.assert_close(got_bf16.double(), _reference(x.bfloat16().float(), codes, d, m), atol=2e-2,
                                   rtol=1e-2)


def test_the_vnni_layout_takes_whole_tiles_only():
    codes, scale, zero = _grid(40, 64)
    with pytest.raises(ValueError, match="divisible by 16"):
        q4_kernel.pack_int4(codes, scale, zero, vnni=True)


@needs_kernel
def test_zero_activations_and_leading_dims():
    codes, scale, zero = _grid(32, 64)
    qweight, sz = q4_kernel.pack_int4(codes, scale, zero)
    assert torch.equal(q4_kernel.int4_linear(torch.zeros(2, 64), qweight, sz), torch.zeros(2, 32))
    x = torch.randn(2, 3, 64)
    torch.testing.assert_close(q4_kernel.int4_linear(x, qweight, sz),
                               q4_kernel.int4_linear(x.reshape(6, 64), qweight, sz).reshape(2, 3, 32))


@needs_kernel
def test_compiled_graphs_call_the_kernel():
    codes, scale, zero = _grid(64, 128)
    qweight, sz = q4_kernel.pack_int4(codes, scale, zero)
    fn = torch.compile(lambda x: torch.relu(q4_kernel.int4_linear(x, qweight, sz)), fullgraph=True)
    x = torch.randn(3, 128)
    torch.testing.assert_close(fn(x), torch.relu(q4_kernel.int4_linear(x, qweight, sz)))


def test_torch_layout_fallback():
    """Where the VNNI kernel cannot run, the same calls use torch's int4 kernel and layout."""
    codes, scale, zero = _grid(32, 96)
    qweight, sz = q4_kernel.pack_int4(codes, scale, zero, vnni=False)
    assert sz.dtype == torch.bfloat16
    scale, zero = scale.bfloat16().float(), zero.bfloat16().float()  # torch's kernel reads them in bf16
    w = (codes.float() - 8).reshape(32, -1, 32) * scale[..., None] + zero[..., None]
    torch.testing.assert_close(q4_kernel.dequantize_int4(qweight, sz, 96), w.reshape(32, 96), atol=1e-6, rtol=0)
    x = torch.randn(2, 96)
    torch.testing.assert_close(q4_kernel.int4_linear(x, qweight, sz), x.bfloat16().float() @ w.reshape(32, 96).T,
                               atol=2e-2, rtol=1e-2)
