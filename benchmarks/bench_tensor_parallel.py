"""Tensor parallelism on CPU: what one engine step costs at TP=2 against TP=1 (gloo).

On one CPU host, TP=2 splits the same cores between two processes, so it cannot be faster than
TP=1; what this measures is the price of the machinery: per step one broadcast of the step's
metadata plus two all-reduces per layer (attention output, MLP output), the vocabulary-parallel
embedding's all-reduce and the logits' gather. Each engine gets the same total of threads. The
model is a small Llama shape with dummy weights (config.json only), served in float32.

    PYTHONPATH=src python benchmarks/bench_tensor_parallel.py [--threads 2] [--layers 4]

Prints step times for batch-1 and batch-8 decode and a 256-token prefill, and the TP=2 / TP=1
ratios. Numbers from a shared host are noisy: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from lmserve.engine.batch import ModelInput  # noqa: E402
from lmserve.engine.llm_engine import LLMEngine  # noqa: E402


def write_config(directory: Path, layers: int, hidden: int) -> None:
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 8192,
              "hidden_size": hidden, "intermediate_size": hidden * 3, "num_hidden_layers": layers,
              "num_attention_heads": hidden // 64, "num_key_value_heads": hidden // 128,
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
              "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "float32"}
    (directory / "config.json").write_text(json.dumps(config))


def step_inputs(block_size: int) -> dict[str, ModelInput]:
    """Decode steps read 128 cached tokens per sequence; the prefill writes 256 new ones."""
    blocks = 128 // block_size + 1

    def decode(n: int) -> ModelInput:
        tables = [list(range(i * blocks, (i + 1) * blocks)) for i in range(n)]
        return ModelInput(token_ids=[7] * n, query_lens=[1] * n, context_lens=[128] * n, block_tables=tables,
                          num_decodes=n, logit_rows=list(range(n)))

    prefill = ModelInput(token_ids=[9] * 256, query_lens=[256], context_lens=[0],
                         block_tables=[list(range(256 // block_size))], num_decodes=0, logit_rows=[255])
    return {"decode b1": decode(1), "decode b8": decode(8), "prefill 256": prefill}


def time_steps(engine: LLMEngine, batch: ModelInput, repeats: int) -> float:
    for _ in range(3):
        engine.executor.execute(batch)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        engine.executor.execute(batch)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="threads in all (split between the ranks at TP=2)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_config(Path(tmp), args.layers, args.hidden)
        for tp in (1, 2):
            torch.set_num_threads(max(args.threads // tp, 1))  # workers get the same share
            engine = LLMEngine(tmp, dtype="float32", load_format="dummy", tensor_parallel_size=tp,
                               num_kv_blocks=160, block_size=16)
            results[tp] = {name: time_steps(engine, batch, args.repeats)
                           for name, batch in step_inputs(16).items()}
            engine.shutdown()
    print(f"Llama shape: {args.layers} layers, hidden {args.hidden}, vocab 8192, float32; "
          f"{args.threads} threads in all")
    print(f"{'step':<14}{'TP=1 ms':>10}{'TP=2 ms':>10}{'TP=2/TP=1':>12}")
    for name in results[1]:
        one, two = results[1][name] * 1e3, results[2][name] * 1e3
        print(f"{name:<14}{one:>10.2f}{two:>10.2f}{two / one:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
