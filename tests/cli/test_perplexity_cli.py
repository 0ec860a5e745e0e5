"""`lmserve perplexity`: llama.cpp's protocol (chunks of ctx tokens, each run from an empty context,
its second half scored), checked against the same protocol computed from transformers' logits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from lmserve.cli import main

TEXT_FILE = Path(__file__).parents[1] / "data" / "perplexity_text.txt"


def reference(hf_smollm, ids: list[int], ctx: int, chunks: int) -> tuple[float, float, int]:
    """llama-perplexity's numbers (SmolLM2's tokenizer adds no BOS, so chunks go as they are)."""
    first = ctx // 2
    nlls = []
    for i in range(chunks):
        chunk = ids[i * ctx:(i + 1) * ctx]
        with torch.inference_mode():
            logp = torch.log_softmax(hf_smollm(torch.tensor([chunk])).logits[0].float(), dim=-1)
        nlls += [-logp[p - 1, chunk[p]].item() for p in range(first + 1, ctx)]
    mean = sum(nlls) / len(nlls)
    var = sum(v * v for v in nlls) / len(nlls) - mean * mean
    return math.exp(mean), math.sqrt(var / (len(nlls) - 1)) * math.exp(mean), len(nlls)


def test_perplexity_command_follows_llama_cpp(smollm, hf_smollm, capsys):
    ctx, chunks = 32, 3
    assert main(["perplexity", str(TEXT_FILE), "--ctx", str(ctx), "--chunks", str(chunks), "--dtype", "float32",
                 "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    ids = smollm.engine.encode(TEXT_FILE.read_text())
    ppl, stderr, scored = reference(hf_smollm, ids, ctx, chunks)
    assert got["tokens"] == len(ids) and got["chunks"] == chunks and got["tokens_scored"] == scored == 45
    assert math.isclose(got["ppl"], ppl, rel_tol=1e-3) and math.isclose(got["stderr"], stderr, rel_tol=1e-2)


def test_perplexity_command_refuses_a_short_text(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    assert main(["perplexity", str(short), "--ctx", "64", "--dtype", "float32"]) == 2
    assert "needs at least 128" in capsys.readouterr().err
    assert main(["perplexity", str(tmp_path / "missing.txt")]) == 2
