"""A Hugging Face MoE checkpoint written as GGUF the way llama.cpp's convert_hf_to_gguf.py writes it
(its Qwen2MoeModel and DeepseekV2Model), for the GGUF loading tests; plain numpy and gguf-py,
nothing of lmserve's.

What follows the converter:
- metadata: TextModel's common keys (block/context/embedding/feed-forward lengths, head counts,
  rope base, rms eps, expert_count / expert_used_count, expert group counts, softmax gating,
  YaRN type / factor / original context / betas), then the architecture's own: qwen2moe's
  expert_feed_forward_length and expert_shared_feed_forward_length; deepseek2's MQA view
  (head_count_kv 1, key_length kv_lora + rope, value_length kv_lora, key/value_length_mla),
  leading_dense_block_count, q/kv_lora_rank, expert_shared_count, expert_weights_scale,
  expert_weights_norm (only when true), rope dimension count and yarn_log_multiplier
  (0.1 * mscale_all_dim). `legacy_mla=True` writes the older deepseek2 layout instead: whole
  attn_kv_b, per-head key/value lengths, no _mla keys.
- tensors: gguf-py's name map for the architecture; each layer's experts stacked per
  projection (HF's fused gate_up [E, 2I, H] split into gate and up [E, I, H], down [E, H, I]);
  deepseek2's kv_b_proj split per head into attn_k_b (k rows transposed: [H, kv_lora, nope]) and
  attn_v_b ([H, v, kv_lora]).
- types: `types(gguf_name, shape)` names each 2-/3-D tensor's type; 1-D tensors and the routers
  (ffn_gate_inp) stay F32 as the converter keeps them. Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 by
  gguf-py's quantizer, Q4_K / Q5_K / Q6_K by tests/support/gguf_kquants.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from tests.support.gguf_kquants import quantize_q4_k, quantize_q5_k, quantize_q6_k

KQUANTS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}


def f32(name: str, shape: tuple[int, ...]) -> str:
    return "F32"


def encode(array: np.ndarray, type_name: str) -> tuple[np.ndarray, object]:
    """(bytes or values to write, gguf-py raw type or None) for `array` in `type_name`."""
    import gguf
    from gguf.quants import quantize

    if type_name == "F32":
        return array.astype(np.float32), None
    if type_name == "F16":
        return array.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType[type_name]
    if type_name in KQUANTS:
        blocks = KQUANTS[type_name](array.reshape(-1, array.shape[-1]))
        return blocks.reshape(*array.shape[:-1], -1), qtype
    return quantize(array.astype(np.float32), qtype), qtype


def write_gguf(model: torch.nn.Module, config: dict, path: Path, types: Callable = f32,
               legacy_mla: bool = False) -> Path:
    """`model` (transformers, Qwen2MoeForCausalLM or DeepseekV2ForCausalLM) with `config` (its
    config.json as saved) written to `path`."""
    import gguf

    arch = {"qwen2_moe": gguf.MODEL_ARCH.QWEN2MOE, "deepseek_v2": gguf.MODEL_ARCH.DEEPSEEK2}[config["model_type"]]
    deepseek = arch == gguf.MODEL_ARCH.DEEPSEEK2
    layers = config["num_hidden_layers"]
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    _write_metadata(writer, config, deepseek, legacy_mla)
    names = gguf.get_tensor_name_map(arch, layers)
    for hf_name, tensor in model.state_dict().items():
        for name, array in _converted(hf_name, tensor.detach().float().numpy(), config, deepseek, legacy_mla):
            gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise ValueError(f"no GGUF name for {name}")
            keep_f32 = array.ndim == 1 or ".ffn_gate_inp." in gguf_name
            data, raw = encode(array, "F32" if keep_f32 else types(gguf_name, array.shape))
            writer.add_tensor(gguf_name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _converted(name: str, array: np.ndarray, config: dict, deepseek: bool, legacy_mla: bool):
    """HF (name, array) -> the converter's (name, array) pairs, before the GGUF name map."""
    if name.endswith("mlp.experts.gate_up_proj"):
        inter = array.shape[1] // 2
        base = name[:-len("gate_up_proj")]
        yield f"{base}gate_proj.weight", array[:, :inter]
        yield f"{base}up_proj.weight", array[:, inter:]
    elif name.endswith("mlp.experts.down_proj"):
        yield f"{name}.weight", array
    elif deepseek and not legacy_mla and name.endswith("kv_b_proj.weight"):
        heads, nope, v_dim = config["num_attention_heads"], config["qk_nope_head_dim"], config["v_head_dim"]
        kv_b = array.reshape(heads, nope + v_dim, array.shape[-1])
        yield name.replace("kv_b_proj", "k_b_proj"), np.ascontiguousarray(kv_b[:, :nope].transpose(0, 2, 1))
        yield name.replace("kv_b_proj", "v_b_proj"), np.ascontiguousarray(kv_b[:, nope:])
    else:
        yield name, array


def _write_metadata(writer, config: dict, deepseek: bool, legacy_mla: bool) -> None:
    import gguf

    c = config
    heads = c["num_attention_heads"]
    writer.add_block_count(c["num_hidden_layers"])
    writer.add_context_length(c["max_position_embeddings"])
    writer.add_embedding_length(c["hidden_size"])
    writer.add_feed_forward_length(c["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_rope_freq_base(c["rope_theta"])
    writer.add_layer_norm_rms_eps(c["rms_norm_eps"])
    writer.add_vocab_size(c["vocab_size"])
    writer.add_eos_token_id(c["eos_token_id"])
    writer.add_bos_token_id(c["bos_token_id"])
    experts = c.get("num_experts") or c.get("n_routed_experts")
    writer.add_expert_count(experts)
    writer.add_expert_used_count(c["num_experts_per_tok"])
    if c.get("n_group") is not None:
        writer.add_expert_group_count(c["n_group"])
    if c.get("topk_group") is not None:
        writer.add_expert_group_used_count(c["topk_group"])
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
    scaling = c.get("rope_scaling")
    if scaling and (scaling.get("type") or scaling.get("rope_type")) == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(scaling["factor"])
        writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
        for key, add in (("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):
            if scaling.get(key) is not None:
                add(scaling[key])
    if not deepseek:
        writer.add_head_count_kv(c["num_key_value_heads"])
        writer.add_expert_feed_forward_length(c["moe_intermediate_size"])
        writer.add_expert_shared_feed_forward_length(c["shared_expert_intermediate_size"])
        return
    rope, nope, kv_lora = c["qk_rope_head_dim"], c["qk_nope_head_dim"], c["kv_lora_rank"]
    writer.add_leading_dense_block_count(c["first_k_dense_replace"])
    if c.get("q_lora_rank") is not None:
        writer.add_q_lora_rank(c["q_lora_rank"])
    writer.add_kv_lora_rank(kv_lora)
    if legacy_mla:
        writer.add_head_count_kv(heads)
        writer.add_key_length(nope + rope)
        writer.add_value_length(c["v_head_dim"])
    else:
        writer.add_head_count_kv(1)
        writer.add_key_length(kv_lora + rope)
        writer.add_value_length(kv_lora)
        writer.add_key_length_mla(nope + rope)
        writer.add_value_length_mla(c["v_head_dim"])
    writer.add_expert_feed_forward_length(c["moe_intermediate_size"])
    writer.add_expert_shared_count(c["n_shared_experts"])
    writer.add_expert_weights_scale(c["routed_scaling_factor"])
    if c.get("norm_topk_prob"):
        writer.add_expert_weights_norm(True)
    writer.add_rope_dimension_count(rope)
    if scaling and scaling.get("mscale_all_dim") is not None:
        writer.add_rope_scaling_yarn_log_mul(0.1 * scaling["mscale_all_dim"])


def write_random_qwen2moe(path: Path, layers: int = 4, experts: int = 32, hidden: int = 512, inter: int = 512,
                          heads: int = 8, vocab: int = 320, seed: int = 0) -> int:
    """A qwen2moe file of random weights whose experts are Q4_K blocks of random bytes (with
    modest fp16 d / dmin every block is valid), the rest small F16 / F32: for memory and speed
    measurements, where the values do not matter. Returns the experts' weight count."""
    import gguf
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as T

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "qwen2moe")
    for add, value in ((writer.add_block_count, layers), (writer.add_context_length, 256),
                       (writer.add_embedding_length, hidden), (writer.add_head_count, heads),
                       (writer.add_head_count_kv, heads), (writer.add_vocab_size, vocab),
                       (writer.add_expert_count, experts), (writer.add_expert_used_count, 2),
                       (writer.add_expert_feed_forward_length, inter),
                       (writer.add_expert_shared_feed_forward_length, inter), (writer.add_eos_token_id, 2)):
        add(value)
    writer.add_layer_norm_rms_eps(1e-6)

    def small(name, shape):
        values = rng.standard_normal(shape) * (0.02 if len(shape) > 1 else 1)
        writer.add_tensor(name, values.astype(np.float32 if len(shape) == 1 else np.float16))

    def q4_k(name, shape):
        _, size = GGML_QUANT_SIZES[T.Q4_K]
        blocks = rng.integers(0, 256, size=(int(np.prod(shape)) // 256, size), dtype=np.uint8)
        blocks[:, 0:4] = rng.uniform(0.0005, 0.002, size=(blocks.shape[0], 2)).astype(np.float16).view(np.uint8)
        writer.add_tensor(name, blocks.reshape(*shape[:-1], -1), raw_dtype=T.Q4_K)

    small("token_embd.weight", (vocab, hidden))
    small("output_norm.weight", (hidden,))
    for layer in range(layers):
        p = f"blk.{layer}."
        for name, shape in (("attn_norm.weight", (hidden,)), ("ffn_norm.weight", (hidden,)),
                            ("attn_q.weight", (hidden, hidden)), ("attn_k.weight", (hidden, hidden)),
                            ("attn_v.weight", (hidden, hidden)), ("attn_q.bias", (hidden,)),
                            ("attn_k.bias", (hidden,)), ("attn_v.bias", (hidden,)),
                            ("attn_output.weight", (hidden, hidden)), ("ffn_gate_inp.weight", (experts, hidden)),
                            ("ffn_gate_shexp.weight", (inter, hidden)), ("ffn_up_shexp.weight", (inter, hidden)),
                            ("ffn_down_shexp.weight", (hidden, inter)), ("ffn_gate_inp_shexp.weight", (1, hidden))):
            small(p + name, shape)
        for name, shape in (("ffn_gate_exps", (experts, inter, hidden)), ("ffn_up_exps", (experts, inter, hidden)),
                            ("ffn_down_exps", (experts, hidden, inter))):
            q4_k(p + name + ".weight", shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return layers * 3 * experts * inter * hidden
