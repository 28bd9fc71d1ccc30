"""graphopt: a post-training optimizer for ONNX models.

The pieces the CLI is made of, importable for export pipelines::

    import graphopt
    model, report = graphopt.optimize("model.onnx", ["cleanup", "fold-batchnorm"])
    graphopt.save(model, "model.opt.onnx")
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    ConfigError,
    ExternalDataError,
    GraphoptError,
    InputSpecError,
    ModelFormatError,
    ModelNotFoundError,
    PassError,
    ProviderError,
    UnsafePathError,
    UnsupportedModelError,
)
from graphopt.ir.model import load, save  # noqa: E402
from graphopt.core.contract import Context, Pass, PassResult, Skip  # noqa: E402
from graphopt.core.manager import PassManager  # noqa: E402
from graphopt.core.registry import register  # noqa: E402
from graphopt.core.report import Report  # noqa: E402

from graphopt.runtime.benchmark import benchmark  # noqa: E402
from graphopt.runtime.validate import validate  # noqa: E402

_LAZY = {
    "optimize": ("graphopt.api", "optimize"),
    "load_recipe": ("graphopt.core.recipe", "load_recipe"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'graphopt' has no attribute {name!r}")


__all__ = [
    "ConfigError", "Context", "ExternalDataError", "GraphoptError", "InputSpecError",
    "ModelFormatError", "ModelNotFoundError", "Pass", "PassError", "PassManager", "PassResult",
    "ProviderError", "Report", "Skip", "UnsafePathError", "UnsupportedModelError", "benchmark",
    "load", "load_recipe", "optimize", "register", "save", "validate",
]

# The built-in passes register themselves on import; the registry (below them) never imports
# them, so the package that users import does.
import graphopt.passes  # noqa: E402,F401
