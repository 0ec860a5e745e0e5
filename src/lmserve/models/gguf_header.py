"""A GGUF file's header, read straight from a memory map: metadata values and tensor infos, with
each tensor's data a view of the map (nothing is copied until a tensor is dequantized).

gguf-py's `GGUFReader` builds a numpy part per value, three per vocabulary entry: ~1.5 s for
SmolLM2's 49k-token vocabulary at every start, for arrays the loader never reads (the tokenizer is
built by transformers from the file itself). This reader walks the same bytes with `struct` and
keeps arrays as Python lists (numeric ones through one `np.frombuffer`): ~0.1 s. gguf-py still
owns the format's constants (value and tensor types, block sizes) and dequantization;
tests/models/test_gguf_header.py holds this reader equal to gguf-py's on real files.

Format (versions 2 and 3, little-endian): magic "GGUF", u32 version, u64 tensor count, u64
metadata count; each metadata entry is a string key, a u32 value type and the value (an array is
a u32 element type, a u64 count and the elements); each tensor info is a string name, u32 dims,
u64 sizes (fastest-varying first), u32 type and a u64 offset into the data section, which starts
at the next multiple of `general.alignment` (32 unless set) after the infos.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
# GGUF value types: numbers by their struct code; 7 is bool, 8 string, 9 array.
_STRING, _ARRAY, _BOOL = 8, 9, 7
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 10: "Q", 11: "q", 12: "d", _BOOL: "?"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          10: np.uint64, 11: np.int64, 12: np.float64, _BOOL: np.bool_}


class TruncatedGGUF(ValueError):
    """The header or a tensor's data points past the end of the file."""

    def __init__(self, needed: int):
        super().__init__(f"needs {needed} bytes")
        self.needed = needed


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # as stored: fastest-varying dimension first (gguf-py's order)
    n_elements: int
    n_bytes: int
    data_offset: int
    # float/int types as their numpy dtype in row-major shape (reversed `shape`); block-quantized
    # types as uint8 rows of blocks: what gguf-py's `dequantize` takes.
    data: np.ndarray


class GGUFHeader:
    def __init__(self, path: str | Path):
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size == 0:
                raise TruncatedGGUF(4)
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._buf = memoryview(self._map)
        self._pos = 0
        if self._read(4) != _MAGIC:
            raise ValueError("not a GGUF file (no GGUF magic)")
        self.version = self._scalar("I")
        if self.version not in (2, 3):
            raise ValueError(f"GGUF version {self.version} is not supported (2 and 3 are)")
        n_tensors, n_fields = self._scalar("Q"), self._scalar("Q")
        self.fields: dict[str, Any] = {}
        for _ in range(n_fields):
            key = self._string()
            self.fields[key] = self._value(self._scalar("I"))
        infos = [self._tensor_info() for _ in range(n_tensors)]
        alignment = int(self.fields.get("general.alignment", _DEFAULT_ALIGNMENT))
        data_start = -(-self._pos // alignment) * alignment
        self.tensors = [self._tensor(data_start, *info) for info in infos]

    # --- reading primitives, each bounded by the file's end

    def _read(self, n: int) -> memoryview:
        end = self._pos + n
        if end > len(self._buf):
            raise TruncatedGGUF(end)
        out = self._buf[self._pos:end]
        self._pos = end
        return out

    def _scalar(self, code: str):
        return struct.unpack("<" + code, self._read(struct.calcsize(code)))[0]

    def _string(self) -> str:
        return str(self._read(self._scalar("Q")), "utf-8")

    def _value(self, kind: int) -> Any:
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            item, count = self._scalar("I"), self._scalar("Q")
            if item == _STRING:
                return [self._string() for _ in range(count)]
            if item == _ARRAY:
                return [self._value(self._scalar("I")) for _ in range(count)]
            if item not in _NUMPY:
                raise ValueError(f"unknown GGUF array element type {item}")
            width = np.dtype(_NUMPY[item]).itemsize
            return np.frombuffer(self._read(width * count), dtype=_NUMPY[item]).tolist()
        if kind not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {kind}")
        return self._scalar(_SCALARS[kind])

    def _tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self._string()
        dims = tuple(self._scalar("Q") for _ in range(self._scalar("I")))
        return name, dims, self._scalar("I"), self._scalar("Q")

    def _tensor(self, data_start: int, name: str, dims: tuple[int, ...], raw_type: int, offset: int) -> GGUFTensor:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import quant_shape_to_byte_shape

        kind = GGMLQuantizationType(raw_type)
        n = int(np.prod(dims)) if dims else 1
        block, block_bytes = GGML_QUANT_SIZES[kind]
        n_bytes = n * block_bytes // block
        start = data_start + offset
        if start + n_bytes > len(self._buf):
            raise TruncatedGGUF(start + n_bytes)
        raw = np.frombuffer(self._buf, dtype=np.uint8, count=n_bytes, offset=start)
        rows = tuple(reversed(dims))
        plain = _PLAIN_TYPES.get(kind.name)
        data = raw.view(plain).reshape(rows) if plain is not None else raw.reshape(
            quant_shape_to_byte_shape(rows, kind))
        return GGUFTensor(name, kind, dims, n, n_bytes, start, data)


# Types gguf-py hands out as typed arrays rather than bytes (BF16 stays bytes there too).
_PLAIN_TYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                "I32": np.int32, "I64": np.int64}
