"""Speculative decoding (n-gram prompt lookup, or a draft model) vs plain decoding on the bundled model, in one run.

Two workloads, each at several concurrencies, each run by two engines over the same weights (one
with `speculative_config`, one without), alternated, best of --repeats:
- copy: chat prompts asking to copy, extract from or lightly edit a ~300-word passage or a code
  snippet, where the answer repeats the prompt (what n-gram lookup is for);
- chat: plain chat prompts, where it rarely finds anything to propose.
Greedy, EOS honoured, --max-tokens new tokens. Prints output tokens/s of both, their ratio
(speculative / plain; above 1 is faster), the acceptance rate and tokens emitted per verified
run, whether both engines produced the same tokens (they must: greedy is exact, up to bf16
near-ties between batch shapes), and the adaptive rule's fitted costs of a query row and of a verifying
sequence's cached token (fractions of a step's fixed cost: spec_decode/cost_model.py).

    .venv/bin/python benchmarks/bench_speculative.py [--concurrency 1 16 64] [--max-tokens 96] [--workloads copy chat]
        [--methods ngram draft]

`--methods draft` adds a draft-model engine whose draft is the bundled model itself (every proposal
is accepted: the ceiling of what a draft can give, paying a full draft forward per proposed token).

On a shared 2-core machine the numbers are noisy; compare ratios within one run only.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from lmserve import LLM, SamplingParams
from lmserve.chat.prompt import render_chat
from lmserve.models.loader import DEFAULT_MODEL_ID, bundled_model_path

PASSAGE = (
    "The town of Brindlemoor sits where two rivers meet, and for three hundred years its life has followed "
    "the water. In spring the Alder floods the lower meadows, leaving a layer of dark silt that the farmers "
    "plough into their fields; in late summer the Wren runs low and clear, and children wade across it to the "
    "orchards on the far bank. The old mill, built in 1742 by a merchant named Tobias Greer, still stands at "
    "the confluence, though its wheel stopped turning in 1931 when the electric grinder arrived. Today the "
    "mill houses a small museum with a collection of tools, ledgers and photographs, and volunteers open it "
    "on weekends from April to October. The ledgers are the museum's pride: they record every sack of grain "
    "that passed through the mill for nearly two centuries, with the name of the farmer, the weight of the "
    "sack and the price paid. Historians from the university in Calder have used them to trace the rise and "
    "fall of wheat prices, the arrival of new crops such as potatoes and sugar beet, and the slow decline of "
    "small farms after the railway came in 1868. The railway station closed in 1964, and the line is now a "
    "footpath that runs eleven kilometres to the market town of Hollins. Each September the town holds a "
    "river festival: boats decorated with lanterns float down the Alder at dusk, the mill's wheel is turned "
    "by hand for one evening, and the oldest resident reads aloud a page chosen at random from the ledgers. "
    "Visitors come from across the county, and the town's two inns are booked a year ahead."
)
CODE = '''def parse_orders(lines):
    orders = []
    for line in lines:
        parts = line.strip().split(",")
        if len(parts) != 3:
            continue
        name, quantity, price = parts
        orders.append({"name": name, "quantity": int(quantity), "price": float(price)})
    return orders


def total_value(orders):
    total = 0.0
    for order in orders:
        total += order["quantity"] * order["price"]
    return total
'''
COPY_TASKS = [
    f"Copy the following passage exactly, word for word:\n\n{PASSAGE}",
    f"Here is a passage:\n\n{PASSAGE}\n\nQuote the sentences that mention the mill, exactly as written.",
    f"Rename the function parse_orders to read_orders in this code and return the whole code:\n\n{CODE}",
    f"Here is a passage:\n\n{PASSAGE}\n\nRepeat the passage, replacing the name Brindlemoor with Ashford.",
]
CHAT_TASKS = [
    "Write a short poem about autumn leaves.",
    "What are three tips for staying focused while studying?",
    "Explain what a black hole is to a ten-year-old.",
    "Suggest a name for a coffee shop and say why.",
]


def run(llm: LLM, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    tokens = [o.outputs[0].token_ids for o in outs]
    return sum(map(len, tokens)) / elapsed, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workloads", nargs="+", choices=["copy", "chat"], default=["copy", "chat"])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--methods", nargs="+", choices=["ngram", "draft"], default=["ngram"])
    ap.add_argument("--speculative-config", default='{"method": "ngram", "num_speculative_tokens": 5, '
                                                    '"prompt_lookup_min": 2, "prompt_lookup_max": 4}')
    args = ap.parse_args()
    spec_config = json.loads(args.speculative_config)
    k = spec_config["num_speculative_tokens"]
    configs = {"ngram": spec_config, "draft": {"model": str(bundled_model_path()), "num_speculative_tokens": k}}
    common = dict(dtype=args.dtype, max_num_seqs=max(args.concurrency), kv_cache_memory=512 << 20)
    plain = LLM(DEFAULT_MODEL_ID, **common)
    specs = {m: LLM(DEFAULT_MODEL_ID, speculative_config=configs[m], **common) for m in args.methods}
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, {args.dtype}; max_tokens {args.max_tokens}; "
          + "; ".join(f"{m}: {json.dumps(configs[m])}" for m in args.methods))

    def encode(task: str) -> list[int]:
        return plain.engine.encode(render_chat(plain.tokenizer, [{"role": "user", "content": task}]),
                                   add_special_tokens=False)

    tasks_of = {"copy": COPY_TASKS, "chat": CHAT_TASKS}
    workloads = {name: [encode(t) for t in tasks_of[name]] for name in args.workloads}
    print(f"{'workload':8} {'method':6} {'conc':>4} {'plain tok/s':>11} {'spec tok/s':>10} {'ratio':>6} {'accept':>6} "
          f"{'tok/run':>7} {'same':>5} {'row/ctx cost':>14}")
    for name, tasks in workloads.items():
        for conc in args.concurrency:
            prompts = [tasks[i % len(tasks)] for i in range(conc)]
            for method, spec in specs.items():
                run(plain, prompts[:1], 8)  # warm both
                run(spec, prompts[:1], 8)
                best_plain = best_spec = 0.0
                stats = spec.engine.spec_decode_stats
                before = (stats.proposed, stats.accepted, stats.emitted, stats.runs)
                for _ in range(args.repeats):
                    rate, ref = run(plain, prompts, args.max_tokens)
                    best_plain = max(best_plain, rate)
                    rate, got = run(spec, prompts, args.max_tokens)
                    best_spec = max(best_spec, rate)
                proposed, accepted, emitted, runs = (now - then for now, then in zip(
                    (stats.proposed, stats.accepted, stats.emitted, stats.runs), before))
                accept = f"{accepted / proposed:.2f}" if proposed else "-"
                per_run = f"{emitted / runs:.2f}" if runs else "-"
                # The adaptive rule's fitted costs of one more query row and of a verifying sequence's
                # cached token, as fractions of a step's fixed cost.
                share = "/".join(f"{x:.2g}" for x in spec.engine.speculator.cost_model.shares())
                print(f"{name:8} {method:6} {conc:>4} {best_plain:>11.1f} {best_spec:>10.1f} "
                      f"{best_spec / best_plain:>6.2f} {accept:>6} {per_run:>7} {str(got == ref):>5} {share:>14}",
                      flush=True)


if __name__ == "__main__":
    main()
