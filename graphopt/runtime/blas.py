"""How many threads numpy's BLAS/LAPACK get for the factorizations graphopt runs.

``one_blas_thread()``: a context in which BLAS runs on one thread (threadpoolctl; a no-op
without it). For factorizations, inverses and the many small products of a greedy OBS on a
few thousand columns: OpenBLAS' threads wait on each other at every block, and on a
shared machine (other processes holding the cores) that wait is most of the time. Measured
on this project's 2-vCPU machine at load 5.5, K = 3073 (CPU / wall, two threads → one):
Cholesky inverse (potrf+potri) 2.0–7.7 s / 3.3–11 s → 1.0 s / 1.4 s; a greedy OBS of 1536
units 2.1–2.6 s / 3.2–3.9 s → 0.7 s / 1.0 s; a 1537² solve with 768 right-hand sides
0.41 s / 0.6 s → 0.2 s / 0.3 s. The large Gram products (syrk) gain nothing from one
thread there (0.70 / 1.03 s either way) and are left to BLAS' default. (``sparsify``'s
Cholesky found the same, 10× slower threaded on a busy machine.)
"""

from __future__ import annotations

import contextlib
import functools


def one_blas_thread():
    """A context running numpy's BLAS on one thread (module doc)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def on_one_blas_thread(fn):
    """``fn`` run inside ``one_blas_thread()``."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with one_blas_thread():
            return fn(*args, **kwargs)
    return wrapped
