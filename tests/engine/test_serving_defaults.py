"""`lmserve serve` serves a 4-bit GGUF from its 4-bit blocks unless told otherwise
(engine/serving_defaults.py); anything set explicitly is left alone."""

from __future__ import annotations

from lmserve.defaults import DEFAULT_MODEL_ID
from lmserve.engine.serving_defaults import int4_share, serving_options
from lmserve.layers.quantization import kernel_timing
from lmserve.models.loader import resolve_checkpoint


def test_the_bundled_q4_1_gguf_is_served_int4_by_default():
    assert int4_share(resolve_checkpoint(DEFAULT_MODEL_ID)) == 1.0  # every block weight is Q4_1
    options = serving_options(DEFAULT_MODEL_ID, "auto", {"max_num_seqs": 8})
    # ~270 MB of bf16 weights: a dense copy for big products fits the rule on any test machine;
    # products up to the measured crossover (at least one row) run the 4-bit kernel
    rows = max(kernel_timing.timings().int4_max_rows(), 1)
    assert options == {"max_num_seqs": 8, "quantization": "int4", "quantized_max_rows": rows}


def test_explicit_choices_are_kept():
    for dtype, options in [("auto", {"quantization": "none"}), ("float32", {}), ("bfloat16", {}),
                           ("auto", {"load_format": "dummy"}), ("auto", {"tensor_parallel_size": 2}),
                           ("auto", {"device": "cuda"})]:
        assert serving_options(DEFAULT_MODEL_ID, dtype, dict(options)) == options
    # int4 asked without a row limit: the memory mode (no dense copy) stays as asked
    assert serving_options(DEFAULT_MODEL_ID, "auto", {"quantization": "int4"}) == {"quantization": "int4"}
    kept = serving_options(DEFAULT_MODEL_ID, "auto", {"quantized_max_rows": 1})
    assert kept["quantization"] == "int4" and kept["quantized_max_rows"] == 1


def test_a_checkpoint_without_4bit_blocks_stays_dense(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # a Hugging Face directory: float weights
    assert int4_share(resolve_checkpoint(str(tmp_path))) == 0.0
    assert serving_options(str(tmp_path), "auto", {}) == {}
