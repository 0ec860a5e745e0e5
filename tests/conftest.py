"""Shared fixtures: the bundled SmolLM2 (real weights), transformers' reference on the same file,
and a leak check that runs after every test: all KV blocks free, no request left behind."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# No GPU here: the CUDA backend's Triton kernels run under Triton's interpreter on CPU tensors
# (tests/attention/test_triton_attention.py). Read when a kernel is defined, so set before any import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.manual_seed(0)

from lmserve import LLM  # noqa: E402
from lmserve.models.loader import DEFAULT_MODEL_ID, bundled_model_path  # noqa: E402

_ENGINES: list = []


def track(llm: LLM) -> LLM:
    _ENGINES.append(llm.engine)
    return llm


def untrack(llm: LLM) -> None:
    _ENGINES.remove(llm.engine)


@pytest.fixture(scope="session")
def smollm() -> LLM:
    """The bundled model in float32, so greedy comparisons with transformers are exact."""
    return track(LLM(DEFAULT_MODEL_ID, dtype="float32"))


@pytest.fixture
def make_llm():
    """Build an extra engine (other cache size, options); it is leak-checked too."""
    made = []

    def factory(model: str = DEFAULT_MODEL_ID, **kwargs) -> LLM:
        kwargs.setdefault("dtype", "float32")
        llm = track(LLM(model, **kwargs))
        made.append(llm)
        return llm

    yield factory
    for llm in made:
        untrack(llm)


@pytest.fixture(scope="session")
def hf_smollm():
    from transformers import AutoModelForCausalLM

    path = bundled_model_path()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(autouse=True)
def _no_leaked_blocks():
    yield
    for engine in _ENGINES:
        assert not engine.has_unfinished(), "a request was left in the engine"
        assert not engine.scheduler.has_work, "a sequence was left in the scheduler"
        assert engine.num_free_blocks == engine.num_blocks, (
            f"KV blocks leaked: {engine.num_blocks - engine.num_free_blocks} still referenced")


def chat_ids(llm: LLM, user: str, system: str | None = None) -> list[int]:
    from lmserve.chat.prompt import render_chat

    conv = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return llm.engine.encode(render_chat(llm.tokenizer, conv), add_special_tokens=False)


def reference_logprobs(hf_model, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    """transformers' teacher-forced log-softmax over the vocabulary at each output position:
    row i is the distribution the model gave output token i (prompt + outputs[:i] as context)."""
    ids = list(prompt_ids) + list(output_ids)
    with torch.inference_mode():
        logits = hf_model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[len(prompt_ids) - 1:len(ids) - 1]


def assert_logprobs_match(logprobs, output_ids: list[int], reference: torch.Tensor, top: int,
                          atol: float = 1e-4) -> None:
    """Every reported logprob (the sampled token's and the top ones) within `atol` of the reference,
    with the same top ids in the same order (ties within atol may swap)."""
    assert len(logprobs) == len(output_ids) == len(reference)
    for i, (lp, token) in enumerate(zip(logprobs, output_ids)):
        assert lp.token_id == token
        assert abs(lp.logprob - reference[i, token].item()) < atol, (i, lp.logprob, reference[i, token].item())
        ref_vals, ref_ids = reference[i].topk(top)
        got_ids = [t for t, _ in lp.top]
        assert len(got_ids) == top
        for (t, v), rt, rv in zip(lp.top, ref_ids.tolist(), ref_vals.tolist()):
            assert abs(v - rv) < atol, (i, t, v, rt, rv)
            assert t == rt or abs(reference[i, t].item() - rv) < atol, (i, got_ids, ref_ids.tolist())
