"""Mutation check: disable each of the strongest mechanisms in turn and show the tests that claim
it fail (and pass without the mutation). Not collected by pytest (no test_ prefix); run it by hand:

    PYTHONPATH=$PWD/src python tests/support/mutations.py [name ...] [--baseline]

Each mutation is a few lines of Python run at interpreter start through a `sitecustomize`
module put first on PYTHONPATH, so it reaches the test process and every `lmserve serve` the
tests start (the server inherits the environment). The product's source is never edited.
Prints one line per mutation and test: KILLED (the test failed, as it must) or SURVIVED.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

MUTATIONS: dict[str, tuple[str, str, list[str]]] = {
    # name: (what is broken, the patch, the tests that must fail)
    "cow-shared-write": (
        "copy-on-write off: a choice writes into the partial block its siblings share",
        "import lmserve.engine.block_manager as m\n"
        "m.BlockManager._needs_copy_on_write = lambda self, seq, n: False\n",
        ["tests/engine/test_block_manager_invariants.py",
         "tests/engine/test_scheduling.py::test_n_choices_copy_on_write_keeps_every_choice_exact"],
    ),
    "cow-lost-copy": (
        "copy-on-write allocates the private block but never copies the shared one into it",
        "import lmserve.engine.block_manager as m\n"
        "_append = m.BlockManager.append_slots\n"
        "m.BlockManager.append_slots = lambda self, seq, n: (_append(self, seq, n), [])[1]\n",
        ["tests/engine/test_block_manager_invariants.py",
         "tests/engine/test_scheduling.py::test_n_choices_copy_on_write_keeps_every_choice_exact"],
    ),
    "grammar-mask-off": (
        "the structured-output mask is never applied to the logits",
        "import lmserve.engine.structured as m\n"
        "m.GrammarBackend.apply = lambda self, logits, matchers, rows: None\n",
        ["tests/engine/test_structured.py::test_json_schema_holds_under_sampling",
         "tests/engine/test_structured.py::test_json_object_with_n_choices"],
    ),
    "seed-ignored": (
        "the sampler's stream key ignores the request's seed (a fresh random key per sequence)",
        "import random\n"
        "import lmserve.engine.llm_engine as m\n"
        "m.stream_key = lambda seed, index: random.getrandbits(32)\n",
        ["tests/engine/test_sampling.py::test_same_seed_same_text_different_seed_different_text",
         "tests/engine/test_sampling.py::test_seeded_request_is_independent_of_its_batch"],
    ),
    "seed-by-engine-step": (
        "draws keyed by how many sampling steps the engine ran instead of the choice's output position "
        "(a fixed seed still repeats on an idle engine; preemption or other requests change the draws)",
        "import itertools\n"
        "import lmserve.engine.sampler as m\n"
        "_random = m.Sampler._sample_random\n"
        "_calls = itertools.count()\n"
        "class _AtStep:\n"
        "    def __init__(self, seq, step):\n"
        "        self._seq, self.num_output_tokens = seq, step\n"
        "    def __getattr__(self, name):\n"
        "        return getattr(self._seq, name)\n"
        "def _sample(logits, seqs, no_sync=False):\n"
        "    step = next(_calls)\n"
        "    return _random(logits, [_AtStep(s, step) for s in seqs], no_sync)\n"
        "m.Sampler._sample_random = staticmethod(_sample)\n",
        ["tests/engine/test_scheduling.py::test_seeded_sampling_and_grammar_state_survive_preemption"],
    ),
    "priority-ignored": (
        "the scheduler queues every request first come, first served: batch lines stay ahead of a "
        "later interactive request",
        "import lmserve.engine.scheduler as m\n"
        "m.Scheduler.add = lambda self, seq: self.waiting.append(seq)\n",
        ["tests/engine/test_scheduler_priority.py::test_waiting_interactive_requests_go_before_batch_ones",
         "tests/server/test_batch_api.py::test_interactive_request_goes_ahead_of_queued_batch_lines"],
    ),
    "ledger-not-written": (
        "the usage row of a finished request is never written",
        "import lmserve.platform.usage as m\n"
        "m.record = lambda db, entry: None\n",
        ["tests/platform/test_platform_store.py::test_200_concurrent_requests_leave_exact_ledger_and_balance",
         "tests/server/test_platform_api.py::test_the_default_server_meters_bootstrap_keys_in_sqlite"],
    ),
}


def run(tests: list[str], patch: str | None) -> tuple[int, float, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with tempfile.TemporaryDirectory(prefix="lmserve-mutation-") as inject:
        path = [str(ROOT / "src")]
        if patch is not None:
            Path(inject, "sitecustomize.py").write_text(patch)
            path.insert(0, inject)
        env["PYTHONPATH"] = os.pathsep.join(path + [p for p in [env.get("PYTHONPATH", "")] if p])
        started = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                           cwd=ROOT, env=env, capture_output=True, text=True)
        tail = [line for line in r.stdout.splitlines() if line.strip()][-1:] or ["(no output)"]
        return r.returncode, time.monotonic() - started, tail[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help=f"mutations to run (default: all): {', '.join(MUTATIONS)}")
    ap.add_argument("--baseline", action="store_true", help="also run each mutation's tests unmutated")
    args = ap.parse_args()
    survived = 0
    for name in args.names or list(MUTATIONS):
        what, patch, tests = MUTATIONS[name]
        print(f"{name}: {what}", flush=True)
        for target in tests:  # each claiming test on its own: every one must fail
            if args.baseline:
                rc, took, tail = run([target], None)
                print(f"    baseline {'pass' if rc == 0 else 'FAIL'} ({took:.0f} s) {target}: {tail}", flush=True)
            rc, took, tail = run([target], patch)
            verdict = "KILLED" if rc == 1 else ("SURVIVED" if rc == 0 else f"ERROR rc={rc}")
            survived += rc != 1
            print(f"    {verdict:8s} ({took:.0f} s) {target}: {tail}", flush=True)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
