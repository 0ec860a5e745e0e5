"""Our GGUF header reader against gguf-py's `GGUFReader` (llama.cpp's own Python package) on real
files: every metadata value and every tensor's type, shape, offset and bytes the same."""

from __future__ import annotations

import numpy as np
import pytest

from lmserve.models.gguf_header import GGUFHeader, TruncatedGGUF
from lmserve.models.loader import bundled_model_path


def _gguf_py_view(path):
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return reader, {name: field.contents() for name, field in reader.fields.items()
                    if not name.startswith("GGUF.")}  # gguf-py's pseudo-fields for the file header


def _assert_same(path):
    ours = GGUFHeader(path)
    reader, fields = _gguf_py_view(path)
    assert ours.fields.keys() == fields.keys()
    for name, value in fields.items():
        assert ours.fields[name] == value, name
    assert [t.name for t in ours.tensors] == [t.name for t in reader.tensors]
    for mine, theirs in zip(ours.tensors, reader.tensors, strict=True):
        assert mine.tensor_type == theirs.tensor_type, mine.name
        assert mine.shape == tuple(int(x) for x in theirs.shape), mine.name
        assert (mine.n_elements, mine.n_bytes, mine.data_offset) == (
            theirs.n_elements, theirs.n_bytes, theirs.data_offset), mine.name
        assert mine.data.dtype == theirs.data.dtype and mine.data.shape == theirs.data.shape, mine.name
        assert np.array_equal(mine.data, theirs.data), mine.name


def test_bundled_gguf_reads_as_gguf_py_reads_it():
    # Q4_1 and Q8_0 blocks, F32 norms, a 49k-entry vocabulary with scores, types and merges.
    _assert_same(bundled_model_path())


def test_written_gguf_reads_as_gguf_py_reads_it(tmp_path):
    from tests.support.family_checkpoints import build_qwen2_gguf

    _, path = build_qwen2_gguf(tmp_path)
    _assert_same(path)


def test_a_header_cut_short_names_the_bytes_it_needs(tmp_path):
    whole = bundled_model_path().read_bytes()[:4096]
    (tmp_path / "cut.gguf").write_bytes(whole)
    with pytest.raises(TruncatedGGUF) as e:
        GGUFHeader(tmp_path / "cut.gguf")
    assert e.value.needed > 4096
    (tmp_path / "not.gguf").write_bytes(b"GGML" + whole[4:])
    with pytest.raises(ValueError, match="no GGUF magic"):
        GGUFHeader(tmp_path / "not.gguf")
