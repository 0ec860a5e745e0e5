"""Part speed: the 8B shape's decode against the roofline and transformers, and offline throughput."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gpu_check_parts.common import ENGINE_FIELDS, accepted, free_device_memory, sync
from gpu_check_parts.report import CheckFailed, Report
from gpu_check_parts.shapes import LLAMA_8B, SGLANG_H200_TOK_S, TARGET_THROUGHPUT, TINY_SPEED_MODEL
from lmserve import SamplingParams
from lmserve.engine.llm_engine import LLMEngine


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
