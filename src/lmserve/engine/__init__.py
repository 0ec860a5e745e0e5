"""The model-agnostic serving engine: scheduling, paged KV cache, sampling, detokenization."""
