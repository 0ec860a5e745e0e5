"""Qwen2 family: Qwen2 and Qwen2.5 (Instruct, Coder, Math; the 128K variant via YaRN scaling).

Llama's layout with biases on q/k/v and none on the output projection. Qwen2's sliding-window
options are off in every released checkpoint (`use_sliding_window: false`) and are ignored.
"""

from __future__ import annotations

from typing import Any

from lmserve.models.config import DecoderConfig
from lmserve.models.llama import LlamaForCausalLM


class Qwen2Config(DecoderConfig):
    @classmethod
    def from_hf(cls, cfg: dict[str, Any], generation_config: dict[str, Any] | None = None,
                **overrides: Any) -> DecoderConfig:
        if cfg.get("use_sliding_window"):
            raise ValueError("Qwen2 sliding-window attention (use_sliding_window: true) is not supported")
        return super().from_hf(cfg, generation_config, qkv_bias=True, o_bias=False, mlp_bias=False, **overrides)


class Qwen2ForCausalLM(LlamaForCausalLM):
    config_class = Qwen2Config
