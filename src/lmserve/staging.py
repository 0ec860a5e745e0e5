"""Host-to-device copies of a step's integer inputs, in one transfer.

A step's inputs (token ids, positions, cache slots, block tables) are Python ints. Creating
each tensor on a GPU from a list is a synchronous copy from pageable memory, and every one of
them waits for the GPU to finish the work queued before it. Packing the lists into one int64
array in a page-locked buffer and copying it with non_blocking=True makes it one asynchronous
copy that the host does not wait for; the device tensors are views of it.

A page-locked buffer must not be refilled while its last copy may still be pending, so each
staging object cycles through a few buffers, each with an event recorded after its copy, and
waits on that event before reusing one (by then the copy has long finished: a step reads its
sampled tokens back before the next begins).
"""

from __future__ import annotations

import numpy as np
import torch

_RING = 4


class HostStaging:
    def __init__(self, device: torch.device):
        self.device = device
        self._cuda = device.type == "cuda"
        self._buffers: list[torch.Tensor | None] = [None] * _RING
        self._events: list[torch.cuda.Event | None] = [None] * _RING
        self._next = 0

    def to_device(self, *arrays) -> list[torch.Tensor]:
        """Each argument (a list of ints, a list of equal-length int lists, or an int array) ->
        a flat int64 tensor on the device."""
        parts = [np.asarray(a, dtype=np.int64).reshape(-1) for a in arrays]
        flat = self._copy(np.concatenate(parts) if parts else np.empty(0, dtype=np.int64))
        out, offset = [], 0
        for p in parts:
            out.append(flat[offset:offset + len(p)])
            offset += len(p)
        return out

    def _copy(self, values: np.ndarray) -> torch.Tensor:
        if not self._cuda:
            return torch.from_numpy(values)
        i = self._next
        self._next = (i + 1) % _RING
        if self._events[i] is not None:
            self._events[i].synchronize()
        buffer = self._buffers[i]
        if buffer is None or buffer.numel() < len(values):
            size = max(len(values), 1024, 2 * (buffer.numel() if buffer is not None else 0))
            buffer = self._buffers[i] = torch.empty(size, dtype=torch.int64).pin_memory()
        buffer.numpy()[:len(values)] = values
        flat = buffer[:len(values)].to(self.device, non_blocking=True)
        event = self._events[i] = self._events[i] or torch.cuda.Event()
        event.record()
        return flat


def padded_rows(rows: list[list[int]], width: int, fill: int) -> np.ndarray:
    """Int lists of different lengths -> an int64 [len(rows), width] array, each row padded with
    `fill` (row-wise slice assignment: far cheaper than building padded Python lists)."""
    out = np.full((len(rows), width), fill, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out
