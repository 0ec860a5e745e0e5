"""GGUF checkpoints (llama.cpp's format): metadata -> config, tensors -> Hugging Face names.

Each supported GGUF architecture names the family it loads into and its tensor rules. llama.cpp's
converter permutes the q/k rows of the `llama` architecture only (for its interleaved rope);
other architectures (qwen2) keep Hugging Face's half-split order, so undoing the permutation is
a per-architecture rule, never a global one.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lmserve.errors import CheckpointError
from lmserve.layers.quantization.int4_kernel import Int4Grid
from lmserve.models.config import DecoderConfig
from lmserve.models.gguf_header import GGUFHeader, TruncatedGGUF


@dataclass(frozen=True)
class GGUFArch:
    architecture: str  # the Hugging Face architecture (family) it loads into
    permuted_qk: bool  # llama.cpp interleaved the q/k rows at conversion
    qkv_bias: bool = False


GGUF_ARCHS: dict[str, GGUFArch] = {
    "llama": GGUFArch("LlamaForCausalLM", permuted_qk=True),
    "qwen2": GGUFArch("Qwen2ForCausalLM", permuted_qk=False, qkv_bias=True),
}

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


class GGUFFile:
    """One parsed GGUF file: the header is read once and shared by config and tensor reading."""

    def __init__(self, path: Path):
        self.path = path
        stat = path.stat()
        self.reader = _cached_reader(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        self.arch_name = self.field("general.architecture")
        self.arch = GGUF_ARCHS.get(self.arch_name)
        if self.arch is None:
            raise CheckpointError(f"{path}: unsupported GGUF architecture {self.arch_name!r} "
                            f"(supported: {', '.join(sorted(GGUF_ARCHS))})")

    def field(self, key: str, default: Any = None) -> Any:
        return self.reader.fields.get(key, default)

    def arch_field(self, name: str, default: Any = None) -> Any:
        value = self.field(f"{self.arch_name}.{name}", default)
        if value is None:
            raise CheckpointError(f"{self.path}: GGUF metadata lacks {self.arch_name}.{name}")
        return value

    def config(self) -> DecoderConfig:
        heads = int(self.arch_field("attention.head_count"))
        hidden = int(self.arch_field("embedding_length"))
        names = {t.name for t in self.reader.tensors}
        vocab = self.field(f"{self.arch_name}.vocab_size") or len(self.field("tokenizer.ggml.tokens", []))
        eos = self.field("tokenizer.ggml.eos_token_id")
        max_pos = int(self.arch_field("context_length", 2048))
        return DecoderConfig(
            architecture=self.arch.architecture,
            num_layers=int(self.arch_field("block_count")),
            vocab_size=int(vocab),
            context_length=max_pos,
            eos_token_ids=set() if eos is None else {int(eos)},
            bos_token_id=self.field("tokenizer.ggml.bos_token_id"),
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=int(self.arch_field("attention.head_count_kv", heads)),
            head_dim=int(self.arch_field("attention.key_length", hidden // heads)),
            intermediate_size=int(self.arch_field("feed_forward_length")),
            rms_norm_eps=float(self.arch_field("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(self.arch_field("rope.freq_base", 10000.0)),
            max_position_embeddings=max_pos,
            tie_word_embeddings="output.weight" not in names,
            qkv_bias=self.arch.qkv_bias,
        )

    def tensors(self, config: DecoderConfig, grid_names: frozenset[str] | set[str] = frozenset()
                ) -> Iterator[tuple[str, torch.Tensor, str]]:
        """(Hugging Face name, tensor, file name), one at a time: dequantized to fp32, except a
        Q4_0 / Q4_1 / Q4_K tensor named in `grid_names`, which is read as its own int4 grid instead: three
        tensors `<module>.codes` (uint8), `.group_scale` and `.group_zero` (fp32 per block of 32),
        for layers/quantization/gguf.py's method; never dequantized."""
        from gguf.quants import dequantize

        for t in tqdm(self.reader.tensors, desc=f"Loading {self.path.name}", unit="tensor", disable=None,
                      leave=False):
            name = hf_name(t.name)
            if name is None:
                continue  # e.g. rope_freqs: derived from the config instead
            shape = tuple(reversed([int(x) for x in t.shape]))
            heads = self._permuted_heads(name, config)
            if name in grid_names:
                grid = int4_grid(t.data, t.tensor_type, shape)
                if heads:
                    grid = grid.permute_rows(torch.from_numpy(undo_rope_permute(np.arange(shape[0]), heads)))
                base = name[:-len(".weight")]
                yield f"{base}.codes", grid.codes, self.path.name
                yield f"{base}.group_scale", grid.scale, self.path.name
                yield f"{base}.group_zero", grid.zero, self.path.name
                continue
            try:
                array = dequantize(t.data, t.tensor_type).reshape(shape)
            except Exception as e:
                raise CheckpointError(f"{self.path}: cannot dequantize tensor {t.name} ({e})") from None
            if heads:
                array = undo_rope_permute(array, heads)
            yield name, torch.from_numpy(np.array(array, dtype=np.float32)), self.path.name  # a writable copy

    def int4_grid_tensors(self) -> set[str]:
        """The Hugging Face names of the file's weights stored in an int4 group-32 grid (Q4_0,
        Q4_1, Q4_K): an int4 load keeps their grids."""
        return self._weights_of_types(int4_grid_types())

    def wide_block_tensors(self) -> set[str]:
        """The Hugging Face names of the file's weights in 5- to 8-bit blocks (Q5_0, Q5_1, Q5_K,
        Q6_K, Q8_0: the Q4_K_M / Q5_K_M mixes' other types): an int4 load gives their layers int8,
        the nearest grid our kernels run that loses none of their bits."""
        from gguf import GGMLQuantizationType as T

        return self._weights_of_types((T.Q5_0, T.Q5_1, T.Q5_K, T.Q6_K, T.Q8_0))

    def _weights_of_types(self, types) -> set[str]:
        return {name for t in self.reader.tensors
                if t.tensor_type in types and (name := hf_name(t.name)) is not None
                and name.endswith(".weight") and len(t.shape) == 2}

    def _permuted_heads(self, name: str, config: DecoderConfig) -> int | None:
        """The head count to undo llama.cpp's q/k row permutation with, or None."""
        if self.arch.permuted_qk and name.endswith(("q_proj.weight", "q_proj.bias")):
            return config.num_heads
        if self.arch.permuted_qk and name.endswith(("k_proj.weight", "k_proj.bias")):
            return config.num_kv_heads
        return None


_Q4_1_BLOCK = 32  # values per block; 20 bytes: fp16 d, fp16 m, 16 bytes of 4-bit codes


def q4_1_grid(data: np.ndarray, shape: tuple[int, ...]) -> Int4Grid:
    """A Q4_1 tensor's own grid (w = d * q + m per block of 32, low nibbles first) in the int4
    kernel's terms: scale = d, zero = m + 8d, codes unchanged."""
    rows, k = shape
    blocks = np.ascontiguousarray(data).reshape(rows, k // _Q4_1_BLOCK, 20)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    packed = blocks[..., 4:]
    codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).reshape(rows, k)
    return Int4Grid(torch.from_numpy(codes), torch.from_numpy(d), torch.from_numpy(m + 8 * d))


def q4_0_grid(data: np.ndarray, shape: tuple[int, ...]) -> Int4Grid:
    """Q4_0 (w = d * (q - 8) per block of 32; 18 bytes: fp16 d, 16 bytes of codes, low nibbles
    first): scale = d, zero = 0."""
    rows, k = shape
    blocks = np.ascontiguousarray(data).reshape(rows, k // 32, 18)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    packed = blocks[..., 2:]
    codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).reshape(rows, k)
    return Int4Grid(torch.from_numpy(codes), torch.from_numpy(d), torch.zeros_like(torch.from_numpy(d)))


def q4_k_grid(data: np.ndarray, shape: tuple[int, ...]) -> Int4Grid:
    """Q4_K super-blocks of 256 values (144 bytes: fp16 d, fp16 dmin, 12 bytes of 6-bit sub-block
    scales and mins, 128 bytes of codes): sub-block i of 32 is w = d * sc_i * q - dmin * m_i, so
    the sub-block scales fold into group-32 scales: scale = d * sc_i, zero = 8 * scale - dmin * m_i.
    Codes: 4 chunks of 32 bytes, chunk j's low nibbles are sub-block 2j, its high ones 2j + 1."""
    from gguf.quants import Q4_K

    rows, k = shape
    blocks = np.ascontiguousarray(data).reshape(-1, 144)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # [B, 1]
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, m = Q4_K.get_scale_min(blocks[:, 4:16].copy())  # [B, 8] each
    qs = blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    codes = (qs & 0x0F).reshape(rows, k)
    scale = (d * sc.astype(np.float32)).reshape(rows, k // 32)
    zero = (8 * scale - (dmin * m.astype(np.float32)).reshape(rows, k // 32))
    return Int4Grid(torch.from_numpy(np.ascontiguousarray(codes)), torch.from_numpy(scale), torch.from_numpy(zero))


def int4_grid(data: np.ndarray, tensor_type, shape: tuple[int, ...]) -> Int4Grid:
    """The int4 group-32 grid a Q4_0 / Q4_1 / Q4_K tensor holds (exactly: no requantization)."""
    from gguf import GGMLQuantizationType as T

    return {T.Q4_0: q4_0_grid, T.Q4_1: q4_1_grid, T.Q4_K: q4_k_grid}[tensor_type](data, shape)


def int4_grid_types():
    from gguf import GGMLQuantizationType as T

    return (T.Q4_0, T.Q4_1, T.Q4_K)


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, mtime_ns: int, size: int) -> GGUFHeader:
    """Engines loading the same file version share one parse of its header."""
    try:
        return GGUFHeader(path)
    except TruncatedGGUF as e:
        # Named as such rather than failing somewhere inside, e.g. as a reshape error.
        raise CheckpointError(f"{path}: truncated GGUF file: its header describes {e.needed:,} bytes, the file "
                              f"has {size:,} (an interrupted download or copy?); fetch the file again") from None
    except Exception as e:
        raise CheckpointError(f"{path}: malformed GGUF file ({e})") from None


def hf_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def undo_rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter interleaves q/k rows for its rope layout; restore the HF half-split order."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)
