"""Part attention: decode attention in one pass vs split keys, by batch and context."""

from __future__ import annotations

import functools

import torch

from gpu_check_parts.common import free_device_memory
from gpu_check_parts.deepseek import deepseek_kernels_unavailable, time_call
from gpu_check_parts.report import CheckFailed, Report


def time_in_graph(fn, device: torch.device, iters: int = 20) -> float:
    """Microseconds per call of a launch-bound op as a decode step's graph replays it: `iters`
    calls captured in one CUDA graph (eager timing would measure Triton's Python launch path)."""
    if device.type != "cuda":
        return time_call(fn, device, 2)
    fn()
    fn()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(3):
        graph.replay()
    end.record()
    torch.cuda.synchronize(device)
    return begin.elapsed_time(end) / (3 * iters) * 1000


@torch.inference_mode()
def check_decode_single_pass(device: torch.device) -> dict:
    """The paged kernel on decode batches of the Llama-3.1-8B layer shape (32 query heads, 8 KV
    heads, head dim 128, bf16): split keys + merge (choose_num_splits) against one pass, per batch
    size and context length, timed as graphs replay them; both must agree. Says up to which
    context one pass is faster, next to the threshold the backend uses (SINGLE_PASS_MAX_KEYS)."""
    from lmserve.attention import triton_paged
    from lmserve.attention.triton_backend import SINGLE_PASS_MAX_KEYS, choose_num_splits

    cuda = device.type == "cuda"
    hq, hkv, d, page = (32, 8, 128, 16) if cuda else (4, 2, 16, 4)
    dtype = torch.bfloat16 if cuda else torch.float32
    sms = torch.cuda.get_device_properties(device).multi_processor_count if cuda else 2
    batches, contexts = ((1, 8, 32), (128, 256, 384, 512, 768, 1024, 2048)) if cuda else ((1, 2), (16, 64))
    g = torch.Generator().manual_seed(5)
    blocks = max(batches) * (-(-max(contexts) // page)) + 1
    k_cache = torch.randn(blocks, page, hkv, d, generator=g).to(device, dtype)
    v_cache = torch.randn(blocks, page, hkv, d, generator=g).to(device, dtype)
    results, problems = {}, []
    for b in batches:
        splits = choose_num_splits(b, hkv, sms)
        rows = {}
        for ctx in contexts:
            per_seq = -(-ctx // page)
            tables = torch.arange(b * per_seq, device=device).view(b, per_seq)
            seq_lens = torch.full((b,), ctx, device=device)
            query_start = torch.arange(b + 1, device=device)
            tiles = (torch.arange(b, device=device), torch.zeros(b, dtype=torch.int64, device=device))
            q = torch.randn(b, hq, d, generator=g).to(device, dtype)
            acc, scalars = triton_paged.split_buffer_sizes(b, hq, d, splits)
            buffers = tuple(torch.empty(n, dtype=torch.float32, device=device) for n in (acc, scalars, scalars))
            run = {s: functools.partial(triton_paged.paged_attention, q, k_cache, v_cache, torch.empty_like(q),
                                        tables, seq_lens, query_start, *tiles, 1, d ** -0.5, None, None, s,
                                        buffers if s > 1 else None) for s in (1, splits)}
            timed = {s: time_in_graph(run[s], device) for s in run}
            one, split = run[1]().float(), run[splits]().float()
            if not torch.allclose(one, split, atol=2e-2, rtol=2e-2):
                problems.append(f"batch {b}, context {ctx}: one pass differs from {splits} splits by "
                                f"{float((one - split).abs().max()):.3g}")
            rows[ctx] = {"splits": splits, "split_us": round(timed[splits], 2), "one_pass_us": round(timed[1], 2)}
        faster = [c for c, r in rows.items() if r["one_pass_us"] <= r["split_us"]]
        results[b] = {"contexts": rows, "one_pass_faster_up_to": max(faster) if faster else 0}
    if problems:
        raise CheckFailed("; ".join(problems))
    detail = "; ".join(
        f"batch {b} ({r['contexts'][contexts[0]]['splits']} splits): "
        + ", ".join(f"{c}: {x['split_us']:.1f}/{x['one_pass_us']:.1f} us" for c, x in r["contexts"].items())
        for b, r in results.items())
    return {"numbers": {"single_pass_max_keys": SINGLE_PASS_MAX_KEYS, "batches": results},
            "detail": f"split+merge/one-pass us per layer by context, {detail}; the backend's one-pass limit "
                      f"{SINGLE_PASS_MAX_KEYS} tokens"}


def part_attention(report: Report, device: torch.device) -> None:
    name = "attention: decode one pass vs split keys"
    why_not = deepseek_kernels_unavailable(device)
    if why_not:
        report.skip(name, why_not)
        return
    result = report.check(name, lambda: check_decode_single_pass(device), needs_s=15)
    if result:
        report.numbers["decode_single_pass"] = result["numbers"]
    free_device_memory(device)
