"""What speculation did, for /metrics: tokens proposed, accepted and emitted, and how the
accepted fraction of each verified run is spread (a histogram, as Prometheus wants it)."""

from __future__ import annotations

from dataclasses import dataclass, field

# Upper bounds of the acceptance-rate histogram's buckets (accepted / proposed per verified run).
ACCEPTANCE_BUCKETS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


@dataclass
class SpecDecodeStats:
    proposed: int = 0  # draft tokens sent to verification
    accepted: int = 0  # of those, the ones the target's draws accepted
    emitted: int = 0  # tokens verified runs produced (accepted + one of the target's own per run)
    runs: int = 0  # verified runs (one per speculating sequence per step)
    bucket_counts: list[int] = field(default_factory=lambda: [0] * len(ACCEPTANCE_BUCKETS))
    rate_sum: float = 0.0

    def record(self, proposed: int, accepted: int, emitted: int) -> None:
        self.proposed += proposed
        self.accepted += accepted
        self.emitted += emitted
        self.runs += 1
        rate = accepted / proposed
        self.rate_sum += rate
        for i, bound in enumerate(ACCEPTANCE_BUCKETS):
            if rate <= bound:
                self.bucket_counts[i] += 1
                break

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    def as_dict(self) -> dict:
        return {"proposed": self.proposed, "accepted": self.accepted, "emitted": self.emitted, "runs": self.runs,
                "acceptance_buckets": list(zip(ACCEPTANCE_BUCKETS, self.bucket_counts)),
                "acceptance_sum": self.rate_sum}
