"""GGUF k-quants end to end: the bundled SmolLM2 re-encoded as llama.cpp's Q4_K_M mix and served
with `quantization: int4`, kept quantized.

The k-quant blocks are written by tests/support/gguf_kquants.py from the format's layout and read
back here by gguf-py's own dequantizer (not ours); benchmarks/gguf_reencode.py applies llama.cpp's
type rules, so the file holds Q4_K (ffn_down), Q6_K (some ffn_down), Q8_0 (some attn_v) and Q5_0
(every other weight: SmolLM2's 576-wide rows are no whole 256-value super-blocks, llama.cpp's
fallback). The load keeps Q4_K as the int4 kernel's grid and gives the 5- to 8-bit layers int8;
it runs in a child process whose peak resident memory is read before and after loading: no layer
is ever held as a bf16 copy of the model.

Perplexity: the file itself costs +8% over the bundled weights (a 4-bit Q4_1 source requantized
to Q5_0 / Q4_K blocks, measured in docs/benchmarks.md); what the load adds on top of the file is
bounded here at 2%.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.quants import dequantize  # noqa: E402

from tests.support.gguf_kquants import quantize_q4_k, quantize_q6_k  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

_CHILD = """
import json, sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(sys.argv[1]) / "benchmarks"))
from gguf_reencode import reencode
from lmserve import LLM
from lmserve.engine.scoring import perplexity
from lmserve.layers.linear import Linear
from lmserve.models.loader import bundled_model_path

def peak_kib():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))

path = reencode(bundled_model_path(), Path(sys.argv[2]), "Q4_K_M")
types = Counter(t.tensor_type.name for t in __import__("gguf").GGUFReader(str(path)).tensors)
text = (Path(sys.argv[1]) / "tests" / "data" / "perplexity_text.txt").read_text()
dense = LLM(str(path), dtype="bfloat16", quantization="none", num_kv_blocks=16)
ids = dense.engine.tokenizer.encode(text)
out = {"types": types, "file_ppl": perplexity(dense.engine, ids),
       "bf16_bytes": sum(p.numel() * p.element_size() for p in dense.engine.model.parameters())}
del dense
import gc; gc.collect()
open("/proc/self/clear_refs", "w").write("5")  # peak RSS := current RSS
before = peak_kib()
llm = LLM(str(path), dtype="bfloat16", quantization="int4", num_kv_blocks=16)
out["load_peak_growth"] = (peak_kib() - before) * 1024
out["ppl"] = perplexity(llm.engine, ids)
out["methods"] = Counter(type(m.quant_method).__name__ for n, m in llm.engine.model.named_modules()
                         if isinstance(m, Linear) and n != "lm_head")
print(json.dumps(out))
"""


def test_kquant_writer_is_what_gguf_py_reads():
    """Our Q4_K / Q6_K bytes, decoded by gguf-py: within a 4-bit / 6-bit grid's error of the
    weights they were written from (a wrong bit layout would give noise)."""
    w = (np.random.default_rng(0).standard_normal((64, 512)) * 0.05).astype(np.float32)
    for quantize, tensor_type, rel in ((quantize_q4_k, T.Q4_K, 0.09), (quantize_q6_k, T.Q6_K, 0.025)):
        blocks = quantize(w)
        assert blocks.shape == (64, 512 // 256 * gguf.GGML_QUANT_SIZES[tensor_type][1])
        back = dequantize(blocks, tensor_type).reshape(w.shape)
        assert np.sqrt(((back - w) ** 2).mean()) / w.std() < rel


def test_q4_k_m_loads_kept_quantized_and_keeps_its_perplexity(tmp_path):
    child = subprocess.run([sys.executable, "-c", _CHILD, str(REPO), str(tmp_path / "smollm2.Q4_K_M.gguf")],
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    r = json.loads(child.stdout.strip().splitlines()[-1])
    assert {"Q4_K", "Q6_K", "Q8_0", "Q5_0"} <= set(r["types"]), r["types"]
    # Q4_K layers keep the file's grid; Q5_0 / Q6_K / Q8_0 ones take int8; nothing stays dense.
    assert set(r["methods"]) == {"GGUFGridMethod", "Int8LinearMethod"}, r["methods"]
    assert r["methods"]["GGUFGridMethod"] == r["types"]["Q4_K"]
    # Peak memory while loading: the int8/int4 model (the tied embedding in bf16) and one layer's
    # dense copy at a time -- measured 0.84 of the bf16 model's bytes; a bf16 copy of the weights
    # beside the quantized ones would need more than the bf16 model alone.
    assert r["load_peak_growth"] < r["bf16_bytes"], r
    assert r["ppl"] / r["file_ppl"] < 1.02, r
