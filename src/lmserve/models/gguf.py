"""GGUF checkpoints (llama.cpp's format): metadata -> config, tensors -> Hugging Face names.

Each supported GGUF architecture names the family it loads into and its tensor rules. The
metadata is read into the keys of the family's config.json, so the family's own config reader
(and its checks) applies. llama.cpp's converter permutes the q/k rows of the `llama`
architecture only (for its interleaved rope); other architectures keep Hugging Face's order
(qwen2 and qwen2moe rotate halves as HF does; deepseek2 rotates adjacent pairs, which is HF
DeepSeek-V2's own interleaved layout), so undoing the permutation is a per-architecture rule.

MoE files (qwen2moe, deepseek2) store each layer's experts stacked in one 3-D tensor per
projection (`ffn_gate_exps` / `ffn_up_exps`: [E, I, H], `ffn_down_exps`: [E, H, I] in row-major
order, llama.cpp's converter stacking HF's per-expert weights), read here as
`mlp.experts.gate_proj.weight` etc. and loaded whole into layers/moe.py's stacked parameters.
deepseek2: current converters split MLA's kv_b_proj into `attn_k_b` ([H, kv_lora, nope], each
head's k part transposed, for llama.cpp's absorbed attention) and `attn_v_b` ([H, v, kv_lora]);
older files keep `attn_kv_b`. Both load into kv_b_proj.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lmserve.errors import CheckpointError
from lmserve.layers.quantization.int4_kernel import Int4Grid
from lmserve.models.config import DecoderConfig
from lmserve.models.gguf_header import GGUFHeader, TruncatedGGUF


@dataclass(frozen=True)
class GGUFArch:
    architecture: str  # the Hugging Face architecture (family) it loads into
    permuted_qk: bool  # llama.cpp interleaved the q/k rows at conversion
    layer_names: dict[str, str] = field(default_factory=dict)  # this architecture's own block tensors
    moe: bool = False  # experts and routing keys (`expert_count`, ...) in the metadata


# MoE block tensors (gguf-py's constants: FFN_GATE_INP, FFN_*_EXP, FFN_*_SHEXP, FFN_GATE_INP_SHEXP).
_EXPERTS_NAMES = {
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}
_QWEN2MOE_NAMES = {
    **_EXPERTS_NAMES,
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
_DEEPSEEK2_NAMES = {
    **_EXPERTS_NAMES,
    "ffn_gate_shexp": "mlp.shared_experts.gate_proj",
    "ffn_up_shexp": "mlp.shared_experts.up_proj",
    "ffn_down_shexp": "mlp.shared_experts.down_proj",
    "attn_q_a": "self_attn.q_a_proj",
    "attn_q_a_norm": "self_attn.q_a_layernorm",
    "attn_q_b": "self_attn.q_b_proj",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
    "attn_kv_a_norm": "self_attn.kv_a_layernorm",
    "attn_kv_b": "self_attn.kv_b_proj",
}
# deepseek2's split kv_b (attn_k_b, attn_v_b): merged back into kv_b_proj by GGUFFile.tensors.
_KV_B_PARTS = ("attn_k_b", "attn_v_b")

GGUF_ARCHS: dict[str, GGUFArch] = {
    "llama": GGUFArch("LlamaForCausalLM", permuted_qk=True),
    "qwen2": GGUFArch("Qwen2ForCausalLM", permuted_qk=False),
    "qwen2moe": GGUFArch("Qwen2MoeForCausalLM", permuted_qk=False, layer_names=_QWEN2MOE_NAMES, moe=True),
    "deepseek2": GGUFArch("DeepseekV2ForCausalLM", permuted_qk=False, layer_names=_DEEPSEEK2_NAMES, moe=True),
}

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


class GGUFFile:
    """One parsed GGUF file: the header is read once and shared by config and tensor reading."""

    def __init__(self, path: Path):
        self.path = path
        stat = path.stat()
        self.reader = _cached_reader(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        self.arch_name = self.field("general.architecture")
        self.arch = GGUF_ARCHS.get(self.arch_name)
        if self.arch is None:
            raise CheckpointError(f"{path}: unsupported GGUF architecture {self.arch_name!r} "
                            f"(supported: {', '.join(sorted(GGUF_ARCHS))})")

    def field(self, key: str, default: Any = None) -> Any:
        return self.reader.fields.get(key, default)

    def arch_field(self, name: str, default: Any = None) -> Any:
        value = self.field(f"{self.arch_name}.{name}", default)
        if value is None:
            raise CheckpointError(f"{self.path}: GGUF metadata lacks {self.arch_name}.{name}")
        return value

    def config(self) -> DecoderConfig:
        """The family's config, read by the family from the config.json keys the metadata holds."""
        from lmserve.models.registry import get_model_class

        cfg = self.hf_config()
        try:
            config = get_model_class(self.arch.architecture).config_from_hf(cfg, None)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{self.path}: GGUF metadata: {e}") from None
        config.architecture = self.arch.architecture
        return config

    def hf_config(self) -> dict[str, Any]:
        """The metadata as the Hugging Face config.json keys llama.cpp's converter read them from."""
        heads = int(self.arch_field("attention.head_count"))
        hidden = int(self.arch_field("embedding_length"))
        names = {t.name for t in self.reader.tensors}
        vocab = self.field(f"{self.arch_name}.vocab_size") or len(self.field("tokenizer.ggml.tokens", []))
        cfg = {
            "architectures": [self.arch.architecture],
            "num_hidden_layers": int(self.arch_field("block_count")),
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "num_attention_heads": heads,
            "num_key_value_heads": int(self.arch_field("attention.head_count_kv", heads)),
            "head_dim": int(self.arch_field("attention.key_length", hidden // heads)),
            # A MoE file whose every layer is sparse may leave the dense width out.
            "intermediate_size": int(self.arch_field("feed_forward_length", 0 if self.arch.moe else None)),
            "rms_norm_eps": float(self.arch_field("attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": float(self.arch_field("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self.arch_field("context_length", 2048)),
            "rope_scaling": self._rope_scaling(),
            "tie_word_embeddings": "output.weight" not in names,
            "eos_token_id": self.field("tokenizer.ggml.eos_token_id"),
            "bos_token_id": self.field("tokenizer.ggml.bos_token_id"),
        }
        if self.arch_name == "qwen2moe":
            cfg.update(self._qwen2moe_config(cfg["num_hidden_layers"], names))
        elif self.arch_name == "deepseek2":
            cfg.update(self._deepseek2_config(heads, names))
        return cfg

    def _rope_scaling(self) -> dict[str, Any] | None:
        kind = self.field(f"{self.arch_name}.rope.scaling.type")
        if kind in (None, "none"):
            return None
        factor = float(self.arch_field("rope.scaling.factor"))
        if kind == "linear":
            return {"type": "linear", "factor": factor}
        if kind != "yarn":
            raise CheckpointError(f"{self.path}: unsupported GGUF rope scaling type {kind!r} (supported: yarn, linear)")
        scaling: dict[str, Any] = {"type": "yarn", "factor": factor, "original_max_position_embeddings":
                                   int(self.arch_field("rope.scaling.original_context_length"))}
        for key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            value = self.field(f"{self.arch_name}.rope.scaling.{key}")
            if value is not None:
                scaling[hf_key] = float(value)
        log_mul = self.field(f"{self.arch_name}.rope.scaling.yarn_log_multiplier")
        if self.arch_name == "deepseek2" and log_mul:
            # llama.cpp's converter writes 0.1 * mscale_all_dim and, for deepseek2, computes as if
            # mscale == mscale_all_dim (rope unscaled, softmax scale times mscale(f, mscale_all_dim)^2),
            # as the released configs have it: the file keeps no other mscale.
            scaling["mscale"] = scaling["mscale_all_dim"] = float(log_mul) / 0.1
        return scaling

    def _qwen2moe_config(self, num_layers: int, names: set[str]) -> dict[str, Any]:
        # llama.cpp's qwen2moe has no dense-layer tensors, but a layer without a router is read
        # as Qwen2-MoE's mlp_only_layers (dense, feed_forward_length wide).
        sparse = {i for i in range(num_layers) if f"blk.{i}.ffn_gate_inp.weight" in names}
        return {
            "num_experts": int(self.arch_field("expert_count")),
            "num_experts_per_tok": int(self.arch_field("expert_used_count")),
            "moe_intermediate_size": int(self.arch_field("expert_feed_forward_length")),
            "shared_expert_intermediate_size": int(self.arch_field("expert_shared_feed_forward_length", 0)),
            "norm_topk_prob": bool(self.arch_field("expert_weights_norm", False)),
            "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i in range(num_layers) if i not in sparse],
        }

    def _deepseek2_config(self, heads: int, names: set[str]) -> dict[str, Any]:
        gating = self.field(f"{self.arch_name}.expert_gating_func")
        if gating not in (None, 1) or any(n.endswith("exp_probs_b.bias") for n in names):
            # 1: softmax (DeepSeek-V2); 2: sigmoid with a routing bias (DeepSeek-V3 / R1).
            raise CheckpointError(f"{self.path}: deepseek2 file with sigmoid routing (expert_gating_func "
                                  f"{gating}, DeepSeek-V3 style) is not supported: DeepSeek-V2 routes with softmax")
        rope = int(self.arch_field("rope.dimension_count"))
        key_mla = self.field(f"{self.arch_name}.attention.key_length_mla")
        if key_mla:  # current converters: key/value_length describe llama.cpp's MQA view of the latent
            nope, v_dim = int(key_mla) - rope, int(self.arch_field("attention.value_length_mla"))
        else:  # older files: the per-head lengths themselves
            nope = int(self.arch_field("attention.key_length")) - rope
            v_dim = int(self.arch_field("attention.value_length"))
        groups = self.field(f"{self.arch_name}.expert_group_count")
        topk_groups = self.field(f"{self.arch_name}.expert_group_used_count")
        experts = self.field(f"{self.arch_name}.expert_count")
        q_lora = self.field(f"{self.arch_name}.attention.q_lora_rank")
        return {
            "num_key_value_heads": heads,  # the file's head_count_kv 1 is llama.cpp's MQA view
            "head_dim": None,  # as DeepSeek-V2's config.json: MLA's dimensions are the three below
            "q_lora_rank": int(q_lora) if q_lora else None,
            "kv_lora_rank": int(self.arch_field("attention.kv_lora_rank")),
            "qk_nope_head_dim": nope,
            "qk_rope_head_dim": rope,
            "v_head_dim": v_dim,
            "n_routed_experts": int(experts) if experts else None,
            "num_experts_per_tok": int(self.arch_field("expert_used_count", 1)),
            "moe_intermediate_size": int(self.arch_field("expert_feed_forward_length", 0)),
            "n_shared_experts": int(self.arch_field("expert_shared_count", 0)),
            "first_k_dense_replace": int(self.arch_field("leading_dense_block_count", 0)),
            "moe_layer_freq": 1,
            # Files written before the group keys existed route greedily, as llama.cpp then did.
            "topk_method": "group_limited_greedy" if groups and int(groups) > 1 else "greedy",
            "n_group": int(groups) if groups else None,
            "topk_group": int(topk_groups) if topk_groups else None,
            "routed_scaling_factor": float(self.arch_field("expert_weights_scale", 1.0)),
            "norm_topk_prob": bool(self.arch_field("expert_weights_norm", False)),
            "scoring_func": "softmax",
        }

    def tensors(self, config: DecoderConfig, grid_names: frozenset[str] | set[str] = frozenset()
                ) -> Iterator[tuple[str, torch.Tensor, str]]:
        """(Hugging Face name, tensor, file name), one at a time: dequantized to fp32, except a
        Q4_0 / Q4_1 / Q4_K tensor named in `grid_names`, which is read as its own int4 grid instead: three
        tensors `<module>.codes` (uint8), `.group_scale` and `.group_zero` (fp32 per block of 32),
        for layers/quantization/gguf.py's methods; never dequantized. A stacked experts tensor
        comes whole ([E, rows, cols]; its grid likewise, [E, rows, cols / 32] for the scales)."""
        kv_b_parts: dict[str, dict[str, np.ndarray]] = {}
        for t in tqdm(self.reader.tensors, desc=f"Loading {self.path.name}", unit="tensor", disable=None,
                      leave=False):
            shape = tuple(reversed([int(x) for x in t.shape]))
            block, _, part = t.name.rpartition(".")[0].rpartition(".")
            if part in _KV_B_PARTS:
                merged = self._merge_kv_b(block, part, self._dequantize(t, shape), kv_b_parts, config)
                if merged is not None:
                    yield (*merged, self.path.name)
                continue
            name = self.hf_name(t.name)
            if name is None:
                continue  # e.g. rope_freqs: derived from the config instead
            heads = self._permuted_heads(name, config)
            if name in grid_names:
                rows = int(np.prod(shape[:-1]))
                grid = int4_grid(t.data, t.tensor_type, (rows, shape[-1]))
                if heads:
                    grid = grid.permute_rows(torch.from_numpy(undo_rope_permute(np.arange(shape[0]), heads)))
                base = name[:-len(".weight")]
                groups = (*shape[:-1], shape[-1] // grid.group)
                yield f"{base}.codes", grid.codes.reshape(shape), self.path.name
                yield f"{base}.group_scale", grid.scale.reshape(groups), self.path.name
                yield f"{base}.group_zero", grid.zero.reshape(groups), self.path.name
                continue
            array = self._dequantize(t, shape)
            if heads:
                array = undo_rope_permute(array, heads)
            if name.endswith("shared_expert_gate.weight") and array.ndim == 1:
                array = array[None]  # [H] in files that dropped HF's [1, H]
            # Copied only where the array is still the file's read-only map (F32): a stacked
            # experts tensor is one layer's projection for every expert, not to be held twice.
            yield name, torch.from_numpy(np.require(array, np.float32, ["W", "C"])), self.path.name

    def _dequantize(self, t, shape: tuple[int, ...]) -> np.ndarray:
        from gguf.quants import dequantize

        try:
            return dequantize(t.data, t.tensor_type).reshape(shape)
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot dequantize tensor {t.name} ({e})") from None

    def _merge_kv_b(self, block: str, part: str, array: np.ndarray, pending: dict,
                    config) -> tuple[str, torch.Tensor] | None:
        """deepseek2's attn_k_b ([H, kv_lora, nope]: each head's k rows, transposed) and attn_v_b
        ([H, v, kv_lora]) back into HF's kv_b_proj ([H * (nope + v), kv_lora], per head k then v):
        (name, tensor) once both parts of `block` are in, else None (the part waits in `pending`)."""
        heads, rank = config.num_heads, config.kv_lora_rank
        nope, v_dim = config.qk_nope_head_dim, config.v_head_dim
        expected = (heads, rank, nope) if part == "attn_k_b" else (heads, v_dim, rank)
        if array.size != int(np.prod(expected)):
            raise CheckpointError(f"{self.path}: tensor {block}.{part}.weight has shape {array.shape}, expected "
                                  f"{expected} (heads, kv_lora_rank, qk_nope_head_dim / v_head_dim)")
        parts = pending.setdefault(block, {})
        parts[part] = array.reshape(expected)
        if len(parts) < 2:
            return None
        del pending[block]
        merged = np.concatenate([parts["attn_k_b"].transpose(0, 2, 1), parts["attn_v_b"]], axis=1)
        merged = np.ascontiguousarray(merged.reshape(heads * (nope + v_dim), rank), dtype=np.float32)
        return f"model.layers.{block.split('.')[1]}.self_attn.kv_b_proj.weight", torch.from_numpy(merged)

    def int4_grid_tensors(self) -> set[str]:
        """The Hugging Face names of the file's weights stored in an int4 group-32 grid (Q4_0,
        Q4_1, Q4_K), stacked experts included: an int4 load keeps their grids."""
        return self._weights_of_types(int4_grid_types())

    def wide_block_tensors(self) -> set[str]:
        """The Hugging Face names of the file's weights in 5- to 8-bit blocks (Q5_0, Q5_1, Q5_K,
        Q6_K, Q8_0: the Q4_K_M / Q5_K_M mixes' other types): an int4 load gives their layers int8,
        the nearest grid our kernels run that loses none of their bits."""
        from gguf import GGMLQuantizationType as T

        return self._weights_of_types((T.Q5_0, T.Q5_1, T.Q5_K, T.Q6_K, T.Q8_0))

    def _weights_of_types(self, types) -> set[str]:
        return {name for t in self.reader.tensors
                if t.tensor_type in types and (name := self.hf_name(t.name)) is not None
                and name.endswith(".weight") and len(t.shape) in (2, 3)}

    def hf_name(self, name: str) -> str | None:
        return hf_name(name, self.arch.layer_names)

    def _permuted_heads(self, name: str, config: DecoderConfig) -> int | None:
        """The head count to undo llama.cpp's q/k row permutation with, or None."""
        if self.arch.permuted_qk and name.endswith(("q_proj.weight", "q_proj.bias")):
            return config.num_heads
        if self.arch.permuted_qk and name.endswith(("k_proj.weight", "k_proj.bias")):
            return config.num_kv_heads
        return None


_Q4_1_BLOCK = 32  # values per block; 20 bytes: fp16 d, fp16 m, 16 bytes of 4-bit codes


def q4_1_grid(data: np.ndarray, shape: tuple[int, ...]) -> Int4Grid:
    """A Q4_1 tensor's own grid (w = d * q + m per block of 32, low nibbles first) in the int4
    kernel's terms: scale = d, zero = m + 8d, codes unchanged."""
    rows, k = shape
    blocks = np.ascontiguousarray(data).reshape(rows, k // _Q4_1_BLOCK, 20)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    packed = blocks[..., 4:]
    codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).reshape(rows, k)
    return Int4Grid(torch.from_numpy(codes), torch.from_numpy(d), torch.from_numpy(m + 8 * d))


def q4_0_grid(data: np.ndarray, shape: tuple[int, ...]) -> Int4Grid:
    """Q4_0 (w = d * (q - 8) per block of 32; 18 bytes: fp16 d, 16 bytes of codes, low nibbles
    first): scale = d, zero = 0."""
    rows, k = shape
    blocks = np.ascontiguousarray(data).reshape(rows, k // 32, 18)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    packed = blocks[..., 2:]
    codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).reshape(rows, k)
    return Int4Grid(torch.from_numpy(codes), torch.from_numpy(d), torch.zeros_like(torch.from_numpy(d)))


def q4_k_grid(data: np.ndarray, shape: tuple[int, ...]) -> Int4Grid:
    """Q4_K super-blocks of 256 values (144 bytes: fp16 d, fp16 dmin, 12 bytes of 6-bit sub-block
    scales and mins, 128 bytes of codes): sub-block i of 32 is w = d * sc_i * q - dmin * m_i, so
    the sub-block scales fold into group-32 scales: scale = d * sc_i, zero = 8 * scale - dmin * m_i.
    Codes: 4 chunks of 32 bytes, chunk j's low nibbles are sub-block 2j, its high ones 2j + 1."""
    from gguf.quants import Q4_K

    rows, k = shape
    blocks = np.ascontiguousarray(data).reshape(-1, 144)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # [B, 1]
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, m = Q4_K.get_scale_min(blocks[:, 4:16].copy())  # [B, 8] each
    qs = blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    codes = (qs & 0x0F).reshape(rows, k)
    scale = (d * sc.astype(np.float32)).reshape(rows, k // 32)
    zero = (8 * scale - (dmin * m.astype(np.float32)).reshape(rows, k // 32))
    return Int4Grid(torch.from_numpy(np.ascontiguousarray(codes)), torch.from_numpy(scale), torch.from_numpy(zero))


def int4_grid(data: np.ndarray, tensor_type, shape: tuple[int, ...]) -> Int4Grid:
    """The int4 group-32 grid a Q4_0 / Q4_1 / Q4_K tensor holds (exactly: no requantization)."""
    from gguf import GGMLQuantizationType as T

    return {T.Q4_0: q4_0_grid, T.Q4_1: q4_1_grid, T.Q4_K: q4_k_grid}[tensor_type](data, shape)


def int4_grid_types():
    from gguf import GGMLQuantizationType as T

    return (T.Q4_0, T.Q4_1, T.Q4_K)


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, mtime_ns: int, size: int) -> GGUFHeader:
    """Engines loading the same file version share one parse of its header."""
    try:
        return GGUFHeader(path)
    except TruncatedGGUF as e:
        # Named as such rather than failing somewhere inside, e.g. as a reshape error.
        raise CheckpointError(f"{path}: truncated GGUF file: its header describes {e.needed:,} bytes, the file "
                              f"has {size:,} (an interrupted download or copy?); fetch the file again") from None
    except Exception as e:
        raise CheckpointError(f"{path}: malformed GGUF file ({e})") from None


def hf_name(name: str, layer_names: dict[str, str] | None = None) -> str | None:
    """A GGUF tensor name -> the Hugging Face one (None: not a weight we read as is); an
    architecture's own block tensors in `layer_names`."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk":
        module = (layer_names or {}).get(parts[2]) or _LAYER_NAMES.get(parts[2])
        if module is not None:
            return f"model.layers.{parts[1]}.{module}.{parts[3]}"
    return None


def undo_rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter interleaves q/k rows for its rope layout; restore the HF half-split order."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)
