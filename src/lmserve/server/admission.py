"""Admission: at most `max_pending_requests` requests of a model in flight, the rest 503.

The check and the take happen in one synchronous call (no await between them), so handlers that
run in the same event-loop turn can never all pass the check for the last slot. A slot is held
from admission until the response is over (prepared, streamed or failed, client gone or not) and
is released exactly once.
"""

from __future__ import annotations


class Admission:
    def __init__(self, caps: dict[str, int]):
        self.caps = caps
        self.in_flight: dict[str, int] = dict.fromkeys(caps, 0)

    def try_enter(self, model: str) -> bool:
        count = self.in_flight.get(model, 0)
        if count >= self.caps.get(model, 1 << 62):
            return False
        self.in_flight[model] = count + 1
        return True

    def leave(self, model: str) -> None:
        self.in_flight[model] -= 1

    @property
    def total(self) -> int:
        return sum(self.in_flight.values())
