"""Routed experts as two grouped GEMMs (Triton): the CUDA path of layers/moe.py's FusedExperts.

The eager path runs a matmul pair per expert that got tokens, after reading the expert counts on
the host: a device sync and up to 2E small launches per MoE layer. Here (vLLM's fused_moe is the
model) a layer's routed experts are one launch per projection:

- align_by_expert: the (token, slot) pairs are grouped by expert and each expert's run is
  padded to a multiple of BLOCK_M, all with device ops (no host sync, so a decode step can be
  captured in a CUDA graph): sorted_pairs lists the pairs expert by expert (padding = an invalid pair),
  block_experts names the expert of every BLOCK_M rows, and num_rows the padded total. Buffers
  are sized by a bound that needs no data (every expert that got pairs pads at most BLOCK_M - 1).
- _grouped_gemm_kernel: a program owns BLOCK_M sorted rows (one expert) and BLOCK_N output
  columns; it gathers its rows of A (the token's hidden state for gate_up, the pair's gated
  activation for down), multiplies them by that expert's weight tile, and writes each row back
  at its pair's index; blocks past num_rows return at once. The down projection multiplies each
  row by its routing weight, then the k slots of a token are summed.
- act(gate) * up between the two is triton_ops.gated_act, the kernel the dense MLPs use.

Numerics: float32 accumulation, the routing weight applied to the unrounded product (the eager
path rounds the expert's output to the dtype first), slots summed per token rather than in expert
order: bits may differ in the last place, no more. Runs under TRITON_INTERPRET=1 on CPU, which is
how CI proves it against the eager path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmserve.layers import triton_ops


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, b_ptr, c_ptr, weights_ptr, sorted_pairs_ptr, block_experts_ptr, num_rows_ptr,
    N, K, num_pairs, stride_am, stride_be, stride_bn, stride_cm,
    A_ROWS_PER_PAIR_DIV: tl.constexpr, MUL_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """c[pair, :] = a[pair // DIV, :] @ b[expert(pair)].T (times weights[pair]), b [E, N, K]."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(tl.num_programs(0), tl.cdiv(N, BLOCK_N))
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M row blocks walk the columns together, so an expert's weight tiles
    # are read from L2 by the blocks that share them.
    in_group = GROUP_M * num_n
    group = pid // in_group
    first_m = group * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_m
    pid_n = (pid % in_group) // group_m
    if pid_m * BLOCK_M >= tl.load(num_rows_ptr):
        return

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + rows)
    row_valid = pairs < num_pairs
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    a_rows = (pairs // A_ROWS_PER_PAIR_DIV).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + ks[None, :]
    b_ptrs = b_ptr + expert * stride_be + cols[None, :].to(tl.int64) * stride_bn + ks[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_valid = ks < K - k0
        a = tl.load(a_ptrs, mask=row_valid[:, None] & k_valid[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_valid[:, None] & col_valid[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if MUL_WEIGHT:
        acc = acc * tl.load(weights_ptr + pairs, mask=row_valid, other=0.0).to(tl.float32)[:, None]
    tl.store(c_ptr + pairs.to(tl.int64)[:, None] * stride_cm + cols[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=row_valid[:, None] & col_valid[None, :])


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """(sorted_pairs [R], block_experts [R / block_m], num_rows [1]) for topk_ids [T, k]: pair
    p = t * k + slot, grouped by expert (stable, so a token's pairs keep their order), each
    expert's run padded with the invalid pair T * k to a multiple of block_m.

    Only elementwise ops, sums, cumsums and scatters (no sort, no bincount, no search): none of
    them syncs with the host or has a data-dependent size, so a CUDA graph captures them. A pair's
    place in its expert's run is the count of earlier pairs routed there (a cumsum over the
    [pairs, experts] one-hot: 3 MB for 2,048 tokens x top-6 of 64 experts)."""
    flat = topk_ids.reshape(-1)
    n = flat.numel()
    dev = flat.device
    onehot = (flat[:, None] == torch.arange(num_experts, device=dev)).to(torch.int32)  # [n, E]
    counts = onehot.sum(0, dtype=torch.int64)
    earlier = (onehot.cumsum(0, dtype=torch.int32) - onehot).gather(1, flat[:, None]).squeeze(1)
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    capacity = triton.cdiv(n + min(n, num_experts) * (block_m - 1), block_m) * block_m
    sorted_pairs = torch.full((capacity,), n, dtype=torch.int64, device=dev)
    sorted_pairs.scatter_(0, (padded_end - padded)[flat] + earlier, torch.arange(n, device=dev))
    starts = torch.arange(0, capacity, block_m, device=dev)
    # A block's expert: how many experts' padded runs end at or before its first row.
    block_experts = (padded_end[None, :] <= starts[:, None]).sum(1).clamp_(max=num_experts - 1)
    return sorted_pairs, block_experts, padded_end[-1:]


def _config(pairs: int, num_experts: int) -> dict:
    """Tile sizes: 16-row blocks when the pairs are few for the experts (decode: most experts
    get a pair or two), 64-row blocks and wider columns when every expert gets many."""
    if pairs <= 4 * num_experts:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


def _grouped_gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, weights: torch.Tensor | None,
                  aligned, div: int, cfg: dict) -> None:
    sorted_pairs, block_experts, num_rows = aligned
    n, k = b.shape[1], b.shape[2]
    if a.stride(-1) != 1:
        a = a.contiguous()
    grid = (triton.cdiv(sorted_pairs.numel(), cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _grouped_gemm_kernel[grid](
        a, b, out, weights if weights is not None else out, sorted_pairs, block_experts, num_rows,
        n, k, out.shape[0], a.stride(0), b.stride(0), b.stride(1), out.stride(0),
        A_ROWS_PER_PAIR_DIV=div, MUL_WEIGHT=weights is not None,
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32", **cfg)


def fused_experts(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, activation: str) -> torch.Tensor:
    """sum over a token's k slots of weight * down_e(act(gate_e x) * up_e x).

    x [T, H]; gate_up_proj [E, 2I, H] (gate rows first); down_proj [E, H, I]; topk_weights,
    topk_ids [T, k]; activation a layers/activation.py kind. Returns [T, H] in x's dtype."""
    t, hidden = x.shape
    num_experts, two_i, _ = gate_up_proj.shape
    k = topk_ids.shape[1]
    if t == 0:
        return torch.zeros_like(x)
    cfg = _config(t * k, num_experts)
    aligned = align_by_expert(topk_ids, num_experts, cfg["BLOCK_M"])
    gate_up = torch.empty(t * k, two_i, dtype=x.dtype, device=x.device)
    _grouped_gemm(x, gate_up_proj, gate_up, None, aligned, k, cfg)
    gated = triton_ops.gated_act(gate_up, two_i // 2, activation)
    down = torch.empty(t * k, hidden, dtype=x.dtype, device=x.device)
    _grouped_gemm(gated, down_proj, down, topk_weights.reshape(-1).contiguous(), aligned, 1, cfg)
    return down.view(t, k, hidden).sum(dim=1)
