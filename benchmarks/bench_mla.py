"""DeepSeek-V2's multi-head latent attention at decode: lmserve's paged latent cache read with
kv_b_proj absorbed into the query and output, against expanding every cached latent into
per-head keys and values at each step (what transformers' DeepseekV2Attention does), in one run.

One attention layer with the released models' shapes (128 heads, nope 128 + rope 64, values
128, latent 512), random weights, a batch of sequences decoding one token each at a given
context length. Prints ms per step for both, their ratio, and the KV bytes per token per layer
of the latent cache against a per-head key/value cache.

    .venv/bin/python benchmarks/bench_mla.py [--contexts 1024 4096 16384] [--batch 1] [--heads 128]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from lmserve.attention import MLAAttention, MLAKVCacheSpec
from lmserve.attention.reference import ReferenceBackend
from lmserve.layers.linear import Linear
from lmserve.model_input import ModelInput

NOPE, ROPE, V, RANK, BLOCK = 128, 64, 128, 512, 16


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    heads, b = args.heads, args.batch
    torch.manual_seed(0)
    kv_b_proj = Linear(RANK, heads * (NOPE + V), dtype=dtype)
    with torch.no_grad():
        kv_b_proj.weight.normal_(0, 0.02)
    layer = MLAAttention(heads, NOPE, ROPE, V, RANK, (NOPE + ROPE) ** -0.5)
    spec = layer.kv_spec
    per_head_bytes = heads * (NOPE + ROPE + V) * torch.empty((), dtype=dtype).element_size()
    print(f"# {platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}, {args.dtype}, "
          f"{heads} heads, batch {b}")
    print(f"# KV bytes per token per layer: latent cache {spec.bytes_per_token(dtype)}, "
          f"per-head keys and values {per_head_bytes} ({per_head_bytes / spec.bytes_per_token(dtype):.0f}x)")
    print("| context | lmserve absorbed ms/step | expand per step ms/step | ratio |")
    print("|---:|---:|---:|---:|")
    for ctx in args.contexts:
        with torch.inference_mode():
            a, e = bench_context(layer, kv_b_proj, ctx, b, heads, dtype, args.repeats)
        print(f"| {ctx} | {a:.2f} | {e:.2f} | {e / a:.1f}x |")


def bench_context(layer: MLAAttention, kv_b_proj: Linear, ctx: int, b: int, heads: int, dtype: torch.dtype,
                  repeats: int) -> tuple[float, float]:
    """(absorbed ms/step, expanded ms/step) for b sequences decoding at context ctx."""
    backend = ReferenceBackend()
    blocks = -(-ctx // BLOCK)
    cache = MLAKVCacheSpec(RANK, ROPE).allocate(b * blocks, BLOCK, dtype, torch.device("cpu"))
    cache[0].normal_()
    tables = [list(range(i * blocks, (i + 1) * blocks)) for i in range(b)]
    batch = ModelInput(token_ids=[0] * b, query_lens=[1] * b, context_lens=[ctx - 1] * b, block_tables=tables,
                       num_decodes=b, logit_rows=[])
    positions = torch.tensor(batch.positions)
    q = torch.randn(b, heads, NOPE + ROPE, dtype=dtype)
    entry = torch.randn(b, RANK + ROPE, dtype=dtype)

    def absorbed():
        meta = backend.build_metadata(batch, positions, BLOCK, dtype)
        return layer(q, entry, kv_b_proj, cache, meta)

    def expanded():
        # transformers: every cached latent through kv_b_proj into per-head keys and values.
        ents = cache[0].view(-1, RANK + ROPE)
        outs = []
        for i in range(b):
            ent = ents[i * blocks * BLOCK:i * blocks * BLOCK + ctx]
            kv = kv_b_proj(ent[:, :RANK]).view(ctx, heads, NOPE + V)
            k = torch.cat((kv[..., :NOPE], ent[:, None, RANK:].expand(ctx, heads, ROPE)), dim=-1)
            outs.append(F.scaled_dot_product_attention(q[i:i + 1].transpose(0, 1).unsqueeze(0),
                                                       k.transpose(0, 1).unsqueeze(0),
                                                       kv[..., NOPE:].transpose(0, 1).unsqueeze(0), scale=layer.scale))
        return outs

    return timed(absorbed, repeats), timed(expanded, repeats)


if __name__ == "__main__":
    main()
