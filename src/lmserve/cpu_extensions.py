"""Our C++ CPU code (layers/q4_kernel.cpp, attention/cpu_decode_kernel.cpp, engine/cpu_graph_replay.cpp and
kin), built and loaded.

Each is compiled once per machine at first use by torch's extension builder (g++ and ninja, which
`.ci/compiler.sh` installs; the compiled decode path needs them too) and cached under
TORCH_EXTENSIONS_DIR. A kernel that cannot run here (a CPU flag missing, the build failing, its
environment variable set to "torch") says why, once, and its callers keep PyTorch's path: nothing
fails for want of a kernel.

All are built with OpenMP: `at::parallel_for` is a header template that splits work over torch's
threads only where the including file is compiled with `-fopenmp`; without it a kernel runs on one
thread (the int4 kernel did until 2026-12-05). The libgomp it links is the one torch has loaded
(same soname): one thread pool, torch's.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("lmserve.engine")

BASE_FLAGS = ("-O3", "-fopenmp", "-mf16c", "-mfma")
_UNDECIDED = object()


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


class CpuExtension:
    """One kernel library: `available()` builds and loads it the first time it is asked (threads
    that ask meanwhile wait for the answer)."""

    def __init__(self, name: str, source: Path, what: str, needs: tuple[str, ...], isa_flags: tuple[str, ...],
                 env: str, fallback: str, on_load: Callable[[], None] | None = None, python_module: bool = False):
        self.name, self.source, self.what = name, source, what
        self.python_module = python_module  # a pybind11 module (`module` once loaded), else operators only
        self.module = None
        self.needs, self.isa_flags = needs, isa_flags  # /proc/cpuinfo flags; extra compiler flags (-m...)
        self.env, self.fallback, self.on_load = env, fallback, on_load
        self._lock = threading.Lock()
        self._reason: str | None | object = _UNDECIDED

    def unavailable_reason(self) -> str | None:
        """Why the kernel cannot be used here (None: it is built and loaded). `<env>=torch` turns
        it off (benchmarks compare the two paths)."""
        with self._lock:
            if self._reason is _UNDECIDED:
                self._reason = self._load()
            return self._reason

    def _load(self) -> str | None:
        if os.environ.get(self.env) == "torch":
            return f"{self.env}=torch"
        missing = [f for f in self.needs if f not in cpu_flags()]
        if missing:
            return f"the CPU lacks {', '.join(missing)}"
        try:
            from torch.utils.cpp_extension import load

            log.info("loading the %s (built once per machine: tens of seconds the first time)", self.what)
            self.module = load(name=self.name, sources=[str(self.source)], extra_cflags=[*BASE_FLAGS, *self.isa_flags],
                               extra_ldflags=["-fopenmp"], is_python_module=self.python_module, verbose=False)
        except Exception as e:  # noqa: BLE001 - no compiler, no ninja, a build error: PyTorch's path instead
            return f"building {self.source.name} failed: {type(e).__name__}: {str(e).strip()[-300:]}"
        if self.on_load is not None:
            self.on_load()
        return None

    def available(self) -> bool:
        reason = self.unavailable_reason()
        if reason is not None:
            self._log_once(reason)
        return reason is None

    @functools.cache  # noqa: B019 - one entry per (kernel, reason) for the process's life, as intended
    def _log_once(self, reason: str) -> None:
        log.info("%s unavailable (%s): %s", self.what, reason, self.fallback)
