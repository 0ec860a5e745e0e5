"""Re-encode a GGUF file's layer weights in another llama.cpp type with gguf-py (the `gguf`
package): metadata and the other tensors are copied as they are, each attention/MLP weight is
dequantized and quantized again by gguf-py's own quantizer. gguf-py writes Q8_0, Q4_0, Q4_1 and
bf16 (not the k-quants: its numpy quantizer has none).

    python benchmarks/gguf_reencode.py SRC.gguf DST.gguf Q8_0
"""

from __future__ import annotations

import sys
from pathlib import Path


def reencode(src: Path, dst: Path, type_name: str) -> Path:
    import gguf
    from gguf.quants import dequantize, quantize

    target = gguf.GGMLQuantizationType[type_name]
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    tensors = []
    for t in reader.tensors:
        shape = tuple(reversed([int(x) for x in t.shape]))
        if t.name.startswith("blk.") and t.name.endswith(".weight") and len(shape) == 2:
            data = quantize(dequantize(t.data, t.tensor_type).reshape(shape), target)
            tensors.append((t.name, data, target))
        else:
            tensors.append((t.name, t.data, t.tensor_type))
    for name, data, qtype in tensors:
        writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, data, _ in tensors:
        writer.write_tensor_data(data, tensor_endianess=reader.endianess)
    writer.close()
    return dst


if __name__ == "__main__":
    reencode(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
