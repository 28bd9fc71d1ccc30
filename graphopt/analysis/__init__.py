"""Analyses over a model: shapes, cost and (later) coupling and structure."""

from .cost import Cost, count_cost
from .shapes import infer_shapes, tensor_shapes

__all__ = ["Cost", "count_cost", "infer_shapes", "tensor_shapes"]
