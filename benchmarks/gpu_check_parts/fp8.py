"""Part fp8: the fp8 linear method on this device, then the 8B shape's speed in fp8 beside bf16."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from gpu_check_parts.common import free_device_memory
from gpu_check_parts.report import CheckFailed, Report
from gpu_check_parts.speed import (
    decode_speed,
    lmserve_engine,
    offline_throughput,
    speed_shape,
    warm_up,
    weight_bytes_per_token,
)


def part_fp8(report: Report, device: torch.device, args) -> None:
    """FP8 weights (issue 22): the method's math on this device, then the 8B shape's speed with
    `quantization: fp8` beside bf16's, both measured here with CUDA graphs (the engine default)."""
    try:
        from lmserve.layers.quantization.fp8 import Fp8LinearMethod, scaled_mm_available
    except ImportError:
        report.skip("fp8", "this checkout has no fp8 quantization method")
        return
    from lmserve.layers.linear import Linear

    def layer_math():
        torch.manual_seed(0)
        with torch.device(device):
            layer = Linear(4096, [4096, 1024, 1024], quant_method=Fp8LinearMethod(None), dtype=torch.bfloat16)
            layer.weight.data.normal_(0, 0.02)
            layer.process_weights()
            x = torch.randn(8, 4096, dtype=torch.bfloat16)
        dense = (layer.weight.float() * layer.row_scale[:, None]).to(torch.bfloat16)
        ref = torch.nn.functional.linear(x, dense).float()
        got = layer(x).float()
        rel = float((got - ref).norm() / ref.norm())
        path = "torch._scaled_mm" if layer.quant_method.use_scaled_mm else "weight-only dequantization"
        report.numbers.setdefault("fp8", {})["layer_rel_error"] = round(rel, 5)
        if rel > 0.05:  # per-token fp8 activations: ~2-3% relative error expected
            raise CheckFailed(f"{path}: relative error {rel:.3f} against the dequantized dense product")
        return f"{path}: relative error {rel:.4f} against the dequantized dense product"

    report.check("fp8: linear method vs dequantized dense", layer_math, needs_s=10)
    if device.type == "cuda" and not scaled_mm_available(device):
        report.skip("fp8: speed", "compute capability below 8.9: fp8 runs weight-only (the slow path)")
        return
    shape = speed_shape(device, args.quick, args.requests)
    config_dir = Path(tempfile.mkdtemp(prefix="gpu_check_fp8_"))
    (config_dir / "config.json").write_text(json.dumps(shape.config))
    numbers = report.numbers.setdefault("fp8", {})
    vocab = shape.config["vocab_size"]
    report.check("fp8: KV cache (kv_cache_dtype fp8) vs bf16 KV", lambda: kv_cache_check(device, config_dir, numbers),
                 needs_s=60)
    for quant in ("none", "fp8"):
        state: dict = {}

        def load(quant=quant, state=state):
            started = time.perf_counter()
            state["engine"] = engine = lmserve_engine(config_dir, device, None, {"quantization": quant})
            warm_up(engine, shape)
            wbytes = weight_bytes_per_token(engine.model)
            numbers[f"{quant}_weight_bytes_per_token"] = wbytes
            return f"{quant}: up in {time.perf_counter() - started:.1f}s, {wbytes / 1e9:.3g} GB read per token"

        if not report.check(f"fp8: {quant} load + warm-up", load, needs_s=40):
            continue
        engine = state.pop("engine")

        def batch1(quant=quant, engine=engine):
            r = decode_speed(engine, shape, vocab)
            numbers[f"{quant}_decode_tok_s"] = round(r["decode_tok_s"], 1)
            line = f"{quant} batch-1 decode {r['decode_tok_s']:.1f} tok/s"
            bw = report.numbers.get("copy_bandwidth_GBps")
            if bw:
                roof = bw * 1e9 / numbers[f"{quant}_weight_bytes_per_token"]
                numbers[f"{quant}_roofline_fraction"] = round(r["decode_tok_s"] / roof, 3)
                line += f", {r['decode_tok_s'] / roof:.0%} of its {roof:.0f} tok/s roofline"
            return line + vs_bf16(numbers, quant, "decode", r["decode_tok_s"], 1.5)

        report.check(f"fp8: {quant} batch-1 decode", batch1, needs_s=15)

        def throughput(quant=quant, engine=engine):
            budget = min(args.throughput_budget_s, max(report.time_left() - 30, 10))
            r = offline_throughput(engine, shape, vocab, budget)
            numbers[f"{quant}_offline_tok_s"] = round(r["output_tok_s"], 1)
            line = f"{quant} offline {r['output_tok_s']:.0f} output tok/s" + (" (partial)" if r["partial"] else "")
            return line + vs_bf16(numbers, quant, "offline", r["output_tok_s"], 1.3)

        report.check(f"fp8: {quant} offline throughput", throughput, needs_s=40)
        del engine
        free_device_memory(device)


def kv_cache_check(device: torch.device, config_dir: Path, numbers: dict) -> str:
    """The 8B shape (dummy weights, the same in both runs) served with a bf16 and an fp8 KV cache
    (the Triton kernels' fp8 reads, CUDA graphs on): logits of every greedy step within 2^-4 of
    their range until the runs' first differing token (tests/attention/test_fp8_kv_cache.py's
    tolerance), the share of greedy tokens that agree, and the blocks each cache gets."""
    from gpu_check_parts.speed import random_prompts
    from lmserve import SamplingParams
    from lmserve.attention.kv_cache_dtype import FP8_RELATIVE_ERROR
    from tests.support.family_checkpoints import serve_and_capture

    vocab = json.loads((config_dir / "config.json").read_text())["vocab_size"]
    prompts = [p[:n] for p, n in zip(random_prompts(4, 96, vocab, seed=5), (96, 40, 17, 64))]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    runs, blocks = {}, {}
    for kv in ("auto", "fp8"):
        engine = lmserve_engine(config_dir, device, None, {"kv_cache_dtype": kv})
        runs[kv] = serve_and_capture(engine, prompts, params)
        blocks[kv] = engine.num_blocks
        del engine
        free_device_memory(device)
    worst, same, total = 0.0, 0, 0
    for (ref_tokens, ref_logits, _), (tokens, logits, _) in zip(runs["auto"], runs["fp8"]):
        parted = next((i for i, (a, b) in enumerate(zip(ref_tokens, tokens)) if a != b), len(tokens))
        same, total = same + parted, total + len(tokens)
        for ref_row, row in zip(ref_logits[:parted + 1], logits[:parted + 1]):
            ref_row, row = ref_row.float(), row.float()
            worst = max(worst, ((row - ref_row).abs().max() / (ref_row.max() - ref_row.min())).item())
    numbers.update(kv_fp8_logit_error=round(worst, 4), kv_fp8_greedy_agreement=round(same / total, 3),
                   kv_fp8_blocks_ratio=round(blocks["fp8"] / blocks["auto"], 3))
    line = (f"logits within {worst:.4f} of their range (tolerance {FP8_RELATIVE_ERROR}), greedy tokens "
            f"agree {same}/{total} before parting, {blocks['fp8']} blocks vs {blocks['auto']} in bf16")
    if worst > FP8_RELATIVE_ERROR or blocks["fp8"] < 1.8 * blocks["auto"]:
        raise CheckFailed(line)
    return line


def vs_bf16(numbers: dict, quant: str, measure: str, tok_s: float, target: float) -> str:
    """fp8's ratio to the bf16 run of the same measure ("decode", "offline"), recorded beside it
    and said in the check's line; nothing for bf16 itself or when its run did not finish."""
    bf16 = numbers.get(f"none_{measure}_tok_s")
    if quant != "fp8" or not bf16:
        return ""
    ratio = tok_s / bf16
    numbers[f"{measure}_ratio_vs_bf16"] = round(ratio, 2)
    return f", {ratio:.2f}x bf16 (target >= {target}x)"
