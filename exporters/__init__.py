"""Exporters from training frameworks to ONNX (needs the ``torch`` extra).

``export`` and ``export_hf`` live in ``graphopt.exporters.torch_export``; they are loaded on
first use, so importing this package does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "export": "graphopt.exporters.torch_export",
    "export_hf": "graphopt.exporters.torch_export",
    "EXPORTERS": "graphopt.exporters.torch_export",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'graphopt.exporters' has no attribute {name!r}")


__all__ = ["EXPORTERS", "export", "export_hf"]
