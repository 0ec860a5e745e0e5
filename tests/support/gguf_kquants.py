"""llama.cpp k-quant blocks (Q4_K, Q5_K, Q6_K) written from the format's published layout (ggml-common.h's
block_q4_K / block_q5_K / block_q6_K, ggml-quants.c's get_scale_min_k4 packing), because gguf-py's numpy
quantizer writes none of them. Plain numpy, independent of lmserve's reader: tests check these
bytes with gguf-py's own dequantizer, and benchmarks/gguf_reencode.py uses them to re-encode the
bundled model.

The quantizer is the simple one (per sub-block min/max, then the sub-block scales quantized to
6 / 8 bits under a super-block scale), not llama.cpp's iterative search: its error is a little
larger than llama-quantize's, so perplexities measured with it are an upper bound.
"""

from __future__ import annotations

import numpy as np

QK_K = 256  # values per super-block


def quantize_q4_k(weights: np.ndarray) -> np.ndarray:
    """[rows, k] float -> [rows, k / 256 * 144] uint8 Q4_K blocks: fp16 d, fp16 dmin, 12 bytes of
    eight 6-bit sub-block scales and mins, 128 bytes of 4-bit codes; w = d * sc * q - dmin * m
    over sub-blocks of 32."""
    rows, k = weights.shape
    x = weights.astype(np.float32).reshape(-1, 8, 32)  # [blocks, sub-block, value]
    lo = np.minimum(x.min(axis=2), 0.0)  # a zero point at or below 0: mins are stored positive
    hi = np.maximum(x.max(axis=2), lo + 1e-12)
    scale, mins = (hi - lo) / 15.0, -lo  # per sub-block, before 6-bit quantization
    d = (scale.max(axis=1) / 63.0).astype(np.float16)
    dmin = (mins.max(axis=1) / 63.0).astype(np.float16)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.rint(np.divide(scale, d32, out=np.zeros_like(scale), where=d32 > 0)), 0, 63).astype(np.uint8)
    m = np.clip(np.rint(np.divide(mins, dmin32, out=np.zeros_like(mins), where=dmin32 > 0)), 0, 63).astype(np.uint8)
    step = (d32 * sc)[:, :, None]
    offset = (dmin32 * m)[:, :, None]
    q = np.clip(np.rint(np.divide(x + offset, step, out=np.zeros_like(x), where=step > 0)), 0, 15).astype(np.uint8)
    packed = _pack_scale_min(sc, m)
    # Codes: each 32 bytes hold two sub-blocks, the first in the low nibbles.
    q = q.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    blocks = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), packed, qs], axis=1)
    return blocks.reshape(rows, -1)


def _pack_scale_min(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """get_scale_min_k4's packing of eight 6-bit scales and mins into 12 bytes: sub-blocks 0-3 in
    the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); 4-7 in the nibbles of bytes 8-11, their
    top 2 bits in the top bits of bytes 0-7."""
    packed = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    packed[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = (m[:, 0:4] & 63) | ((m[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:8] & 15) | ((m[:, 4:8] & 15) << 4)
    return packed


def q5_k_blocks_and_values(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[rows, k] float -> ([rows, k / 256 * 176] uint8 Q5_K blocks, the float32 values they encode).
    block_q5_K: fp16 d, fp16 dmin, 12 bytes of 6-bit sub-block scales and mins (as Q4_K), 32 bytes
    qh (bit j of byte i: the 5th bit of value i of sub-block j), 128 bytes of low nibbles (as
    Q4_K: chunk c's low nibbles are sub-block 2c, its high ones 2c + 1); over sub-blocks of 32,
    w = d * sc * q - dmin * m with q in [0, 31]. The values are computed in float32 in the
    decoder's order ((d * sc) * q - dmin * m), so a right decoder reproduces them bit for bit."""
    rows, k = weights.shape
    x = weights.astype(np.float32).reshape(-1, 8, 32)
    lo = np.minimum(x.min(axis=2), 0.0)
    hi = np.maximum(x.max(axis=2), lo + 1e-12)
    scale, mins = (hi - lo) / 31.0, -lo
    d = (scale.max(axis=1) / 63.0).astype(np.float16)
    dmin = (mins.max(axis=1) / 63.0).astype(np.float16)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.rint(np.divide(scale, d32, out=np.zeros_like(scale), where=d32 > 0)), 0, 63).astype(np.uint8)
    m = np.clip(np.rint(np.divide(mins, dmin32, out=np.zeros_like(mins), where=dmin32 > 0)), 0, 63).astype(np.uint8)
    step = (d32 * sc.astype(np.float32))[:, :, None]
    offset = (dmin32 * m.astype(np.float32))[:, :, None]
    q = np.clip(np.rint(np.divide(x + offset, step, out=np.zeros_like(x), where=step > 0)), 0, 31).astype(np.uint8)
    values = (step * q.astype(np.float32) - offset).reshape(rows, k)
    low = (q & 15).reshape(-1, 4, 2, 32)
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    qh = np.zeros((x.shape[0], 32), dtype=np.uint8)
    for j in range(8):
        qh |= ((q[:, j] >> 4) & 1) << j
    blocks = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2),
                             _pack_scale_min(sc, m), qh, qs], axis=1)
    return blocks.reshape(rows, -1), values


def quantize_q5_k(weights: np.ndarray) -> np.ndarray:
    """[rows, k] float -> [rows, k / 256 * 176] uint8 Q5_K blocks (see q5_k_blocks_and_values)."""
    return q5_k_blocks_and_values(weights)[0]


def quantize_q6_k(weights: np.ndarray) -> np.ndarray:
    """[rows, k] float -> [rows, k / 256 * 210] uint8 Q6_K blocks: 128 bytes of low 4 bits, 64 of
    high 2 bits, sixteen int8 sub-block scales, fp16 d; w = d * scale * (q - 32) over sub-blocks
    of 16."""
    rows, k = weights.shape
    x = weights.astype(np.float32).reshape(-1, 16, 16)
    amax = np.abs(x).max(axis=2)
    sub = amax / 31.0  # per sub-block, before 8-bit quantization
    d = (sub.max(axis=1) / 127.0).astype(np.float16)
    d32 = d.astype(np.float32)[:, None]
    scales = np.clip(np.rint(np.divide(sub, d32, out=np.zeros_like(sub), where=d32 > 0)), -128, 127).astype(np.int8)
    step = (d32 * scales)[:, :, None]
    q = np.clip(np.rint(np.divide(x, step, out=np.zeros_like(x), where=step != 0)) + 32, 0, 63).astype(np.uint8)
    q = q.reshape(-1, 2, 4, 32)  # [blocks, 128-value half, quarter, value]
    ql = np.concatenate([q[:, :, 0] & 15 | (q[:, :, 2] & 15) << 4, q[:, :, 1] & 15 | (q[:, :, 3] & 15) << 4],
                        axis=2).reshape(-1, 128)
    qh = ((q[:, :, 0] >> 4) | (q[:, :, 1] >> 4) << 2 | (q[:, :, 2] >> 4) << 4 | (q[:, :, 3] >> 4) << 6).reshape(-1, 64)
    blocks = np.concatenate([ql, qh, scales.view(np.uint8), d.view(np.uint8).reshape(-1, 2)], axis=1)
    return blocks.reshape(rows, -1)


def q4_k_m_uses_q6_k(name: str, num_layers: int) -> bool:
    """llama.cpp's Q4_K_M and Q5_K_M mixes (llama_tensor_get_type): attn_v and ffn_down take Q6_K in
    the first and last eighth of the layers and every third layer between, the rest Q4_K / Q5_K."""
    if not name.endswith(("attn_v.weight", "ffn_down.weight")):
        return False
    i = int(name.split(".")[1])
    eighth = num_layers // 8
    return i < eighth or i >= num_layers - eighth or (i - eighth) % 3 == 2
