"""max_difference: the manager's lossless comparison."""

import numpy as np

from graphopt.runtime.session import max_difference


def test_rounding_on_a_large_output_is_not_a_change():
    """fuzz seed 463: fold-batchnorm on an output reaching 3e5 moved an element that cancels
    to near zero by 0.34, float rounding at that scale: not a changed output."""
    ref = np.array([3.2e5, -1.5e5, 0.02], np.float32)
    got = ref + np.array([0.0, 0.0, 0.344], np.float32)
    worst, problem = max_difference({"y": ref}, {"y": got}, 1e-4, 1e-4)
    assert problem is None and abs(worst - 0.344) < 1e-3


def test_a_real_change_on_a_large_output_is_caught():
    """A change far above rounding (1% of the output's scale) is still a mismatch, and an
    exact comparison (rtol 0) stays exact."""
    ref = np.array([3.2e5, -1.5e5, 0.02], np.float32)
    got = ref + np.array([0.0, 0.0, 3.2e3], np.float32)
    assert max_difference({"y": ref}, {"y": got}, 1e-4, 1e-4)[1] is not None
    tiny = ref + np.array([0.0, 0.0, 0.01], np.float32)
    assert max_difference({"y": ref}, {"y": tiny}, 0.0, 0.0)[1] is not None
