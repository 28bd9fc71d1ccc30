"""The per-op coupling handlers, by family; importing this package registers them all
(``graphopt.analysis.registry`` is the mechanism they register with)."""

from graphopt.analysis.ops import (  # noqa: F401
    attention, elementwise, layout, quant, reshape, weights)
