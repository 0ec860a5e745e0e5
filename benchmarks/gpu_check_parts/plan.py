"""Part plan: `lmserve plan`'s predictions against a dummy-weight engine's measured numbers."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from gpu_check_parts.common import accepted, free_device_memory
from gpu_check_parts.report import CheckFailed, Report
from gpu_check_parts.shapes import DEEPSEEK_V2_LITE, LLAMA_8B, QWEN2_57B_A14B, TINY_SPEED_MODEL
from lmserve.engine.llm_engine import LLMEngine


def part_plan(report: Report, device: torch.device) -> None:
    """`lmserve plan`'s prediction for the Llama-3.1-8B, DeepSeek-V2-Lite (MLA + MoE) and
    Qwen2-57B-A14B (MoE) shapes on this device (TP=1, its total memory, several step budgets)
    against a dummy-weight engine's measured numbers: parameter bytes and KV bytes per token
    must be equal; the KV capacity (num_blocks x block_size) within 3%, reported as a ratio
    with the activation estimate against the measured peak. On CPU (smoke mode) the tiny
    shape, with an explicit kv_cache_memory budget, must give equal blocks."""
    numbers = report.numbers.setdefault("plan", {})
    # Several step budgets: the sampler's rows and the layers' tokens each set the peak (the
    # activation estimate's two terms); few rows leave the layers' widths (dense, MoE, MLA) to show.
    shapes = [("Llama-3.1-8B shape", LLAMA_8B, [(2048, 256), (8192, 256), (2048, 32), (16384, 8), (32768, 8)]),
              ("DeepSeek-V2-Lite shape", DEEPSEEK_V2_LITE, [(2048, 8), (8192, 8)]),
              ("Qwen2-57B-A14B shape", QWEN2_57B_A14B, [(2048, 8), (8192, 8)])]
    if device.type != "cuda":
        shapes = [("tiny Llama shape", TINY_SPEED_MODEL, [(2048, 256)])]
    for label, config, settings in shapes:
        plan_shape(report, device, label, config, settings, numbers)


def plan_shape(report: Report, device: torch.device, label: str, config: dict, settings: list, numbers: dict) -> None:
    from lmserve.engine import capacity, kv_sizing
    from lmserve.models.inventory import inventory

    config_dir = Path(tempfile.mkdtemp(prefix="gpu_check_plan_"))
    (config_dir / "config.json").write_text(json.dumps(config))
    for tokens, seqs in settings:
        def check(tokens=tokens, seqs=seqs):
            readings = []
            measure = kv_sizing.measure_peak

            def recording(*args, **kwargs):
                readings.append(measure(*args, **kwargs))
                return readings[-1]

            kv_sizing.measure_peak = recording
            options = {"max_num_batched_tokens": tokens, "max_num_seqs": seqs}
            if device.type == "cuda":
                options.update(gpu_memory_utilization=0.9, cuda_graphs=False)  # graphs come after the sizing
            else:
                options["kv_cache_memory"] = 256 << 20
            try:
                engine = LLMEngine(str(config_dir), dtype="bfloat16", device=str(device), load_format="dummy",
                                   **accepted(**options))
            finally:
                kv_sizing.measure_peak = measure
            inv = inventory(engine.model_config)
            params = sum(p.numel() * p.element_size() for p in engine.model.parameters())
            buffers = sum(b.numel() * b.element_size() for b in engine.model.buffers())
            per_block = engine.runner.kv_bytes_per_block(engine.model, engine.engine_config.block_size, engine.dtype)
            predicted_weights = sum(capacity.weight_bytes(inv, 1, "none", torch.bfloat16).values())
            predicted_kv = capacity.kv_bytes_per_token(inv, 1, torch.bfloat16)
            row = {"params_bytes": params, "predicted_weight_bytes": predicted_weights, "buffers_bytes": buffers,
                   "predicted_rope_bytes": capacity.rope_table_bytes(inv, torch.bfloat16),
                   "kv_bytes_per_token": per_block // engine.engine_config.block_size,
                   "predicted_kv_bytes_per_token": predicted_kv, "num_blocks": engine.num_blocks}
            if (params, per_block) != (predicted_weights, predicted_kv * engine.engine_config.block_size):
                raise CheckFailed(f"measured {params} parameter bytes, {per_block} KV bytes per block; the planner "
                                  f"predicts {predicted_weights} and {predicted_kv * engine.engine_config.block_size}")
            if device.type != "cuda":
                blocks = capacity.cache_blocks(256 << 20, per_block)
                numbers[f"{label}: t{tokens}_s{seqs}"] = {**row, "predicted_num_blocks": blocks}
                if blocks != engine.num_blocks:
                    raise CheckFailed(f"engine {engine.num_blocks} blocks, planner {blocks}")
                return f"weights, KV bytes and {blocks} blocks as predicted"
            reading = readings[0]
            total = reading.total
            options = capacity.Options(max_num_batched_tokens=tokens, max_num_seqs=seqs,
                                       max_model_len=engine.max_model_len)
            plan = capacity.plan(inv, capacity.Hardware(1, total), options, tensor_parallel_size=1)
            c = plan.candidates[0]
            in_use = kv_sizing.peak_in_use(reading)
            measured_activation = reading.torch_peak - reading.profile_kv - params - buffers
            non_torch = max(reading.total - reading.free - reading.torch_allocated, 0)
            row.update(total_bytes=total, in_use_bytes=in_use, predicted_in_use_bytes=c.in_use,
                       activation_bytes=measured_activation, predicted_activation_bytes=c.activation,
                       non_torch_bytes=non_torch, predicted_overhead_bytes=c.overhead,
                       predicted_num_blocks=c.num_blocks, tokens=engine.num_blocks * engine.engine_config.block_size,
                       predicted_tokens=c.tokens)
            numbers[f"{label}: t{tokens}_s{seqs}"] = row
            ratio = c.tokens / row["tokens"]
            del engine
            free_device_memory(device)
            line = (f"{tokens} tokens/{seqs} seqs: KV capacity predicted {c.tokens:,} tokens, engine {row['tokens']:,} "
                    f"({ratio:.4f}x); activations predicted {c.activation / 2**30:.2f} GiB, measured "
                    f"{measured_activation / 2**30:.2f} GiB; outside torch predicted {c.overhead / 2**30:.2f} GiB, "
                    f"measured {non_torch / 2**30:.2f} GiB")
            if abs(ratio - 1) > 0.03:
                raise CheckFailed(line)
            return line

        report.check(f"plan: {label}, {tokens} tokens / {seqs} seqs", check, needs_s=30)
        free_device_memory(device)
