"""``graphopt.runtime.blas``: jobs side by side give the numbers of jobs one after another."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from graphopt.prune.scores import _obs_greedy
from graphopt.runtime.blas import on_one_blas_thread, on_one_blas_thread_each


def _problem(seed: int, k: int = 96, n: int = 40):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.standard_normal((400, k)), np.ones((400, 1))], axis=1)
    return x.T @ x, rng.standard_normal((k + 1, n)), np.arange(k)[:, None]


def test_jobs_side_by_side_equal_the_jobs_in_turn():
    """Greedy OBS scores of four sites run two at a time are bitwise those run in turn, in
    the jobs' order."""
    problems = [_problem(s) for s in range(4)]
    jobs = [lambda p=p: _obs_greedy(p[0], p[1], p[2], 0.1, 80) for p in problems]
    in_turn = [on_one_blas_thread(job)() for job in jobs]
    side = on_one_blas_thread_each(jobs)
    assert len(side) == 4
    for a, b in zip(in_turn, side):
        assert np.array_equal(a, b)


def test_jobs_run_in_other_threads_and_errors_reach_the_caller():
    """A job's exception is raised by the call; the jobs ran off the calling thread."""
    seen = []

    def where():
        seen.append(threading.current_thread().name)
        return 1

    def fails():
        raise ValueError("job failed")

    with pytest.raises(ValueError, match="job failed"):
        on_one_blas_thread_each([where, fails, where])
    assert on_one_blas_thread_each([]) == []
    from graphopt.runtime.blas import workers

    if workers() > 1:
        assert all(name.startswith("graphopt-blas") for name in seen)
