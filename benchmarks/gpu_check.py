"""The device check of issue 11, in one run: correctness of every family on the GPU, then speed
of a Llama-3.1-8B-shaped model against the HBM roofline and transformers' `generate`.

Written for a lent H100/H200 that has torch, triton, transformers, numpy, safetensors and
tokenizers but no network, no model files and maybe no pytest/gguf/fastapi/xgrammar: every model
is built here (tiny random checkpoints from tests/family_checkpoints.py; the 8B shape from a
config.json alone with `load_format="dummy"`), lmserve is imported from this repo's src/, and
only what truly needs a missing package is skipped (and said so).

    python3 benchmarks/gpu_check.py                 # on the device: everything, well inside 10 min
    python3 benchmarks/gpu_check.py --quick         # a smaller offline-throughput run
    python benchmarks/gpu_check.py --device cpu --quick   # smoke mode: the whole script on CPU,
                                                          # with a tiny speed model

Parts (--parts):
  env          device, versions, measured copy bandwidth (bytes read + written / time)
  engine       the check_* functions of tests/cuda_engine_checks.py (sampler syncs, memory sizing)
  correctness  per family, float32: lmserve on the device == transformers on the device ==
               lmserve on CPU, greedy, 32 steps, through the batched paged engine (chunked
               prefill, a second wave hitting the prefix cache), for every attention backend and
               CUDA-graph setting the engine accepts; bfloat16 within a logit tolerance; seeded
               sampling reproducible and equal to CPU in float32
  speed        8B shape in bf16: transformers' generate at batch 1 and 32 (the baseline, freed
               before lmserve starts), lmserve batch-1 decode (fraction of the roofline) and
               offline throughput (N x 1,024 in / 1,024 out, ignore_eos), with and without graphs
  plan         `lmserve plan`'s prediction for the 8B shape (weights, KV bytes per token, KV capacity)
               against a dummy-weight engine's measured numbers (engine/capacity.py)
  deepseek     the MLA decode and fused-MoE kernels against the reference paths at DeepSeek-V2-Lite
               sizes (float32 and bf16 error, time per call vs the reference), then the V2-Lite shape
               (MLA + 64-expert MoE, ~16B, dummy weights) served with CUDA graphs: batch-1 decode,
               offline throughput (256 x 1,024 in / 1,024 out; --quick 128 x 512 / 512), a profile's top
               kernels at batch 64
  fp8          the fp8 linear method (torch._scaled_mm with per-row weight and per-token activation
               scales, compute capability >= 8.9) against the dequantized dense product, then the 8B
               shape with `quantization: fp8` (per-channel fp8 weights from dummy bf16 at load): batch-1
               decode (fraction of the fp8 roofline, ratio to bf16's) and offline throughput, each
               beside the same numbers in bf16 measured in this part
  attention    decode attention of the 8B layer shape in one pass vs split keys + merge, by batch size
               and context (graph-replayed kernel time), and where one pass stops paying

Results go to $OUT (default ./gpu_check_out): gpu_check.json (every number), gpu_check.md (the
table for docs/benchmarks.md) and gpu_check_profile.txt, rewritten after every check so a run
cut short still returns what it measured. Each part runs in a process of its own (--no-isolate:
all in this one), so a poisoned CUDA context, a crash or a hang costs one part, not the run.
Exit status 1 if any check failed.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# This checkout's lmserve (not an installed one) and the test checkpoints, which import no pytest.
sys.path[:0] = [str(REPO / "src"), str(REPO / "tests")]

import torch  # noqa: E402
from family_checkpoints import FAMILIES, STEPS, WAVES, FamilySpec, serve_and_capture  # noqa: E402

from lmserve import SamplingParams  # noqa: E402
from lmserve.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402

PROMPTS = [p for wave in WAVES for p in wave]

# Published anchor for the same shape and workload (SGLang on one H200, request rate 16,
# 1,024 in / 1,024 out) and the targets.
SGLANG_H200_TOK_S = 5355
TARGET_ROOFLINE_FRACTION = 0.80
TARGET_THROUGHPUT = {"H200": 5000, "H100": 3500}

# Llama-3.1-8B's config.json (the keys lmserve and transformers read).
LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu",
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "tie_word_embeddings": False,
    "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16"}
# MoE and MLA shapes for the capacity planner's check: DeepSeek-V2-Lite's and Qwen2-57B-A14B's
# config.json keys (the engine reads no others).
DEEPSEEK_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 102400,
    "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
    "num_attention_heads": 16, "num_key_value_heads": 16, "n_routed_experts": 64, "n_shared_experts": 2,
    "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1, "kv_lora_rank": 512,
    "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "topk_method": "greedy",
    "norm_topk_prob": False, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "max_position_embeddings": 163840,
    "rope_theta": 10000, "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                          "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    "rms_norm_eps": 1e-6, "bos_token_id": 100000, "eos_token_id": 100001, "tie_word_embeddings": False}
QWEN2_57B_A14B = {
    "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "vocab_size": 151936, "hidden_size": 3584,
    "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
    "num_experts": 64, "num_experts_per_tok": 8, "moe_intermediate_size": 2560,
    "shared_expert_intermediate_size": 20480, "norm_topk_prob": False, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "max_position_embeddings": 65536, "rope_theta": 1e6, "rms_norm_eps": 1e-6, "bos_token_id": 151643,
    "eos_token_id": 151643, "tie_word_embeddings": False}
# Smoke mode's stand-in: the same family and rope, small enough for a CPU.
TINY_SPEED_MODEL = {**LLAMA_8B, "vocab_size": 1024, "hidden_size": 128, "intermediate_size": 256,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                    "bos_token_id": 1, "eos_token_id": 2}


# ---- the report ---------------------------------------------------------------------------

class CheckFailed(Exception):
    """A check ran and found a difference (as opposed to crashing)."""


@dataclass
class Report:
    out_dir: Path
    deadline_s: float
    command: str
    started: float = field(default_factory=time.perf_counter)
    checks: list[dict] = field(default_factory=list)
    numbers: dict = field(default_factory=dict)
    part_deadline_s: float | None = None  # the running part's own limit, so one part cannot starve the next
    child_json: Path | None = None  # a part's process reports here, to the parent that runs the parts

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def time_left(self) -> float:
        return min(self.deadline_s, self.part_deadline_s or self.deadline_s) - self.elapsed()

    def check(self, name: str, fn, needs_s: float = 0.0):
        """Run one check: PASS (fn returns a detail line), FAIL (CheckFailed or any exception,
        reported with where it came from), or SKIP when the deadline leaves no room. Never
        raises, so one failure does not stop the others. Returns fn's value (None unless PASS)."""
        if self.time_left() < needs_s:
            return self.skip(name, f"{self.time_left():.0f}s left before the deadline, needs ~{needs_s:.0f}s")
        started = time.perf_counter()
        value, status = None, "PASS"
        try:
            value = fn()
            detail = value if isinstance(value, str) else (value or {}).get("detail", "")
        except CheckFailed as e:
            status, detail = "FAIL", str(e)
        except Exception as e:  # a crash is a failure of this check, not of the run
            frame = traceback.extract_tb(e.__traceback__)[-1]
            status = "FAIL"
            detail = f"{type(e).__name__}: {e} (at {Path(frame.filename).name}:{frame.lineno})"
            traceback.print_exc()
        took = time.perf_counter() - started
        self._record(name, status, detail, took)
        return value if status == "PASS" else None

    def skip(self, name: str, why: str) -> None:
        self._record(name, "SKIP", why, 0.0)

    def _record(self, name: str, status: str, detail: str, took: float) -> None:
        self.checks.append({"name": name, "status": status, "detail": detail, "seconds": round(took, 2)})
        print(f"{status} {name} ({took:.1f}s, at {self.elapsed():.0f}s): {detail}", flush=True)
        self.save()

    @property
    def failed(self) -> list[dict]:
        return [c for c in self.checks if c["status"] == "FAIL"]

    def save(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        data = {"command": self.command, "elapsed_s": round(self.elapsed(), 1), "numbers": self.numbers,
                "checks": self.checks}
        if self.child_json is not None:
            self.child_json.write_text(json.dumps(data, default=str))
            return
        (self.out_dir / "gpu_check.json").write_text(json.dumps(data, indent=2, default=str))
        (self.out_dir / "gpu_check.md").write_text(markdown(self))


# ---- engine options the engine of this checkout accepts -------------------------------------

ENGINE_FIELDS = set(EngineConfig.__dataclass_fields__)


def accepted(**options) -> dict:
    """Only the options this engine has (attention_backend, cuda_graphs and
    gpu_memory_utilization land with issue 11), so the script runs before and after them."""
    return {k: v for k, v in options.items() if v is not None and k in ENGINE_FIELDS}


def engine_variants(device: torch.device, backends: list[str] | None = None) -> list[dict]:
    """Every attention backend x CUDA-graph setting worth proving on this device (`backends`
    overrides the backends: on CPU, "triton" runs under TRITON_INTERPRET=1)."""
    if "attention_backend" not in ENGINE_FIELDS:
        backends = [None]
    elif backends is None:
        backends = ["triton", "reference"] if device.type == "cuda" else ["reference"]
    graphs: list[bool | None] = [None]
    if "cuda_graphs" in ENGINE_FIELDS and device.type == "cuda":
        graphs = [True, False]
    return [accepted(attention_backend=b, cuda_graphs=g) for b in backends for g in graphs]


def backend_unavailable(options: dict, device: torch.device, kv_specs: list) -> str | None:
    """Why the asked attention backend cannot serve this model here (the selector's own
    reason, e.g. MLA layers for Triton), or None."""
    if options.get("attention_backend") != "triton":
        return None
    try:
        from lmserve.attention.selector import triton_unavailable_reason
    except ImportError:  # a selector without the function: let the engine say it
        return None
    return triton_unavailable_reason(device, kv_specs)


def variant_label(options: dict) -> str:
    parts = [f"backend={options['attention_backend']}"] if "attention_backend" in options else []
    if "cuda_graphs" in options:
        parts.append("graphs=" + ("on" if options["cuda_graphs"] else "off"))
    return " ".join(parts) or "defaults"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ---- part a: environment --------------------------------------------------------------------

def part_env(report: Report, device: torch.device) -> None:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers", "numpy", "safetensors", "tokenizers", "gguf", "pytest"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
        versions["cuda"] = torch.version.cuda
    else:
        name = f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    report.numbers["device"] = name
    report.numbers["versions"] = versions
    print(f"device: {name}\nversions: {versions}", flush=True)
    if versions.get("transformers") and not str(versions["transformers"]).startswith(("5", "6")):
        print("note: the family checkpoints are written with transformers 5's config API (rope_parameters); "
              "an older transformers may build references with a different rope", flush=True)

    def bandwidth():
        gbs = measure_copy_bandwidth(device)
        report.numbers["copy_bandwidth_GBps"] = round(gbs, 1)
        return f"{gbs:.0f} GB/s (device-to-device copy, bytes read + written / time)"

    report.check("env: copy bandwidth", bandwidth)


def measure_copy_bandwidth(device: torch.device) -> float:
    """Bytes read + written per second by a large device-to-device copy: the memory speed
    decode can reach at best (the roofline divides weight bytes by it)."""
    size = (2 << 30) if device.type == "cuda" else (128 << 20)
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):  # warm-up: allocation, clocks
        dst.copy_(src)
    iters = 50 if device.type == "cuda" else 5
    sync(device)
    started = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    sync(device)
    took = time.perf_counter() - started
    del src, dst
    free_device_memory(device)
    return 2 * size * iters / took / 1e9


# ---- the engine's own device checks (tests/cuda_engine_checks.py) ---------------------------

def part_engine_checks(report: Report, device: torch.device) -> None:
    """Every `check_*` function of tests/cuda_engine_checks.py (the sampler's one sync per step,
    the KV cache sized by gpu_memory_utilization, and whatever is added there), so the one device
    run covers them; each returns a dict of numbers, a `directory` argument gets a fresh folder."""
    import inspect

    try:
        import cuda_engine_checks
    except ImportError as e:
        report.skip("engine checks", f"tests/cuda_engine_checks.py cannot be imported here ({e})")
        return
    checks = [(name, fn) for name, fn in vars(cuda_engine_checks).items()
              if name.startswith("check_") and inspect.isfunction(fn) and fn.__module__ == cuda_engine_checks.__name__]
    if device.type != "cuda":
        report.skip("engine checks", f"{len(checks)} checks of tests/cuda_engine_checks.py need a CUDA device")
        return
    results = report.numbers.setdefault("engine_checks", {})
    for name, fn in checks:
        def run(name=name, fn=fn):
            with tempfile.TemporaryDirectory(prefix="gpu_check_engine_") as tmp:
                kwargs = {"directory": Path(tmp)} if "directory" in inspect.signature(fn).parameters else {}
                out = fn(**kwargs)
            free_device_memory(device)
            results[name] = out
            return json.dumps(out, default=str)[:300]

        report.check(f"engine: {name}", run, needs_s=10)


# ---- part b: correctness per family ---------------------------------------------------------

@dataclass
class Served:
    """One engine's answer to WAVES: per prompt its tokens and the logits of each step."""

    tokens: list[list[int]]
    logits: list[torch.Tensor]  # [STEPS, vocab] per prompt, on the CPU in float32
    cached_tokens: int  # prompt tokens found in the prefix cache (the second wave's, resumed preemptions')


def serve_waves(engine: LLMEngine, params: SamplingParams | None = None) -> Served:
    tokens, logits, cached = [], [], 0
    for wave in WAVES:
        for toks, rows, hits in serve_and_capture(engine, wave, params):
            tokens.append(toks)
            logits.append(torch.stack(rows).float().cpu() if rows else torch.empty(0))
            cached += hits
    if engine.num_free_blocks != engine.num_blocks:
        raise CheckFailed(f"{engine.num_blocks - engine.num_free_blocks} KV blocks still held after the waves")
    return served_ok(Served(tokens, logits, cached))


def served_ok(served: Served) -> Served:
    for i, toks in enumerate(served.tokens):
        if len(toks) != STEPS:
            raise CheckFailed(f"prompt {i}: {len(toks)} tokens generated, expected {STEPS}")
    return served


def first_difference(ours: list[int], theirs: list[int]) -> int | None:
    for step, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            return step
    return None if len(ours) == len(theirs) else min(len(ours), len(theirs))


def token_problem(what: str, prompt: int, ours: list[int], theirs: list[int]) -> list[str]:
    """[] if the token lists agree, else one line naming the first differing step."""
    step = first_difference(ours, theirs)
    if step is None:
        return []
    a = ours[step] if step < len(ours) else "-"
    b = theirs[step] if step < len(theirs) else "-"
    return [f"prompt {prompt}: tokens differ from {what} first at step {step} ({a} vs {b})"]


def compare_tokens(what: str, ours: list[list[int]], theirs: list[list[int]]) -> list[str]:
    return [p for i, (a, b) in enumerate(zip(ours, theirs)) for p in token_problem(what, i, a, b)]


class Reference:
    """transformers' model of one family's checkpoint on the device, teacher-forced on the
    tokens lmserve generated: row `step` holds the logits lmserve's step `step` must match."""

    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype):
        self.model = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
        self.device = device
        self._cache: dict[tuple, torch.Tensor] = {}

    @torch.inference_mode()
    def logits(self, prompt: list[int], tokens: list[int]) -> torch.Tensor:
        key = (tuple(prompt), tuple(tokens))
        if key not in self._cache:
            ids = torch.tensor([prompt + tokens], device=self.device)
            full = self.model(ids).logits[0].float().cpu()
            self._cache[key] = full[len(prompt) - 1:len(prompt) - 1 + len(tokens)]
        return self._cache[key]


def family_engine(source: str, spec: FamilySpec, device: torch.device, dtype: str, **options) -> LLMEngine:
    """The engine setup of tests/test_family_parity.py: a small token budget (chunked prefill),
    block size 4, few sequences (a short CUDA-graph ladder)."""
    base = {"num_kv_blocks": 96, "block_size": 4, "max_num_batched_tokens": 16, "max_num_seqs": 8}
    return LLMEngine(source, dtype=dtype, device=str(device), **{**base, **spec.engine_options, **options})


# Seeded sampling: the same stream must come out of every run and every device.
SEEDED = SamplingParams(max_tokens=STEPS, temperature=0.8, top_p=0.9, seed=1234, ignore_eos=True)
# bf16: lmserve's logit error (against float32 transformers) may be this many times
# transformers' own bf16 error (calibrated on CPU: see _bfloat16_greedy).
BF16_ERROR_RATIO = 3.0
FLOAT32_ATOL = 1e-3


def build_family(report: Report, spec: FamilySpec, device: torch.device, workdir: Path) -> dict | None:
    """The family's checkpoint, lmserve's CPU answers (greedy and seeded) and transformers'
    model on the device; None when it cannot be built here."""
    missing = [p for p in spec.needs if importlib.util.find_spec(p) is None]
    if missing:
        report.skip(f"{spec.name}", f"needs the {', '.join(missing)} package, not installed here")
        return None
    directory = workdir / spec.name
    directory.mkdir()
    state: dict = {}

    def build():
        torch.manual_seed(0)
        built = spec.build(directory)
        state["hf"], source = built if isinstance(built, tuple) else (built, directory)
        state["source"] = str(source)
        cpu = family_engine(state["source"], spec, torch.device("cpu"), "float32")
        state["cpu"] = serve_waves(cpu)
        state["cpu_sampled"] = served_ok(Served(*_sampled(cpu)))
        state["kv_specs"] = cpu.model.kv_cache_specs()
        del cpu
        state["ref32"] = Reference(state["hf"], device, torch.float32)
        return f"checkpoint built, lmserve on CPU served {len(PROMPTS)} prompts x {STEPS} steps"

    return state if report.check(f"{spec.name}: build + CPU reference", build, needs_s=10) else None


def check_variant(report: Report, spec: FamilySpec, state: dict, device: torch.device, options: dict) -> None:
    """The three checks of one family on one engine variant."""
    label = variant_label(options)
    report.check(f"{spec.name} [{label}] float32 greedy",
                 lambda: _float32_greedy(spec, state, device, options), needs_s=10)
    report.check(f"{spec.name} [{label}] seeded sampling",
                 lambda: _seeded_sampling(spec, state, device, options), needs_s=10)
    if device.type == "cpu" and options.get("attention_backend") == "triton":
        # Measured: the interpreter's tl.dot on bf16 tiles returns garbage (float16 is exact).
        report.skip(f"{spec.name} [{label}] bfloat16 greedy", "Triton's CPU interpreter gets bf16 dot products "
                    "wrong; only a GPU can check this")
        return
    report.check(f"{spec.name} [{label}] bfloat16 greedy",
                 lambda: _bfloat16_greedy(spec, state, device, options), needs_s=10)
    free_device_memory(device)  # the variant's engines (and their graph pools) go before the next ones


def _float32_greedy(spec: FamilySpec, state: dict, device: torch.device, options: dict) -> str:
    engine = family_engine(state["source"], spec, device, "float32", **options)
    ours = serve_waves(engine)
    preempted = engine.scheduler.num_preemptions
    # What served it: the MLA and MoE families name their kernels' path here.
    served_by = (f"{type(engine.runner.attention_backend).__name__}, "
                 f"graphs {'on' if getattr(engine.runner, 'graphs', None) is not None else 'off'}")
    del engine
    problems = compare_tokens("lmserve on CPU", ours.tokens, state["cpu"].tokens)
    worst_hf = worst_cpu = 0.0
    for i, prompt in enumerate(PROMPTS):
        ref = state["ref32"].logits(prompt, ours.tokens[i])
        problems += token_problem("transformers", i, ours.tokens[i], ref.argmax(-1).tolist())
        worst_hf = max(worst_hf, float((ours.logits[i] - ref).abs().max()))
        worst_cpu = max(worst_cpu, float((ours.logits[i] - state["cpu"].logits[i]).abs().max()))
    if worst_hf > max(FLOAT32_ATOL, spec.atol):
        problems.append(f"logits differ from transformers by up to {worst_hf:.2e} (> {FLOAT32_ATOL:g})")
    if ours.cached_tokens < 16:
        problems.append(f"the prefix cache served {ours.cached_tokens} prompt tokens (expected >= 16)")
    if (preempted > 0) != spec.preempts:
        problems.append(f"{preempted} preemptions ({'expected some' if spec.preempts else 'expected none'})")
    if problems:
        raise CheckFailed("; ".join(problems))
    return (f"{len(PROMPTS)} prompts x {STEPS} steps: tokens == transformers == lmserve-CPU; "
            f"max |dlogit| vs transformers {worst_hf:.1e}, vs CPU {worst_cpu:.1e}; "
            f"prefix hit {ours.cached_tokens} tokens" + (f"; {preempted} preemptions" if preempted else "")
            + f"; {served_by}")


def _sampled(engine: LLMEngine) -> tuple[list[list[int]], list[torch.Tensor], int]:
    served = [r for wave in WAVES for r in serve_and_capture(engine, wave, SEEDED)]
    return [t for t, _, _ in served], [torch.empty(0)] * len(served), 0


def _seeded_sampling(spec: FamilySpec, state: dict, device: torch.device, options: dict) -> str:
    engine = family_engine(state["source"], spec, device, "float32", **options)
    first, _, _ = _sampled(engine)
    second, _, _ = _sampled(engine)  # prefix cache warm now: other chunking, same stream
    del engine
    problems = compare_tokens("the first run", second, first)
    problems += compare_tokens("lmserve on CPU", first, state["cpu_sampled"].tokens)
    if problems:
        raise CheckFailed("; ".join(problems))
    return (f"temperature 0.8, top_p 0.9, seed 1234: two runs identical, equal to CPU "
            f"({len(PROMPTS)} prompts x {STEPS} tokens)")


def _bfloat16_greedy(spec: FamilySpec, state: dict, device: torch.device, options: dict) -> str:
    """bf16 rounds differently in every implementation, so tokens may flip at near-ties: the
    measure is the error against float32 transformers (on lmserve's own tokens), which must
    stay within BF16_ERROR_RATIO x the error of transformers' own bf16 run on the device."""
    if "ref16" not in state:
        state["ref16"] = Reference(state["hf"], device, torch.bfloat16)
    engine = family_engine(state["source"], spec, device, "bfloat16", **options)
    ours = serve_waves(engine)
    del engine
    ours_err = hf_err = 0.0
    same = 0
    for i, prompt in enumerate(PROMPTS):
        truth = state["ref32"].logits(prompt, ours.tokens[i])
        ours_err = max(ours_err, float((ours.logits[i] - truth).abs().max()))
        hf_err = max(hf_err, float((state["ref16"].logits(prompt, ours.tokens[i]) - truth).abs().max()))
        same += int((truth.argmax(-1) == torch.tensor(ours.tokens[i])).sum())
    ratio = ours_err / max(hf_err, 1e-6)
    line = (f"max |dlogit| vs float32 transformers {ours_err:.3f}, transformers' own bf16 {hf_err:.3f} "
            f"({ratio:.2f}x); greedy tokens = float32 argmax at {same}/{len(PROMPTS) * STEPS} steps")
    if ratio > BF16_ERROR_RATIO:
        raise CheckFailed(f"bf16 error above {BF16_ERROR_RATIO:g}x transformers': {line}")
    return line


def part_correctness(report: Report, device: torch.device, names: list[str] | None, budget_s: float,
                     backends: list[str] | None = None) -> None:
    families = [f for f in FAMILIES if names is None or f.name in names]
    unknown = set(names or ()) - {f.name for f in FAMILIES}
    if unknown:
        report.skip("correctness: families", f"unknown family name(s) {sorted(unknown)}; "
                    f"known: {[f.name for f in FAMILIES]}")
    variants = engine_variants(device, backends)
    print(f"correctness: {len(families)} families x variants {[variant_label(v) for v in variants]}", flush=True)
    first = len(report.checks)
    report.part_deadline_s = report.elapsed() + budget_s
    with tempfile.TemporaryDirectory(prefix="gpu_check_families_") as tmp:
        built = [(spec, build_family(report, spec, device, Path(tmp))) for spec in families]
        built = [(spec, state) for spec, state in built if state is not None]
        # Each family's variants in order of importance (the one `auto` serves with first), one
        # round over all families at a time: if the budget runs out, every family has had its
        # production path checked before any has its alternatives.
        usable = {}
        for spec, state in built:
            usable[spec.name] = []
            for options in variants:
                why_not = backend_unavailable(options, device, state["kv_specs"])
                if why_not:
                    report.skip(f"{spec.name} [{variant_label(options)}]", why_not)
                else:
                    usable[spec.name].append(options)
        for round_ in range(len(variants)):
            for spec, state in built:
                if round_ < len(usable[spec.name]):
                    check_variant(report, spec, state, device, usable[spec.name][round_])
        built.clear()
    free_device_memory(device)
    report.part_deadline_s = None
    counts = {s: sum(c["status"] == s for c in report.checks[first:]) for s in ("PASS", "FAIL", "SKIP")}
    report.numbers["correctness"] = counts


# ---- part c: speed ----------------------------------------------------------------------------

@dataclass
class SpeedShape:
    config: dict
    decode_prompt: int
    decode_new: int
    requests: int
    input_len: int
    output_len: int
    hf_new: int
    hf_batches: tuple[int, ...] = (1, 32)


def speed_shape(device: torch.device, quick: bool, requests: int | None) -> SpeedShape:
    if device.type == "cpu":  # smoke mode: the same steps on a model a CPU runs in seconds
        return SpeedShape(TINY_SPEED_MODEL, 16, 32, requests or 8, 64, 32, 16, (1, 4))
    return SpeedShape(LLAMA_8B, 128, 256, requests or (64 if quick else 256), 1024, 1024, 64 if quick else 128)


def random_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1000 if vocab > 4096 else 3, vocab, (count, length), generator=g).tolist()


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter once, except an input embedding
    table not shared with the LM head (a step reads one row of it)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    others = {m.weight.data_ptr() for m in model.modules()
              if not isinstance(m, torch.nn.Embedding) and isinstance(getattr(m, "weight", None), torch.Tensor)}
    for m in model.modules():
        if isinstance(m, torch.nn.Embedding) and m.weight.data_ptr() not in others:
            total -= m.weight.numel() * m.weight.element_size()
    return total


def hf_generate_speed(model, device: torch.device, batch: int, prompt_len: int, new_tokens: int):
    """transformers' generate, greedy, exactly `new_tokens` new tokens per row: output tok/s."""
    ids = torch.tensor(random_prompts(batch, prompt_len, model.config.vocab_size, seed=batch), device=device)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up
        sync(device)
        started = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        sync(device)
    took = time.perf_counter() - started
    if out.shape[1] != prompt_len + new_tokens:
        raise CheckFailed(f"generate returned {out.shape[1] - prompt_len} new tokens, expected {new_tokens}")
    return batch * new_tokens / took, took


def build_hf_model(config_dir: Path, device: torch.device):
    """transformers' model of the same shape with its own random init, built on the device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(config_dir))
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        except TypeError:  # transformers 4.x spells it torch_dtype
            model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
    return model.to(torch.bfloat16).eval()


def lmserve_engine(config_dir: Path, device: torch.device, graphs: bool | None, extra: dict) -> LLMEngine:
    # The fraction is of the device's total memory and the engine measures what is in use
    # (transformers' model is freed and torch's cache emptied before), so leftovers could only
    # shrink the KV cache, never overflow it.
    options = accepted(cuda_graphs=graphs, gpu_memory_utilization=0.9 if device.type == "cuda" else None)
    if device.type == "cpu":
        options["kv_cache_memory"] = 256 << 20
    return LLMEngine(str(config_dir), dtype="bfloat16", device=str(device), load_format="dummy",
                     **options, **extra)


def decode_speed(engine: LLMEngine, shape: SpeedShape, vocab: int) -> dict:
    """Batch-1 greedy decode: tokens per second between the first and the last token (the
    prefill excluded), plus the time to the first token."""
    prompt = random_prompts(1, shape.decode_prompt, vocab, seed=11)[0]
    engine.add_request("decode", prompt, SamplingParams(max_tokens=shape.decode_new, temperature=0.0,
                                                        ignore_eos=True))
    started = time.perf_counter()
    stamps, count = [], 0
    while engine.has_unfinished():
        for out in engine.step():
            count += len(out.outputs[0].token_ids) if out.outputs else 0
            stamps.append(time.perf_counter())
    if count != shape.decode_new:
        raise CheckFailed(f"{count} tokens generated, expected {shape.decode_new}")
    return {"decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]), "ttft_s": stamps[0] - started}


def offline_throughput(engine: LLMEngine, shape: SpeedShape, vocab: int, budget_s: float) -> dict:
    """All requests queued at once (the offline LLM.generate workload), EOS ignored. Output
    tokens per second over the run; cut at `budget_s` (then over what was generated, marked
    partial) so one slow configuration cannot eat the device time of the rest."""
    prompts = random_prompts(shape.requests, shape.input_len, vocab, seed=13)
    params = SamplingParams(max_tokens=shape.output_len, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"t{i}", prompt, params)
    tokens = done = 0
    while engine.has_unfinished():
        for out in engine.step():
            tokens += sum(len(o.token_ids) for o in out.outputs)
            done += int(out.finished)
        if time.perf_counter() - started > budget_s:
            engine.abort_all()
            break
    took = time.perf_counter() - started
    return {"output_tok_s": tokens / took, "total_s": took, "output_tokens": tokens, "requests_done": done,
            "partial": done < shape.requests}


def warm_up(engine: LLMEngine, shape: SpeedShape) -> dict:
    """First requests outside the timings, shaped like the offline workload's (its prompt
    length, so the chunked prefills compile the same kernels), and a look at the logits: a
    random 32-layer bf16 model must stay finite."""
    rows = []
    sampler = engine.sampler

    def recording(logits, seqs):
        rows.append(logits.float().cpu())
        return sampler(logits, seqs)

    engine.sampler = recording
    try:
        for i, prompt in enumerate(random_prompts(4, shape.input_len, shape.config["vocab_size"], seed=5)):
            engine.add_request(f"warm{i}", prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
        while engine.has_unfinished():
            engine.step()
    finally:
        engine.sampler = sampler
    logits = torch.cat(rows)
    if not torch.isfinite(logits).all():
        raise CheckFailed("the dummy-weight model produced non-finite logits")
    return {"logit_std": float(logits.std())}


def part_speed(report: Report, device: torch.device, args) -> None:
    shape = speed_shape(device, args.quick, args.requests)
    numbers = report.numbers.setdefault("speed", {})
    numbers["shape"] = {k: shape.config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                     "num_key_value_heads", "intermediate_size", "vocab_size")}
    numbers["workload"] = {"decode": f"prompt {shape.decode_prompt}, {shape.decode_new} new tokens",
                           "offline": f"{shape.requests} x {shape.input_len} in / {shape.output_len} out",
                           "transformers": f"prompt {shape.decode_prompt}, {shape.hf_new} new tokens"}
    config_dir = Path(tempfile.mkdtemp(prefix="gpu_check_8b_"))
    (config_dir / "config.json").write_text(json.dumps(shape.config))  # nothing else: load_format dummy

    # transformers first, freed before lmserve sizes its KV cache from free memory.
    hf = {"model": None}

    def hf_build():
        started = time.perf_counter()
        hf["model"] = build_hf_model(config_dir, device).to(device)
        return f"random init on {device.type} in {time.perf_counter() - started:.1f}s"

    if report.check("speed: transformers model", hf_build, needs_s=30):
        for batch in shape.hf_batches:
            def run(b=batch):
                tok_s, took = hf_generate_speed(hf["model"], device, b, shape.decode_prompt, shape.hf_new)
                numbers[f"transformers_b{b}_tok_s"] = round(tok_s, 1)
                return f"batch {b}: {tok_s:.1f} output tok/s ({took:.1f}s)"

            report.check(f"speed: transformers generate batch {batch}", run, needs_s=20)
    hf.clear()
    free_device_memory(device)

    # CUDA graphs first: the numbers the targets are about, should the deadline cut the rest.
    graph_settings = [True, False] if "cuda_graphs" in ENGINE_FIELDS and device.type == "cuda" else [None]
    extra = {"max_num_batched_tokens": args.max_num_batched_tokens} if args.max_num_batched_tokens else {}
    for graphs in graph_settings:
        speed_of_engine(report, device, shape, config_dir, graphs, extra, args.throughput_budget_s)
        free_device_memory(device)


def speed_of_engine(report: Report, device: torch.device, shape: SpeedShape, config_dir: Path, graphs: bool | None,
                    extra: dict, throughput_budget_s: float) -> None:
    """One lmserve engine (CUDA graphs on, off, or the engine's default): load, warm up,
    batch-1 decode, offline throughput."""
    label = {True: "cuda graphs", False: "eager", None: "default"}[graphs]
    key = {True: "graphs", False: "eager", None: "default"}[graphs]
    numbers = report.numbers["speed"]
    vocab = shape.config["vocab_size"]
    state: dict = {}

    def load():
        started = time.perf_counter()
        with EngineLog() as engine_log:  # memory profile, attention backend, graph capture time
            state["engine"] = engine = lmserve_engine(config_dir, device, graphs, extra)
        loaded = time.perf_counter() - started
        numbers[f"{key}_engine_log"] = engine_log.lines
        for line in engine_log.lines:
            print(f"    engine: {line}", flush=True)
        warm = warm_up(engine, shape)
        wbytes = weight_bytes_per_token(engine.model)
        numbers["weight_bytes_per_token"] = wbytes
        numbers[f"{key}_load_s"] = round(loaded, 1)
        return (f"engine up in {loaded:.1f}s (dummy weights, {wbytes / 1e9:.4g} GB read per token, "
                f"{engine.num_blocks} KV blocks), warm-up logits finite (std {warm['logit_std']:.2f})")

    if not report.check(f"speed: lmserve {label} load + warm-up", load, needs_s=40):
        return
    engine = state.pop("engine")

    def batch1():
        r = decode_speed(engine, shape, vocab)
        numbers[f"{key}_decode_tok_s"] = round(r["decode_tok_s"], 1)
        numbers[f"{key}_ttft_s"] = round(r["ttft_s"], 3)
        line = f"batch-1 decode {r['decode_tok_s']:.1f} tok/s, first token {r['ttft_s'] * 1000:.0f} ms"
        roof = roofline(report)
        if roof:
            numbers[f"{key}_roofline_fraction"] = round(r["decode_tok_s"] / roof, 3)
            line += f", {r['decode_tok_s'] / roof:.0%} of the {roof:.0f} tok/s roofline"
        hf_b1 = numbers.get(f"transformers_b{shape.hf_batches[0]}_tok_s")
        if hf_b1:
            line += f", {r['decode_tok_s'] / hf_b1:.1f}x transformers"
        return line

    report.check(f"speed: lmserve {label} batch-1 decode", batch1, needs_s=15)

    def throughput():
        budget = min(throughput_budget_s, max(report.time_left() - 30, 10))
        r = offline_throughput(engine, shape, vocab, budget)
        numbers[f"{key}_offline"] = {k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}
        line = (f"offline {r['output_tok_s']:.0f} output tok/s, {r['requests_done']}/{shape.requests} requests "
                f"in {r['total_s']:.1f}s" + (" (cut at the time budget: partial)" if r["partial"] else ""))
        hf_big = numbers.get(f"transformers_b{shape.hf_batches[-1]}_tok_s")
        if hf_big:
            line += f", {r['output_tok_s'] / hf_big:.1f}x transformers batch {shape.hf_batches[-1]}"
        if device.type == "cuda":
            line += f", {r['output_tok_s'] / SGLANG_H200_TOK_S:.2f}x SGLang's H200 anchor ({SGLANG_H200_TOK_S})"
            target = throughput_target(report)
            if target:
                line += f", {r['output_tok_s'] / target:.2f}x the {target} tok/s target"
        return line

    report.check(f"speed: lmserve {label} offline throughput", throughput, needs_s=40)

    for batch in (1, min(64, shape.requests)):
        def profiled(b=batch):
            r = profile_decode(engine, device, vocab, b, report.out_dir / "gpu_check_profile.txt", label)
            numbers[f"{key}_profile_b{b}"] = r
            return (f"batch {b} decode: {r['wall_ms_per_step']:.2f} ms/step wall, "
                    f"{r['device_ms_per_step']:.2f} ms/step in kernels; top: {r['top']} (gpu_check_profile.txt)")

        report.check(f"speed: lmserve {label} profile batch {batch}", profiled, needs_s=20)


def throughput_target(report: Report) -> int | None:
    return next((v for k, v in TARGET_THROUGHPUT.items() if k in report.numbers.get("device", "")), None)


class EngineLog(logging.Handler):
    """lmserve's INFO log lines while an engine starts (KV sizing, attention backend, CUDA-graph
    capture time), kept for the report: the script prints no logs otherwise."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.logger = logging.getLogger("lmserve")

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self):
        self.saved_level = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.setLevel(self.saved_level)


def profile_decode(engine: LLMEngine, device: torch.device, vocab: int, batch: int, out: Path, label: str) -> dict:
    """Where a decode step's time goes, for the case a target is missed: `batch` sequences are
    prefilled, then a few decode-only steps run under torch.profiler. Wall time per step against
    kernel time per step shows the host's share; the top kernels go to `out`."""
    from torch.profiler import ProfilerActivity, profile

    steps = 10
    for i, prompt in enumerate(random_prompts(batch, 128 if device.type == "cuda" else 16, vocab, seed=17)):
        engine.add_request(f"prof{i}", prompt, SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True))
    seen: set[str] = set()
    while len(seen) < batch:  # until every sequence has its first token: from here on decode only
        seen.update(o.request_id for o in engine.step() if o.outputs)
    for _ in range(2):
        engine.step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        with profile(activities=activities) as prof:
            sync(device)
            started = time.perf_counter()
            for _ in range(steps):
                engine.step()
            sync(device)
            wall = time.perf_counter() - started
    finally:
        engine.abort_all()
    events = prof.key_averages()
    if device.type == "cuda":
        def device_time(e):  # microseconds; the attribute was renamed in torch 2.4
            return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        # Device-side events only: an eager op (aten::mm) also carries its kernels' time, and
        # counting both would double it (seen on the H200: aten::mm next to its nvjet kernel).
        kernels = [e for e in events if device_time(e) > 0
                   and getattr(e, "device_type", torch.autograd.DeviceType.CUDA) != torch.autograd.DeviceType.CPU]
        # The sort key by its name in this torch (self_cuda_time_total is gone in newer ones).
        sort_key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    else:
        def device_time(e):
            return e.self_cpu_time_total
        kernels = [e for e in events if not e.key.startswith(("ProfilerStep", "aten::to"))]
        sort_key = "self_cpu_time_total"
    busy_us = sum(device_time(e) for e in kernels)
    top = sorted(kernels, key=device_time, reverse=True)[:3]
    with out.open("a") as f:
        f.write(f"==== {label}, batch {batch}, {steps} decode steps: {wall / steps * 1000:.2f} ms/step wall\n")
        f.write(events.table(sort_by=sort_key, row_limit=25) + "\n")
    return {"wall_ms_per_step": round(wall / steps * 1000, 3), "device_ms_per_step": round(busy_us / steps / 1000, 3),
            "top": ", ".join(f"{e.key[:40]} {device_time(e) / steps / 1000:.2f} ms" for e in top)}


def roofline(report: Report) -> float | None:
    """Batch-1 decode tokens/s if every step only streamed the weights at the copy bandwidth."""
    bw = report.numbers.get("copy_bandwidth_GBps")
    wbytes = report.numbers.get("speed", {}).get("weight_bytes_per_token")
    return bw * 1e9 / wbytes if bw and wbytes else None


# ---- part e: the MLA and MoE kernels, the DeepSeek-V2-Lite shape ------------------------------

# DeepSeek-V2-Lite's config.json (deepseek-ai/DeepSeek-V2-Lite; the keys lmserve and transformers
# read): 27 layers (the first dense), MLA without q compression, 64 routed experts (top 6) + 2
# shared, YaRN x40. ~15.7B parameters, ~2.4B active per token.
DEEPSEEK_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 102400,
    "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
    "num_attention_heads": 16, "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
    "num_experts_per_tok": 6, "routed_scaling_factor": 1.0, "kv_lora_rank": 512, "q_lora_rank": None,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "topk_method": "greedy", "n_group": 1,
    "topk_group": 1, "first_k_dense_replace": 1, "moe_layer_freq": 1, "norm_topk_prob": False,
    "scoring_func": "softmax", "aux_loss_alpha": 0.001, "seq_aux": True, "hidden_act": "silu",
    "max_position_embeddings": 163840, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    "rms_norm_eps": 1e-6, "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 100000,
    "eos_token_id": 100001, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
# Smoke mode's stand-in: the same structure, small enough for a CPU.
TINY_DEEPSEEK_MODEL = {**DEEPSEEK_V2_LITE, "vocab_size": 1024, "hidden_size": 128, "intermediate_size": 256,
                       "moe_intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "num_key_value_heads": 4, "n_routed_experts": 8, "num_experts_per_tok": 2, "kv_lora_rank": 32,
                       "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 16,
                       "max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 2}
# LMDeploy's published DeepSeek-V2-Lite figure (one A100, ShareGPT): the anchor.
LMDEPLOY_A100_LITE_TOK_S = 965
DEEPSEEK_PART_LIMIT_S = 240  # the part's own process limit (run_parts_isolated)
# bf16: a kernel's error against the float32 reference may be this many times the bf16
# reference path's own error (both accumulate differently; neither is exact).
KERNEL_BF16_ERROR_RATIO = 2.0


def deepseek_kernels_unavailable(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "the Triton kernels need a CUDA device (or TRITON_INTERPRET=1 on CPU)"
    return None


def time_call(fn, device: torch.device, iters: int) -> float:
    """Microseconds per call (after two warm-up calls), by CUDA events on a GPU."""
    for _ in range(2):
        fn()
    if device.type != "cuda":
        started = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - started) / iters * 1e6
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    return begin.elapsed_time(end) / iters * 1000


def _mla_case(device: torch.device, dims: dict, decode_contexts: list[int], prefills: list[tuple[int, int]],
              page: int, seed: int):
    """One MLA layer, its kv_b_proj, a latent cache and a step's queries (float32, on the device),
    with the step's sequences on scattered pages."""
    from lmserve.attention import MLAAttention
    from lmserve.engine.batch import ModelInput

    g = torch.Generator().manual_seed(seed)
    heads, nope, rope, v, rank = (dims[k] for k in ("heads", "nope", "rope", "v", "rank"))
    seqs = [(c, 1) for c in decode_contexts] + prefills
    num_blocks = sum(-(-(c + n) // page) for c, n in seqs) + 8
    free = torch.randperm(num_blocks, generator=g).tolist()
    tables = [[free.pop() for _ in range(-(-(c + n) // page))] for c, n in seqs]
    tokens = sum(n for _, n in seqs)
    batch = ModelInput([0] * tokens, [n for _, n in seqs], [c for c, _ in seqs], tables, len(decode_contexts),
                       list(range(tokens)))
    layer = MLAAttention(heads, nope, rope, v, rank, (nope + rope) ** -0.5)
    kv_b = torch.nn.Linear(rank, heads * (nope + v), bias=False)
    kv_b.weight.data = (torch.randn(heads * (nope + v), rank, generator=g) * rank ** -0.5)
    kv_b = kv_b.to(device)
    data = {"cache": torch.randn(num_blocks, page, rank + rope, generator=g),
            "q": torch.randn(tokens, heads, nope + rope, generator=g),
            "entry": torch.randn(tokens, rank + rope, generator=g)}
    return layer, kv_b, {k: t.to(device) for k, t in data.items()}, batch


def _mla_run(backend, layer, kv_b, data: dict, batch, dtype: torch.dtype, page: int, splits: int | None = None):
    """The layer's output through `backend` in `dtype` (float32 out), and a call to time."""
    positions = torch.tensor(batch.positions, device=data["q"].device)
    kv_b = copy.deepcopy(kv_b).to(dtype)
    cache = (data["cache"].to(dtype),)
    q, entry = data["q"].to(dtype), data["entry"].to(dtype)
    meta = backend.build_metadata(batch, positions, page, dtype)
    if splits is not None and hasattr(meta, "num_splits"):
        meta.num_splits = splits

    def call():
        return layer(q, entry, kv_b, cache, meta)

    return call().float(), call


@torch.inference_mode()
def check_mla_kernel(device: torch.device) -> dict:
    """The Triton MLA path (absorbed decode kernel, expanded prefill) against the reference
    backend, V2-Lite's head sizes: a mixed step (decodes up to 3,000 cached tokens, a fresh
    prompt, a chunk after a cached prefix) and a decode-only step with split keys. float32:
    within 1e-4 of the reference; bf16: error against float32 within KERNEL_BF16_ERROR_RATIO x
    the bf16 reference's. Then batch-64 decode at a 1,024-token context, timed against the
    reference backend."""
    from lmserve.attention.reference import ReferenceBackend as CpuSdpaBackend
    from lmserve.attention.triton_backend import TritonPagedBackend

    cuda = device.type == "cuda"
    dims = (dict(heads=16, nope=128, rope=64, v=128, rank=512) if cuda
            else dict(heads=4, nope=16, rope=16, v=16, rank=32))
    page = 16 if cuda else 4
    cases = {"mixed": ([1, 77, 1000, 3000] if cuda else [1, 13, 40],
                       [(0, 300), (500, 200)] if cuda else [(0, 9), (10, 7)], None),
             "decode, 4 splits": ([5, 300, 2000] if cuda else [5, 30], [], 4)}
    out: dict = {}
    problems = []
    for name, (decodes, prefills, splits) in cases.items():
        layer, kv_b, data, batch = _mla_case(device, dims, decodes, prefills, page, seed=len(out))
        triton_backend = TritonPagedBackend([layer.kv_spec], device)
        truth, _ = _mla_run(CpuSdpaBackend(), layer, kv_b, data, batch, torch.float32, page)
        got32, _ = _mla_run(triton_backend, layer, kv_b, data, batch, torch.float32, page, splits)
        err32 = float((got32 - truth).abs().max())
        row = {"fp32_max_err": err32}
        if err32 > 1e-4:
            problems.append(f"{name}: float32 differs from the reference by {err32:.2e}")
        if cuda:  # the interpreter's bf16 dot products are wrong (check_variant says so)
            ref16, _ = _mla_run(CpuSdpaBackend(), layer, kv_b, data, batch, torch.bfloat16, page)
            got16, _ = _mla_run(triton_backend, layer, kv_b, data, batch, torch.bfloat16, page, splits)
            ours, theirs = float((got16 - truth).abs().max()), float((ref16 - truth).abs().max())
            row.update(bf16_max_err=ours, reference_bf16_max_err=theirs)
            if ours > KERNEL_BF16_ERROR_RATIO * theirs + 1e-3:
                problems.append(f"{name}: bf16 error {ours:.3f} vs the reference's {theirs:.3f}")
        out[name] = row
    batch_size, context = (64, 1024) if cuda else (4, 32)
    layer, kv_b, data, batch = _mla_case(device, dims, [context] * batch_size, [], page, seed=9)
    dtype = torch.bfloat16 if cuda else torch.float32
    timed = {}
    for label, backend in (("triton", TritonPagedBackend([layer.kv_spec], device)), ("reference", CpuSdpaBackend())):
        _, call = _mla_run(backend, layer, kv_b, data, batch, dtype, page)
        timed[label] = time_call(call, device, 20 if cuda else 2)
    out["decode_timing_us"] = {k: round(v, 1) for k, v in timed.items()}
    if problems:
        raise CheckFailed("; ".join(problems))
    detail = "; ".join(f"{k}: fp32 err {v['fp32_max_err']:.1e}" + (f", bf16 err {v['bf16_max_err']:.3f} vs "
                                                                    f"reference {v['reference_bf16_max_err']:.3f}"
                                                                    if "bf16_max_err" in v else "")
                       for k, v in out.items() if k != "decode_timing_us")
    return {"numbers": out, "detail": f"{detail}; decode batch {batch_size} x {context} cached: triton "
                                      f"{timed['triton']:.0f} us vs reference {timed['reference']:.0f} us per layer "
                                      f"({timed['reference'] / timed['triton']:.1f}x)"}


@torch.inference_mode()
def check_moe_kernel(device: torch.device) -> dict:
    """The fused-MoE grouped GEMMs (layers/triton_moe.py) against FusedExperts' eager path at
    V2-Lite's sizes (64 experts, top 6, hidden 2,048, expert width 1,408), a decode-sized and a
    prefill-sized batch: float32 within 1e-4 relative, bf16 error within the ratio of the eager
    bf16 path's; then each timed against the eager path in bf16."""
    from lmserve.layers import fused, triton_moe
    from lmserve.layers.moe import FusedExperts

    cuda = device.type == "cuda"
    experts_n, k, hidden, inter = (64, 6, 2048, 1408) if cuda else (8, 2, 64, 48)
    g = torch.Generator().manual_seed(21)
    experts = FusedExperts(experts_n, hidden, inter)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, hidden ** -0.5, generator=g)
        experts.down_proj.normal_(0, inter ** -0.5, generator=g)
    experts32 = experts.to(device)
    experts16 = copy.deepcopy(experts32).to(torch.bfloat16)
    saved = fused.use_fused

    def eager(module, x, w, ids):
        fused.use_fused = lambda t: False  # FusedExperts' per-expert loop, even on CUDA
        try:
            return module(x, w, ids)
        finally:
            fused.use_fused = saved

    def kernel(module, x, w, ids):
        return triton_moe.fused_experts(x, module.gate_up_proj, module.down_proj, w, ids, module.act_kind)

    out: dict = {}
    problems = []
    for tokens in ((4, 2048) if cuda else (3, 40)):
        x = torch.randn(tokens, hidden, generator=g).to(device)
        weights, ids = torch.softmax(torch.randn(tokens, experts_n, generator=g), -1).topk(k, dim=-1)
        weights, ids = weights.to(device), ids.to(device)
        truth = eager(experts32, x, weights, ids)
        err32 = float((kernel(experts32, x, weights, ids) - truth).abs().max() / truth.abs().max())
        row = {"fp32_rel_err": err32}
        if err32 > 1e-4:
            problems.append(f"{tokens} tokens: float32 differs from the eager path by {err32:.1e} (relative)")
        if cuda:
            x16 = x.to(torch.bfloat16)
            ours = float((kernel(experts16, x16, weights, ids).float() - truth).abs().max())
            theirs = float((eager(experts16, x16, weights, ids).float() - truth).abs().max())
            row.update(bf16_max_err=ours, eager_bf16_max_err=theirs)
            if ours > KERNEL_BF16_ERROR_RATIO * theirs + 1e-3:
                problems.append(f"{tokens} tokens: bf16 error {ours:.4f} vs the eager path's {theirs:.4f}")
        module, xt = (experts16, x.to(torch.bfloat16)) if cuda else (experts32, x)
        call_args = (module, xt, weights, ids)
        row["us"] = {label: round(time_call(lambda f=f, a=call_args: f(*a), device, 20 if cuda else 2), 1)
                     for label, f in (("fused", kernel), ("eager", eager))}
        out[tokens] = row
    if problems:
        raise CheckFailed("; ".join(problems))
    return {"numbers": out, "detail": "; ".join(
        f"{t} tokens: fp32 rel err {r['fp32_rel_err']:.1e}"
        + (f", bf16 err {r['bf16_max_err']:.4f} vs eager {r['eager_bf16_max_err']:.4f}" if "bf16_max_err" in r else "")
        + f", fused {r['us']['fused']:.0f} us vs eager {r['us']['eager']:.0f} us "
          f"({r['us']['eager'] / r['us']['fused']:.1f}x)" for t, r in out.items())}


def deepseek_shape(device: torch.device, quick: bool) -> SpeedShape:
    if device.type == "cpu":
        return SpeedShape(TINY_DEEPSEEK_MODEL, 16, 16, 4, 32, 16, 0)
    if quick:
        return SpeedShape(DEEPSEEK_V2_LITE, 128, 128, 128, 512, 512, 0)
    return SpeedShape(DEEPSEEK_V2_LITE, 128, 128, 256, 1024, 1024, 0)  # the 8B shape's workload


def part_deepseek(report: Report, device: torch.device, args) -> None:
    numbers = report.numbers.setdefault("deepseek", {})
    why_not = deepseek_kernels_unavailable(device)
    for key, name, fn in (("mla_kernel", "deepseek: MLA decode kernel vs reference", check_mla_kernel),
                          ("moe_kernel", "deepseek: fused MoE kernel vs eager experts", check_moe_kernel)):
        if why_not:
            report.skip(name, why_not)
            continue
        result = report.check(name, lambda fn=fn: fn(device), needs_s=15)
        free_device_memory(device)
        if result:
            numbers[key] = result["numbers"]

    shape = deepseek_shape(device, args.quick)
    vocab = shape.config["vocab_size"]
    numbers["workload"] = {"decode": f"prompt {shape.decode_prompt}, {shape.decode_new} new tokens",
                           "offline": f"{shape.requests} x {shape.input_len} in / {shape.output_len} out"}
    config_dir = Path(tempfile.mkdtemp(prefix="gpu_check_dsv2_lite_"))
    (config_dir / "config.json").write_text(json.dumps(shape.config))
    state: dict = {}

    def load():
        started = time.perf_counter()
        extra = {"max_model_len": 4096, "max_num_seqs": shape.requests}
        with EngineLog() as engine_log:
            state["engine"] = engine = lmserve_engine(config_dir, device, True if device.type == "cuda" else None,
                                                      accepted(**extra))
        loaded = time.perf_counter() - started
        numbers["engine_log"] = engine_log.lines
        for line in engine_log.lines:
            print(f"    engine: {line}", flush=True)
        runner = engine.runner
        backend = type(runner.attention_backend).__name__
        graphs = runner.graphs is not None
        numbers.update(load_s=round(loaded, 1), attention_backend=backend, cuda_graphs=graphs,
                       parameters=sum(p.numel() for p in engine.model.parameters()))
        if device.type == "cuda" and (backend != "TritonPagedBackend" or not graphs):
            raise CheckFailed(f"the V2-Lite shape runs on {backend}, CUDA graphs {'on' if graphs else 'off'}: "
                              f"expected the Triton MLA kernels and captured graphs")
        warm = warm_up(engine, shape)
        return (f"engine up in {loaded:.1f}s ({numbers['parameters'] / 1e9:.2f}B parameters, dummy weights, "
                f"{backend}, CUDA graphs {'on' if graphs else 'off'}, {engine.num_blocks} KV blocks), "
                f"warm-up logits finite (std {warm['logit_std']:.2f})")

    if not report.check("deepseek: V2-Lite shape load + warm-up", load, needs_s=40):
        state.clear()
        free_device_memory(device)
        return

    def batch1():
        r = decode_speed(state["engine"], shape, vocab)
        numbers.update(decode_tok_s=round(r["decode_tok_s"], 1), ttft_s=round(r["ttft_s"], 3))
        return f"batch-1 decode {r['decode_tok_s']:.1f} tok/s, first token {r['ttft_s'] * 1000:.0f} ms"

    report.check("deepseek: V2-Lite batch-1 decode", batch1, needs_s=10)

    def throughput():
        budget = min(args.throughput_budget_s, max(report.time_left() - 20, 10))
        r = offline_throughput(state["engine"], shape, vocab, budget)
        numbers["offline"] = {k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}
        return (f"offline {r['output_tok_s']:.0f} output tok/s, {r['requests_done']}/{shape.requests} requests in "
                f"{r['total_s']:.1f}s" + (" (cut at the time budget: partial)" if r["partial"] else "")
                + f"; LMDeploy's published A100 figure {LMDEPLOY_A100_LITE_TOK_S} "
                  f"({r['output_tok_s'] / LMDEPLOY_A100_LITE_TOK_S:.1f}x, other workload and GPU)")

    report.check("deepseek: V2-Lite offline throughput", throughput, needs_s=30)

    def profiled():
        batch = min(64, shape.requests)
        r = profile_decode(state["engine"], device, vocab, batch, report.out_dir / "gpu_check_profile.txt",
                           "deepseek-v2-lite")
        numbers[f"profile_b{batch}"] = r
        return (f"batch {batch} decode: {r['wall_ms_per_step']:.2f} ms/step wall, {r['device_ms_per_step']:.2f} "
                f"ms/step in kernels; top: {r['top']} (gpu_check_profile.txt)")

    report.check("deepseek: V2-Lite profile", profiled, needs_s=15)
    state.clear()
    free_device_memory(device)


def deepseek_markdown(d: dict) -> list[str]:
    """The V2-Lite lines of the table (none when the part did not run)."""
    lines = []
    if d.get("decode_tok_s") or d.get("offline"):
        w = d.get("workload", {})
        lines.append(f"DeepSeek-V2-Lite shape (MLA + MoE, {d.get('parameters', 0) / 1e9:.1f}B parameters, dummy "
                     f"weights, {d.get('attention_backend')}, CUDA graphs {'on' if d.get('cuda_graphs') else 'off'}): "
                     f"batch-1 decode {d.get('decode_tok_s', '-')} tok/s ({w.get('decode')})"
                     + (f"; offline {d['offline']['output_tok_s']:.0f} output tok/s ({w.get('offline')}"
                        f"{', partial' if d['offline'].get('partial') else ''}); LMDeploy A100 (ShareGPT) "
                        f"{LMDEPLOY_A100_LITE_TOK_S}" if d.get("offline") else "") + ".")
        lines.append("")
    return lines


# ---- part f: decode attention in one pass vs split keys ----------------------------------------

def time_in_graph(fn, device: torch.device, iters: int = 20) -> float:
    """Microseconds per call of a launch-bound op as a decode step's graph replays it: `iters`
    calls captured in one CUDA graph (eager timing would measure Triton's Python launch path)."""
    if device.type != "cuda":
        return time_call(fn, device, 2)
    fn()
    fn()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(3):
        graph.replay()
    end.record()
    torch.cuda.synchronize(device)
    return begin.elapsed_time(end) / (3 * iters) * 1000


@torch.inference_mode()
def check_decode_single_pass(device: torch.device) -> dict:
    """The paged kernel on decode batches of the Llama-3.1-8B layer shape (32 query heads, 8 KV
    heads, head dim 128, bf16): split keys + merge (choose_num_splits) against one pass, per batch
    size and context length, timed as graphs replay them; both must agree. Says up to which
    context one pass is faster, next to the threshold the backend uses (SINGLE_PASS_MAX_KEYS)."""
    from lmserve.attention import triton_paged
    from lmserve.attention.triton_backend import SINGLE_PASS_MAX_KEYS, choose_num_splits

    cuda = device.type == "cuda"
    hq, hkv, d, page = (32, 8, 128, 16) if cuda else (4, 2, 16, 4)
    dtype = torch.bfloat16 if cuda else torch.float32
    sms = torch.cuda.get_device_properties(device).multi_processor_count if cuda else 2
    batches, contexts = ((1, 8, 32), (128, 256, 384, 512, 768, 1024, 2048)) if cuda else ((1, 2), (16, 64))
    g = torch.Generator().manual_seed(5)
    blocks = max(batches) * (-(-max(contexts) // page)) + 1
    k_cache = torch.randn(blocks, page, hkv, d, generator=g).to(device, dtype)
    v_cache = torch.randn(blocks, page, hkv, d, generator=g).to(device, dtype)
    results, problems = {}, []
    for b in batches:
        splits = choose_num_splits(b, hkv, sms)
        rows = {}
        for ctx in contexts:
            per_seq = -(-ctx // page)
            tables = torch.arange(b * per_seq, device=device).view(b, per_seq)
            seq_lens = torch.full((b,), ctx, device=device)
            query_start = torch.arange(b + 1, device=device)
            tiles = (torch.arange(b, device=device), torch.zeros(b, dtype=torch.int64, device=device))
            q = torch.randn(b, hq, d, generator=g).to(device, dtype)
            acc, scalars = triton_paged.split_buffer_sizes(b, hq, d, splits)
            buffers = tuple(torch.empty(n, dtype=torch.float32, device=device) for n in (acc, scalars, scalars))
            run = {s: functools.partial(triton_paged.paged_attention, q, k_cache, v_cache, torch.empty_like(q),
                                        tables, seq_lens, query_start, *tiles, 1, d ** -0.5, None, None, s,
                                        buffers if s > 1 else None) for s in (1, splits)}
            timed = {s: time_in_graph(run[s], device) for s in run}
            one, split = run[1]().float(), run[splits]().float()
            if not torch.allclose(one, split, atol=2e-2, rtol=2e-2):
                problems.append(f"batch {b}, context {ctx}: one pass differs from {splits} splits by "
                                f"{float((one - split).abs().max()):.3g}")
            rows[ctx] = {"splits": splits, "split_us": round(timed[splits], 2), "one_pass_us": round(timed[1], 2)}
        faster = [c for c, r in rows.items() if r["one_pass_us"] <= r["split_us"]]
        results[b] = {"contexts": rows, "one_pass_faster_up_to": max(faster) if faster else 0}
    if problems:
        raise CheckFailed("; ".join(problems))
    detail = "; ".join(
        f"batch {b} ({r['contexts'][contexts[0]]['splits']} splits): "
        + ", ".join(f"{c}: {x['split_us']:.1f}/{x['one_pass_us']:.1f} us" for c, x in r["contexts"].items())
        for b, r in results.items())
    return {"numbers": {"single_pass_max_keys": SINGLE_PASS_MAX_KEYS, "batches": results},
            "detail": f"split+merge/one-pass us per layer by context, {detail}; the backend's one-pass limit "
                      f"{SINGLE_PASS_MAX_KEYS} tokens"}


def part_attention(report: Report, device: torch.device) -> None:
    name = "attention: decode one pass vs split keys"
    why_not = deepseek_kernels_unavailable(device)
    if why_not:
        report.skip(name, why_not)
        return
    result = report.check(name, lambda: check_decode_single_pass(device), needs_s=15)
    if result:
        report.numbers["decode_single_pass"] = result["numbers"]
    free_device_memory(device)


# ---- part d: the table -------------------------------------------------------------------------

def markdown(report: Report) -> str:
    n = report.numbers
    s = n.get("speed", {})
    versions = n.get("versions", {})
    roof = roofline(report)
    device = n.get("device", "?")
    target = throughput_target(report)
    lines = [f"Device check on {device}: torch {versions.get('torch')}, triton {versions.get('triton')}, "
             f"transformers {versions.get('transformers')}; `{report.command}` "
             f"({report.elapsed():.0f} s).", ""]
    if n.get("copy_bandwidth_GBps"):
        lines.append(f"Measured copy bandwidth {n['copy_bandwidth_GBps']:.0f} GB/s"
                     + (f"; {s['weight_bytes_per_token'] / 1e9:.4g} GB of weights per token gives a batch-1 "
                        f"roofline of {roof:.0f} tok/s." if roof else "."))
        lines.append("")
    if s:
        w = s.get("workload", {})
        lines += ["| measurement | output tok/s | roofline fraction | vs transformers | target |",
                  "|---|---:|---:|---:|---|"]
        hf_runs = sorted((int(k.split("_")[1][1:]), v) for k, v in s.items() if k.startswith("transformers_b"))
        for key, label in (("graphs", "CUDA graphs"), ("eager", "eager"), ("default", "engine defaults")):
            if f"{key}_decode_tok_s" in s:
                v = s[f"{key}_decode_tok_s"]
                frac = s.get(f"{key}_roofline_fraction")
                vs = f"{v / hf_runs[0][1]:.1f}x (b{hf_runs[0][0]})" if hf_runs else "-"
                goal = f">= {TARGET_ROOFLINE_FRACTION:.0%} of the roofline" if key != "eager" else ""
                lines.append(f"| lmserve batch-1 decode, {label} ({w.get('decode')}) | {v:.1f} | "
                             f"{f'{frac:.0%}' if frac else '-'} | {vs} | {goal} |")
            off = s.get(f"{key}_offline")
            if off:
                tok_s = off["output_tok_s"]
                vs = f"{tok_s / hf_runs[-1][1]:.1f}x (b{hf_runs[-1][0]})" if hf_runs else "-"
                goal = (f">= {target} ({tok_s / target:.2f}x); SGLang H200 {SGLANG_H200_TOK_S} "
                        f"({tok_s / SGLANG_H200_TOK_S:.2f}x)") if target else "-"
                lines.append(f"| lmserve offline {w.get('offline')}, {label}: {off['total_s']:.0f} s"
                             f"{' (partial)' if off.get('partial') else ''} | {tok_s:.0f} | - | {vs} | {goal} |")
        for batch, v in hf_runs:
            lines.append(f"| transformers generate batch {batch} ({w.get('transformers')}) | {v:.1f} | - | 1.0x | |")
        lines.append("")
    lines += deepseek_markdown(n.get("deepseek", {}))
    single = n.get("decode_single_pass")
    if single:
        lines += ["Decode attention, 8B layer shape, bf16: one pass (no split keys, no merge) is as fast or faster "
                  "up to " + ", ".join(f"{r['one_pass_faster_up_to']} tokens at batch {b}"
                                       for b, r in single["batches"].items())
                  + f" (the backend takes one pass up to {single['single_pass_max_keys']}).", ""]
    counts = n.get("correctness")
    if counts:
        lines.append(f"Correctness: {counts['PASS']} checks passed, {counts['FAIL']} failed, {counts['SKIP']} skipped.")
    fails = [c["name"] for c in report.checks if c["status"] == "FAIL"]
    if fails:  # of any part
        lines.append(f"Failed: {', '.join(fails)}.")
    return "\n".join(lines) + "\n"


# ---- part: the capacity planner against the engine ----------------------------------------------

def part_plan(report: Report, device: torch.device) -> None:
    """`lmserve plan`'s prediction for the Llama-3.1-8B, DeepSeek-V2-Lite (MLA + MoE) and
    Qwen2-57B-A14B (MoE) shapes on this device (TP=1, its total memory, several step budgets)
    against a dummy-weight engine's measured numbers: parameter bytes and KV bytes per token
    must be equal; the KV capacity (num_blocks x block_size) within 3%, reported as a ratio
    with the activation estimate against the measured peak. On CPU (smoke mode) the tiny
    shape, with an explicit kv_cache_memory budget, must give equal blocks."""
    numbers = report.numbers.setdefault("plan", {})
    # Several step budgets: the sampler's rows and the layers' tokens each set the peak (the
    # activation estimate's two terms); few rows leave the layers' widths (dense, MoE, MLA) to show.
    shapes = [("Llama-3.1-8B shape", LLAMA_8B, [(2048, 256), (8192, 256), (2048, 32), (16384, 8), (32768, 8)]),
              ("DeepSeek-V2-Lite shape", DEEPSEEK_V2_LITE, [(2048, 8), (8192, 8)]),
              ("Qwen2-57B-A14B shape", QWEN2_57B_A14B, [(2048, 8), (8192, 8)])]
    if device.type != "cuda":
        shapes = [("tiny Llama shape", TINY_SPEED_MODEL, [(2048, 256)])]
    for label, config, settings in shapes:
        plan_shape(report, device, label, config, settings, numbers)


def plan_shape(report: Report, device: torch.device, label: str, config: dict, settings: list, numbers: dict) -> None:
    from lmserve.engine import capacity, llm_engine
    from lmserve.models.inventory import inventory

    config_dir = Path(tempfile.mkdtemp(prefix="gpu_check_plan_"))
    (config_dir / "config.json").write_text(json.dumps(config))
    for tokens, seqs in settings:
        def check(tokens=tokens, seqs=seqs):
            readings = []
            measure = llm_engine.measure_peak

            def recording(*args, **kwargs):
                readings.append(measure(*args, **kwargs))
                return readings[-1]

            llm_engine.measure_peak = recording
            options = {"max_num_batched_tokens": tokens, "max_num_seqs": seqs}
            if device.type == "cuda":
                options.update(gpu_memory_utilization=0.9, cuda_graphs=False)  # graphs come after the sizing
            else:
                options["kv_cache_memory"] = 256 << 20
            try:
                engine = LLMEngine(str(config_dir), dtype="bfloat16", device=str(device), load_format="dummy",
                                   **accepted(**options))
            finally:
                llm_engine.measure_peak = measure
            inv = inventory(engine.model_config)
            params = sum(p.numel() * p.element_size() for p in engine.model.parameters())
            buffers = sum(b.numel() * b.element_size() for b in engine.model.buffers())
            per_block = engine.runner.kv_bytes_per_block(engine.model, engine.engine_config.block_size, engine.dtype)
            predicted_weights = sum(capacity.weight_bytes(inv, 1, "none", torch.bfloat16).values())
            predicted_kv = capacity.kv_bytes_per_token(inv, 1, torch.bfloat16)
            row = {"params_bytes": params, "predicted_weight_bytes": predicted_weights, "buffers_bytes": buffers,
                   "predicted_rope_bytes": capacity.rope_table_bytes(inv, torch.bfloat16),
                   "kv_bytes_per_token": per_block // engine.engine_config.block_size,
                   "predicted_kv_bytes_per_token": predicted_kv, "num_blocks": engine.num_blocks}
            if (params, per_block) != (predicted_weights, predicted_kv * engine.engine_config.block_size):
                raise CheckFailed(f"measured {params} parameter bytes, {per_block} KV bytes per block; the planner "
                                  f"predicts {predicted_weights} and {predicted_kv * engine.engine_config.block_size}")
            if device.type != "cuda":
                blocks = capacity.cache_blocks(256 << 20, per_block)
                numbers[f"{label}: t{tokens}_s{seqs}"] = {**row, "predicted_num_blocks": blocks}
                if blocks != engine.num_blocks:
                    raise CheckFailed(f"engine {engine.num_blocks} blocks, planner {blocks}")
                return f"weights, KV bytes and {blocks} blocks as predicted"
            reading = readings[0]
            total = reading.total
            options = capacity.Options(max_num_batched_tokens=tokens, max_num_seqs=seqs,
                                       max_model_len=engine.max_model_len)
            plan = capacity.plan(inv, capacity.Hardware(1, total), options, tensor_parallel_size=1)
            c = plan.candidates[0]
            in_use = llm_engine.peak_in_use(reading)
            measured_activation = reading.torch_peak - reading.profile_kv - params - buffers
            non_torch = max(reading.total - reading.free - reading.torch_allocated, 0)
            row.update(total_bytes=total, in_use_bytes=in_use, predicted_in_use_bytes=c.in_use,
                       activation_bytes=measured_activation, predicted_activation_bytes=c.activation,
                       non_torch_bytes=non_torch, predicted_overhead_bytes=c.overhead,
                       predicted_num_blocks=c.num_blocks, tokens=engine.num_blocks * engine.engine_config.block_size,
                       predicted_tokens=c.tokens)
            numbers[f"{label}: t{tokens}_s{seqs}"] = row
            ratio = c.tokens / row["tokens"]
            del engine
            free_device_memory(device)
            line = (f"{tokens} tokens/{seqs} seqs: KV capacity predicted {c.tokens:,} tokens, engine {row['tokens']:,} "
                    f"({ratio:.4f}x); activations predicted {c.activation / 2**30:.2f} GiB, measured "
                    f"{measured_activation / 2**30:.2f} GiB; outside torch predicted {c.overhead / 2**30:.2f} GiB, "
                    f"measured {non_torch / 2**30:.2f} GiB")
            if abs(ratio - 1) > 0.03:
                raise CheckFailed(line)
            return line

        report.check(f"plan: {label}, {tokens} tokens / {seqs} seqs", check, needs_s=30)
        free_device_memory(device)
# ---- part tp: tensor parallelism on one device ---------------------------------------------------

TP_STEPS = 8


def part_tp(report: Report, device: torch.device) -> None:
    """Tensor parallelism where one GPU can prove it (docs/tensor_parallel.md): the executor with
    NCCL at one rank (the communicator's setup on this device), and two ranks sharing the GPU over
    gloo with CUDA tensors (the sharded layers and kernels); both serve family_checkpoints' WAVES
    in float32 and must give the one-rank engine's greedy tokens, logits within 1e-4 (2e-3 on
    CUDA, where the sharded matmuls sum in another order). On CPU (the smoke mode) gloo at two ranks."""
    from family_checkpoints import assert_same_greedy_run, build_llama, serve_waves_greedy

    if "tensor_parallel_size" not in ENGINE_FIELDS:
        report.skip("tp", "this checkout's engine has no tensor_parallel_size")
        return
    atol = 2e-3 if device.type == "cuda" else 1e-4
    variants = ([("tp=1 nccl", {"tensor_parallel_size": 1, "distributed_backend": "nccl"}),
                 ("tp=2 gloo, CUDA tensors", {"tensor_parallel_size": 2, "distributed_backend": "gloo"})]
                if device.type == "cuda" else [("tp=2 gloo", {"tensor_parallel_size": 2})])
    with tempfile.TemporaryDirectory(prefix="gpu_check_tp_") as tmp:
        build_llama(Path(tmp))
        state = {}

        def reference():
            engine, state["reference"] = serve_waves_greedy(tmp, TP_STEPS, device=device.type)
            del engine
            free_device_memory(device)
            return f"{sum(len(t) for t, _ in state['reference'])} tokens"

        if report.check("tp: one-rank reference", reference, needs_s=20) is None:
            return
        results = report.numbers.setdefault("tp", {})
        for label, options in variants:
            def run(options=options, label=label):
                started = time.perf_counter()
                engine, got = serve_waves_greedy(tmp, TP_STEPS, device=device.type, **options)
                took = time.perf_counter() - started
                try:
                    assert_same_greedy_run(state["reference"], got, TP_STEPS, atol=atol)
                except AssertionError as e:
                    raise CheckFailed(f"{label}: differs from one rank: {str(e)[:300]}") from None
                finally:
                    engine.shutdown()
                    del engine
                    free_device_memory(device)
                results[label] = {"seconds": round(took, 2)}
                return f"greedy equal to one rank, logits within {atol:g} ({took:.1f}s with start)"

            report.check(f"tp: {label}", run, needs_s=25)


def part_fp8(report: Report, device: torch.device, args) -> None:
    """FP8 weights (issue 22): the method's math on this device, then the 8B shape's speed with
    `quantization: fp8` beside bf16's, both measured here with CUDA graphs (the engine default)."""
    try:
        from lmserve.layers.quantization.fp8 import Fp8LinearMethod, scaled_mm_available
    except ImportError:
        report.skip("fp8", "this checkout has no fp8 quantization method")
        return
    from lmserve.layers.linear import Linear

    def layer_math():
        torch.manual_seed(0)
        with torch.device(device):
            layer = Linear(4096, [4096, 1024, 1024], quant_method=Fp8LinearMethod(None), dtype=torch.bfloat16)
            layer.weight.data.normal_(0, 0.02)
            layer.process_weights()
            x = torch.randn(8, 4096, dtype=torch.bfloat16)
        dense = (layer.weight.float() * layer.row_scale[:, None]).to(torch.bfloat16)
        ref = torch.nn.functional.linear(x, dense).float()
        got = layer(x).float()
        rel = float((got - ref).norm() / ref.norm())
        path = "torch._scaled_mm" if layer.quant_method.use_scaled_mm else "weight-only dequantization"
        report.numbers.setdefault("fp8", {})["layer_rel_error"] = round(rel, 5)
        if rel > 0.05:  # per-token fp8 activations: ~2-3% relative error expected
            raise CheckFailed(f"{path}: relative error {rel:.3f} against the dequantized dense product")
        return f"{path}: relative error {rel:.4f} against the dequantized dense product"

    report.check("fp8: linear method vs dequantized dense", layer_math, needs_s=10)
    if device.type == "cuda" and not scaled_mm_available(device):
        report.skip("fp8: speed", "compute capability below 8.9: fp8 runs weight-only (the slow path)")
        return
    shape = speed_shape(device, args.quick, args.requests)
    config_dir = Path(tempfile.mkdtemp(prefix="gpu_check_fp8_"))
    (config_dir / "config.json").write_text(json.dumps(shape.config))
    numbers = report.numbers.setdefault("fp8", {})
    vocab = shape.config["vocab_size"]
    for quant in ("none", "fp8"):
        state: dict = {}

        def load(quant=quant, state=state):
            started = time.perf_counter()
            state["engine"] = engine = lmserve_engine(config_dir, device, None, {"quantization": quant})
            warm_up(engine, shape)
            wbytes = weight_bytes_per_token(engine.model)
            numbers[f"{quant}_weight_bytes_per_token"] = wbytes
            return f"{quant}: up in {time.perf_counter() - started:.1f}s, {wbytes / 1e9:.3g} GB read per token"

        if not report.check(f"fp8: {quant} load + warm-up", load, needs_s=40):
            continue
        engine = state.pop("engine")

        def batch1(quant=quant, engine=engine):
            r = decode_speed(engine, shape, vocab)
            numbers[f"{quant}_decode_tok_s"] = round(r["decode_tok_s"], 1)
            line = f"{quant} batch-1 decode {r['decode_tok_s']:.1f} tok/s"
            bw = report.numbers.get("copy_bandwidth_GBps")
            if bw:
                roof = bw * 1e9 / numbers[f"{quant}_weight_bytes_per_token"]
                numbers[f"{quant}_roofline_fraction"] = round(r["decode_tok_s"] / roof, 3)
                line += f", {r['decode_tok_s'] / roof:.0%} of its {roof:.0f} tok/s roofline"
            if quant == "fp8" and numbers.get("none_decode_tok_s"):
                ratio = r["decode_tok_s"] / numbers["none_decode_tok_s"]
                numbers["decode_ratio_vs_bf16"] = round(ratio, 2)
                line += f", {ratio:.2f}x bf16 (target >= 1.5x)"
            return line

        report.check(f"fp8: {quant} batch-1 decode", batch1, needs_s=15)

        def throughput(quant=quant, engine=engine):
            budget = min(args.throughput_budget_s, max(report.time_left() - 30, 10))
            r = offline_throughput(engine, shape, vocab, budget)
            numbers[f"{quant}_offline_tok_s"] = round(r["output_tok_s"], 1)
            line = f"{quant} offline {r['output_tok_s']:.0f} output tok/s" + (" (partial)" if r["partial"] else "")
            if quant == "fp8" and numbers.get("none_offline_tok_s"):
                ratio = r["output_tok_s"] / numbers["none_offline_tok_s"]
                numbers["offline_ratio_vs_bf16"] = round(ratio, 2)
                line += f", {ratio:.2f}x bf16 (target >= 1.3x)"
            return line

        report.check(f"fp8: {quant} offline throughput", throughput, needs_s=40)
        del engine
        free_device_memory(device)


# ---- main ---------------------------------------------------------------------------------------

PARTS = ("env", "engine", "correctness", "speed", "plan", "deepseek", "attention", "tp", "fp8")


def run_parts_isolated(report: Report, args, parts: list[str]) -> None:
    """Each part in a process of its own: a CUDA error that poisons the context (an illegal
    address in a kernel), a crash or a hang then costs that part only, the next part starts on
    a clean device, and every byte a part held is back. A part that outlives its time is killed;
    what it reported until then is kept (it saves after every check)."""
    import subprocess

    with tempfile.TemporaryDirectory(prefix="gpu_check_parts_") as tmp:
        for part in parts:
            remaining = report.time_left()
            if remaining < 15:
                report.skip(f"part {part}", f"{remaining:.0f}s left before the deadline")
                continue
            numbers_in, child_json = Path(tmp) / f"{part}.in.json", Path(tmp) / f"{part}.json"
            numbers_in.write_text(json.dumps(report.numbers, default=str))
            argv = [sys.executable, str(Path(__file__).resolve()), "--no-isolate", "--device", args.device,
                    "--parts", part, "--out", str(args.out), "--deadline-s", str(args.deadline_s),
                    "--correctness-budget-s", str(args.correctness_budget_s),
                    "--throughput-budget-s", str(args.throughput_budget_s), "--child-json", str(child_json),
                    "--numbers-in", str(numbers_in), "--clock-offset", f"{report.elapsed():.1f}"]
            argv += ["--quick"] if args.quick else []
            for name in ("families", "backends", "requests", "max_num_batched_tokens"):
                if getattr(args, name) is not None:
                    argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
            # A check already running at the deadline finishes its work (grace); a part that
            # hangs is stopped at its own limit so the parts after it still run.
            own_limit = {"env": 60, "engine": 120, "correctness": args.correctness_budget_s + 60,
                         "deepseek": DEEPSEEK_PART_LIMIT_S}
            limit = min(remaining + 60, own_limit.get(part, remaining + 60))
            try:
                rc = subprocess.run(argv, timeout=limit).returncode
                problem = None if rc in (0, 1) else f"the process exited with status {rc} (a crash)"
            except subprocess.TimeoutExpired:
                problem = f"killed after {limit:.0f}s (a hang?)"
            if child_json.is_file():
                data = json.loads(child_json.read_text())
                report.checks += data["checks"]
                report.numbers = data["numbers"]
            if problem:
                report._record(f"part {part}", "FAIL", problem, 0.0)
            print(f"== {part} done at {report.elapsed():.0f}s", flush=True)


def run_parts(report: Report, args, device: torch.device, parts: list[str]) -> None:
    if "env" in parts:
        part_env(report, device)
    if "engine" in parts:
        part_engine_checks(report, device)
    if "correctness" in parts:
        names = args.families.split(",") if args.families else None
        backends = args.backends.split(",") if args.backends else None
        part_correctness(report, device, names, args.correctness_budget_s, backends)
    if "speed" in parts:
        part_speed(report, device, args)
    if "plan" in parts:
        part_plan(report, device)
    if "deepseek" in parts:
        part_deepseek(report, device, args)
    if "attention" in parts:
        part_attention(report, device)
    if "tp" in parts:
        part_tp(report, device)
    if "fp8" in parts:
        part_fp8(report, device, args)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (the device check) or cpu (smoke mode)")
    ap.add_argument("--quick", action="store_true", help="fewer offline requests, shorter transformers runs")
    ap.add_argument("--parts", default="env,engine,correctness,speed,plan,deepseek,attention,tp,fp8",
                    help="comma-separated: env,engine,correctness,speed,plan,deepseek,attention,tp")
    ap.add_argument("--families", default=None, help="comma-separated family names (default: all)")
    ap.add_argument("--backends", default=None,
                    help="attention backends to prove (default: triton,reference on CUDA, reference on CPU; "
                         "triton on CPU needs TRITON_INTERPRET=1)")
    ap.add_argument("--requests", type=int, default=None, help="offline requests (default 256; --quick 64)")
    ap.add_argument("--throughput-budget-s", type=float, default=None,
                    help="most seconds one offline-throughput run may take, then reported as partial "
                         "(default 60; --quick 30)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="the speed engines' per-step token budget (default: the engine's)")
    ap.add_argument("--correctness-budget-s", type=float, default=None,
                    help="correctness checks that would start after this many seconds of the part are skipped, "
                         "leaving the rest of the deadline to the speed part (default 170; --quick 110)")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="checks that would start after this many seconds are skipped: a lent device has 15 "
                         "minutes in all, so a run must leave room for its start and one rerun "
                         "(default 360; --quick 250)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="results folder (default $OUT)")
    ap.add_argument("--no-isolate", action="store_true",
                    help="run the parts in this process (default: one process per part)")
    # Internal: how the parent hands a part to its own process.
    ap.add_argument("--child-json", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--numbers-in", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--clock-offset", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.throughput_budget_s is None:
        args.throughput_budget_s = 30.0 if args.quick else 60.0
    if args.correctness_budget_s is None:
        args.correctness_budget_s = 110.0 if args.quick else 170.0
    if args.deadline_s is None:
        args.deadline_s = 250.0 if args.quick else 360.0

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run with --device cpu --quick for the smoke mode", file=sys.stderr)
        return 2
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        ap.error(f"unknown part(s) {sorted(unknown)}; parts: {','.join(PARTS)}")
    parts = [p for p in PARTS if p in args.parts.split(",")]
    command = "python3 benchmarks/gpu_check.py" + "".join(f" {a}" for a in sys.argv[1:])
    report = Report(Path(args.out), args.deadline_s, command, started=time.perf_counter() - args.clock_offset,
                    child_json=args.child_json)
    if args.numbers_in is not None:
        report.numbers = json.loads(args.numbers_in.read_text())
    torch.manual_seed(0)

    if args.child_json is None and not args.no_isolate:
        run_parts_isolated(report, args, parts)
    else:
        run_parts(report, args, device, parts)
    if args.child_json is not None:
        report.save()
        return 1 if report.failed else 0

    report.save()
    print("\n" + markdown(report))
    print(f"results in {report.out_dir}/gpu_check.json and gpu_check.md; {len(report.checks)} checks, "
          f"{len(report.failed)} failed, {report.elapsed():.0f}s")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
