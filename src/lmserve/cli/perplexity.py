"""`lmserve perplexity FILE`: a model's perplexity on a text file by llama.cpp's protocol, so a
quantized or converted model is compared with `llama-perplexity` on the same GGUF and file:

    lmserve perplexity wiki.test.raw --model model.gguf --ctx 512
    llama-perplexity -m model.gguf -f wiki.test.raw -c 512

Chunks of --ctx tokens, BOS first in each when the tokenizer adds one, the second half of each
chunk scored; prints the running estimate per chunk and `Final estimate: PPL = ... +/- ...`."""

from __future__ import annotations

import argparse
import json
import sys
import time

from lmserve.cli._types import positive_int
from lmserve.defaults import DEFAULT_MODEL_ID


def register(sub) -> None:
    p = sub.add_parser("perplexity", help="perplexity of a model on a text file (llama-perplexity's protocol)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="a UTF-8 text file")
    p.add_argument("--model", default=DEFAULT_MODEL_ID,
                   help=f"checkpoint directory, .gguf file or bundled model id (default: {DEFAULT_MODEL_ID})")
    p.add_argument("--ctx", type=positive_int, default=512,
                   help="tokens per chunk (llama-perplexity's -c; default 512)")
    p.add_argument("--chunks", type=positive_int, default=None, help="score at most this many chunks (default: all)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        print(f"lmserve perplexity: cannot read {args.file}: {e}", file=sys.stderr)
        return 2
    from lmserve import LLM
    from lmserve.engine.scoring import llama_perplexity, tokenizer_bos

    # Chunks are scored a few at a time: room for them and their one sampled token each.
    llm = LLM(args.model, args.dtype, device=args.device, max_model_len=args.ctx + 1)
    if llm.tokenizer is None:
        print("lmserve perplexity: this model has no tokenizer", file=sys.stderr)
        return 2
    ids = llm.tokenizer.encode(text, add_special_tokens=True)
    if args.ctx + 1 > llm.engine.max_seq_len:
        print(f"lmserve perplexity: --ctx {args.ctx} exceeds the model's context ({llm.engine.max_seq_len - 1})",
              file=sys.stderr)
        return 2

    def progress(i: int, ppl: float) -> None:
        if not args.json:
            print(f"[{i}]{ppl:.4f},", end="", flush=True)

    started = time.perf_counter()
    try:
        result = llama_perplexity(llm, ids, args.ctx, tokenizer_bos(llm.tokenizer), args.chunks, on_chunk=progress)
    except ValueError as e:
        print(f"lmserve perplexity: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started
    if args.json:
        print(json.dumps({"model": args.model, "file": args.file, "ctx": args.ctx, "tokens": len(ids),
                          "chunks": len(result.running), "tokens_scored": result.tokens_scored, "ppl": result.ppl,
                          "stderr": result.stderr, "seconds": round(seconds, 2)}))
    else:
        print()
        print(f"{len(ids)} tokens, {len(result.running)} chunks of {args.ctx}, {result.tokens_scored} tokens scored "
              f"in {seconds:.1f} s")
        print(f"Final estimate: PPL = {result.ppl:.4f} +/- {result.stderr:.5f}")
    return 0
