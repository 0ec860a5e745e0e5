"""How big the KV cache is on a CUDA device: `gpu_memory_utilization` of its memory.

vLLM's meaning: the engine may use that fraction of the device's TOTAL memory for everything it
needs, i.e. the weights, the activation peak of the largest step and the KV cache. The first two
are measured, not estimated: after the weights are loaded, one profiling step of the largest work
the scheduler can hand out (`max_num_batched_tokens` prefill tokens, sampled for up to
`max_num_seqs` rows) runs through the real model and runner with a temporary cache just big
enough for it; torch's allocator and the driver then say what was in use at the peak, and the
KV cache gets what is left of the fraction.

The arithmetic is plain ints in and out (tested on CPU); only `measure_peak` touches CUDA.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

GiB = 1 << 30


@dataclass(frozen=True)
class MemoryReading:
    """What the device and torch reported around the profiling step (bytes)."""

    total: int  # the device's memory
    free: int  # free per the driver after the step, with torch's unused cached blocks released
    torch_allocated: int  # in live torch tensors at that moment (weights, other engines' caches)
    torch_peak: int  # the most in live torch tensors during the step, its temporary cache included
    profile_kv: int  # that temporary cache, which the real KV cache replaces


def peak_in_use(reading: MemoryReading) -> int:
    """Device memory in use at the profiled peak, without the profiling step's own KV cache.

    vLLM's accounting (Worker.determine_num_available_blocks): torch's peak of live tensors, plus
    everything the device holds that no live torch tensor accounts for, read once the step is
    over and torch's cache is emptied: `(total - free) - torch_allocated`. That is the CUDA
    context, library workspaces outside torch's allocator, segments torch cannot hand back
    (fragmentation) and other processes on the device. It is counted whole because the fraction
    is of the device's total memory: whatever else lives there comes out of it too.
    """
    non_torch = max(reading.total - reading.free - reading.torch_allocated, 0)
    return max(reading.torch_peak - reading.profile_kv, 0) + non_torch


def kv_cache_bytes(total: int, utilization: float, in_use: int) -> int:
    """Bytes left for the KV cache: `total * utilization` minus what the peak step had in use."""
    budget = int(total * utilization) - in_use
    if budget <= 0:
        raise ValueError(
            f"the weights, activations and other memory in use need {in_use / GiB:.2f} GiB; "
            f"gpu_memory_utilization {utilization:g} of {total / GiB:.2f} GiB leaves none for the KV cache "
            "(raise gpu_memory_utilization, lower max_num_batched_tokens, or set kv_cache_memory)")
    return budget


def kv_cache_blocks(budget: int, bytes_per_block: int, utilization: float) -> int:
    """Whole blocks in the budget; at least one must fit."""
    blocks = budget // bytes_per_block
    if blocks < 1:
        raise ValueError(
            f"gpu_memory_utilization {utilization:g} leaves {budget / GiB:.3f} GiB for the KV cache, "
            f"less than one block ({bytes_per_block / GiB:.3f} GiB); raise gpu_memory_utilization")
    return blocks


def profile_sequence_lengths(max_num_batched_tokens: int, max_model_len: int) -> list[int]:
    """The prefill lengths of the profiling step: `max_num_batched_tokens` tokens in as few
    sequences as the context allows (one, unless the context is shorter than the budget)."""
    per_seq = max(1, min(max_num_batched_tokens, max_model_len - 1))
    full, rest = divmod(max_num_batched_tokens, per_seq)
    return [per_seq] * full + ([rest] if rest else [])


def blocks_for(lengths: list[int], block_size: int) -> int:
    return sum(math.ceil(n / block_size) for n in lengths)


def measure_peak(device: torch.device, step: Callable[[], int]) -> MemoryReading:
    """Run `step` (which returns the bytes of the temporary KV cache it allocated and drops every
    tensor it made before returning) and read the device's memory around it. Any other work on
    the device meanwhile (an engine already serving) only raises the peak: the sizing errs small."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    profile_kv = step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.empty_cache()  # what the step cached but no longer uses is free for the KV cache
    free, total = torch.cuda.mem_get_info(device)
    return MemoryReading(total=total, free=free, torch_allocated=torch.cuda.memory_allocated(device),
                         torch_peak=peak, profile_kv=profile_kv)
