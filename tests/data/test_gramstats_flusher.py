"""``GramStats`` with a ``flusher``: the products run on another thread, the sums are the
same bit for bit as those made in line, snapshots included."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from graphopt.data.gramstats import GramStats


def _fill(flusher, single: bool):
    rng = np.random.default_rng(3)
    k, widths = 40, [6, 5]
    st = GramStats(np.zeros((k + 1, k + 1)), np.zeros((k + 1, sum(widths))), single=single,
                   widths=widths, flusher=flusher)
    snap = None
    for i in range(12):  # 12 × 70 rows: several products of 256+ rows, and a rest
        x = rng.standard_normal((70, k)).astype(np.float32)
        t = [rng.standard_normal((70, w)).astype(np.float32) for w in widths]
        w = rng.uniform(0.5, 2.0, 70) if i % 2 else None
        st.add(x, t, w)
        if i == 7:
            snap = st.snapshot()
    return st, snap


def test_sums_on_a_flusher_equal_the_sums_in_line():
    """xtx, xty, tt and a snapshot after 8 of 12 batches: equal, float32 and float64."""
    for single in (False, True):
        inline, inline_snap = _fill(None, single)
        with ThreadPoolExecutor(1) as pool:
            threaded, threaded_snap = _fill(pool, single)
            assert np.array_equal(inline.xtx, threaded.xtx)
            assert np.array_equal(inline.xty, threaded.xty)
        assert inline.tt == threaded.tt and inline.n == threaded.n == 840
        assert np.array_equal(inline_snap.xtx, threaded_snap.xtx)
        assert np.array_equal(inline_snap.xty, threaded_snap.xty)
