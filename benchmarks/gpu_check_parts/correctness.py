"""Part correctness: every family on the device against transformers and against lmserve on CPU."""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from gpu_check_parts.common import backend_unavailable, engine_variants, free_device_memory, variant_label
from gpu_check_parts.report import CheckFailed, Report
from gpu_check_parts.shapes import PROMPTS
from lmserve import SamplingParams
from lmserve.engine.llm_engine import LLMEngine
from tests.support.family_checkpoints import FAMILIES, STEPS, WAVES, FamilySpec, serve_and_capture


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
    """The engine setup of tests/models/test_family_parity.py: a small token budget (chunked prefill),
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
