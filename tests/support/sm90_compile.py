"""Compile Triton kernels for an H100 (sm_90) without a GPU.

The interpreter runs kernels on CPU but neither lowers them nor runs bfloat16 dots correctly, so
shape and dtype rules of the real compiler (tl.dot's minimum sizes, operand dtypes, precision
modes) would first show on a lent device. Triton's own ptxas lowers them here instead. It runs in
a child process: the test process has TRITON_INTERPRET set, which makes its kernels interpreted
functions that cannot be compiled.
"""

from __future__ import annotations

import os
import subprocess
import sys

_PRELUDE = '''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def compile_for_sm90(fn, signature, constexprs, **options):
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", 90, 32), options=options)
    assert kernel.asm["ptx"], fn.__name__
'''


def compile_for_sm90_in_child(script: str, cache_dir) -> None:
    """Run `script` (which calls compile_for_sm90(kernel, signature, constexprs, **options)) in a
    fresh interpreter; fail with the compiler's error if any kernel does not lower."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache_dir)
    done = subprocess.run([sys.executable, "-c", _PRELUDE + script + '\nprint("compiled")'], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
