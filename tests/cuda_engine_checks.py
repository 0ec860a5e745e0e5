"""Device checks of the engine outside attention: the KV cache sized from GPU memory and the
sampler's one synchronisation per step. What CPU tests cannot show (the driver's memory
numbers, torch's sync debug mode) is checked here on a CUDA device.

Plain Python, no pytest (the GPU image has none), like tests/family_checkpoints.py: a device
script imports these functions, or runs this file (a few seconds on an H100):

    python tests/cuda_engine_checks.py        # prints one JSON line, exits non-zero on a failure
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
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
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
    sys.path.insert(0, str(Path(__file__).parent))
    from family_checkpoints import build_llama, greedy_tokens

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


def main() -> int:
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for name, check in (("sampler", lambda: check_sampler_syncs_once()),
                            ("memory", lambda: check_memory_sizing(Path(tmp) / "llama"))):
            try:
                results.update(check())
            except Exception as e:  # noqa: BLE001 - report every check, then fail
                results[f"{name}_failed"] = f"{type(e).__name__}: {e}"[:500]
                failed = True
    print(json.dumps(results))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
