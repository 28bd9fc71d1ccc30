"""Execution providers: names, options, and sessions that really run where asked.

Short names are the interface (``cpu``, ``cuda``, ``tensorrt``, ``auto``); ORT names stay
inside this module.

1. ``onnxruntime-gpu`` lists CUDA and TensorRT in ``get_available_providers()`` even on a
   machine without a GPU, and a session asked for them quietly falls back to CPU. So a
   provider counts as working only when a session was created with it and
   ``session.get_providers()`` names it first.
2. An explicit provider that is not listed, fails to start, or falls back raises
   ``ProviderError``: one line naming the providers that do work.
3. ``auto`` tries TensorRT, then CUDA, then CPU, and moves on silently (logged at INFO).
4. TensorRT sessions list the CUDA EP after the TensorRT EP (ORT's recommendation: nodes
   TensorRT cannot take run on CUDA rather than CPU). TensorRT options: FP16
   (``trt_fp16_enable``), an engine cache folder (``trt_engine_cache_enable``,
   ``trt_engine_cache_path``) and sparse weights (``trt_sparsity_enable``: TensorRT may
   pick 2:4 sparse tactics for weights in that pattern).
5. Sessions are created with ORT's own constructor fallback disabled, so a failing EP is an
   exception we can report instead of a banner printed to stdout.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from graphopt.errors import ConfigError, ModelFormatError, ProviderError
from graphopt.runtime.session import Runnable, ort_session_for, session_source

logger = logging.getLogger(__name__)

ORT_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
SHORT_NAMES = {v: k for k, v in ORT_NAMES.items()}
PROVIDER_CHOICES = ("cpu", "cuda", "tensorrt", "auto")
AUTO_ORDER = ("tensorrt", "cuda", "cpu")

OrtProvider = str | tuple[str, dict[str, Any]]


@dataclass(frozen=True)
class ProviderOptions:
    """Session settings shared by every provider.

    ``threads`` sets ``intra_op_num_threads`` (None: ORT's default, one per core);
    ``trt_fp16``, ``trt_cache`` (a folder, created if missing) and ``trt_sparse`` apply to
    TensorRT only.
    """

    threads: int | None = None
    trt_fp16: bool = False
    trt_cache: str | None = None
    trt_sparse: bool = False
    device_id: int = 0

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be 1 or more, got {self.threads}")
        if self.device_id < 0:
            raise ConfigError(f"device_id must be 0 or more, got {self.device_id}")


def check_provider_name(name: str) -> str:
    key = name.lower()
    if key not in PROVIDER_CHOICES:
        raise ConfigError(
            f"unknown provider '{name}'; choose one of {', '.join(PROVIDER_CHOICES)}"
        )
    return key


def listed_providers() -> list[str]:
    """Short names of the providers this onnxruntime build lists (not necessarily working)."""
    import onnxruntime as ort

    listed = set(ort.get_available_providers())
    return [short for short in ("tensorrt", "cuda", "cpu") if ORT_NAMES[short] in listed]


def ort_providers(name: str, options: ProviderOptions | None = None) -> list[OrtProvider]:
    """The ORT ``providers`` list for one concrete short name, best first, CPU last."""
    options = options or ProviderOptions()
    cuda = (ORT_NAMES["cuda"], {"device_id": str(options.device_id)})
    if name == "cpu":
        return [ORT_NAMES["cpu"]]
    if name == "cuda":
        return [cuda, ORT_NAMES["cpu"]]
    if name == "tensorrt":
        trt: dict[str, Any] = {"device_id": str(options.device_id)}
        if options.trt_fp16:
            trt["trt_fp16_enable"] = "True"
        if options.trt_sparse:
            trt["trt_sparsity_enable"] = "True"
        if options.trt_cache:
            folder = Path(options.trt_cache)
            folder.mkdir(parents=True, exist_ok=True)
            trt["trt_engine_cache_enable"] = "True"
            trt["trt_engine_cache_path"] = str(folder)
        return [(ORT_NAMES["tensorrt"], trt), cuda, ORT_NAMES["cpu"]]
    raise ConfigError(f"unknown provider '{name}'; choose one of {', '.join(ORT_NAMES)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


def _cpu_session(data: bytes | str, threads: int | None, label: str):
    try:
        return ort_session_for(data, ort_providers("cpu"), threads)
    except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types
        raise ModelFormatError(
            f"onnxruntime cannot load the {label}: {_first_line(exc)} "
            "(run `graphopt inspect` on it, or check the pass that produced it)"
        ) from exc


def _try_provider(data: bytes | str, name: str, options: ProviderOptions):
    """(session, None) when ``name`` really runs, else (None, reason)."""
    if name == "cpu":
        return _cpu_session(data, options.threads, "model"), None
    if name not in listed_providers():
        return None, "not in this onnxruntime build"
    try:
        session = ort_session_for(data, ort_providers(name, options), options.threads)
    except Exception as exc:  # noqa: BLE001 - EP load/device errors come as many types
        return None, _first_line(exc)
    got = session.get_providers()
    if not got or got[0] != ORT_NAMES[name]:
        return None, f"the session fell back to {', '.join(SHORT_NAMES.get(p, p) for p in got)}"
    return session, None


@functools.lru_cache(maxsize=1)
def working_providers() -> tuple[str, ...]:
    """Short names of the listed providers that start a session on this machine (probed
    once with a one-node model)."""
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    graph = onnx.helper.make_graph(
        [node], "probe",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    probe = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    probe.ir_version = 7
    data = probe.SerializeToString()
    working = []
    for name in listed_providers():
        session, _ = _try_provider(data, name, ProviderOptions())
        if session is not None:
            working.append(name)
    return tuple(working)


def create_session(
    model: Runnable,
    provider: str = "cpu",
    options: ProviderOptions | None = None,
    *,
    label: str = "model",
):
    """``(session, short_name)`` on ``provider`` (``cpu|cuda|tensorrt|auto``).

    ``model``: a ModelProto, or a model file's path (onnxruntime reads its external data;
    see ``runtime.session.session_source``). A model ORT refuses raises
    ``ModelFormatError`` (checked on CPU, so a broken model is never reported as a missing
    GPU); an explicit provider that does not run raises ``ProviderError``.
    """
    options = options or ProviderOptions()
    name = check_provider_name(provider)
    with session_source(model) as data:
        return _first_working(data, name, options, label)


def _first_working(data: bytes | str, name: str, options: ProviderOptions, label: str):
    candidates = AUTO_ORDER if name == "auto" else (name,)
    for candidate in candidates:
        if candidate == "cpu":
            return _cpu_session(data, options.threads, label), "cpu"
        session, reason = _try_provider(data, candidate, options)
        if session is not None:
            return session, candidate
        if name == "auto":
            logger.info("provider %s not used: %s", candidate, reason)
            continue
        _cpu_session(data, options.threads, label)  # a model error outranks a provider error
        raise ProviderError(_unavailable_message(candidate, reason))
    raise AssertionError("unreachable: auto always ends with cpu")


def _unavailable_message(name: str, reason: str | None) -> str:
    import onnxruntime as ort

    listed = listed_providers()
    if name not in listed:
        return (
            f"provider '{name}' ({ORT_NAMES[name]}) is not available: onnxruntime "
            f"{ort.__version__} here offers {', '.join(listed)}; for cuda/tensorrt install graphopt[gpu] on a machine with "
            "an NVIDIA GPU, or use --provider cpu/auto"
        )
    working = [w for w in working_providers() if w != name]
    return (
        f"provider '{name}' ({ORT_NAMES[name]}) is listed by onnxruntime but does not run "
        f"here ({reason}); "
        f"working: {', '.join(working) or 'none'}; check the GPU, driver and CUDA/TensorRT "
        "libraries, or use --provider auto"
    )


def resolve_ort_providers(providers: Sequence[OrtProvider] | str) -> list[OrtProvider]:
    """Accept short names (``"cpu"``, ``["cuda"]``) as well as ORT names/tuples."""
    if isinstance(providers, str):
        providers = [providers]
    out: list[OrtProvider] = []
    for p in providers:
        if isinstance(p, str) and p.lower() in ORT_NAMES:
            out.extend(x for x in ort_providers(p.lower()) if x not in out)
        else:
            out.append(p)
    return out
