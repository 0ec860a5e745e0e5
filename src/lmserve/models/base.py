"""What every family class shares: reading its config, mapping checkpoint names onto its
parameters, declaring its KV specs. The loading loop itself is generic (models/loader.py)."""

from __future__ import annotations

from typing import Any

from torch import nn

from lmserve.attention import Attention, KVSpec
from lmserve.models.config import DecoderConfig, ModelConfig

# Checkpoint name fragment -> (our packed parameter fragment, shard id): q/k/v and gate/up
# each become one matmul (fewer, larger matmuls are what make small-batch decode fast).
LLAMA_PACKING = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class CausalLM(nn.Module):
    """Base of the family classes. Subclasses set `config_class` and `packed_modules`, build
    their layers in __init__(config, dtype), and implement forward/compute_logits."""

    config_class: type[ModelConfig] = DecoderConfig
    packed_modules: dict[str, tuple[str, int]] = LLAMA_PACKING
    # Tensors some checkpoints carry that are derived instead (rope tables).
    skipped_fragments: tuple[str, ...] = ("rotary_emb.inv_freq",)
    # Linear layers (by name suffix) that stay dense under weight-only quantization: the family
    # reads their weight itself, not only through the layer's forward.
    dense_modules: tuple[str, ...] = ()
    config: Any

    @classmethod
    def config_from_hf(cls, cfg: dict[str, Any], generation_config: dict[str, Any] | None) -> ModelConfig:
        return cls.config_class.from_hf(cfg, generation_config)

    def map_checkpoint_name(self, name: str) -> tuple[str, int | None] | None:
        """A checkpoint tensor name -> (our parameter name, shard id), or None to skip it."""
        if name.startswith("model."):
            name = name[len("model."):]
        if any(fragment in name for fragment in self.skipped_fragments):
            return None
        if name == "lm_head.weight" and getattr(self.config, "tie_word_embeddings", False):
            return None
        for fragment, (packed, shard) in self.packed_modules.items():
            if f".{fragment}." in name:
                return name.replace(f".{fragment}.", f".{packed}."), shard
        return name, None

    def kv_cache_specs(self) -> list[KVSpec]:
        """One spec per attention layer, in the order the forward takes their caches."""
        return [m.kv_spec for m in self.modules() if isinstance(m, Attention)]
