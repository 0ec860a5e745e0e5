"""The device check of issue 11, in one run: correctness of every family on the GPU, then speed
of a Llama-3.1-8B-shaped model against the HBM roofline and transformers' `generate`.

Written for a lent H100/H200 that has torch, triton, transformers, numpy, safetensors and
tokenizers but no network, no model files and maybe no pytest/gguf/fastapi/xgrammar: every model
is built here (tiny random checkpoints from tests/support/family_checkpoints.py; the 8B shape from a
config.json alone with `load_format="dummy"`), lmserve is imported from this repo's src/, and
only what truly needs a missing package is skipped (and said so).

    python3 benchmarks/gpu_check.py                 # on the device: everything, well inside 10 min
    python3 benchmarks/gpu_check.py --quick         # a smaller offline-throughput run
    python benchmarks/gpu_check.py --device cpu --quick   # smoke mode: the whole script on CPU,
                                                          # with a tiny speed model

Parts (--parts):
  env          device, versions, measured copy bandwidth (bytes read + written / time)
  engine       the check_* functions of tests/support/cuda_engine_checks.py (sampler syncs, memory sizing)
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
               beside the same numbers in bf16 measured in this part; and the fp8 KV cache
               (kv_cache_dtype fp8, the Triton kernels' fp8 reads) against a bf16 cache on that shape:
               greedy logits within 2^-4 of their range, token agreement, blocks gained
  spec         speculative decoding with a draft model on the 8B shape (dummy weights: step costs): plain
               decode vs a Llama-3.2-1B-shaped draft and vs the target as its own draft (the ceiling),
               4 proposals per step, batch 1 and 16
  attention    decode attention of the 8B layer shape in one pass vs split keys + merge, by batch size
               and context (graph-replayed kernel time), and where one pass stops paying

Results go to $OUT (default ./gpu_check_out): gpu_check.json (every number), gpu_check.md (the
table for docs/benchmarks.md) and gpu_check_profile.txt, rewritten after every check so a run
cut short still returns what it measured. Each part runs in a process of its own (--no-isolate:
all in this one), so a poisoned CUDA context, a crash or a hang costs one part, not the run.
Exit status 1 if any check failed. Each part is a module of benchmarks/gpu_check_parts/; this
script holds only the command line and how the parts are run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# This checkout's lmserve (not an installed one) and the test checkpoints, which import no pytest.
sys.path[:0] = [str(REPO / "src"), str(REPO)]  # lmserve from this checkout; tests.support

import torch  # noqa: E402
from gpu_check_parts.attention import part_attention  # noqa: E402
from gpu_check_parts.correctness import part_correctness  # noqa: E402
from gpu_check_parts.deepseek import DEEPSEEK_PART_LIMIT_S, part_deepseek  # noqa: E402
from gpu_check_parts.engine_checks import part_engine_checks  # noqa: E402
from gpu_check_parts.env import part_env  # noqa: E402
from gpu_check_parts.fp8 import part_fp8  # noqa: E402
from gpu_check_parts.plan import part_plan  # noqa: E402
from gpu_check_parts.report import Report  # noqa: E402
from gpu_check_parts.spec import part_spec  # noqa: E402
from gpu_check_parts.speed import part_speed  # noqa: E402
from gpu_check_parts.table import markdown  # noqa: E402
from gpu_check_parts.tp import part_tp  # noqa: E402

# ---- main ---------------------------------------------------------------------------------------

PARTS = ("env", "engine", "correctness", "speed", "plan", "deepseek", "attention", "tp", "fp8", "spec")


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
    if "spec" in parts:
        part_spec(report, device, args)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (the device check) or cpu (smoke mode)")
    ap.add_argument("--quick", action="store_true", help="fewer offline requests, shorter transformers runs")
    ap.add_argument("--parts", default="env,engine,correctness,speed,plan,deepseek,attention,tp,fp8,spec",
                    help="comma-separated: env,engine,correctness,speed,plan,deepseek,attention,tp,fp8,spec")
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
