"""The seeded mutation fuzzer (``graphopt.fuzzing``) in CI: bounded, reproducible.

``GRAPHOPT_FUZZ_CASES`` (default 100) sets the number of cases, ``GRAPHOPT_FUZZ_SEED`` the
first seed; ``python benchmarks/fuzz_lossless.py --cases 600`` runs the long campaign over
the PP-OCR files and the onnx wheel's light models too. Every case must end ok, refused
with one clean line (a broken input), or unverified with nothing written; never a wrong
output, a rollback of a valid input, a traceback, a hang or a modified input.
"""

from __future__ import annotations

import os

from graphopt.fuzzing import campaign

CASES = int(os.environ.get("GRAPHOPT_FUZZ_CASES", "100"))
SEED = int(os.environ.get("GRAPHOPT_FUZZ_SEED", "0"))


def test_fuzz_campaign_has_no_failures():
    """CASES seeded cases over tiny CNNs with dynamic H/W, valid and breaking mutations,
    through the CLI: no failure of any kind, and both kinds of input were exercised."""
    tally = campaign(CASES, SEED)
    failures = [(c.seed, c.base, c.mutations, c.args, c.outcome, c.detail)
                for c in tally.failures]
    assert not failures, failures
    counts = tally.counts
    assert counts["ok"] >= CASES // 2, dict(counts)
    assert counts["refused"] > 0, dict(counts)
