"""GGUF MoE files (llama.cpp's qwen2moe and deepseek2) loaded with their experts kept quantized.

The files are written by tests/support/gguf_convert.py (llama.cpp's converter rules; gguf-py's
quantizers for Q8_0 / Q4_0 / Q4_1, our k-quant writer for Q4_K / Q5_K) from tiny random-weight
checkpoints; their dense loads match transformers in tests/models/test_family_parity.py (the
`*-gguf*` families). Here, under `quantization: int4`:
- the experts hold the file's own 4-bit codes (Q4_0 / Q4_K: an expert's product equals the
  one with gguf-py's dequantization of the same bytes) or int8 (Q5_K / Q8_0), and no dense stack;
- the logits stay within a stated tolerance of the same file loaded dense (`quantization: none`:
  the model of the file's dequantized weights);
- loading never holds a bf16 copy of the experts (peak resident size in a fresh process against a
  dense load's, on a file large enough to tell).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize  # noqa: E402

from lmserve.errors import CheckpointError  # noqa: E402
from lmserve.layers.moe import FusedExperts  # noqa: E402
from lmserve.layers.quantization import int4_kernel  # noqa: E402
from lmserve.layers.quantization.gguf import GGUFExpertsMethod  # noqa: E402
from lmserve.layers.quantization.int4_kernel import KERNEL_DTYPE  # noqa: E402
from lmserve.models.loader import read_config, resolve_checkpoint  # noqa: E402
from tests.support.family_checkpoints import build_moe_gguf, serve_waves_greedy  # noqa: E402
from tests.support.gguf_convert import write_random_qwen2moe  # noqa: E402
from tests.support.gguf_kquants import q5_k_blocks_and_values  # noqa: E402


def test_q5_k_writer_is_decoded_bit_for_bit_by_gguf_py():
    """Our Q5_K blocks (block_q5_K's layout): gguf-py's decoder returns exactly the values the
    writer encoded, which are within a 5-bit grid's error of the source weights."""
    w = (np.random.default_rng(1).standard_normal((48, 768)) * 0.05).astype(np.float32)
    blocks, values = q5_k_blocks_and_values(w)
    assert blocks.shape == (48, 768 // 256 * gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q5_K][1])
    decoded = dequantize(blocks, gguf.GGMLQuantizationType.Q5_K).reshape(w.shape)
    assert np.array_equal(decoded, values)
    assert np.sqrt(((decoded - w) ** 2).mean()) / w.std() < 0.05


def _qwen2_moe_types(name: str, shape) -> str:
    # 256-wide rows (whole k-quant super-blocks): experts' gate/up Q4_K, down Q5_K (the Q5_K_M
    # kind), attention Q8_0, the shared expert Q4_0, embeddings Q8_0, the head Q6_K.
    for part, kind in (("ffn_gate_exps", "Q4_K"), ("ffn_up_exps", "Q4_K"), ("ffn_down_exps", "Q5_K"),
                       ("shexp", "Q4_0"), ("attn_", "Q8_0"), ("token_embd", "Q8_0"), ("output", "Q6_K")):
        if part in name:
            return "F32" if name.endswith("ffn_gate_inp_shexp.weight") else kind
    return "F32"


def _deepseek_types(name: str, shape) -> str:
    # Experts' gate/up Q4_0, down Q8_0, shared experts Q4_1, Q8_0 where rows are whole blocks of
    # 32, F16 elsewhere (the latent attention's narrow rows: layers the kernels refuse anyway).
    for part, kind in (("ffn_gate_exps", "Q4_0"), ("ffn_up_exps", "Q4_0"), ("ffn_down_exps", "Q8_0"),
                       ("shexp", "Q4_1")):
        if part in name:
            return kind
    return "Q8_0" if shape[-1] % 32 == 0 else "F16"


CASES = {
    "qwen2-moe": (lambda d: build_moe_gguf(d, "qwen2-moe", _qwen2_moe_types, mlp_only_layers=(), hidden_size=256,
                                           moe_intermediate_size=256, shared_size=256),
                  {"gate_up_proj": "grid", "down_proj": "int8"}, "ffn_gate_exps", "ffn_up_exps", 0.1),
    "deepseek-v2": (lambda d: build_moe_gguf(d, "deepseek-v2", _deepseek_types, mscale=0.7,
                                             moe_intermediate_size=32),
                    {"gate_up_proj": "grid", "down_proj": "int8"}, "ffn_gate_exps", "ffn_up_exps", 0.03),
}


@pytest.mark.parametrize("family", sorted(CASES))
def test_quantized_moe_gguf_keeps_its_experts_quantized(family, tmp_path):
    build, kinds, gate_name, up_name, tolerance = CASES[family]
    _, path = build(tmp_path)
    _, dense = serve_waves_greedy(path, 4, quantization="none")
    engine, got = serve_waves_greedy(path, 4, quantization="int4")

    experts = {name: m for name, m in engine.model.named_modules() if isinstance(m, FusedExperts)}
    assert experts
    for module in experts.values():
        method = module.quant_method
        assert isinstance(method, GGUFExpertsMethod) and method.kinds == kinds
        # No dense stack and no grid staging left: only the packed experts.
        assert all(p.numel() == 0 for p in module.parameters(recurse=False))
        assert all(isinstance(w, int4_kernel.PackedInt4) for w in method.weights["gate_up_proj"])
        assert all(w[0].dtype == torch.int8 for w in method.weights["down_proj"])
        dense_bf16 = 2 * module.local_experts * 3 * module.intermediate * module.hidden
        assert method.quantized_bytes() < 0.5 * dense_bf16

    # An expert's gate/up product is the one with gguf-py's dequantization of the file's bytes
    # (Q4_0 / Q4_K kept as their own grid; the kernel rounds activations and scales to 16 bits).
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    name, module = next(iter(experts.items()))  # layers.<i>.mlp.experts
    layer = int(name.split(".")[-3])
    rows = []
    for name in (gate_name, up_name):
        t = tensors[f"blk.{layer}.{name}.weight"]
        rows.append(dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(x) for x in t.shape])))[2])
    weight = torch.from_numpy(np.concatenate(rows))
    x = torch.randn(5, module.hidden)
    expected = x.to(KERNEL_DTYPE).float() @ weight.T
    product = module.quant_method.apply_expert(module, 2, "gate_up_proj", x)
    assert float((product - expected).norm() / expected.norm()) < 1e-2

    # Logits against the file's dense model: the first sampled step of every request (later
    # steps may follow different tokens). The differences: int8 per channel on the 5- to 8-bit
    # layers, the int4 kernel's int8-rounded activations (llama.cpp's route), and top-k routing
    # near-ties they flip. Measured (relative norm): deepseek-v2 0.6-1.5%, qwen2-moe (256 wide,
    # three 256-input k-quant layers per block) 2.9-7.1%.
    for (_, ref_logits), (_, logits) in zip(dense, got, strict=True):
        rel = float((logits[0] - ref_logits[0]).norm() / ref_logits[0].norm())
        assert rel < tolerance, rel


def test_gguf_moe_metadata_reads_as_the_checkpoints_config(tmp_path):
    """The metadata llama.cpp's converter writes reads back as the source config.json does."""
    for family, options in (("qwen2-moe", {"mlp_only_layers": ()}), ("deepseek-v2", {"mscale": 0.7})):
        directory = tmp_path / family
        _, path = build_moe_gguf(directory, family, **options)
        from_hf, from_gguf = (vars(read_config(resolve_checkpoint(str(p)))) for p in (directory / "hf", path))
        scaling_hf, scaling_gguf = from_hf.pop("rope_scaling"), from_gguf.pop("rope_scaling")
        assert from_gguf.keys() == from_hf.keys()
        for key, value in from_gguf.items():  # GGUF keeps floats in float32
            expected = from_hf[key]
            assert value == (pytest.approx(expected, rel=1e-6) if isinstance(expected, float) else expected), key
        assert scaling_gguf.keys() <= scaling_hf.keys()
        for key, value in scaling_gguf.items():
            expected = scaling_hf[key]
            assert value == (pytest.approx(expected, rel=1e-6) if isinstance(expected, float) else expected), key


def test_sigmoid_routed_deepseek2_is_refused(tmp_path):
    """DeepSeek-V3-style files (deepseek2 with sigmoid gating) fail with one line naming why."""
    path = tmp_path / "v3-like.gguf"
    writer = gguf.GGUFWriter(str(path), "deepseek2")
    for add, value in ((writer.add_block_count, 1), (writer.add_embedding_length, 64), (writer.add_head_count, 4),
                       (writer.add_context_length, 128), (writer.add_expert_count, 8), (writer.add_vocab_size, 32)):
        add(value)
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"v3-like.gguf: deepseek2 file with sigmoid routing"):
        read_config(resolve_checkpoint(str(path)))


_LOAD = """
import json, sys
from lmserve import SamplingParams
from lmserve.engine.llm_engine import LLMEngine
from lmserve.layers.moe import FusedExperts

def status_bytes(key):
    return 1024 * next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))

engine = LLMEngine(sys.argv[1], dtype="bfloat16", quantization=sys.argv[2], num_kv_blocks=16)
peak = status_bytes("VmHWM")
engine.add_request("r", [5, 6, 7], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
while engine.has_unfinished():
    engine.step()
experts = [m for m in engine.model.modules() if isinstance(m, FusedExperts)]
print(json.dumps({"peak": peak, "method": type(experts[0].quant_method).__name__}))
"""


def test_a_big_moe_gguf_loads_without_a_bf16_copy_of_its_experts(tmp_path):
    from lmserve.engine.serving_defaults import int4_share

    # Big enough for the experts' bytes to show in the resident size: 4 layers of 32 experts,
    # 512 x 512 (100M expert weights: 201 MB in bf16), random Q4_K blocks.
    path = tmp_path / "big-qwen2moe.Q4_K.gguf"
    expert_weights = write_random_qwen2moe(path)
    # `lmserve serve`'s default for it is int4: its stacked Q4_K experts are most of its weights.
    assert int4_share(resolve_checkpoint(str(path))) > 0.9
    runs = {}
    for quantization in ("int4", "none"):
        child = subprocess.run([sys.executable, "-c", _LOAD, str(path), quantization], capture_output=True,
                               text=True, timeout=600)
        assert child.returncode == 0, child.stderr[-3000:]
        runs[quantization] = json.loads(child.stdout.strip().splitlines()[-1])
    assert runs["int4"]["method"] == "GGUFExpertsMethod" and runs["none"]["method"] == "NoneType"
    # The kept load holds ~4.6 bits per expert weight (codes and fp16 scales) and one layer's
    # staged grid; the dense load the bf16 stacks (2 bytes per weight). Measured: peaks 441 vs
    # 618 MiB, 0.88 of the experts' bf16 bytes apart; a bf16 copy of the experts held at any
    # moment of the kept load would put its peak at or above the dense one.
    bf16 = 2 * expert_weights
    assert runs["none"]["peak"] - runs["int4"]["peak"] > 0.5 * bf16, (runs, bf16)
