"""GGUF 4-bit blocks read as the int4 kernel's grid: the grid's values are gguf-py's own
dequantization of the same bytes (its reference decoder, not ours), for random blocks of every
type the int4 load keeps (Q4_0, Q4_1, Q4_K), and the packed kernel computes with them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: E402
from gguf.quants import dequantize  # noqa: E402

from lmserve.layers.quantization import int4_kernel  # noqa: E402
from lmserve.models.gguf import int4_grid  # noqa: E402


def random_blocks(tensor_type, rows: int, k: int, seed: int = 0) -> np.ndarray:
    """Random bytes are valid blocks once the fp16 fields hold finite, modest values."""
    block, size = GGML_QUANT_SIZES[tensor_type]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(rows * k // block, size), dtype=np.uint8)
    halves = 2 if tensor_type in (GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q4_K) else 1
    for h in range(halves):  # d (and m / dmin) at the start of each block
        data[:, 2 * h:2 * h + 2] = rng.uniform(0.001, 0.05, size=(data.shape[0], 1)).astype(np.float16).view(np.uint8)
    return data.reshape(rows, -1)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q4_K"])
def test_grid_is_gguf_pys_dequantization(name):
    tensor_type = GGMLQuantizationType[name]
    rows, k = 32, 512
    data = random_blocks(tensor_type, rows, k)
    expected = torch.from_numpy(dequantize(data, tensor_type).reshape(rows, k).astype(np.float32))
    grid = int4_grid(data, tensor_type, (rows, k))
    assert grid.codes.dtype == torch.uint8 and int(grid.codes.max()) <= 15 and grid.group == 32
    torch.testing.assert_close(grid.dequantize(), expected, atol=1e-5, rtol=1e-5)
    # The kernel computes the same product (its scale/zero and activations in bf16).
    x = torch.randn(3, k)
    got = int4_kernel.int4_matmul(x, int4_kernel.pack(grid))
    ref = x @ expected.T
    assert float((got - ref).norm() / ref.norm()) < 1e-2


def test_stacked_experts_pack_as_each_expert_alone():
    """A MoE layer's stacked grids packed in one call (int4_kernel.pack_experts, the GGUF experts'
    route) give each expert exactly the products of its own grid packed alone."""
    torch.manual_seed(0)
    experts, rows, k = 4, 48, 256
    codes = torch.randint(0, 16, (experts, rows, k), dtype=torch.uint8)
    scale, zero = torch.rand(experts, rows, k // 32) * 0.01, torch.randn(experts, rows, k // 32) * 0.01
    packed = int4_kernel.pack_experts(codes, scale, zero)
    x = torch.randn(3, k)
    for e in range(experts):
        alone = int4_kernel.pack(int4_kernel.Int4Grid(codes[e], scale[e], zero[e]))
        assert torch.equal(int4_kernel.int4_matmul(x, packed[e]), int4_kernel.int4_matmul(x, alone))
