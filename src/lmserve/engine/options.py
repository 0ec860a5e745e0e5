"""Engine options, written once: the `**engine_options` of `LLM` and `LLMEngine`, the `engine:`
section of a deployment in the config file, and the `lmserve serve` engine flags all validate
against `EngineConfig` (vLLM's `EngineArgs` plays this part there).

Every field's type, range and default lives here. The config file and the flags give only some of
them; `EngineConfig.options()` hands the engine just those, so a default the serving layer fills
in itself (engine/serving_defaults.py: int4 for a 4-bit GGUF) is not mistaken for a choice.
This module imports no torch, so a bad config fails before any model code loads.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

# Mirrors of the choices the layers that use them define (tests keep each equal to its source):
Quantization = Literal["none", "int8", "int4", "fp8"]  # lmserve.layers.quantization.QUANTIZATION_CHOICES
LoadFormat = Literal["auto", "dummy"]  # lmserve.models.loader.LOAD_FORMATS
AttentionBackend = Literal["auto", "reference", "triton"]  # lmserve.attention.selector.ATTENTION_BACKENDS
DistributedBackend = Literal["gloo", "nccl"]  # lmserve.distributed.group.BACKENDS
KVCacheDtype = Literal["auto", "fp8", "fp8_e4m3"]  # lmserve.attention.kv_cache_dtype.KV_CACHE_DTYPES
_CHOICES = {"quantization": get_args(Quantization), "load_format": get_args(LoadFormat),
            "attention_backend": get_args(AttentionBackend), "distributed_backend": get_args(DistributedBackend),
            "kv_cache_dtype": get_args(KVCacheDtype)}
Positive = Annotated[int, Field(ge=1)]


class EngineConfig(BaseModel):
    """The options of one engine; what is left out takes the default written here."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    block_size: Annotated[int, Field(ge=1, le=1024)] = 16
    num_kv_blocks: Positive | None = None  # explicit cache size; else from kv_cache_memory
    # Bytes (or "4GiB"); default 1 GiB on CPU, on CUDA what gpu_memory_utilization leaves.
    kv_cache_memory: Annotated[ByteSize, Field(ge=1 << 20)] | None = None
    # On CUDA without num_kv_blocks / kv_cache_memory: the fraction of the device's total memory
    # for weights + activation peak + KV cache, the cache getting the rest (engine/memory.py).
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = 0.9
    max_num_seqs: Positive = 256
    max_num_batched_tokens: Positive = 2048
    # Most tokens one prompt's prefill takes per step, so decodes and short prompts share every
    # step with a long prefill (0: a prefill may take the whole step).
    long_prefill_token_threshold: Annotated[int, Field(ge=0)] = 512
    # Most of the KV cache that less urgent requests (priority > 0: batch API lines) are admitted
    # into, so interactive requests always find room (engine/scheduler.py).
    batch_kv_share: Annotated[float, Field(gt=0, le=1)] = 0.5
    max_model_len: Positive | None = None  # default: the model's own context
    enable_prefix_caching: bool = True
    device: Annotated[str, Field(pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")] = "auto"
    # Weight-only int8 / int4 on CPU, fp8 (fast on GPUs) (layers/quantization/).
    quantization: Quantization = "none"
    # Products of more rows than this (prefill, big decode batches) run on a bf16 copy kept beside
    # the quantized weights: the quantized kernels win only for a few rows. None: no copy.
    quantized_max_rows: Annotated[int, Field(ge=0)] | None = None
    # What the KV cache stores: "auto" the compute dtype; "fp8" (= "fp8_e4m3") float8 e4m3 with
    # per-layer scales from the checkpoint (else 1.0), half the bytes per token
    # (attention/kv_cache_dtype.py). vLLM's "fp8_e5m2" is refused there, by name.
    kv_cache_dtype: KVCacheDtype = "auto"
    # Decode-only steps through a torch.compile'd forward, compiled in the background after
    # start (engine/compiled_decode.py, docs/compile.md); off: every step eager, the exact-parity path.
    compile: bool = False
    # "auto": the checkpoint's weights; "dummy": random weights drawn on the device from
    # config.json alone (benchmarks and device checks of model shapes we hold no weights for).
    load_format: LoadFormat = "auto"
    # Attention kernels: "auto" (Triton over the paged cache on CUDA, else the reference),
    # "reference" (PyTorch SDPA, any device) or "triton" (attention/selector.py).
    attention_backend: AttentionBackend = "auto"
    # CUDA: decode steps replay graphs captured at start for a ladder of batch sizes
    # (engine/cuda_graphs.py); off: every step eager.
    cuda_graphs: bool = True
    # CPU: small decode batches replay their recorded operator calls from C++, without the Python
    # between them (engine/cpu_graphs.py); off: every step eager.
    cpu_graphs: bool = True
    # Tensor parallelism (docs/tensor_parallel.md): the model's layers split over this many ranks
    # (processes), rank 0 in this process (distributed/executor.py). Expert parallelism gives MoE
    # layers whole experts per rank instead of a slice of each. Backend: nccl on CUDA, gloo on CPU
    # by default.
    tensor_parallel_size: Positive = 1
    enable_expert_parallel: bool = False
    distributed_backend: DistributedBackend | None = None
    # Multi-node: the ranks spread over nnodes nodes; this engine is node 0, hosting the
    # rendezvous at dist_init_addr (HOST:PORT) that the other nodes' `lmserve serve` join.
    nnodes: Positive = 1
    dist_init_addr: Annotated[str, Field(pattern=r"^[^\s:]+:\d+$")] | None = None
    # Speculative decoding (engine/spec_decode/), vLLM's keys as a dict or its JSON text, e.g.
    # {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4}. None: off.
    speculative_config: dict[str, Any] | str | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """`max_num_seqs: null` in a file (or None as a keyword) asks for the default."""
        if isinstance(data, dict):
            data = {k: v for k, v in data.items()
                    if v is not None or k not in cls.model_fields or cls.model_fields[k].default is None}
        return data

    @field_validator(*_CHOICES, mode="before")
    @classmethod
    def _one_of(cls, value: Any, info: ValidationInfo) -> Any:
        """A bad choice is named as the layer that takes it names it (and LLM(...) always did)."""
        choices = _CHOICES[info.field_name]
        if info.field_name == "kv_cache_dtype" and value == "fp8_e5m2":
            from lmserve.attention.kv_cache_dtype import FP8_E5M2_REFUSED  # here: it imports torch

            raise ValueError(FP8_E5M2_REFUSED)
        if value is not None and value not in choices:
            raise ValueError(f"{info.field_name} must be one of {', '.join(choices)}; got {value!r}")
        return value

    @field_validator("speculative_config")
    @classmethod
    def _check_speculative_config(cls, value: dict[str, Any] | str | None) -> dict[str, Any] | str | None:
        from lmserve.engine.spec_decode.config import SpeculativeConfig

        SpeculativeConfig.parse(value)  # ValueError naming the bad key, before any weights load
        return value

    @classmethod
    def from_options(cls, **options: Any) -> EngineConfig:
        """From `LLM(...)` keyword arguments: TypeError for a name that is no option (as for any
        keyword argument), ValueError naming each bad value."""
        unknown = set(options) - set(cls.model_fields)
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(sorted(unknown))}")
        if options.get("gpu_memory_utilization") is not None:
            # A Python caller's True or "0.9" is a mistake the lax parsing below would take for a
            # number (right for the config file's text, where the same model reads it)
            check_utilization(options["gpu_memory_utilization"])
        try:
            return cls.model_validate(options)
        except ValidationError as e:
            raise ValueError("; ".join(_describe(err) for err in e.errors())) from None

    def options(self) -> dict[str, Any]:
        """The keyword arguments for LLMEngine: only what was set (in the file or by a flag)."""
        return {k: int(v) if isinstance(v, ByteSize) else v
                for k, v in self.model_dump(exclude_unset=True, exclude_none=True).items()}


def check_utilization(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be a fraction in (0, 1]; got {value!r}")
    return float(value)


def _describe(err: dict[str, Any]) -> str:
    message = err["msg"].removeprefix("Value error, ")
    name = str(err["loc"][0]) if err["loc"] else ""
    return message if message.startswith(name) else f"{name}: {message} (got {err.get('input')!r})"
