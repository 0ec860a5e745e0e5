"""Speculative decoding: cheap proposals of the next few tokens, checked by one target forward.

- `config`: the options (vLLM's `speculative_config` keys) and their validation;
- `ngram`: prompt lookup, the proposer that needs no second model;
- `draft_model`: a smaller checkpoint of the same tokenizer proposing greedily, with its own paged KV cache;
- `speculator`: who proposes how many tokens each step (the adaptive rule) and what verification kept;
- `cost_model`: the step-time fit the adaptive rule weighs acceptance against;
- `verify`: which proposed tokens the target's own draws accept, and the per-position views the
  sampler draws them through;
- `stats`: counters and the acceptance histogram behind /metrics.

The engine loop (engine/llm_engine.py) asks for proposals before scheduling, lets the scheduler
give a decoding sequence 1 + k query tokens, and keeps the accepted prefix of each run.
"""
