"""`lmserve serve`: the OpenAI-compatible API server.

Flags override the config file; model flags (--dtype, --max-model-len, ...) apply to every
deployment. Flag values are checked here, so a typo fails before anything loads."""

from __future__ import annotations

import argparse
import sys

from lmserve.cli._types import integer_in, non_negative_int
from lmserve.cli._types import positive_int as _positive


def _port(text: str) -> int:
    return integer_in(text, 1, 65535, "a port number")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {text}")
    return value


def _speculative_config(text: str) -> dict:
    import json

    from lmserve.engine.spec_decode.config import SpeculativeConfig

    try:
        SpeculativeConfig.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return json.loads(text)


def _bytes(text: str) -> int:
    from pydantic import ByteSize, TypeAdapter, ValidationError

    try:
        return int(TypeAdapter(ByteSize).validate_python(text))
    except ValidationError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (bytes, or e.g. 512MiB, 4GiB)") from None


def _existing_file(text: str) -> str:
    from pathlib import Path

    if not Path(text).expanduser().is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return text


def register(sub) -> None:
    from typing import get_args

    from lmserve.config import DTYPES
    from lmserve.engine.options import AttentionBackend, DistributedBackend, EngineConfig, KVCacheDtype

    default = EngineConfig()  # the defaults the help texts name
    serve = sub.add_parser(
        "serve", help="serve the OpenAI-compatible API",
        description="Serve the OpenAI-compatible API. With no config and no --model: the bundled SmolLM2.",
        epilog="Example: lmserve serve --model ./Qwen2.5-0.5B-Instruct --served-model-name qwen "
               "--api-key sk-mine --max-model-len 8192")
    server = serve.add_argument_group("server")
    server.add_argument("--config", metavar="FILE", help="deployment config (YAML or TOML); flags override it")
    server.add_argument("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 for every interface)")
    server.add_argument("--port", type=_port, help="port to bind (default 8000)")
    server.add_argument("--api-key", action="append", metavar="KEY", dest="api_keys",
                        help="accept this API key (repeatable; also LMSERVE_API_KEYS=k1,k2). "
                             "With none, a key is made up and printed")
    server.add_argument("--cors-origin", action="append", metavar="ORIGIN", dest="cors_origins",
                        help="allow browser calls from this origin (repeatable; '*' for any). Default: none")
    server.add_argument("--threads", type=_positive, metavar="N",
                        help="CPU threads for the model's math (default: the physical cores; fewer on a shared host)")
    server.add_argument("--data-dir", metavar="DIR", help="where lmserve keeps state (default ~/.local/share/lmserve)")

    model = serve.add_argument_group("model")
    model.add_argument("--model", action="append", metavar="PATH_OR_ID",
                       help="deploy this checkpoint directory, .gguf file or Hugging Face id found in the "
                            "local cache (repeatable); ID=PATH serves local weights under a catalog id")
    model.add_argument("--served-model-name", metavar="NAME",
                       help="the model id clients send (default: what --model says)")
    model.add_argument("--dtype", choices=DTYPES, help="compute dtype (default auto)")
    model.add_argument("--chat-template", type=_existing_file, metavar="FILE",
                       help="a Jinja chat template replacing the checkpoint's")

    engine = serve.add_argument_group("engine")
    engine.add_argument("--max-model-len", type=_positive, metavar="TOKENS",
                        help="context length cap (default: the model's own)")
    engine.add_argument("--kv-cache-memory", type=_bytes, metavar="SIZE",
                        help="KV cache size, e.g. 2GiB (default 1GiB on CPU; on a GPU what "
                             "--gpu-memory-utilization leaves)")
    engine.add_argument("--gpu-memory-utilization", type=_fraction, metavar="FRACTION",
                        help="on a GPU: the fraction of its total memory for weights, activations and the KV "
                             f"cache, which gets the rest (default {default.gpu_memory_utilization})")
    engine.add_argument("--speculative-config", type=_speculative_config, metavar="JSON",
                        help='speculative decoding (vLLM\'s keys), e.g. \'{"method": "ngram", '
                             '"num_speculative_tokens": 5, "prompt_lookup_max": 4}\'')
    engine.add_argument("--max-num-seqs", type=_positive, metavar="N",
                        help=f"most sequences decoded together (default {default.max_num_seqs})")
    engine.add_argument("--quantization", choices=["none", "int8", "int4"],
                        help="weight-only quantization on CPU (default none)")
    engine.add_argument("--quantized-max-rows", type=non_negative_int, metavar="N",
                        help="with --quantization: products of more than N rows (prefill, large batches) use a "
                             "bf16 copy kept beside the quantized weights (default: no copy)")
    engine.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="run decode steps through a torch.compile'd forward, compiled in the background "
                             "after start (kernels cached in the data directory); default off")
    engine.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="on a GPU: replay decode steps from CUDA graphs captured at start; default on")
    engine.add_argument("--cpu-graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="on a CPU: replay small decode batches' recorded operator calls from C++; default on")
    def kv_cache_dtype(text: str) -> str:
        if text == "fp8_e5m2":  # vLLM's other fp8: refused by name, not as a typo
            from lmserve.attention.kv_cache_dtype import FP8_E5M2_REFUSED  # here: it imports torch

            raise argparse.ArgumentTypeError(FP8_E5M2_REFUSED)
        if text not in get_args(KVCacheDtype):  # in words, as every typed option (argparse's is "invalid choice")
            raise argparse.ArgumentTypeError(f"one of {', '.join(get_args(KVCacheDtype))}, not {text!r}")
        return text

    engine.add_argument("--kv-cache-dtype", type=kv_cache_dtype, metavar="{" + ",".join(get_args(KVCacheDtype)) + "}",
                        default=None,
                        help="what the KV cache stores: auto (the compute dtype) or fp8 (= fp8_e4m3: float8 e4m3 "
                             "with per-layer scales from the checkpoint, else 1.0; half the bytes per token)")
    engine.add_argument("--attention-backend", choices=get_args(AttentionBackend), default=None,
                        help="attention kernels: auto (Triton over the paged cache on a GPU, else the reference), "
                             "reference (PyTorch SDPA, any device) or triton")

    parallel = serve.add_argument_group("parallelism (docs/tensor_parallel.md)")
    parallel.add_argument("--tensor-parallel-size", "-tp", type=_positive, metavar="N",
                          help="split the model's layers over N ranks (GPUs, or CPU processes); default 1")
    parallel.add_argument("--enable-expert-parallel", action="store_true", default=None,
                          help="MoE models: whole experts per rank instead of a slice of every expert")
    parallel.add_argument("--distributed-backend", choices=get_args(DistributedBackend),
                          help="collectives: nccl (default on GPUs) or gloo (default on CPU)")
    parallel.add_argument("--nnodes", type=_positive, metavar="K",
                          help="the ranks spread over K nodes (tensor-parallel size / K each); default 1")
    parallel.add_argument("--node-rank", type=non_negative_int, default=0, metavar="R",
                          help="this node's number: 0 serves HTTP; the others only run their ranks and exit "
                               "when node 0 does")
    parallel.add_argument("--dist-init-addr", metavar="HOST:PORT",
                          help="with --nnodes: node 0's address for the rendezvous (node 0 listens on it)")

    logs = serve.add_argument_group("logging")
    logs.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="default info")
    logs.add_argument("--log-format", choices=["text", "json"], help="text (colour on a terminal) or json lines")
    serve.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lmserve.config import ConfigError, load_config

    if args.node_rank:
        return _run_worker_node(args)
    try:
        config = load_config(
            args.config, args.model, args.host, args.port, api_keys=args.api_keys, cors_origins=args.cors_origins,
            data_dir=args.data_dir, served_model_name=args.served_model_name, dtype=args.dtype,
            chat_template=args.chat_template, max_model_len=args.max_model_len,
            kv_cache_memory=args.kv_cache_memory, max_num_seqs=args.max_num_seqs, quantization=args.quantization,
            quantized_max_rows=args.quantized_max_rows, compile=args.compile,
            gpu_memory_utilization=args.gpu_memory_utilization, cuda_graphs=args.cuda_graphs,
            cpu_graphs=args.cpu_graphs, attention_backend=args.attention_backend, kv_cache_dtype=args.kv_cache_dtype,
            tensor_parallel_size=args.tensor_parallel_size,
            enable_expert_parallel=args.enable_expert_parallel, distributed_backend=args.distributed_backend,
            nnodes=args.nnodes, dist_init_addr=args.dist_init_addr, speculative_config=args.speculative_config,
            log_level=args.log_level, log_format=args.log_format, threads=args.threads)
    except ConfigError as e:
        print(f"lmserve serve: {e}", file=sys.stderr)
        return 2
    from lmserve.server.serve import serve

    return serve(config)


def _run_worker_node(args: argparse.Namespace) -> int:
    """A node other than 0: no HTTP, no model flags; its ranks take everything from node 0."""
    import logging

    from lmserve.distributed.executor import run_node_workers

    if not args.nnodes or args.nnodes < 2 or not args.dist_init_addr:
        print("lmserve serve: --node-rank needs --nnodes (at least 2) and --dist-init-addr HOST:PORT",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=(args.log_level or "info").upper(), format="%(asctime)s %(levelname)s %(message)s")
    try:
        return run_node_workers(args.node_rank, args.dist_init_addr, args.nnodes)
    except (ValueError, RuntimeError) as e:
        print(f"lmserve serve: node {args.node_rank}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
