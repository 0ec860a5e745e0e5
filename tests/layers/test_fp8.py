"""FP8 checkpoints on CPU: the weight-only path (fp8 weights dequantized per call) computes what a
dense model of the dequantized weights computes.

The compressed-tensors checkpoints are written by the `compressed-tensors` package itself
(apply_quantization_config + ModelCompressor, as llm-compressor does; we only set the scales its
observers would have computed: amax / 448 per row or per tensor); the fbgemm one by hand from its
layout (float8_e4m3fn weight, float32 weight_scale [n, 1]). The dense reference's weights are
fp8 * scale read back from the written files. On CPU the activations are not quantized, so the
float32 logits agree to 1e-4 and the greedy tokens over 32 steps are the same.
(torch._scaled_mm, the CUDA >= 8.9 path, is checked by benchmarks/gpu_check.py on a lent GPU.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmserve.layers.quantization.fp8 import FP8, FP8_MAX, Fp8LinearMethod
from tests.support.family_checkpoints import STEPS, assert_same_greedy_run, build_llama, build_qwen2, serve_waves_greedy

pytest.importorskip("compressed_tensors")


def write_compressed_tensors(dense: Path, out: Path, scheme_name: str) -> None:
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    config = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(scheme_name, ["Linear"])},
                                ignore=["lm_head"])
    apply_quantization_config(model, config)
    for module in model.modules():
        if hasattr(module, "weight_scale"):
            w = module.weight.detach().float().abs()
            amax = w.amax(dim=1, keepdim=True) if module.weight_scale.numel() > 1 else w.amax().reshape(1)
            module.weight_scale.data = (amax / FP8_MAX).reshape(module.weight_scale.shape)
        if hasattr(module, "input_scale"):
            module.input_scale.data.fill_(0.05)  # a static activation scale (used by the GPU path only)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="float-quantized")
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)


def write_fbgemm(dense: Path, out: Path) -> None:
    shutil.copytree(dense, out)
    tensors = load_file(str(dense / "model.safetensors"))
    packed = {}
    for name, t in tensors.items():
        if name.endswith("_proj.weight"):
            scale = t.float().abs().amax(dim=1, keepdim=True) / FP8_MAX
            packed[name] = (t.float() / scale).to(FP8)
            packed[name.replace(".weight", ".weight_scale")] = scale
        else:
            packed[name] = t
    save_file(packed, str(out / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                                  "modules_to_not_convert": ["lm_head"]}
    (out / "config.json").write_text(json.dumps(cfg))


def write_dequantized(quantized: Path, out: Path) -> None:
    """The dense reference: every fp8 weight times its scale (per row, or per tensor)."""
    shutil.copytree(quantized, out)
    tensors = load_file(str(quantized / "model.safetensors"))
    dense = {}
    for name, t in tensors.items():
        if t.dtype == FP8:
            scale = tensors[name.replace(".weight", ".weight_scale")].float()
            dense[name] = t.float() * (scale if scale.dim() == 2 else scale.reshape(()))
        elif not name.endswith(("_scale", "_zero_point")):
            dense[name] = t
    save_file(dense, str(out / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(cfg))


CASES = {
    "llama-compressed-tensors-channel-dynamic": (build_llama,
                                                 lambda d, o: write_compressed_tensors(d, o, "FP8_DYNAMIC")),
    "qwen2-compressed-tensors-tensor-static": (lambda d: build_qwen2(d, yarn=False),
                                               lambda d, o: write_compressed_tensors(d, o, "FP8")),
    "llama-fbgemm": (build_llama, write_fbgemm),
}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fp8_checkpoint_matches_its_dequantized_dense_model(case, tmp_path):
    build, write = CASES[case]
    build(tmp_path / "dense")
    write(tmp_path / "dense", tmp_path / "fp8")
    write_dequantized(tmp_path / "fp8", tmp_path / "ref")
    _, reference = serve_waves_greedy(tmp_path / "ref", STEPS)
    engine, got = serve_waves_greedy(tmp_path / "fp8", STEPS)
    fp8_layers = [m for m in engine.model.modules() if isinstance(getattr(m, "quant_method", None), Fp8LinearMethod)]
    assert len(fp8_layers) == 4 * 3 and all(m.weight.dtype == FP8 for m in fp8_layers)
    assert_same_greedy_run(reference, got, STEPS, atol=1e-4)
