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

``on_one_blas_thread_each(jobs)``: independent jobs (the scores of several sites, say) run
at once in up to ``workers()`` Python threads, each job's BLAS on one thread. What one
thread of BLAS leaves idle on a quiet machine is then used, and the numbers are those of
the jobs run one after the other: OpenBLAS' rounding depends on its thread count (a
K = 3073 Cholesky inverse differs by ~1e-15 relative between one and two threads, a
product by ~1e-13), never on how many other calls run beside it. The BLAS libraries
(numpy's and scipy's: two copies of OpenBLAS, each with its own count) are held at one
thread by the calling thread for the whole batch, so no job's own ``one_blas_thread``
can hand another job a different count when it ends.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any


def one_blas_thread():
    """A context running numpy's BLAS on one thread (module doc)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    try:  # scipy's own OpenBLAS, loaded before the limit so that the limit reaches it
        import scipy.linalg  # noqa: F401
    except ImportError:
        pass
    return threadpool_limits(1, user_api="blas")


def on_one_blas_thread(fn):
    """``fn`` run inside ``one_blas_thread()``."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with one_blas_thread():
            return fn(*args, **kwargs)
    return wrapped


def workers() -> int:
    """Python threads ``on_one_blas_thread_each`` uses: the cores this process may run
    on, at most 2 (each job holds its own inverse: memory grows with them)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(2, cores))


def on_one_blas_thread_each(jobs: Sequence[Callable[[], Any]]) -> list:
    """The results of ``jobs`` (callables), in their order, each run with BLAS on one
    thread, up to ``workers()`` at a time (module doc). A job's exception is raised here
    once the jobs started have ended."""
    jobs = list(jobs)
    count = min(workers(), len(jobs))
    with one_blas_thread():
        if count <= 1:
            return [job() for job in jobs]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(count, thread_name_prefix="graphopt-blas") as pool:
            futures = [pool.submit(job) for job in jobs]
            return [f.result() for f in futures]
