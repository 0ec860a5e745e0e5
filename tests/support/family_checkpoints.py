"""Tiny random-weight checkpoints of every supported family, and the batched serving pattern
that proves the engine against transformers on them.

Each builder makes a checkpoint from the family's real config shape rules with its features
switched on (GQA, biases, YaRN, softcaps, a sliding window shorter than the prompts), saved under
the family's real tensor names and config keys, and returns transformers' model of the same
weights as the reference. `WAVES` and `serve_and_capture` are the serving pattern: several
prompts of different lengths at once with chunked prefill, then a wave that hits the prefix cache.

Plain Python, no pytest: tests/models/test_family_parity.py runs these on CPU and
benchmarks/gpu_check.py runs them on a lent GPU, whose image has no pytest.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmserve import SamplingParams
from lmserve.engine.llm_engine import LLMEngine

STEPS = 32


def _widen(model: torch.nn.Module) -> torch.nn.Module:
    """Random init has tiny weights: widen them so the comparison has teeth."""
    torch.manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
            elif name.endswith("bias"):
                p.normal_(0, 0.2)
            elif "norm" in name:
                p.normal_(0, 0.1) if model.config.model_type == "gemma2" else p.normal_(1.0, 0.1)
    return model.eval()


def _rewrite_config(directory: Path, **changes) -> None:
    """Store config keys as released checkpoints spell them (transformers 5 rewrites some)."""
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg))


def build_llama(directory: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 64})
    model = _widen(LlamaForCausalLM(config))
    model.save_pretrained(directory)
    return model


QWEN2_YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}


def build_qwen2(directory: Path, yarn: bool = True, tie: bool = False):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    rope = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32} \
        if yarn else {"rope_type": "default", "rope_theta": 1e6}
    config = Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rms_norm_eps=1e-6, tie_word_embeddings=tie, use_sliding_window=False,
                         rope_parameters=rope, bos_token_id=1, eos_token_id=2)
    model = _widen(Qwen2ForCausalLM(config))
    model.save_pretrained(directory)
    # Released Qwen2.5 configs spell the 128K recipe as rope_theta + rope_scaling {"type": "yarn"}.
    _rewrite_config(directory, rope_parameters=None, rope_theta=1e6, rope_scaling=QWEN2_YARN if yarn else None)
    return model


def build_qwen2_gguf(directory: Path):
    """The Qwen2 checkpoint written as a GGUF file the way llama.cpp names qwen2 tensors (gguf-py's
    own name map; qwen2's q/k rows are not permuted). Returns the reference and the file."""
    import gguf

    model = build_qwen2(directory, yarn=False)
    c = model.config
    path = directory / "tiny-qwen2.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(1e6)
    writer.add_vocab_size(c.vocab_size)
    writer.add_eos_token_id(2)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, c.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model, path


def build_gemma2(directory: Path):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    # head_dim 24 is not hidden / heads (64 / 4), as in gemma-2-27b; query_pre_attn_scalar is
    # not head_dim either; the window (8) is shorter than every prompt.
    config = Gemma2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=18,
                          max_position_embeddings=256, rms_norm_eps=1e-6, sliding_window=8,
                          attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                          hidden_activation="gelu_pytorch_tanh", bos_token_id=1, eos_token_id=2, pad_token_id=0,
                          attn_implementation="eager")
    model = _widen(Gemma2ForCausalLM(config))
    model.save_pretrained(directory)
    # Released gemma-2 configs carry no layer_types: the alternation must come from the family.
    _rewrite_config(directory, layer_types=None)
    return model


def _renamed(sd: dict[str, torch.Tensor], src: str, dst: str, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """One layer's tensors under a checkpoint's own names: {transformers' name: its name}, each
    after the layer's prefix (src in transformers' state dict, dst in the checkpoint)."""
    return {dst + new: sd[src + old] for old, new in names.items()}


def _by_kv_head(weight: torch.Tensor, kv_heads: int, head_dim: int) -> torch.Tensor:
    """A q/k/v projection's rows as [KV head, heads of its group, head_dim, in]."""
    return weight.reshape(kv_heads, -1, head_dim, weight.shape[-1])


def _save_converted(directory: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """A remote-code checkpoint: the converted tensors under their real names, its config.json."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))


def _tiny_glm(rope_theta: float):
    from transformers import GlmConfig, GlmForCausalLM

    # head_dim 24 is not hidden / heads, and only its first half rotates (partial_rotary_factor).
    config = GlmConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=512,
                       rms_norm_eps=1e-5, pad_token_id=0, eos_token_id=[2, 5], attention_bias=True,
                       rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "partial_rotary_factor": 0.5})
    return _widen(GlmForCausalLM(config))


def build_glm_hf(directory: Path):
    model = _tiny_glm(20000.0)
    model.save_pretrained(directory)
    # glm-4-9b-chat-hf spells the rope settings at the top level.
    _rewrite_config(directory, rope_parameters=None, rope_theta=20000.0, partial_rotary_factor=0.5)
    return model


def build_chatglm(directory: Path):
    """GLM's weights in the original ChatGLMModel layout: q/k/v (and their biases) concatenated
    into query_key_value, gate/up already fused as dense_h_to_4h, names under transformer.;
    rope_ratio 2 makes the base 10000 * 2, the reference's rope_theta."""
    model = _tiny_glm(20000.0)
    sd = model.state_dict()
    out = {"transformer.embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
           "transformer.encoder.final_layernorm.weight": sd["model.norm.weight"],
           "transformer.output_layer.weight": sd["lm_head.weight"],
           "transformer.rotary_pos_emb.inv_freq": torch.ones(6)}  # stored by the real ones, recomputed
    for i in range(model.config.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}self_attention.query_key_value.{kind}"] = torch.cat(
                [sd[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"])
        out.update(_renamed(sd, src, dst, {
            "self_attn.o_proj.weight": "self_attention.dense.weight",
            "mlp.gate_up_proj.weight": "mlp.dense_h_to_4h.weight", "mlp.down_proj.weight": "mlp.dense_4h_to_h.weight",
            "input_layernorm.weight": "input_layernorm.weight",
            "post_attention_layernorm.weight": "post_attention_layernorm.weight"}))
    _save_converted(directory, out, {
        "architectures": ["ChatGLMModel"], "model_type": "chatglm", "num_layers": 3, "hidden_size": 64,
        "num_attention_heads": 4, "multi_query_attention": True, "multi_query_group_num": 2, "kv_channels": 24,
        "ffn_hidden_size": 96, "layernorm_epsilon": 1e-5, "padded_vocab_size": 320, "seq_length": 512,
        "rope_ratio": 2.0, "add_qkv_bias": True, "add_bias_linear": False, "rmsnorm": True, "post_layer_norm": True,
        "original_rope": True, "apply_residual_connection_post_layernorm": False, "eos_token_id": [2, 5],
        "pad_token_id": 0, "torch_dtype": "float32"})
    return model


def _tiny_llama(bias: bool, kv_heads: int, heads: int, rope: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=320, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         attention_bias=bias, mlp_bias=bias, rope_parameters=rope)
    return _widen(LlamaForCausalLM(config))


def build_internlm2(directory: Path):
    """Llama's weights in InternLM2's layout: wqkv rows grouped by KV head (3 query heads, then
    the key head, then the value head, per group), w1/w3/w2 for gate/up/down. The dynamic NTK
    scaling of the released configs is exact inside the trained window, which these prompts fit."""
    heads, kv_heads, head_dim = 6, 2, 16
    model = _tiny_llama(False, kv_heads, heads, {"rope_type": "default", "rope_theta": 1e6})
    sd = model.state_dict()
    out = {"model.tok_embeddings.weight": sd["model.embed_tokens.weight"], "model.norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    for i in range(3):
        src, dst = f"model.layers.{i}.", f"model.layers.{i}."
        qkv = [_by_kv_head(sd[f"{src}self_attn.{p}_proj.weight"], kv_heads, head_dim) for p in "qkv"]
        out[f"{dst}attention.wqkv.weight"] = torch.cat(qkv, dim=1).reshape(-1, 96)
        out.update(_renamed(sd, src, dst, {
            "self_attn.o_proj.weight": "attention.wo.weight", "mlp.gate_proj.weight": "feed_forward.w1.weight",
            "mlp.up_proj.weight": "feed_forward.w3.weight", "mlp.down_proj.weight": "feed_forward.w2.weight",
            "input_layernorm.weight": "attention_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight"}))
    _save_converted(directory, out, {
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "hidden_size": 96,
        "num_hidden_layers": 3, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "intermediate_size": 160, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "max_position_embeddings": 512,
        "rope_scaling": {"type": "dynamic", "factor": 2.0}, "bias": False, "vocab_size": 320, "bos_token_id": 1,
        "eos_token_id": 2, "pad_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "float32"})
    return model


def build_telechat2(directory: Path):
    """Llama with every bias on, the ones TeleChat2 lacks (q/k/v, gate/up) zeroed, so it computes
    TeleChat2's function: biases on the attention output and the down projection only. Saved
    in TeleChat2's layout: key_value rows per KV head [K_h; V_h], names under transformer.h."""
    heads, kv_heads, head_dim = 4, 2, 24
    model = _tiny_llama(True, kv_heads, heads, {"rope_type": "default", "rope_theta": 10000.0})
    sd = model.state_dict()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(f"{n}.bias" in name for n in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
                p.zero_()
    out = {"transformer.word_embeddings.weight": sd["model.embed_tokens.weight"],
           "transformer.ln_f.weight": sd["model.norm.weight"], "lm_head.weight": sd["lm_head.weight"]}
    for i in range(3):
        src, dst = f"model.layers.{i}.", f"transformer.h.{i}."
        kv = [_by_kv_head(sd[f"{src}self_attn.{p}_proj.weight"], kv_heads, head_dim) for p in "kv"]
        out[f"{dst}self_attention.key_value.weight"] = torch.cat(kv, dim=1).reshape(-1, 96)
        out.update(_renamed(sd, src, dst, {
            "self_attn.q_proj.weight": "self_attention.query.weight",
            "self_attn.o_proj.weight": "self_attention.dense.weight",
            "self_attn.o_proj.bias": "self_attention.dense.bias",
            **{f"mlp.{n}.weight": f"mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")},
            "mlp.down_proj.bias": "mlp.down_proj.bias", "input_layernorm.weight": "input_layernorm.weight",
            "post_attention_layernorm.weight": "post_attention_layernorm.weight"}))
    _save_converted(directory, out, {
        "architectures": ["TeleChat2ForCausalLM"], "model_type": "telechat", "hidden_size": 96, "n_layer": 3,
        "n_head": heads, "num_key_value_heads": kv_heads, "ffn_hidden_size": 160, "layer_norm_epsilon": 1e-5,
        "vocab_size": 320, "training_seqlen": 8192, "base_seqlen": 8192, "embed_layernorm": False, "logn": True,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "tie_word_embeddings": False,
        "torch_dtype": "float32"})
    return model


def build_qwen2_moe(directory: Path, renormalize: bool = False, sparse_step: int = 1,
                    mlp_only_layers: tuple[int, ...] = (1,), shared_size: int = 48, hidden_size: int = 64,
                    moe_intermediate_size: int = 32):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    # 8 experts, top-3, a shared expert with its sigmoid gate, a dense layer in the middle.
    config = Qwen2MoeConfig(vocab_size=320, hidden_size=hidden_size, intermediate_size=96, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                            num_experts=8, num_experts_per_tok=3, moe_intermediate_size=moe_intermediate_size,
                            shared_expert_intermediate_size=shared_size, norm_topk_prob=renormalize,
                            decoder_sparse_step=sparse_step, mlp_only_layers=list(mlp_only_layers),
                            rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                             "original_max_position_embeddings": 32},
                            rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = _widen(Qwen2MoeForCausalLM(config))
    model.save_pretrained(directory)
    _rewrite_config(directory, rope_parameters=None, rope_theta=1e6, rope_scaling=QWEN2_YARN, layer_types=None,
                    qkv_bias=None)
    return model


def build_deepseek_v2(directory: Path, q_lora_rank: int | None = 24, group_limited: bool = True, v_head_dim: int = 10,
                      mscale: float = 0.9, moe_intermediate_size: int = 24, kv_lora_rank: int = 20):
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    # MLA (q_lora_rank set like V2/V2.5, or None like V2-Lite), a dense first layer, 8 experts in
    # 4 groups of which the best 2 stay eligible, top-3, routed scaling, 2 shared experts, and
    # YaRN with mscale != mscale_all_dim so both the rope factor and the softmax factor matter.
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32,
            "beta_slow": 1, "mscale": mscale, "mscale_all_dim": 0.7}
    config = DeepseekV2Config(
        vocab_size=320, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=q_lora_rank, kv_lora_rank=kv_lora_rank, qk_nope_head_dim=12,
        qk_rope_head_dim=8,
        v_head_dim=v_head_dim, n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=moe_intermediate_size,
        n_shared_experts=2,
        first_k_dense_replace=1, topk_method="group_limited_greedy" if group_limited else "greedy",
        n_group=4 if group_limited else None, topk_group=2 if group_limited else None, routed_scaling_factor=2.5,
        norm_topk_prob=False, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, **{k: v for k, v in yarn.items() if k != "type"}},
        bos_token_id=1, eos_token_id=2)
    model = _widen(DeepseekV2ForCausalLM(config))
    model.save_pretrained(directory)
    # As the released configs spell it (rope_scaling with "type", no derived head dims).
    _rewrite_config(directory, rope_parameters=None, rope_theta=10000.0, rope_scaling=yarn, head_dim=None,
                    qk_head_dim=None, moe_layer_freq=1, scoring_func="softmax")
    return model


def build_moe_gguf(directory: Path, family: str, types: Callable | None = None, legacy_mla: bool = False, **options):
    """A MoE checkpoint (family "qwen2-moe" or "deepseek-v2", builder options passed on) written
    as GGUF by tests/support/gguf_convert.py (llama.cpp's converter rules); `types(gguf_name,
    shape)` picks each weight's type (F32 by default). F16 weights are rounded in the reference
    too, so it is the model the file holds. Returns (reference, file)."""
    from tests.support.gguf_convert import f32, write_gguf

    types = types or f32
    build = {"qwen2-moe": build_qwen2_moe, "deepseek-v2": build_deepseek_v2}[family]
    model = build(directory / "hf", **options)
    config = json.loads((directory / "hf" / "config.json").read_text())
    path = write_gguf(model, config, directory / f"tiny-{family}.gguf", types, legacy_mla=legacy_mla)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and not name.endswith("mlp.gate.weight") and types(name, tuple(p.shape)) == "F16":
                p.copy_(p.half().float())
    return model, path


@dataclass
class FamilySpec:
    name: str
    build: Callable  # directory -> reference model, or (reference, file to serve)
    engine_options: dict = field(default_factory=dict)
    atol: float = 2e-4
    preempts: bool = False  # the engine options leave too few KV blocks: sequences must be preempted
    needs: tuple[str, ...] = ()  # packages the builder imports beyond torch/transformers/safetensors


FAMILIES = [
    FamilySpec("llama", build_llama),
    FamilySpec("qwen2-yarn", build_qwen2),
    FamilySpec("qwen2-tied", lambda d: build_qwen2(d, yarn=False, tie=True)),
    FamilySpec("qwen2-gguf", build_qwen2_gguf, needs=("gguf",)),
    FamilySpec("gemma2", build_gemma2),
    FamilySpec("glm-hf", build_glm_hf),
    FamilySpec("chatglm", build_chatglm),
    FamilySpec("internlm2", build_internlm2),
    FamilySpec("telechat2", build_telechat2),
    FamilySpec("qwen2-moe", build_qwen2_moe),
    FamilySpec("qwen2-moe-renorm-step2", lambda d: build_qwen2_moe(d, renormalize=True, sparse_step=2,
                                                                   mlp_only_layers=())),
    FamilySpec("deepseek-v2", build_deepseek_v2),
    # GGUF (llama.cpp's converter rules, tests/support/gguf_convert.py): qwen2moe in F16 (every
    # layer sparse: llama.cpp's qwen2moe has no dense layers); deepseek2 in F32 with the split
    # attn_k_b / attn_v_b, and V2-Lite-like with the older whole attn_kv_b. mscale equals
    # mscale_all_dim: a GGUF keeps only the latter (and llama.cpp computes as if they were equal).
    FamilySpec("qwen2-moe-gguf-f16", lambda d: build_moe_gguf(d, "qwen2-moe", lambda n, s: "F16", mlp_only_layers=()),
               needs=("gguf",)),
    FamilySpec("deepseek-v2-gguf", lambda d: build_moe_gguf(d, "deepseek-v2", mscale=0.7), needs=("gguf",)),
    FamilySpec("deepseek-v2-lite-gguf-kv-b", lambda d: build_moe_gguf(
        d, "deepseek-v2", legacy_mla=True, q_lora_rank=None, group_limited=False, mscale=0.7), needs=("gguf",)),
    # V2-Lite-like (no q LoRA, greedy routing) with a KV cache of 32 blocks of 4 tokens: wave 1
    # needs 40, so sequences are preempted and resumed by recomputing their latents.
    FamilySpec("deepseek-v2-lite-preempt", lambda d: build_deepseek_v2(d, q_lora_rank=None, group_limited=False),
               engine_options={"num_kv_blocks": 32}, preempts=True),
]

# Wave 1: three prompts of different lengths, prefilled in chunks (token budget 16).
# Wave 2: a prompt sharing wave 1's first 16 tokens (a prefix-cache hit) and a short one.
_G = torch.Generator().manual_seed(7)
BASE_PROMPT = torch.randint(3, 320, (64,), generator=_G).tolist()
WAVES = [
    [BASE_PROMPT[:21], BASE_PROMPT[20:27], BASE_PROMPT[30:60]],
    [BASE_PROMPT[:16] + BASE_PROMPT[40:52], BASE_PROMPT[5:9]],
]


def serve_and_capture(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams | None = None):
    """Run prompts together; return per prompt (generated tokens, logits per sampled step,
    cached prompt tokens). Default: greedy for STEPS tokens, EOS ignored."""
    captured: dict[str, list[torch.Tensor]] = {}
    sampler = engine.sampler

    def recording_sampler(logits, seqs):
        for row, seq in zip(logits, seqs):
            captured.setdefault(seq.request.request_id, []).append(row.clone())
        return sampler(logits, seqs)

    engine.sampler = recording_sampler
    params = params or SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True)
    ids = [f"p{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, prompt, params)
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    cached: dict[str, int] = {}
    while engine.has_unfinished():
        for out in engine.step():
            cached[out.request_id] = out.num_cached_tokens
            for o in out.outputs:
                tokens[out.request_id] += o.token_ids
    engine.sampler = sampler
    return [(tokens[r], captured[r], cached.get(r, 0)) for r in ids]


def greedy_tokens(engine: LLMEngine, prompt: list[int], max_tokens: int) -> list[int]:
    """One greedy request (EOS ignored) stepped to its end; its tokens."""
    engine.add_request("q", prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    tokens = []
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.outputs[0].token_ids
    return tokens


def serve_waves_greedy(source, steps: int, **options) -> tuple[LLMEngine, list[tuple[list[int], list[torch.Tensor]]]]:
    """Both WAVES served greedily for `steps` tokens each, in float32 through chunked prefill (a
    16-token budget) with the second wave hitting the prefix cache: the engine and, per request,
    its tokens and the logits of every sampled step. Every KV block is free afterwards."""
    options = {"num_kv_blocks": 96, **options}  # a smaller cache preempts
    engine = LLMEngine(str(source), dtype="float32", block_size=4, max_num_batched_tokens=16, max_num_seqs=6,
                       **options)
    params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
    results = [r for wave in WAVES for r in serve_and_capture(engine, wave, params)]
    assert sum(cached for _, _, cached in results) >= 16, "the second wave should have hit the prefix cache"
    assert engine.num_free_blocks == engine.num_blocks
    return engine, [(tokens, logits) for tokens, logits, _ in results]


def assert_same_greedy_run(reference: list, got: list, steps: int, atol: float = 1e-4) -> None:
    """Two serve_waves_greedy results: the same tokens, `steps` of them, and logits within atol."""
    for (ref_tokens, ref_logits), (tokens, logits) in zip(reference, got, strict=True):
        assert tokens == ref_tokens and len(tokens) == steps
        for ref_row, row in zip(ref_logits, logits):
            torch.testing.assert_close(row, ref_row, atol=atol, rtol=1e-4)
