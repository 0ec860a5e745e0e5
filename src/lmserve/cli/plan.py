"""`lmserve plan`: will a model fit, on how many GPUs, and how many requests will its KV cache hold?

From a checkpoint's config.json (a directory, or a catalog id through the shapes in
lmserve/models/shapes.py) and a hardware description, for every valid tensor-parallel size:
each rank's weight bytes by parameter group (split as tensor parallelism splits them), the KV
bytes per token per rank, the KV cache left at --gpu-memory-utilization after the weights, an
activation estimate and the device's own overhead, in tokens and in full-context requests; and
the smallest TP size that fits, or exactly why nothing does. The arithmetic is the engine's own
(engine/capacity.py); docs/capacity_planning.md explains the rules and what was measured.

    lmserve plan Qwen/Qwen2.5-72B-Instruct --gpus 8 --gpu-memory 80GiB
    lmserve plan meta-llama/Meta-Llama-3.1-405B-Instruct --gpus 8 --gpu-memory 80GiB --nnodes 2 --json
"""

from __future__ import annotations

import argparse
import json
import sys

from lmserve.cli.serve import _bytes, _fraction, _positive


def register(sub) -> None:
    p = sub.add_parser("plan", help="capacity planner: GPUs, tensor-parallel size, KV cache of a model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="checkpoint directory (its config.json) or catalog model id")
    p.add_argument("--gpus", type=_positive, required=True, metavar="N", help="GPUs per node")
    p.add_argument("--gpu-memory", type=_bytes, required=True, metavar="SIZE",
                   help="memory of one GPU, e.g. 80GiB, 141GB (GB = 10^9 bytes, GiB = 2^30)")
    p.add_argument("--nnodes", type=_positive, default=1, metavar="K", help="nodes (default 1)")
    p.add_argument("--quantization", choices=["none", "fp8", "int8", "int4"], default="none",
                   help="weight storage (default none: the compute dtype)")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                   help="KV cache element type (default auto: the compute dtype)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="compute dtype (default bfloat16)")
    p.add_argument("--max-model-len", type=_positive, metavar="TOKENS",
                   help="context of one request (default: the model's)")
    p.add_argument("--gpu-memory-utilization", type=_fraction, default=0.9, metavar="FRACTION",
                   help="fraction of each GPU for weights + activations + KV cache (default 0.9)")
    p.add_argument("--tensor-parallel-size", "-tp", type=_positive, metavar="N",
                   help="plan this TP size only (default: every valid size, the smallest that fits chosen)")
    p.add_argument("--max-num-batched-tokens", type=_positive, default=2048, metavar="N",
                   help="tokens per step, for the activation estimate (default 2048, the engine's)")
    p.add_argument("--max-num-seqs", type=_positive, default=256, metavar="N",
                   help="sequences per step, for the sampler's share of the estimate (default 256, the engine's)")
    p.add_argument("--block-size", type=_positive, default=16, metavar="TOKENS", help="KV block size (default 16)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)


def load_inventory(model: str):
    """(inventory, where the shape came from, the context it is served with) for a checkpoint
    directory (its own context) or a catalog id (the catalog's context, which may be shorter
    than the config's: DeepSeek-V2 is served at 128K of its 160K)."""
    from pathlib import Path

    from lmserve.models.catalog import CATALOG
    from lmserve.models.inventory import inventory
    from lmserve.models.loader import read_config, resolve_checkpoint
    from lmserve.models.registry import get_model_class, resolve_architecture
    from lmserve.models.shapes import catalog_shape

    path = Path(model).expanduser()
    if path.exists():
        checkpoint = resolve_checkpoint(str(path))
        return inventory(read_config(checkpoint)), str(checkpoint.path), None
    shape = catalog_shape(model)
    if shape is None:
        raise ValueError(f"{model!r} is neither a checkpoint directory nor a catalog model id with a known shape "
                         "(lmserve/models/shapes.py)")
    architecture = resolve_architecture(shape)
    config = get_model_class(architecture).config_from_hf(shape, None)
    config.architecture = architecture
    entry = CATALOG.get(model)
    return inventory(config), "catalog shape (lmserve/models/shapes.py)", entry.context_length if entry else None


def build_plan(args: argparse.Namespace):
    from lmserve.engine.capacity import DTYPES, Hardware, Options, plan

    inv, source, served_context = load_inventory(args.model)
    hardware = Hardware(args.gpus, args.gpu_memory, args.nnodes)
    options = Options(dtype=DTYPES[args.dtype], quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                      max_model_len=args.max_model_len or served_context,
                      gpu_memory_utilization=args.gpu_memory_utilization,
                      block_size=args.block_size, max_num_batched_tokens=args.max_num_batched_tokens,
                      max_num_seqs=args.max_num_seqs)
    return plan(inv, hardware, options, args.tensor_parallel_size), source


def run(args: argparse.Namespace) -> int:
    from lmserve.errors import CheckpointError

    try:
        result, source = build_plan(args)
    except (CheckpointError, ValueError) as e:
        print(f"lmserve plan: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(as_json(args.model, source, result), indent=2))
    else:
        print(as_text(args.model, source, result))
    return 0 if result.chosen else 1


GiB = 1 << 30


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def _options_line(p) -> str:
    o, h = p.options, p.hardware
    kv = "fp8" if o.kv_cache_dtype == "fp8" else str(o.dtype).removeprefix("torch.")
    weights = str(o.dtype).removeprefix("torch.") if o.quantization == "none" else o.quantization
    return (f"hardware: {h.nnodes} node(s) x {h.gpus_per_node} GPU(s) of {_gib(h.gpu_memory)}; weights {weights}, "
            f"KV cache {kv}; max_model_len {p.max_model_len}; gpu_memory_utilization {o.gpu_memory_utilization:g}")


def as_text(model: str, source: str, p) -> str:
    inv = p.inventory
    lines = [f"{model}: {inv.architecture}, {inv.num_parameters() / 1e9:.2f} B parameters ({source})",
             _options_line(p), ""]
    valid = [c for c in p.candidates if not c.invalid]
    header = (f"{'TP':>3}  {'weights/rank':>13}  {'KV/token/rank':>13}  {'KV cache/rank':>13}  {'tokens':>10}  "
              f"{'full-context requests':>21}  fits")
    lines.append(header)
    for c in valid:
        kv_cache = _gib(c.kv_cache) if c.kv_cache else "-"
        lines.append(f"{c.tensor_parallel_size:>3}  {_gib(c.weight_total):>13}  {c.kv_bytes_per_token:>7,} bytes  "
                     f"{kv_cache:>13}  {c.tokens:>10,}  {c.full_context_requests:>21,}  "
                     + ("yes" if c.fits else "no"))
    skipped = [c for c in p.candidates if c.invalid]
    if skipped:
        lines.append(f"(not valid: {', '.join(f'TP={c.tensor_parallel_size}' for c in skipped)}; "
                     "--json gives each reason)" if len(skipped) > 1 else f"(TP={skipped[0].tensor_parallel_size} is "
                     f"not valid: {skipped[0].invalid})")
    detail = p.detail
    if detail is not None:
        lines += ["", f"Per rank at TP={detail.tensor_parallel_size}:"]
        for group, n in detail.weights.items():
            lines.append(f"  {group:<24} {_gib(n):>12}")
        lines.append(f"  {'weights':<24} {_gib(detail.weight_total):>12}")
        lines.append(f"  {'rope table':<24} {_gib(detail.rope_table):>12}")
        lines.append(f"  {'activation estimate':<24} {_gib(detail.activation):>12}  "
                     f"(the larger of {p.options.max_num_batched_tokens} tokens through the widest layer and "
                     f"the sampler over {min(p.options.max_num_seqs, p.options.max_num_batched_tokens)} rows)")
        lines.append(f"  {'device overhead':<24} {_gib(detail.overhead):>12}  (CUDA context, workspaces"
                     + (", NCCL" if detail.tensor_parallel_size > 1 else "") + ")")
        lines.append(f"  {'usable':<24} {_gib(detail.usable):>12}")
        if detail.kv_cache:
            lines.append(f"  {'KV cache':<24} {_gib(detail.kv_cache):>12}  = {detail.num_blocks:,} blocks of "
                         f"{p.options.block_size} tokens x {detail.kv_bytes_per_token:,} bytes per token")
    lines.append("")
    if p.chosen:
        c = p.chosen
        lines.append(f"Smallest TP that fits: {c.tensor_parallel_size} -- {c.tokens:,} tokens of KV cache, "
                     f"{c.full_context_requests:,} concurrent {p.max_model_len}-token request"
                     + ("s." if c.full_context_requests != 1 else "."))
    else:
        lines.append(f"Nothing fits: {p.reason}.")
    lines += [f"note: {n}" for n in notes(p)]
    return "\n".join(lines)


def notes(p) -> list[str]:
    out = []
    if p.options.quantization == "fp8":
        out.append("lmserve serves no fp8 weights yet: this is the arithmetic of an fp8 checkpoint "
                   "(1 byte per weight + a float32 scale per output row), as vLLM serves them")
    if p.options.quantization in ("int8", "int4"):
        out.append(f"lmserve's {p.options.quantization} is weight-only and runs on CPU today; "
                   "the LM head, embeddings, norms and MoE experts stay in the compute dtype")
    if p.options.kv_cache_dtype == "fp8":
        out.append("lmserve has no fp8 KV cache yet: this is the arithmetic of one (1 byte per value)")
    if p.hardware.nnodes > 1 and p.chosen and p.chosen.tensor_parallel_size > p.hardware.gpus_per_node:
        out.append("TP across nodes all-reduces over the network twice per layer: expect it slower than one node")
    return out


def as_json(model: str, source: str, p) -> dict:
    o, h = p.options, p.hardware

    def candidate(c) -> dict:
        d = {"tensor_parallel_size": c.tensor_parallel_size, "valid": c.invalid is None}
        if c.invalid:
            return {**d, "invalid": c.invalid}
        return {**d, "weight_bytes": c.weight_total, "weight_bytes_by_group": c.weights,
                "rope_table_bytes": c.rope_table, "activation_bytes": c.activation, "overhead_bytes": c.overhead,
                "usable_bytes": c.usable, "kv_bytes_per_token": c.kv_bytes_per_token, "kv_cache_bytes": c.kv_cache,
                "kv_cache_blocks": c.num_blocks, "kv_cache_tokens": c.tokens,
                "full_context_requests": c.full_context_requests, "fits": c.fits, "why_not": c.why_not}

    return {"model": model, "source": source, "architecture": p.inventory.architecture,
            "parameters": p.inventory.num_parameters(),
            "hardware": {"gpus_per_node": h.gpus_per_node, "nnodes": h.nnodes, "gpu_memory_bytes": h.gpu_memory},
            "options": {"dtype": str(o.dtype).removeprefix("torch."), "quantization": o.quantization,
                        "kv_cache_dtype": o.kv_cache_dtype, "max_model_len": p.max_model_len,
                        "gpu_memory_utilization": o.gpu_memory_utilization, "block_size": o.block_size,
                        "max_num_batched_tokens": o.max_num_batched_tokens, "max_num_seqs": o.max_num_seqs},
            "candidates": [candidate(c) for c in p.candidates],
            "tensor_parallel_size": p.chosen.tensor_parallel_size if p.chosen else None,
            "fits": p.chosen is not None, "reason": p.reason, "notes": notes(p)}
