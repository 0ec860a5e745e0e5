"""The interface every attention backend implements.

An attention layer (attention/layer.py) holds what is fixed per layer and hands the work to the
step's backend, which the metadata carries: `forward` for per-head keys and values, `forward_mla`
for multi-head latent attention (DeepSeek-V2). The runner builds that metadata once per step with
`build_metadata`, shared by every layer. What differs between backends beyond that is declared
here as a capability the runner reads, never found out from the backend's class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from torch import nn

    from lmserve.model_input import ModelInput


class AttentionBackend(ABC):
    # Decode metadata of fixed shapes and device buffers filled in place, which a captured CUDA
    # graph can replay (engine/cuda_graphs.py); a backend that builds per-step Python structures
    # (decode groups, masks built on first use) cannot be captured.
    supports_cuda_graphs: ClassVar[bool] = False

    @abstractmethod
    def build_metadata(self, batch: ModelInput, positions: torch.Tensor, block_size: int, dtype: torch.dtype):
        """The step's metadata for every layer (it carries this backend as `meta.backend`)."""

    @abstractmethod
    def forward(self, layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta) -> torch.Tensor:
        """q [T, Hq, D]; k, v [T, Hkv, D] (already rotated), written into the cache first.
        Returns [T, Hq, D]."""

    @abstractmethod
    def forward_mla(self, layer, q: torch.Tensor, entry: torch.Tensor, kv_b_proj: nn.Module,
                    kv_cache: tuple[torch.Tensor], meta) -> torch.Tensor:
        """Multi-head latent attention. q [T, H, nope + rope]; entry [T, latent + rope] (what the
        cache keeps per token, written first); kv_b_proj the layer's up-projection.
        Returns [T, H, v_head_dim]."""
