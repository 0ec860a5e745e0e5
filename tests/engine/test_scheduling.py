"""Continuous batching, prefix caching, preemption and chunked prefill on the real SmolLM2:
every schedule must give the same greedy tokens as running each request alone."""

from __future__ import annotations

import json

import jsonschema
import pytest

from lmserve import SamplingParams
from lmserve.errors import ContextLengthExceeded, InvalidParameter
from tests.conftest import assert_logprobs_match, chat_ids, reference_logprobs

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Why is the sky blue?",
    "Give me a tip for learning to cook.",
    "What does a compiler do?",
    "Suggest a name for a pet turtle.",
    "How many legs does a spider have?",
    "Write one sentence about autumn.",
]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0)


@pytest.fixture(scope="module")
def alone(smollm):
    """Each question run by itself: the reference every schedule must reproduce."""
    return {q: smollm.generate([chat_ids(smollm, q)], GREEDY)[0].outputs[0].token_ids for q in QUESTIONS}


def test_batch_of_eight_equals_each_alone(smollm, alone):
    outs = smollm.generate([chat_ids(smollm, q) for q in QUESTIONS], GREEDY)
    for q, out in zip(QUESTIONS, outs):
        assert out.outputs[0].token_ids == alone[q], q


def test_requests_joining_mid_decode_equal_each_alone(smollm, alone):
    engine = smollm.engine
    tokens: dict[str, list[int]] = {}
    for q in QUESTIONS[:4]:
        engine.add_request(q, chat_ids(smollm, q), GREEDY)
    steps = 0
    while engine.has_unfinished():
        if steps == 5:  # the first four are decoding now
            for q in QUESTIONS[4:]:
                engine.add_request(q, chat_ids(smollm, q), GREEDY)
        for out in engine.step():
            for o in out.outputs:
                tokens.setdefault(out.request_id, []).extend(o.token_ids)
        steps += 1
    assert {q: tokens[q] for q in QUESTIONS} == alone


SYSTEM = ("You are a meticulous assistant for a public library. You answer questions about opening hours, "
          "membership, borrowing rules and events. Always answer politely and in at most two sentences. "
          "If a question is not about the library, say that you can only help with library matters.")


def test_shared_system_prompt_hits_prefix_cache(smollm):
    engine = smollm.engine
    bm = engine.block_manager
    first = chat_ids(smollm, "When does the library open on Saturdays?", SYSTEM)
    second = chat_ids(smollm, "How many books can I borrow at once?", SYSTEM)
    shared = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert shared >= 3 * bm.block_size, "the system prompt must span several blocks"

    assert shared % bm.block_size and len(first) > (shared // bm.block_size + 1) * bm.block_size
    smollm.generate([first], GREEDY)
    hits_before = bm.prefix_hits
    out = smollm.generate([second], GREEDY)[0]
    # Token-granular: the whole blocks of the shared prefix, then the start of the block where the
    # prompts part (a copy of it, since this prompt writes the rest of that block).
    assert out.num_cached_tokens == shared
    assert bm.prefix_hits - hits_before == shared
    again = smollm.generate([second], GREEDY)[0]
    assert again.num_cached_tokens == len(second) - 1, "a repeated prompt computes only its last token"

    bm.reset_prefix_cache()
    cold = smollm.generate([second], GREEDY)[0]
    assert cold.num_cached_tokens == 0
    assert cold.outputs[0].token_ids == out.outputs[0].token_ids == again.outputs[0].token_ids


def test_preemption_under_cache_pressure_gives_same_outputs(make_llm, alone):
    # 10 blocks of 16 tokens hold ~2 of these requests (prompt ~37 + 24 new tokens each, the first
    # block shared).
    small = make_llm(num_kv_blocks=10, block_size=16)
    outs = small.generate([chat_ids(small, q) for q in QUESTIONS], GREEDY)
    assert small.engine.scheduler.num_preemptions > 0
    for q, out in zip(QUESTIONS, outs):
        assert out.outputs[0].token_ids == alone[q], q


PERSON_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
                 "properties": {"name": {"type": "string", "maxLength": 20},
                                "age": {"type": "integer", "minimum": 0, "maximum": 150}}}


def test_seeded_sampling_and_grammar_state_survive_preemption(smollm, make_llm):
    """A preempted sequence is recomputed from prompt + the tokens it had: its random stream (a
    function of seed and position) and its grammar matcher (kept on the sequence) must carry on
    where they were, so every request gives what it gives alone on a roomy cache."""
    from lmserve.sampling_params import StructuredOutput

    spec = StructuredOutput.json_schema(PERSON_SCHEMA)
    prompts = QUESTIONS[:1] + ["Describe a fictional person as JSON.", QUESTIONS[6], QUESTIONS[7]]
    params = ([GREEDY] + [SamplingParams(max_tokens=40, temperature=1.0, seed=101, structured_output=spec)]
              + [SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=s) for s in (102, 103)])
    # The seeded ones alone on the roomy cache (the greedy ones are held to that by the tests above).
    alone = {i: smollm.generate([chat_ids(smollm, prompts[i])], params[i])[0].outputs[0] for i in (1, 2, 3)}
    # 6 blocks of 16: each request fits alone (prompt ~40 tokens, 3 blocks), two at a time must
    # preempt the younger one as they grow, mid-output.
    small = make_llm(num_kv_blocks=6, block_size=16)
    sched = small.engine.scheduler
    preempted: list[tuple[int | None, int]] = []
    original = sched._preempt

    def spy(seq, batch):  # which requests lost their KV, and how far into their output
        preempted.append((seq.params.seed, seq.num_output_tokens))
        original(seq, batch)

    sched._preempt = spy
    outs = small.generate([chat_ids(small, q) for q in prompts], params)
    seeded_mid_output = {seed for seed, n in preempted if seed is not None and n > 0}
    assert seeded_mid_output, f"no seeded request was preempted mid-output: {preempted}"
    for i, ref in alone.items():
        assert outs[i].outputs[0].token_ids == ref.token_ids, (i, params[i].seed)
    json_out = outs[1].outputs[0]
    assert json_out.finish_reason == "eos", json_out.text
    jsonschema.validate(json.loads(json_out.text), PERSON_SCHEMA)


def test_chunked_prefill_gives_same_outputs(make_llm, alone):
    chunked = make_llm(max_num_batched_tokens=16, enable_prefix_caching=False)
    outs = chunked.generate([chat_ids(chunked, q) for q in QUESTIONS[:3]], GREEDY)
    for q, out in zip(QUESTIONS, outs):
        assert out.outputs[0].token_ids == alone[q], q


def test_prompt_longer_than_context_is_rejected(make_llm):
    llm = make_llm(max_model_len=64)
    with pytest.raises(ContextLengthExceeded, match="64"):
        llm.generate([list(range(10, 80))], GREEDY)


def test_generation_stops_with_length_at_context_end(make_llm):
    llm = make_llm(max_model_len=48)
    ids = chat_ids(llm, "Tell me a long story about dragons.")
    out = llm.generate([ids], SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True))[0]
    assert out.outputs[0].finish_reason == "length"
    assert len(ids) + len(out.outputs[0].token_ids) == 48


def test_n_choices_share_prompt_blocks(smollm):
    engine = smollm.engine
    ids = chat_ids(smollm, "Invent a name for a new color.")
    engine.add_request("n3", ids, SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=7))
    engine.step()  # prefill + fork
    seqs = engine.requests["n3"].seqs
    assert len(seqs) == 3
    full_blocks = len(ids) // engine.block_manager.block_size
    for s in seqs[1:]:
        assert s.block_table[:full_blocks] == seqs[0].block_table[:full_blocks]
    outputs: dict[int, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            for o in out.outputs:
                outputs.setdefault(o.index, []).extend(o.token_ids)
    assert len(outputs) == 3
    assert len({tuple(v) for v in outputs.values()}) > 1, "choices with different streams should differ"


MID_BLOCK_QUESTION = "Invent a name for a new color."


def test_n_choices_copy_on_write_keeps_every_choice_exact(smollm, hf_smollm):
    """The prompt ends inside a block, so the n choices' first decodes all write into one shared
    block: each must copy it first. Greedy choices must then equal the n=1 greedy tokens, and each
    seeded choice's logprobs must be transformers' teacher-forced ones on its own tokens (a choice
    reading a sibling's KV, or a copy that lost the prompt's tail, changes them)."""
    ids = chat_ids(smollm, MID_BLOCK_QUESTION)
    bs = smollm.engine.block_manager.block_size
    assert len(ids) % bs not in (0, bs - 1), "the prompt must end well inside a block"
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)  # decodes past the shared block
    single = smollm.generate([ids], params)[0].outputs[0].token_ids
    three = smollm.generate([ids], SamplingParams(n=3, max_tokens=24, temperature=0.0, ignore_eos=True))[0].outputs
    assert [o.token_ids for o in three] == [single] * 3

    params = SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=7, ignore_eos=True, logprobs=True,
                            top_logprobs=3)
    choices = smollm.generate([ids], params)[0].outputs
    assert len({tuple(o.token_ids) for o in choices}) == 3, "seeded choices draw from different streams"
    for o in choices:
        assert_logprobs_match(o.logprobs, o.token_ids, reference_logprobs(hf_smollm, ids, o.token_ids), 3)


def test_running_set_respects_max_num_seqs_with_forks(make_llm):
    llm = make_llm(max_num_seqs=4)
    engine = llm.engine
    engine.add_request("n3", chat_ids(llm, QUESTIONS[0]), SamplingParams(n=3, max_tokens=6, temperature=1.0, seed=1))
    for i, q in enumerate(QUESTIONS[1:3]):
        engine.add_request(f"q{i}", chat_ids(llm, q), SamplingParams(max_tokens=6, temperature=0.0))
    peak = 0
    while engine.has_unfinished():
        engine.step()
        peak = max(peak, len(engine.scheduler.running))
    assert peak == 4  # the n=3 request and one other; the third waited
    with pytest.raises(InvalidParameter, match="max_num_seqs"):
        engine.add_request("n5", [1, 2, 3], SamplingParams(n=5))


def test_long_prefill_shares_every_step(make_llm, alone):
    """A long prompt is prefilled at most `long_prefill_token_threshold` tokens per step: a short
    request that arrives meanwhile is prefilled in the next step and gets its first token while the
    long prompt is still prefilling, and both give the tokens they give alone."""
    llm = make_llm(long_prefill_token_threshold=48, enable_prefix_caching=False)
    engine = llm.engine
    story = " ".join(f"Paragraph {i}: the dragon baked bread in the old stone oven." for i in range(20))
    long_ids = chat_ids(llm, "Summarize: " + story)
    assert len(long_ids) > 4 * 48
    engine.add_request("long", long_ids, GREEDY)
    engine.step()
    short = QUESTIONS[0]
    assert len(chat_ids(llm, short)) <= 48
    engine.add_request("short", chat_ids(llm, short), GREEDY)
    tokens: dict[str, list[int]] = {}
    first_token_step = {}
    steps = 0
    while engine.has_unfinished():
        outs = engine.step()
        steps += 1
        for out in outs:
            for o in out.outputs:
                if o.token_ids:
                    first_token_step.setdefault(out.request_id, steps)
                tokens.setdefault(out.request_id, []).extend(o.token_ids)
    assert first_token_step["short"] == 1, "the short request waited for the long prefill"
    assert first_token_step["long"] > 1
    assert tokens["short"] == alone[short]
    assert tokens["long"] == llm.generate([long_ids], GREEDY)[0].outputs[0].token_ids


def test_prefill_chunks_never_exceed_the_threshold(make_llm):
    llm = make_llm(long_prefill_token_threshold=40)
    sched = llm.engine.scheduler
    llm.engine.add_request("a", list(range(100, 400)), GREEDY)
    llm.engine.add_request("b", list(range(500, 530)), GREEDY)
    batch = sched.schedule()
    assert [(s.request.request_id, n) for s, n in batch.prefills] == [("a", 40), ("b", 30)]
    llm.engine.abort_request("a")
    llm.engine.abort_request("b")
