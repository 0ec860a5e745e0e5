"""The report every check writes into: PASS / FAIL / SKIP per check, numbers, saved after each."""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path


class CheckFailed(Exception):
    """A check ran and found a difference (as opposed to crashing)."""


@dataclass
class Report:
    out_dir: Path
    deadline_s: float
    command: str
    started: float = field(default_factory=time.perf_counter)
    checks: list[dict] = field(default_factory=list)
    numbers: dict = field(default_factory=dict)
    part_deadline_s: float | None = None  # the running part's own limit, so one part cannot starve the next
    child_json: Path | None = None  # a part's process reports here, to the parent that runs the parts

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def time_left(self) -> float:
        return min(self.deadline_s, self.part_deadline_s or self.deadline_s) - self.elapsed()

    def check(self, name: str, fn, needs_s: float = 0.0):
        """Run one check: PASS (fn returns a detail line), FAIL (CheckFailed or any exception,
        reported with where it came from), or SKIP when the deadline leaves no room. Never
        raises, so one failure does not stop the others. Returns fn's value (None unless PASS)."""
        if self.time_left() < needs_s:
            return self.skip(name, f"{self.time_left():.0f}s left before the deadline, needs ~{needs_s:.0f}s")
        started = time.perf_counter()
        value, status = None, "PASS"
        try:
            value = fn()
            detail = value if isinstance(value, str) else (value or {}).get("detail", "")
        except CheckFailed as e:
            status, detail = "FAIL", str(e)
        except Exception as e:  # a crash is a failure of this check, not of the run
            frame = traceback.extract_tb(e.__traceback__)[-1]
            status = "FAIL"
            detail = f"{type(e).__name__}: {e} (at {Path(frame.filename).name}:{frame.lineno})"
            traceback.print_exc()
        took = time.perf_counter() - started
        self._record(name, status, detail, took)
        return value if status == "PASS" else None

    def skip(self, name: str, why: str) -> None:
        self._record(name, "SKIP", why, 0.0)

    def _record(self, name: str, status: str, detail: str, took: float) -> None:
        self.checks.append({"name": name, "status": status, "detail": detail, "seconds": round(took, 2)})
        print(f"{status} {name} ({took:.1f}s, at {self.elapsed():.0f}s): {detail}", flush=True)
        self.save()

    @property
    def failed(self) -> list[dict]:
        return [c for c in self.checks if c["status"] == "FAIL"]

    def save(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        data = {"command": self.command, "elapsed_s": round(self.elapsed(), 1), "numbers": self.numbers,
                "checks": self.checks}
        if self.child_json is not None:
            self.child_json.write_text(json.dumps(data, default=str))
            return
        (self.out_dir / "gpu_check.json").write_text(json.dumps(data, indent=2, default=str))
        from gpu_check_parts.table import markdown  # here: the table reads the parts, which import this

        (self.out_dir / "gpu_check.md").write_text(markdown(self))
