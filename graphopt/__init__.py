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
from graphopt.core.manager import (  # noqa: E402
    Context,
    Pass,
    PassManager,
    PassResult,
    Report,
    Skip,
    register,
)

# Imported eagerly: these functions share their module's name, and importing the submodule
# anywhere would otherwise rebind ``graphopt.validate`` to the module, shadowing the lazy
# attribute below.
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
