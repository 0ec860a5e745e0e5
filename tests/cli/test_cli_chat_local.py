"""`lmserve chat` in its default mode: the engine in the CLI's own process (no server). Two turns
piped in, greedy: each reply must be transformers' greedy continuation of the conversation so far
(the first reply kept in the history of the second), and /exit ends with status 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

MAX_TOKENS = 24
TURNS = ["What is the capital of France?", "And of Italy?"]


def _reference_reply(hf_model, tokenizer, messages: list[dict]) -> str:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    with torch.inference_mode():
        out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=MAX_TOKENS, do_sample=False)[0, len(ids):].tolist()
    return tokenizer.decode(out, skip_special_tokens=True)


def test_local_chat_replies_are_the_models_greedy_continuations(hf_smollm):
    from transformers import AutoTokenizer

    from lmserve.models.loader import bundled_model_path

    gguf = bundled_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-m", "lmserve", "chat", "--dtype", "float32", "--temperature", "0",
                          "--frequency-penalty", "0", "--max-tokens", str(MAX_TOKENS)],
                         input="\n".join(TURNS + ["/exit"]) + "\n", capture_output=True, text=True, env=env,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "chatting with" in run.stderr and "Traceback" not in run.stderr, run.stderr[-3000:]
    # input() writes its prompt to stdout when stdin is not a terminal: prompt, reply, newline, ...
    replies = [part[:-1] for part in run.stdout.split("you> ")[1:-1]]
    assert len(replies) == 2, run.stdout
    history: list[dict] = []
    for turn, reply in zip(TURNS, replies):
        history.append({"role": "user", "content": turn})
        assert reply == _reference_reply(hf_smollm, tokenizer, history), (turn, reply)
        history.append({"role": "assistant", "content": reply})
    assert "Paris" in replies[0]
