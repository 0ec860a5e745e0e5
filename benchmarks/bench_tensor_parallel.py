"""Tensor parallelism on CPU: what one engine step costs at TP=2 against TP=1 (gloo).

On one CPU host, TP=2 splits the same cores between two processes, so it cannot be faster than
TP=1; what this measures is the price of the machinery: per step one broadcast of the step's
metadata plus two all-reduces per layer (attention output, MLP output), the vocabulary-parallel
embedding's all-reduce and the logits' gather. Each engine gets the same total of threads. The
model is a small Llama shape with dummy weights (config.json only), served in float32.

    PYTHONPATH=src python benchmarks/bench_tensor_parallel.py [--threads 2] [--layers 4]

Prints step times for batch-1 and batch-8 decode and a 256-token prefill (the best of interleaved
rounds, each the median of its steps), the TP=2 / TP=1 ratios, and the collectives alone: one
command's broadcast and one all-reduce of a decode step's [1, hidden] and a prefill's [256, hidden].
Numbers from a shared host are noisy: compare within one run.
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

from lmserve.engine.llm_engine import LLMEngine  # noqa: E402
from lmserve.model_input import ModelInput  # noqa: E402


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
    ap.add_argument("--threads", type=int, default=1,
                    help="threads per rank (default 1: OpenMP barriers stall on a loaded shared host)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=10, help="steps per timing (their median)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the best round is kept)")
    args = ap.parse_args()
    results: dict[int, dict[str, list[float]]] = {1: {}, 2: {}}
    with tempfile.TemporaryDirectory() as tmp:
        write_config(Path(tmp), args.layers, args.hidden)
        torch.set_num_threads(2 * args.threads)  # TP=2's worker gets half (LLMEngine's split)
        engines = {tp: LLMEngine(tmp, dtype="float32", load_format="dummy", tensor_parallel_size=tp,
                                 num_kv_blocks=160, block_size=16) for tp in (1, 2)}
        try:
            # Interleaved rounds, so load from other processes on a shared host hits both alike.
            for _ in range(args.rounds):
                for name, batch in step_inputs(16).items():
                    for tp, engine in engines.items():
                        torch.set_num_threads(args.threads)
                        results[tp].setdefault(name, []).append(time_steps(engine, batch, args.repeats))
            probes = collective_probes(engines[2].executor, args.hidden, args.repeats)
        finally:
            engines[2].shutdown()
    print(f"Llama shape: {args.layers} layers, hidden {args.hidden}, vocab 8192, float32; "
          f"{args.threads} thread(s) per rank")
    print(f"{'step':<14}{'TP=1 ms':>10}{'TP=2 ms':>10}{'TP=2/TP=1':>12}")
    for name in results[1]:
        one, two = min(results[1][name]) * 1e3, min(results[2][name]) * 1e3
        print(f"{name:<14}{one:>10.2f}{two:>10.2f}{two / one:>12.2f}")
    print("collectives (gloo, 2 ranks):")
    for name, seconds in probes.items():
        print(f"  {name:<34}{seconds * 1e3:>8.3f} ms")
    per_step = (2 * args.layers + 1) * probes["all-reduce [1, hidden]"] + probes["broadcast of a command"]
    print(f"  a decode step's {2 * args.layers + 1} all-reduces + its broadcast: ~{per_step * 1e3:.2f} ms "
          f"(the logits' gather comes on top)")
    return 0


def collective_probes(executor, hidden: int, repeats: int) -> dict[str, float]:
    out = {}
    started = time.perf_counter()
    for _ in range(repeats):
        executor.run_all("noop")
    out["broadcast of a command"] = (time.perf_counter() - started) / repeats
    for rows in (1, 256):
        n = 20 * repeats
        started = time.perf_counter()
        executor.run_all("all_reduce_probe", n, (rows, hidden))
        out[f"all-reduce [{rows}, hidden]"] = (time.perf_counter() - started - out["broadcast of a command"]) / n
    return out


if __name__ == "__main__":
    sys.exit(main())
