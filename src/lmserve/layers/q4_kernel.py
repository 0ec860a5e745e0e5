"""The int4 linear's CPU kernel for few rows: 4-bit weights times 8-bit activations (AVX512-VNNI).

Why: at batch 1 a decode step streams every weight once, so the int4 linear should run at memory
speed. torch's `_weight_int4pack_mm_for_cpu` converts every 4-bit weight to bf16 and multiplies in
floating point: compute-bound, it streams ~3.5x fewer bytes than bf16 yet ran only ~1.1x faster
(docs/benchmarks.md, with the other candidates measured against it). llama.cpp's route is faster:
quantize the few activation rows to int8 per block of 32 once per product, then one integer
multiply-add instruction (vpdpbusd) does 64 weight x activation products; the float scales are
applied once per block. That is what q4_kernel.cpp does, threaded over output rows with torch's
own intra-op threads (at::parallel_for: no second OpenMP pool).

The weights are laid out in tiles of 16 output rows, so that a vector's 16 lanes are 16 output
columns: a block's product for one activation row is 8 vpdpbusd with the row's codes broadcast,
no horizontal sums, and each weight is unpacked once for up to 8 activation rows. Until
2026-12-05 the layout was row by row (one weight row against 1-4 activation rows, a horizontal
sum per pair): it lost to bf16 from 8 rows on, so decode batches of 8-16 streamed bf16 weights
(4x the bytes). Tiled, the four products of SmolLM2's 30 layers measured 9.0 ms at 16 rows
against bf16's 13.4 and the row layout's 24.0, and 2.4 ms at one row against 3.4-3.7
(benchmarks/bench_int4_kernels.py, docs/benchmarks.md "Round six").

The weights keep the checkpoint's grid: w = d * q + m per block of 32 (a GGUF Q4_1 tensor's own
fp16 d and m, bit for bit). The activations are rounded to int8 per block (llama.cpp's Q8_1), the
only new rounding; perplexity on tests/data/perplexity_text.txt bounds its effect
(tests/layers/test_q4_kernel.py, docs/benchmarks.md).

Building: lmserve/cpu_extensions.py (once per machine, with OpenMP). Where the CPU lacks
AVX512-VNNI, the build fails or LMSERVE_INT4_KERNEL=torch is set, `available()` is False and the
int4 method keeps torch's kernel (the reason is logged once).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmserve.cpu_extensions import CpuExtension

BLOCK = 32
TILE = 16  # output rows per tile of the VNNI layouts (q4_kernel.cpp)


def _register_fakes() -> None:
    torch.library.register_fake("lmserve_q4::linear")(_fake_linear)
    torch.library.register_fake("lmserve_q4::linear_q8")(_fake_linear)


def _fake_linear(x, codes, scales, n=None):  # shapes for torch.compile's tracing
    return x.new_empty(x.shape[0], codes.shape[0] * TILE if n is None else n)


_KERNEL = CpuExtension(
    "lmserve_q4_kernel", Path(__file__).with_name("q4_kernel.cpp"), "int4 VNNI kernel",
    needs=("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c", "fma"),
    isa_flags=("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni"),
    env="LMSERVE_INT4_KERNEL", fallback="int4 layers use torch's kernel", on_load=_register_fakes)
unavailable_reason = _KERNEL.unavailable_reason
available = _KERNEL.available


def pack_int4(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
              vnni: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight, scales_zeros) of an int4 grid w = (codes - 8) * scale + zero (layers/quantization.py's
    Int4Grid: codes uint8 [n, k] in 0..15, scale and zero float [n, k/32]), in the layout of the
    kernel `int4_linear` will run here:
    - VNNI kernel: tiles of 16 output rows (q4_kernel.cpp): codes [n/16, k/32 * 256] uint8; d = scale
      and m = zero - 8 * scale as float16 [n/16, k/32 * 32] (a GGUF Q4_1 tensor's own fp16 d and m).
      n must be a multiple of 16 (int4_kernel.kernel_refusal says so first).
    - torch's kernel: its int4pack layout, and scale and zero as bf16 [k/32, n, 2].
    Both hold the same bytes (4 bits per weight, 2 x 16 bits per block of 32). `vnni` forces a
    layout (tests); by default the VNNI one wherever the kernel is available."""
    n, k = codes.shape
    if k % BLOCK:
        raise ValueError(f"int4 needs input sizes divisible by {BLOCK}, got {k}")
    if not (available() if vnni is None else vnni):
        qweight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        return qweight, torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    if n % TILE:
        raise ValueError(f"the int4 VNNI layout needs output sizes divisible by {TILE}, got {n}")
    tiles, nb = n // TILE, k // BLOCK
    # [tile, column, block, half, load, i]: input 16 * half + 4 * load + i of the block
    c = codes.to(torch.uint8).reshape(tiles, TILE, nb, 2, 4, 4)
    packed = (c[:, :, :, 0] | (c[:, :, :, 1] << 4)).permute(0, 2, 3, 1, 4)  # [tile, block, load, column, i]
    scale = scale.float()
    d_m = torch.stack([scale, zero.float() - 8 * scale]).to(torch.float16)  # [2, n, nb]
    return (packed.reshape(tiles, -1).contiguous(),
            d_m.reshape(2, tiles, TILE, nb).permute(1, 3, 0, 2).reshape(tiles, -1).contiguous())


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales_zeros: torch.Tensor, group: int = BLOCK) -> torch.Tensor:
    """x [..., k] times a `pack_int4` weight: [..., n] in x's dtype (`group`: the grid's columns per
    scale in torch's layout; the VNNI one is always BLOCK). The one entry point of the int4 linear
    method. A 2-D bf16 x (a decode step's) costs one op call: at batch 1 the bundled model makes
    120 of these per token, and each reshape, cast or index around it cost ~3-5 us."""
    if x.dim() != 2:
        shape = x.shape
        return int4_linear(x.reshape(-1, shape[-1]), qweight, scales_zeros, group).reshape(*shape[:-1], -1)
    if scales_zeros.dtype == torch.float16:
        return torch.ops.lmserve_q4.linear.default(x, qweight, scales_zeros)
    # torch's kernel takes bf16 activations (its float32 path is a ~100x slower reference loop)
    if x.dtype == torch.bfloat16:
        return _TORCH_INT4(x, qweight, group, scales_zeros)
    return _TORCH_INT4(x.to(torch.bfloat16), qweight, group, scales_zeros).to(x.dtype)


_TORCH_INT4 = torch._weight_int4pack_mm_for_cpu  # the plain binding: ~1.5 us less per call than torch.ops


def pack_q8(w: torch.Tensor, chunk_rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense [n, k] weight as Q8_0 blocks for `q8_linear`, tiled as q4_kernel.cpp reads them:
    d = amax / 127 per block of 32 (fp16, as llama.cpp's), q = round(w / d) in [-127, 127],
    stored as u = q + 128 (uint8); codes [ceil(n/16), k/32 * 512], d [ceil(n/16), k/32 * 16], the
    rows past n zero. A weight that was itself dequantized from Q8_0 in float32 gets its own codes
    and scales back exactly (`q8_blocks` unpacks them). Packed `chunk_rows` (a multiple of 16) at a
    time: a vocabulary-sized head in float32 would otherwise add several times its size to the
    load's peak memory."""
    n, k = w.shape
    if k % BLOCK:
        raise ValueError(f"Q8_0 needs input sizes divisible by {BLOCK}, got {k}")
    if chunk_rows % TILE:  # each chunk fills whole tiles
        raise ValueError(f"chunk_rows must be a multiple of {TILE}, got {chunk_rows}")
    tiles, nb = -(-n // TILE), k // BLOCK
    codes = torch.full((tiles, nb * BLOCK * TILE), 128, dtype=torch.uint8)
    scales = torch.zeros(tiles, nb * TILE, dtype=torch.float16)
    for start in range(0, n, chunk_rows):
        blocks = w[start:start + chunk_rows].float().reshape(-1, nb, BLOCK)
        rows = blocks.shape[0]
        d = (blocks.abs().amax(dim=-1) / 127.0).to(torch.float16)
        inv = torch.where(d.float() > 0, 1.0 / d.float(), 0.0)
        u = (torch.round(blocks * inv[..., None]).clamp_(-127, 127) + 128).to(torch.uint8)
        pad = -rows % TILE
        if pad:  # the last tile's missing rows: zero weights
            u = torch.cat([u, u.new_full((pad, nb, BLOCK), 128)])
            d = torch.cat([d, d.new_zeros(pad, nb)])
        t0, t1 = start // TILE, start // TILE + (rows + pad) // TILE
        # [tile, column, block, load, i] -> [tile, block, load, column, i]: input 4 * load + i
        codes[t0:t1] = u.reshape(-1, TILE, nb, 8, 4).permute(0, 2, 3, 1, 4).reshape(t1 - t0, -1)
        scales[t0:t1] = d.reshape(-1, TILE, nb).transpose(1, 2).reshape(t1 - t0, -1)
    return codes, scales


def q8_blocks(codes: torch.Tensor, d: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The row-major Q8_0 blocks of a `pack_q8` pair: u = q + 128 [n, k] uint8 and d [n, k/32] float16."""
    tiles, nb = d.shape[0], d.shape[1] // TILE
    u = codes.reshape(tiles, nb, 8, TILE, 4).permute(0, 3, 1, 2, 4).reshape(tiles * TILE, nb * BLOCK)
    return u[:n], d.reshape(tiles, nb, TILE).transpose(1, 2).reshape(tiles * TILE, nb)[:n]


def q8_linear(x: torch.Tensor, codes: torch.Tensor, d: torch.Tensor, n: int) -> torch.Tensor:
    """x [rows, k] times a `pack_q8` weight of n output rows: [rows, n] in x's dtype, activations
    rounded to int8 per block of 32 as for int4 (llama.cpp's Q8_0 x Q8_1 product)."""
    return torch.ops.lmserve_q4.linear_q8.default(x, codes, d, n)


def dequantize_int4(qweight: torch.Tensor, scales_zeros: torch.Tensor, k: int) -> torch.Tensor:
    """The float32 [n, k] weight a `pack_int4` pair stands for, unpacked without the kernels."""
    if scales_zeros.dtype != torch.float16:  # torch's layout: its kernel's product with the identity
        # (float32 in and out: its exact reference path, not the bf16 kernel)
        eye = torch.eye(k)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, qweight, BLOCK, scales_zeros.float()).T.contiguous()
    tiles, nb = qweight.shape[0], k // BLOCK
    packed = qweight.reshape(tiles, nb, 4, TILE, 4)  # [tile, block, load, column, i]
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=2)  # [tile, block, half, load, column, i]
    codes = codes.permute(0, 4, 1, 2, 3, 5).reshape(tiles * TILE, nb, BLOCK).float()
    d, m = scales_zeros.reshape(tiles, nb, 2, TILE).permute(2, 0, 3, 1).reshape(2, tiles * TILE, nb).float()
    return (codes * d[..., None] + m[..., None]).reshape(-1, k)
