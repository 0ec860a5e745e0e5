"""Host-to-device copies of a step's integer inputs, in one transfer.

A step's inputs (token ids, positions, cache slots, block tables) are Python ints. Creating
each tensor on a GPU from a list is a synchronous copy from pageable memory, and every one of
them waits for the GPU to finish the previous step's work. Packing the lists into one int64
array in a reused page-locked buffer and copying it with non_blocking=True makes it one
asynchronous copy per step that the host does not wait for; the device tensors are views of it.

The buffer can be reused at the next step without a race: every step ends by reading the
sampled token ids back, which waits for everything queued before, this step's copy included.
"""

from __future__ import annotations

import numpy as np
import torch


class HostStaging:
    def __init__(self, device: torch.device):
        self.device = device
        self._pinned = device.type == "cuda"
        self._host = torch.empty(0, dtype=torch.int64)

    def to_device(self, *arrays) -> list[torch.Tensor]:
        """Each argument (a list of ints or a 1-D int array) -> an int64 tensor on the device."""
        parts = [np.asarray(a, dtype=np.int64).reshape(-1) for a in arrays]
        total = sum(len(p) for p in parts)
        if not self._pinned:
            flat = torch.from_numpy(np.concatenate(parts)) if parts else torch.empty(0, dtype=torch.int64)
        else:
            if self._host.numel() < total:
                self._host = torch.empty(max(total, 2 * self._host.numel()), dtype=torch.int64).pin_memory()
            view = self._host.numpy()
            offset = 0
            for p in parts:
                view[offset:offset + len(p)] = p
                offset += len(p)
            flat = self._host[:total].to(self.device, non_blocking=True)
        out, offset = [], 0
        for p in parts:
            out.append(flat[offset:offset + len(p)])
            offset += len(p)
        return out
