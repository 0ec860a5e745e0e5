"""Re-encode a GGUF file's layer weights in another llama.cpp type with gguf-py (the `gguf`
package): metadata and the other tensors are copied as they are, each attention/MLP weight is
dequantized and quantized again. gguf-py's own quantizer writes Q8_0, Q5_0, Q4_0, Q4_1 and bf16;
its numpy code has no k-quant quantizer, so Q4_K and Q6_K blocks come from
tests/support/gguf_kquants.py (written from the format's layout, checked against gguf-py's
dequantizer). `Q4_K_M` / `Q5_K_M` are llama.cpp's mixes: Q6_K for some attn_v / ffn_down, Q4_K /
Q5_K elsewhere. As in llama-quantize, a k-quant needs rows of whole 256-value super-blocks: other
rows fall back to Q5_0 (for Q4_K), Q5_1 (for Q5_K) or Q8_0 (for Q6_K) -- in SmolLM2-135M (hidden
576) every weight but ffn_down.

    python benchmarks/gguf_reencode.py SRC.gguf DST.gguf Q8_0|Q4_K|Q4_K_M|Q5_K|Q5_K_M|...
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support, from a script


def reencode(src: Path, dst: Path, type_name: str) -> Path:
    import gguf
    from gguf.quants import dequantize, quantize

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    num_layers = int(reader.fields[f"{arch}.block_count"].contents())
    writer = gguf.GGUFWriter(str(dst), arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    tensors, kquantizers = [], _kquantizers()
    for t in reader.tensors:
        shape = tuple(reversed([int(x) for x in t.shape]))
        if t.name.startswith("blk.") and t.name.endswith(".weight") and len(shape) == 2:
            target = target_type(type_name, t.name, shape, num_layers)
            weights = dequantize(t.data, t.tensor_type).reshape(shape)
            data = kquantizers[target](weights) if target in kquantizers else quantize(weights, target)
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


def target_type(type_name: str, name: str, shape: tuple[int, ...], num_layers: int):
    """The type a layer weight is written in (see the module's docstring for the mix and fallbacks)."""
    from gguf import GGMLQuantizationType as T

    from tests.support.gguf_kquants import QK_K, q4_k_m_uses_q6_k

    if type_name in ("Q4_K_M", "Q5_K_M"):
        target = T.Q6_K if q4_k_m_uses_q6_k(name, num_layers) else T[type_name[:-2]]
    else:
        target = T[type_name]
    fallbacks = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
    if target in fallbacks and shape[-1] % QK_K:
        return fallbacks[target]
    return target


def _kquantizers() -> dict:
    from gguf import GGMLQuantizationType as T

    from tests.support.gguf_kquants import quantize_q4_k, quantize_q5_k, quantize_q6_k

    return {T.Q4_K: quantize_q4_k, T.Q5_K: quantize_q5_k, T.Q6_K: quantize_q6_k}


if __name__ == "__main__":
    reencode(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
