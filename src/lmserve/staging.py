"""Host-to-device copies of a step's small inputs, without waiting for the device.

A step's inputs (token ids, positions, cache slots, block tables, sampling parameters) are Python
values. Creating a tensor on a GPU from a list copies from pageable memory and waits for the
device to finish the work queued before it. Built on the host, pinned and sent with
non_blocking=True, the copy is queued behind that work instead, and the host goes on. The pinned
memory comes from PyTorch's caching host allocator, which records each copy's event and hands the
block out again only once that copy is done, so nothing here has to keep it alive.
"""

from __future__ import annotations

import numpy as np
import torch


def host_to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Python values, a numpy array or a CPU tensor -> a tensor on `device` (CPU: as it is)."""
    t = values if isinstance(values, torch.Tensor) else torch.as_tensor(values, dtype=dtype)
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def ints_to_device(device: torch.device, *arrays) -> list[torch.Tensor]:
    """Each argument (a list of ints, a list of equal-length int lists, or an int array) -> a
    flat int64 tensor on the device, all of them in one transfer (views of one tensor)."""
    parts = [np.asarray(a, dtype=np.int64).reshape(-1) for a in arrays]
    flat = host_to_device(np.concatenate(parts), torch.int64, device)
    out, offset = [], 0
    for p in parts:
        out.append(flat[offset:offset + len(p)])
        offset += len(p)
    return out


def padded_rows(rows: list[list[int]], width: int, fill: int) -> np.ndarray:
    """Int lists of different lengths -> an int64 [len(rows), width] array, each row padded with
    `fill` (row-wise slice assignment: far cheaper than building padded Python lists)."""
    out = np.full((len(rows), width), fill, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out
