"""Pruning machinery under the passes: reconstruction, data-aware importance, budgets."""
