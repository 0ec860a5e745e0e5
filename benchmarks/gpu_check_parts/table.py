"""The markdown table of a report (gpu_check.md, for docs/benchmarks.md)."""

from __future__ import annotations

from gpu_check_parts.deepseek import deepseek_markdown
from gpu_check_parts.report import Report
from gpu_check_parts.shapes import SGLANG_H200_TOK_S, TARGET_ROOFLINE_FRACTION
from gpu_check_parts.speed import roofline, throughput_target


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
