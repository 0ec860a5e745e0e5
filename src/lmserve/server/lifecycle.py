"""Where the server is in its life: loading its models, ready, or failed to load. The app reads
it to answer /health, the readiness and liveness probes, and 503 `loading` on the API."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Lifecycle:
    total_models: int
    phase: str = "loading"  # loading -> ready | failed
    loaded: list[str] = field(default_factory=list)
    error: str | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def ready(self) -> bool:
        return self.phase == "ready"

    def loading_body(self) -> dict:
        return {"status": "loading", "models_loaded": len(self.loaded), "models_total": self.total_models,
                "elapsed_s": round(time.monotonic() - self.started, 1)}
