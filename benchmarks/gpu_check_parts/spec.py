"""Part spec: speculative decoding with a draft model on the 8B shape, step costs only.

Dummy weights make a 1B-shaped draft's acceptance meaningless (it guesses nothing), so two
drafts are measured beside plain decoding, each proposing 4 tokens per step whatever the adaptive
rule would say (its cost model priced at zero: the point is what a step costs):
- a Llama-3.2-1B-shaped draft: the overhead side, 4 draft forwards + a 5-row verification per
  step for (almost) one token, as tokens/s and as ms per step vs plain decoding's;
- the target as its own draft (the same dummy weights): the ceiling, every proposal accepted
  (up to bf16 near-ties between the draft's and the verification's batch shapes).
At batch 1 and 16, greedy, EOS ignored, 128 prompt and 128 new tokens per request.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from gpu_check_parts.common import free_device_memory
from gpu_check_parts.report import CheckFailed, Report
from gpu_check_parts.shapes import LLAMA_8B, TINY_SPEED_MODEL
from gpu_check_parts.speed import lmserve_engine, random_prompts
from lmserve import SamplingParams

# Llama-3.2-1B's shape with the 8B's vocabulary and end tokens (what the tokenizer check compares
# for checkpoints without a tokenizer).
LLAMA_1B = {**LLAMA_8B, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
            "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": True,
            "rope_scaling": {**LLAMA_8B["rope_scaling"], "factor": 32.0}}
TINY_DRAFT = {**TINY_SPEED_MODEL, "num_hidden_layers": 1}
K = 4


def generate_speed(engine, vocab: int, batch: int, prompt_len: int, new: int) -> dict:
    """Output tokens/s after every request's first token (prefill excluded), and steps taken."""
    for i, prompt in enumerate(random_prompts(batch, prompt_len, vocab, seed=17)):
        engine.add_request(f"s{i}", prompt, SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True))
    total, tokens, steps, started = 0, 0, 0, None
    while engine.has_unfinished():
        outs = engine.step()
        got = sum(len(o.token_ids) for out in outs for o in out.outputs)
        total += got
        if started is None and got:
            started, got = time.perf_counter(), 0  # the first step's tokens (after the prefill) do not count
        tokens += got
        steps += started is not None
    took = time.perf_counter() - started
    if total != batch * new:
        raise CheckFailed(f"{total} tokens generated, expected {batch * new}")
    return {"tok_s": tokens / took, "ms_per_step": took / max(steps - 1, 1) * 1000}


def part_spec(report: Report, device: torch.device, args) -> None:
    try:
        from lmserve.engine.spec_decode.cost_model import FixedCost
    except ImportError:
        report.skip("spec", "this checkout has no draft-model speculative decoding")
        return
    target, draft = (LLAMA_8B, LLAMA_1B) if device.type == "cuda" else (TINY_SPEED_MODEL, TINY_DRAFT)
    prompt_len, new = (128, 128) if device.type == "cuda" else (16, 24)  # smoke mode: short
    dirs = {}
    for name, config in (("target", target), ("draft", draft)):
        dirs[name] = Path(tempfile.mkdtemp(prefix=f"gpu_check_spec_{name}_"))
        (dirs[name] / "config.json").write_text(json.dumps(config))
    numbers = report.numbers.setdefault("spec", {"k": K, "workload": "greedy, 128 in / 128 out, dummy weights"})
    vocab = target["vocab_size"]
    variants = {"plain": None, "draft_1b": dirs["draft"], "draft_self": dirs["target"]}
    for label, draft_dir in variants.items():
        state: dict = {}

        def load(label=label, draft_dir=draft_dir, state=state):
            started = time.perf_counter()
            extra = {} if draft_dir is None else {"speculative_config": {
                "model": str(draft_dir), "num_speculative_tokens": K, "min_acceptance_rate": 0.0}}
            state["engine"] = engine = lmserve_engine(dirs["target"], device, None, extra)
            if engine.speculator is not None:
                engine.speculator.cost_model = FixedCost(0.0)  # always propose k: measure the cost
            generate_speed(engine, vocab, 1, 16, 4)  # warm-up
            return f"{label}: up in {time.perf_counter() - started:.1f}s, {engine.num_blocks} KV blocks (draft too)"

        if not report.check(f"spec: {label} load", load, needs_s=40):
            continue
        engine = state.pop("engine")
        for batch in (1, 16):
            def run(label=label, batch=batch, engine=engine):
                stats = engine.spec_decode_stats
                before = (stats.proposed, stats.accepted) if stats else (0, 0)
                r = generate_speed(engine, vocab, batch, prompt_len, new)
                key = f"{label}_b{batch}"
                numbers[f"{key}_tok_s"] = round(r["tok_s"], 1)
                numbers[f"{key}_ms_per_step"] = round(r["ms_per_step"], 2)
                line = f"batch {batch}: {r['tok_s']:.1f} tok/s, {r['ms_per_step']:.1f} ms/step"
                if stats is not None:
                    proposed, accepted = stats.proposed - before[0], stats.accepted - before[1]
                    numbers[f"{key}_acceptance"] = round(accepted / proposed, 3) if proposed else None
                    line += f", acceptance {accepted / max(proposed, 1):.2f}"
                plain = numbers.get(f"plain_b{batch}_tok_s")
                if plain and label != "plain":
                    numbers[f"{key}_ratio_vs_plain"] = round(r["tok_s"] / plain, 2)
                    line += f", {r['tok_s'] / plain:.2f}x plain"
                return line

            report.check(f"spec: {label} batch {batch}", run, needs_s=30)
        del engine
        free_device_memory(device)
