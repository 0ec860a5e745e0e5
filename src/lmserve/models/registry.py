"""Architecture name -> model family class, imported on first use.

Keys are the `architectures[0]` of a Hugging Face config.json; a config without it is looked up
by `model_type`. Importing a family only when a checkpoint asks for it keeps start-up cheap and
lets a family depend on optional packages.
"""

from __future__ import annotations

import importlib

# architecture -> (module under lmserve.models, class name)
_FAMILIES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "Qwen2MoeForCausalLM": ("qwen2_moe", "Qwen2MoeForCausalLM"),
    "DeepseekV2ForCausalLM": ("deepseek_v2", "DeepseekV2ForCausalLM"),
    "Gemma2ForCausalLM": ("gemma2", "Gemma2ForCausalLM"),
    "GlmForCausalLM": ("glm", "GlmForCausalLM"),
    "ChatGLMModel": ("chatglm", "ChatGLMForCausalLM"),
    "ChatGLMForConditionalGeneration": ("chatglm", "ChatGLMForCausalLM"),
    "InternLM2ForCausalLM": ("internlm2", "InternLM2ForCausalLM"),
    "TeleChat2ForCausalLM": ("telechat2", "TeleChat2ForCausalLM"),
    "TelechatForCausalLM": ("telechat2", "TeleChat2ForCausalLM"),  # the 115B copy's spelling
}

_MODEL_TYPES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "glm": "GlmForCausalLM",
    "chatglm": "ChatGLMModel",
    "internlm2": "InternLM2ForCausalLM",
    "telechat": "TeleChat2ForCausalLM",
}


class UnsupportedArchitecture(ValueError):
    pass


def supported_architectures() -> list[str]:
    return sorted(_FAMILIES)


def resolve_architecture(cfg: dict) -> str:
    """The architecture a config.json declares (`architectures[0]`, else by `model_type`)."""
    archs = cfg.get("architectures") or []
    if archs:
        return archs[0]
    return _MODEL_TYPES.get(cfg.get("model_type", ""), cfg.get("model_type") or "<none>")


def get_model_class(architecture: str):
    entry = _FAMILIES.get(architecture)
    if entry is None:
        raise UnsupportedArchitecture(
            f"unsupported architecture {architecture!r} (supported: {', '.join(supported_architectures())})")
    module, name = entry
    return getattr(importlib.import_module(f"lmserve.models.{module}"), name)
