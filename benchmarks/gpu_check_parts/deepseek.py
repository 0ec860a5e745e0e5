"""Part deepseek: the MLA and fused-MoE kernels, then the DeepSeek-V2-Lite shape served."""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from gpu_check_parts.common import accepted, free_device_memory
from gpu_check_parts.report import CheckFailed, Report
from gpu_check_parts.shapes import DEEPSEEK_V2_LITE
from gpu_check_parts.speed import (
    EngineLog,
    SpeedShape,
    decode_speed,
    lmserve_engine,
    offline_throughput,
    profile_decode,
    warm_up,
)

# Smoke mode's stand-in: the same structure, small enough for a CPU.
TINY_DEEPSEEK_MODEL = {**DEEPSEEK_V2_LITE, "vocab_size": 1024, "hidden_size": 128, "intermediate_size": 256,
                       "moe_intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "num_key_value_heads": 4, "n_routed_experts": 8, "num_experts_per_tok": 2, "kv_lora_rank": 32,
                       "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 16,
                       "max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 2}
# LMDeploy's published DeepSeek-V2-Lite figure (one A100, ShareGPT): the anchor.
LMDEPLOY_A100_LITE_TOK_S = 965
DEEPSEEK_PART_LIMIT_S = 240  # the part's own process limit (run_parts_isolated)
# bf16: a kernel's error against the float32 reference may be this many times the bf16
# reference path's own error (both accumulate differently; neither is exact).
KERNEL_BF16_ERROR_RATIO = 2.0


def deepseek_kernels_unavailable(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "the Triton kernels need a CUDA device (or TRITON_INTERPRET=1 on CPU)"
    return None


def time_call(fn, device: torch.device, iters: int) -> float:
    """Microseconds per call (after two warm-up calls), by CUDA events on a GPU."""
    for _ in range(2):
        fn()
    if device.type != "cuda":
        started = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - started) / iters * 1e6
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    return begin.elapsed_time(end) / iters * 1000


def _mla_case(device: torch.device, dims: dict, decode_contexts: list[int], prefills: list[tuple[int, int]],
              page: int, seed: int):
    """One MLA layer, its kv_b_proj, a latent cache and a step's queries (float32, on the device),
    with the step's sequences on scattered pages."""
    from lmserve.attention import MLAAttention
    from lmserve.model_input import ModelInput

    g = torch.Generator().manual_seed(seed)
    heads, nope, rope, v, rank = (dims[k] for k in ("heads", "nope", "rope", "v", "rank"))
    seqs = [(c, 1) for c in decode_contexts] + prefills
    num_blocks = sum(-(-(c + n) // page) for c, n in seqs) + 8
    free = torch.randperm(num_blocks, generator=g).tolist()
    tables = [[free.pop() for _ in range(-(-(c + n) // page))] for c, n in seqs]
    tokens = sum(n for _, n in seqs)
    batch = ModelInput([0] * tokens, [n for _, n in seqs], [c for c, _ in seqs], tables, len(decode_contexts),
                       list(range(tokens)))
    layer = MLAAttention(heads, nope, rope, v, rank, (nope + rope) ** -0.5)
    kv_b = torch.nn.Linear(rank, heads * (nope + v), bias=False)
    kv_b.weight.data = (torch.randn(heads * (nope + v), rank, generator=g) * rank ** -0.5)
    kv_b = kv_b.to(device)
    data = {"cache": torch.randn(num_blocks, page, rank + rope, generator=g),
            "q": torch.randn(tokens, heads, nope + rope, generator=g),
            "entry": torch.randn(tokens, rank + rope, generator=g)}
    return layer, kv_b, {k: t.to(device) for k, t in data.items()}, batch


def _mla_run(backend, layer, kv_b, data: dict, batch, dtype: torch.dtype, page: int, splits: int | None = None):
    """The layer's output through `backend` in `dtype` (float32 out), and a call to time."""
    positions = torch.tensor(batch.positions, device=data["q"].device)
    kv_b = copy.deepcopy(kv_b).to(dtype)
    cache = (data["cache"].to(dtype),)
    q, entry = data["q"].to(dtype), data["entry"].to(dtype)
    meta = backend.build_metadata(batch, positions, page, dtype)
    if splits is not None and hasattr(meta, "num_splits"):
        meta.num_splits = splits

    def call():
        return layer(q, entry, kv_b, cache, meta)

    return call().float(), call


@torch.inference_mode()
def check_mla_kernel(device: torch.device) -> dict:
    """The Triton MLA path (absorbed decode kernel, expanded prefill) against the reference
    backend, V2-Lite's head sizes: a mixed step (decodes up to 3,000 cached tokens, a fresh
    prompt, a chunk after a cached prefix) and a decode-only step with split keys. float32:
    within 1e-4 of the reference; bf16: error against float32 within KERNEL_BF16_ERROR_RATIO x
    the bf16 reference's. Then batch-64 decode at a 1,024-token context, timed against the
    reference backend."""
    from lmserve.attention.reference import ReferenceBackend
    from lmserve.attention.triton_backend import TritonPagedBackend

    cuda = device.type == "cuda"
    dims = (dict(heads=16, nope=128, rope=64, v=128, rank=512) if cuda
            else dict(heads=4, nope=16, rope=16, v=16, rank=32))
    page = 16 if cuda else 4
    cases = {"mixed": ([1, 77, 1000, 3000] if cuda else [1, 13, 40],
                       [(0, 300), (500, 200)] if cuda else [(0, 9), (10, 7)], None),
             "decode, 4 splits": ([5, 300, 2000] if cuda else [5, 30], [], 4)}
    out: dict = {}
    problems = []
    for name, (decodes, prefills, splits) in cases.items():
        layer, kv_b, data, batch = _mla_case(device, dims, decodes, prefills, page, seed=len(out))
        triton_backend = TritonPagedBackend([layer.kv_spec], device)
        truth, _ = _mla_run(ReferenceBackend(), layer, kv_b, data, batch, torch.float32, page)
        got32, _ = _mla_run(triton_backend, layer, kv_b, data, batch, torch.float32, page, splits)
        err32 = float((got32 - truth).abs().max())
        row = {"fp32_max_err": err32}
        if err32 > 1e-4:
            problems.append(f"{name}: float32 differs from the reference by {err32:.2e}")
        if cuda:  # the interpreter's bf16 dot products are wrong (check_variant says so)
            ref16, _ = _mla_run(ReferenceBackend(), layer, kv_b, data, batch, torch.bfloat16, page)
            got16, _ = _mla_run(triton_backend, layer, kv_b, data, batch, torch.bfloat16, page, splits)
            ours, theirs = float((got16 - truth).abs().max()), float((ref16 - truth).abs().max())
            row.update(bf16_max_err=ours, reference_bf16_max_err=theirs)
            if ours > KERNEL_BF16_ERROR_RATIO * theirs + 1e-3:
                problems.append(f"{name}: bf16 error {ours:.3f} vs the reference's {theirs:.3f}")
        out[name] = row
    batch_size, context = (64, 1024) if cuda else (4, 32)
    layer, kv_b, data, batch = _mla_case(device, dims, [context] * batch_size, [], page, seed=9)
    dtype = torch.bfloat16 if cuda else torch.float32
    timed = {}
    for label, backend in (("triton", TritonPagedBackend([layer.kv_spec], device)), ("reference", ReferenceBackend())):
        _, call = _mla_run(backend, layer, kv_b, data, batch, dtype, page)
        timed[label] = time_call(call, device, 20 if cuda else 2)
    out["decode_timing_us"] = {k: round(v, 1) for k, v in timed.items()}
    if problems:
        raise CheckFailed("; ".join(problems))
    detail = "; ".join(f"{k}: fp32 err {v['fp32_max_err']:.1e}" + (f", bf16 err {v['bf16_max_err']:.3f} vs "
                                                                    f"reference {v['reference_bf16_max_err']:.3f}"
                                                                    if "bf16_max_err" in v else "")
                       for k, v in out.items() if k != "decode_timing_us")
    return {"numbers": out, "detail": f"{detail}; decode batch {batch_size} x {context} cached: triton "
                                      f"{timed['triton']:.0f} us vs reference {timed['reference']:.0f} us per layer "
                                      f"({timed['reference'] / timed['triton']:.1f}x)"}


@torch.inference_mode()
def check_moe_kernel(device: torch.device) -> dict:
    """The fused-MoE grouped GEMMs (layers/triton_moe.py) against FusedExperts' eager path at
    V2-Lite's sizes (64 experts, top 6, hidden 2,048, expert width 1,408), a decode-sized and a
    prefill-sized batch: float32 within 1e-4 relative, bf16 error within the ratio of the eager
    bf16 path's; then each timed against the eager path in bf16."""
    from lmserve.layers import fused, triton_moe
    from lmserve.layers.moe import FusedExperts

    cuda = device.type == "cuda"
    experts_n, k, hidden, inter = (64, 6, 2048, 1408) if cuda else (8, 2, 64, 48)
    g = torch.Generator().manual_seed(21)
    experts = FusedExperts(experts_n, hidden, inter)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, hidden ** -0.5, generator=g)
        experts.down_proj.normal_(0, inter ** -0.5, generator=g)
    experts32 = experts.to(device)
    experts16 = copy.deepcopy(experts32).to(torch.bfloat16)
    saved = fused.use_triton

    def eager(module, x, w, ids):
        fused.use_triton = lambda t: False  # FusedExperts' per-expert loop, even on CUDA
        try:
            return module(x, w, ids)
        finally:
            fused.use_triton = saved

    def kernel(module, x, w, ids):
        return triton_moe.fused_experts(x, module.gate_up_proj, module.down_proj, w, ids, module.act_kind)

    out: dict = {}
    problems = []
    for tokens in ((4, 2048) if cuda else (3, 40)):
        x = torch.randn(tokens, hidden, generator=g).to(device)
        weights, ids = torch.softmax(torch.randn(tokens, experts_n, generator=g), -1).topk(k, dim=-1)
        weights, ids = weights.to(device), ids.to(device)
        truth = eager(experts32, x, weights, ids)
        err32 = float((kernel(experts32, x, weights, ids) - truth).abs().max() / truth.abs().max())
        row = {"fp32_rel_err": err32}
        if err32 > 1e-4:
            problems.append(f"{tokens} tokens: float32 differs from the eager path by {err32:.1e} (relative)")
        if cuda:
            x16 = x.to(torch.bfloat16)
            ours = float((kernel(experts16, x16, weights, ids).float() - truth).abs().max())
            theirs = float((eager(experts16, x16, weights, ids).float() - truth).abs().max())
            row.update(bf16_max_err=ours, eager_bf16_max_err=theirs)
            if ours > KERNEL_BF16_ERROR_RATIO * theirs + 1e-3:
                problems.append(f"{tokens} tokens: bf16 error {ours:.4f} vs the eager path's {theirs:.4f}")
        module, xt = (experts16, x.to(torch.bfloat16)) if cuda else (experts32, x)
        call_args = (module, xt, weights, ids)
        row["us"] = {label: round(time_call(lambda f=f, a=call_args: f(*a), device, 20 if cuda else 2), 1)
                     for label, f in (("fused", kernel), ("eager", eager))}
        out[tokens] = row
    if problems:
        raise CheckFailed("; ".join(problems))
    return {"numbers": out, "detail": "; ".join(
        f"{t} tokens: fp32 rel err {r['fp32_rel_err']:.1e}"
        + (f", bf16 err {r['bf16_max_err']:.4f} vs eager {r['eager_bf16_max_err']:.4f}" if "bf16_max_err" in r else "")
        + f", fused {r['us']['fused']:.0f} us vs eager {r['us']['eager']:.0f} us "
          f"({r['us']['eager'] / r['us']['fused']:.1f}x)" for t, r in out.items())}


def deepseek_shape(device: torch.device, quick: bool) -> SpeedShape:
    if device.type == "cpu":
        return SpeedShape(TINY_DEEPSEEK_MODEL, 16, 16, 4, 32, 16, 0)
    if quick:
        return SpeedShape(DEEPSEEK_V2_LITE, 128, 128, 128, 512, 512, 0)
    return SpeedShape(DEEPSEEK_V2_LITE, 128, 128, 256, 1024, 1024, 0)  # the 8B shape's workload


def part_deepseek(report: Report, device: torch.device, args) -> None:
    numbers = report.numbers.setdefault("deepseek", {})
    why_not = deepseek_kernels_unavailable(device)
    for key, name, fn in (("mla_kernel", "deepseek: MLA decode kernel vs reference", check_mla_kernel),
                          ("moe_kernel", "deepseek: fused MoE kernel vs eager experts", check_moe_kernel)):
        if why_not:
            report.skip(name, why_not)
            continue
        result = report.check(name, lambda fn=fn: fn(device), needs_s=15)
        free_device_memory(device)
        if result:
            numbers[key] = result["numbers"]

    shape = deepseek_shape(device, args.quick)
    vocab = shape.config["vocab_size"]
    numbers["workload"] = {"decode": f"prompt {shape.decode_prompt}, {shape.decode_new} new tokens",
                           "offline": f"{shape.requests} x {shape.input_len} in / {shape.output_len} out"}
    config_dir = Path(tempfile.mkdtemp(prefix="gpu_check_dsv2_lite_"))
    (config_dir / "config.json").write_text(json.dumps(shape.config))
    state: dict = {}

    def load():
        started = time.perf_counter()
        extra = {"max_model_len": 4096, "max_num_seqs": shape.requests}
        with EngineLog() as engine_log:
            state["engine"] = engine = lmserve_engine(config_dir, device, True if device.type == "cuda" else None,
                                                      accepted(**extra))
        loaded = time.perf_counter() - started
        numbers["engine_log"] = engine_log.lines
        for line in engine_log.lines:
            print(f"    engine: {line}", flush=True)
        runner = engine.runner
        backend = type(runner.attention_backend).__name__
        graphs = runner.graphs is not None
        numbers.update(load_s=round(loaded, 1), attention_backend=backend, cuda_graphs=graphs,
                       parameters=sum(p.numel() for p in engine.model.parameters()))
        if device.type == "cuda" and (backend != "TritonPagedBackend" or not graphs):
            raise CheckFailed(f"the V2-Lite shape runs on {backend}, CUDA graphs {'on' if graphs else 'off'}: "
                              f"expected the Triton MLA kernels and captured graphs")
        warm = warm_up(engine, shape)
        return (f"engine up in {loaded:.1f}s ({numbers['parameters'] / 1e9:.2f}B parameters, dummy weights, "
                f"{backend}, CUDA graphs {'on' if graphs else 'off'}, {engine.num_blocks} KV blocks), "
                f"warm-up logits finite (std {warm['logit_std']:.2f})")

    if not report.check("deepseek: V2-Lite shape load + warm-up", load, needs_s=40):
        state.clear()
        free_device_memory(device)
        return

    def batch1():
        r = decode_speed(state["engine"], shape, vocab)
        numbers.update(decode_tok_s=round(r["decode_tok_s"], 1), ttft_s=round(r["ttft_s"], 3))
        return f"batch-1 decode {r['decode_tok_s']:.1f} tok/s, first token {r['ttft_s'] * 1000:.0f} ms"

    report.check("deepseek: V2-Lite batch-1 decode", batch1, needs_s=10)

    def throughput():
        budget = min(args.throughput_budget_s, max(report.time_left() - 20, 10))
        r = offline_throughput(state["engine"], shape, vocab, budget)
        numbers["offline"] = {k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}
        return (f"offline {r['output_tok_s']:.0f} output tok/s, {r['requests_done']}/{shape.requests} requests in "
                f"{r['total_s']:.1f}s" + (" (cut at the time budget: partial)" if r["partial"] else "")
                + f"; LMDeploy's published A100 figure {LMDEPLOY_A100_LITE_TOK_S} "
                  f"({r['output_tok_s'] / LMDEPLOY_A100_LITE_TOK_S:.1f}x, other workload and GPU)")

    report.check("deepseek: V2-Lite offline throughput", throughput, needs_s=30)

    def profiled():
        batch = min(64, shape.requests)
        r = profile_decode(state["engine"], device, vocab, batch, report.out_dir / "gpu_check_profile.txt",
                           "deepseek-v2-lite")
        numbers[f"profile_b{batch}"] = r
        return (f"batch {batch} decode: {r['wall_ms_per_step']:.2f} ms/step wall, {r['device_ms_per_step']:.2f} "
                f"ms/step in kernels; top: {r['top']} (gpu_check_profile.txt)")

    report.check("deepseek: V2-Lite profile", profiled, needs_s=15)
    state.clear()
    free_device_memory(device)


def deepseek_markdown(d: dict) -> list[str]:
    """The V2-Lite lines of the table (none when the part did not run)."""
    lines = []
    if d.get("decode_tok_s") or d.get("offline"):
        w = d.get("workload", {})
        lines.append(f"DeepSeek-V2-Lite shape (MLA + MoE, {d.get('parameters', 0) / 1e9:.1f}B parameters, dummy "
                     f"weights, {d.get('attention_backend')}, CUDA graphs {'on' if d.get('cuda_graphs') else 'off'}): "
                     f"batch-1 decode {d.get('decode_tok_s', '-')} tok/s ({w.get('decode')})"
                     + (f"; offline {d['offline']['output_tok_s']:.0f} output tok/s ({w.get('offline')}"
                        f"{', partial' if d['offline'].get('partial') else ''}); LMDeploy A100 (ShareGPT) "
                        f"{LMDEPLOY_A100_LITE_TOK_S}" if d.get("offline") else "") + ".")
        lines.append("")
    return lines
