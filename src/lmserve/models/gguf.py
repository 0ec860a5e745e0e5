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
from lmserve.layers.quantization import Int4Grid
from lmserve.models.config import DecoderConfig


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
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

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

    def tensors(self, config: DecoderConfig, int4_grids: bool = False) -> Iterator[tuple[str, torch.Tensor, str]]:
        """(Hugging Face name, fp32 tensor, file name), dequantized one at a time. With
        `int4_grids`, a Q4_0 or Q4_1 tensor also carries its own grid as `tensor.int4_grid` (rows in the
        same order as the tensor) for an int4 method to use as is."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        for t in tqdm(self.reader.tensors, desc=f"Loading {self.path.name}", unit="tensor", disable=None,
                      leave=False):
            name = hf_name(t.name)
            if name is None:
                continue  # e.g. rope_freqs: derived from the config instead
            try:
                array = dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(x) for x in t.shape])))
            except Exception as e:
                raise CheckpointError(f"{self.path}: cannot dequantize tensor {t.name} ({e})") from None
            grid = None
            if int4_grids and t.tensor_type == GGMLQuantizationType.Q4_1:
                grid = q4_1_grid(t.data, array.shape)
            elif int4_grids and t.tensor_type == GGMLQuantizationType.Q4_0:
                grid = q4_0_grid(t.data, array.shape)
            heads = self._permuted_heads(name, config)
            if heads:
                array = undo_rope_permute(array, heads)
            tensor = torch.from_numpy(np.array(array, dtype=np.float32))  # a writable copy
            if grid is not None:
                tensor.int4_grid = grid if not heads else grid.permute_rows(
                    torch.from_numpy(undo_rope_permute(np.arange(array.shape[0]), heads)))
            yield name, tensor, self.path.name

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
    """A Q4_0 tensor's own grid (w = d * (q - 8) per block of 32; 18 bytes: fp16 d, 16 bytes of
    codes, low nibbles first): scale = d, zero = 0."""
    rows, k = shape
    blocks = np.ascontiguousarray(data).reshape(rows, k // _Q4_1_BLOCK, 18)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    packed = blocks[..., 2:]
    codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).reshape(rows, k)
    return Int4Grid(torch.from_numpy(codes), torch.from_numpy(d), torch.from_numpy(np.zeros_like(d)))


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, mtime_ns: int, size: int):
    """Parsing the metadata takes seconds (every vocabulary entry is a field): engines loading
    the same file version share one parse."""
    try:
        return _bounded_reader()(path)
    except _Truncated as e:
        raise CheckpointError(f"{path}: truncated GGUF file: its header describes {e.needed:,} bytes, the file "
                              f"has {size:,} (an interrupted download or copy?); fetch the file again") from None
    except Exception as e:
        raise CheckpointError(f"{path}: malformed GGUF file ({e})") from None


class _Truncated(Exception):
    def __init__(self, needed: int):
        self.needed = needed


def _bounded_reader():
    """gguf-py's reader, refusing to read past the end of the file. The stock reader slices its
    memory map wherever the header points: a cut-off file (an interrupted download) then fails
    somewhere inside, e.g. as `cannot reshape array of size 399424 into shape (576,960)`. Every
    read, metadata or tensor data, goes through `_get`, so the check there names the cause."""
    import numpy as np
    from gguf import GGUFReader

    class BoundedReader(GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            end = int(offset) + int(np.dtype(dtype).itemsize) * int(count)
            if end > len(self.data):
                raise _Truncated(end)
            return super()._get(offset, dtype, count, override_order)

    return BoundedReader


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
