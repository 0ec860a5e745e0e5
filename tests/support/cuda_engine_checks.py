"""Device checks of the engine outside attention: the KV cache sized from GPU memory, the
sampler's one synchronisation per step, and the fused norm/rotary/activation kernels in bfloat16
inside a CUDA graph. What CPU tests cannot show (the driver's memory numbers, torch's sync debug
mode, bf16 on the device, kernel counts) is checked here on a CUDA device.

Plain Python, no pytest (the GPU image has none), like tests/support/family_checkpoints.py: a device
script imports these functions, or runs this file (a few seconds on an H100):

    python tests/support/cuda_engine_checks.py        # prints one JSON line, exits non-zero on a failure
"""

from __future__ import annotations

import gc
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from lmserve import SamplingParams
from lmserve.engine.detokenizer import IncrementalDetokenizer
from lmserve.engine.llm_engine import LLMEngine
from lmserve.engine.memory import GiB
from lmserve.engine.sampler import Sampler
from lmserve.engine.sequence import Request, Sequence

MiB = 1 << 20

SAMPLER_KINDS = [
    SamplingParams(temperature=0.0, logprobs=True, top_logprobs=3),
    SamplingParams(temperature=0.9),
    SamplingParams(temperature=1.0, top_p=0.85, presence_penalty=0.5, frequency_penalty=0.3),
    SamplingParams(temperature=1.1, top_k=80, repetition_penalty=1.2, logprobs=True),
    SamplingParams(temperature=1.0, min_p=0.02, min_tokens=4, stop_token_ids=[7, 8]),
    SamplingParams(temperature=0.6, top_k=5, top_p=0.5),
]


def mixed_batch(rows: int, vocab: int, seed: int) -> tuple[torch.Tensor, list[Sequence]]:
    """Float32 logits from nearly flat to peaked rows (masked tails on some), and one sequence
    per row cycling through SAMPLER_KINDS, with a few output tokens for the penalties."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=gen) * torch.linspace(0.05, 8.0, rows).unsqueeze(1)
    logits[::7, -vocab // 10:] = float("-inf")
    seqs = []
    for i in range(rows):
        prompt = [1, 2, 3]
        req = Request(f"r{i}", prompt, SAMPLER_KINDS[i % len(SAMPLER_KINDS)], 0.0, seed=i)
        seqs.append(Sequence(i, req, 0, prompt + [7, 9, 9, 11][:i % 5], sampling_key=7919 * i + 5,
                             detok=IncrementalDetokenizer(None)))
    return logits, seqs


def check_sampler_syncs_once(device: str = "cuda", rows: int = 48, vocab: int = 32000) -> dict:
    """One sampler call on the device waits for it once (torch's sync debug mode warns on every
    synchronising call), repeats itself, keeps seeded rows batch-invariant, and mostly agrees
    with the CPU (float rounding of softmax/exp on another device may move a near-tie)."""
    logits, seqs = mixed_batch(rows, vocab, seed=3)
    on_device = logits.to(device)
    sampler = Sampler()
    sampler.eos_token_ids = [0]
    first = sampler(on_device.clone(), seqs)  # warm-up: kernels loaded, pinned host blocks cached
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            again = sampler(on_device.clone(), seqs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # Every synchronising call warns "called a synchronizing CUDA operation"; turning the
    # debug mode on also warns once that it is a prototype, which is not a sync.
    syncs = [str(w.message) for w in caught if "called a synchronizing" in str(w.message)]
    assert len(syncs) == 1, syncs
    assert again.token_ids == first.token_ids and again.logprobs == first.logprobs
    for i in range(0, rows, 3):
        assert sampler(on_device[i:i + 1].clone(), seqs[i:i + 1]).token_ids == [first.token_ids[i]], i
    cpu_sampler = Sampler()
    cpu_sampler.eos_token_ids = [0]
    cpu = cpu_sampler(logits.clone(), seqs).token_ids
    agree = sum(a == b for a, b in zip(cpu, first.token_ids)) / rows
    assert agree >= 0.9, agree
    return {"sampler_syncs_per_call": len(syncs), "sampler_cpu_agreement": round(agree, 3)}


def check_memory_sizing(directory: Path, device: str = "cuda") -> dict:
    """An engine given room for about 2 GiB past what the device already holds stays inside its
    fraction with the cache taking most of it; a fraction below what is in use is refused with
    an error naming the option."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.support.family_checkpoints import build_llama, greedy_tokens

    build_llama(directory)
    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    in_use = total - free
    utilization = min(1.0, (in_use + 2 * GiB) / total)
    engine = LLMEngine(str(directory), dtype="bfloat16", device=device, gpu_memory_utilization=utilization,
                       cuda_graphs=False)
    kv_bytes = sum(t.numel() * t.element_size() for cache in engine.runner.kv_caches for t in cache)
    assert len(greedy_tokens(engine, [1, 5, 9, 13], 8)) == 8  # it serves, within the fraction
    torch.cuda.synchronize()
    used = total - torch.cuda.mem_get_info()[0]
    assert used <= total * utilization + 64 * MiB, (used, total * utilization)
    assert kv_bytes >= 1.5 * GiB, kv_bytes
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    refused = None
    try:
        LLMEngine(str(directory), dtype="bfloat16", device=device,
                  gpu_memory_utilization=max(in_use / total / 2, 0.001), cuda_graphs=False)
    except ValueError as e:
        refused = str(e)
    assert refused is not None and "gpu_memory_utilization" in refused, refused
    return {"memory_utilization": round(utilization, 4), "memory_used_gib": round(used / GiB, 3),
            "memory_budget_gib": round(total * utilization / GiB, 3), "memory_kv_gib": round(kv_bytes / GiB, 3),
            "memory_refusal": refused}


def ulps_apart(ref: torch.Tensor, got: torch.Tensor) -> torch.Tensor:
    """|ref - got| in units of the dtype's spacing at the larger of the two."""
    spacing = [(torch.nextafter(v.abs(), torch.full_like(v, float("inf"))) - v.abs()).float() for v in (ref, got)]
    return (ref.float() - got.float()).abs() / torch.maximum(*spacing)


def check_fused_ops(device: str = "cuda", dtype: torch.dtype = torch.bfloat16, kernels=None) -> dict:
    """The fused Triton kernels (layers/triton_ops.py) against the PyTorch ops they replace, through
    the layers, on Llama-3-8B-shaped inputs: rotary bit-equal; norms and activations within the
    roundings tests/layers/test_triton_ops.py allows. On CUDA also: the fused ops replayed from a CUDA
    graph give the eager results, and the kernels launched for a layer's two norms, rotary and
    MLP, fused vs not (profiler count). On CPU (float16, under TRITON_INTERPRET) the same
    comparisons, so this check is exercised in CI."""
    from lmserve.layers import fused
    from lmserve.layers.activation import activation_kind, get_activation
    from lmserve.layers.norm import GemmaRMSNorm, RMSNorm
    from lmserve.layers.rotary import get_rope

    original, original_ops = fused.use_fused, fused.ops
    on_cuda = torch.device(device).type == "cuda"

    def run(fused_on: bool, fn):
        fused.use_fused = lambda x: fused_on  # both paths on the same tensors
        if kernels is not None:  # a given kernels module (Triton's, interpreted, on CPU tensors)
            fused.ops = lambda x: kernels
        try:
            return fn()
        finally:
            fused.use_fused, fused.ops = original, original_ops

    gen = torch.Generator().manual_seed(11)
    hidden, intermediate, heads, kv_heads, head_dim, tokens = 4096, 14336, 32, 8, 128, 3
    norm = RMSNorm(hidden, 1e-5)
    gemma_norm = GemmaRMSNorm(hidden, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.3 * torch.randn(hidden, generator=gen))
        gemma_norm.weight.copy_(0.3 * torch.randn(hidden, generator=gen))
    norm, gemma_norm = norm.to(device, dtype), gemma_norm.to(device, dtype)
    rope = get_rope(head_dim, 8192, 500000.0, dtype=dtype).to(device)
    x = (2 * torch.randn(tokens, 2 * hidden, generator=gen)).to(device, dtype)[:, :hidden]  # strided rows
    delta = torch.randn(tokens, hidden, generator=gen).to(device, dtype)  # an attention output
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(device, dtype)
    qk = qkv[:, :(heads + kv_heads) * head_dim].view(tokens, heads + kv_heads, head_dim)
    cos, sin = rope.lookup(torch.tensor([0, 1000, 8000], device=device))
    gate = torch.rand(tokens, intermediate, generator=gen) * 6.5 - 2.5  # see test_triton_ops
    gate_up = torch.cat([gate, torch.randn(tokens, intermediate, generator=gen)], 1).to(device, dtype)

    def gated(name: str) -> torch.Tensor:  # GatedMLP.forward between its two matmuls
        if fused.use_fused(gate_up):
            return fused.ops(gate_up).gated_act(gate_up, intermediate, activation_kind(name))
        return get_activation(name)(gate_up[:, :intermediate]) * gate_up[:, intermediate:]

    def ops():
        total, normed = norm.add_and_norm(x, delta)
        return {"norm": norm(x), "gemma_norm": gemma_norm(x), "rotary": rope.apply(qk, cos, sin),
                "add_norm_sum": total, "add_norm": normed,
                **{name: gated(name) for name in ("silu", "gelu_pytorch_tanh", "gelu")}}

    ref, got = run(False, ops), run(True, ops)
    results = {}
    for name in ref:
        apart = ulps_apart(ref[name], got[name])
        results[f"fused_{name}_max_ulps"] = apart.max().item()
        results[f"fused_{name}_mismatch"] = round((apart > 0).float().mean().item(), 5)
    assert torch.equal(ref["rotary"], got["rotary"]), "rotary is bit-equal to the PyTorch ops"
    assert torch.equal(ref["add_norm_sum"], got["add_norm_sum"]), "the residual sum is bit-equal to x + delta"
    for name, ulps, share in (("norm", 2, 0.01), ("gemma_norm", 1, 0.01), ("add_norm", 2, 0.01), ("silu", 2, 0.02),
                              ("gelu_pytorch_tanh", 2, 0.02), ("gelu", 2, 0.02)):
        max_ulps, mismatch = results[f"fused_{name}_max_ulps"], results[f"fused_{name}_mismatch"]
        assert max_ulps <= ulps and mismatch <= share, f"{name}: {max_ulps} ulps, {mismatch} of elements differ"
    if not on_cuda:
        return results

    # Replayed from a graph: static inputs refilled, the same results as eager.
    run(True, ops)  # kernels compiled outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run(True, ops)
    fresh = torch.randn(x.shape, generator=gen).to(device, dtype)
    x.copy_(fresh)
    qk.copy_(torch.randn(qk.shape, generator=gen).to(device, dtype))
    graph.replay()
    eager = run(True, ops)
    for name in eager:
        assert torch.equal(captured[name], eager[name]), f"{name} replayed differs from eager"

    # Kernels launched for one layer's small ops: two norms (the second with the residual add
    # before it), rotary, act(gate) * up.
    from torch.profiler import ProfilerActivity, profile

    def layer_ops():
        return norm(x), rope.apply(qk, cos, sin), norm.add_and_norm(x, delta), gated("silu")

    for label, fused_on in (("unfused", False), ("fused", True)):
        run(fused_on, layer_ops)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run(fused_on, layer_ops)
            torch.cuda.synchronize()
        results[f"layer_small_op_kernels_{label}"] = sum(
            1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return results


def main() -> int:
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for name, check in (("sampler", lambda: check_sampler_syncs_once()),
                            ("memory", lambda: check_memory_sizing(Path(tmp) / "llama")),
                            ("fused_ops", lambda: check_fused_ops())):
            try:
                results.update(check())
            except Exception as e:  # noqa: BLE001 - report every check, then fail
                results[f"{name}_failed"] = f"{type(e).__name__}: {e}"[:500]
                failed = True
    print(json.dumps(results))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
