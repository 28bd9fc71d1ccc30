"""Native TensorRT: build an engine from the ONNX model and time it (no ONNX Runtime).

Importable without TensorRT; what cannot run here comes back as a ``Skipped`` value with
the reason, never an ImportError:

1. ``import tensorrt`` fails -> ``Skipped("tensorrt package not installed; ...")``.
2. No library to hold device memory -> ``Skipped``. Device buffers come from the first of
   cuda-python (``cuda.bindings.runtime`` / ``cuda.cudart``), pycuda, or a CUDA build of
   torch that sees a GPU.
3. Outputs whose shape depends on the data (TensorRT reports ``-1`` after the input
   shapes are set) need an output allocator this timer does not have -> ``Skipped``.

The engine (TensorRT 10 API, with the 8.x explicit-batch flag when running on 8.x):

- ``OnnxParser`` parses the model (from bytes; over 2 GB from a temporary file with
  external data, via ``parse_from_file``); a parse failure is ``UnsupportedModelError``
  with TensorRT's first error.
- ``BuilderConfig``: ``BuilderFlag.FP16`` with ``fp16``, ``BuilderFlag.SPARSE_WEIGHTS``
  with ``sparse_weights`` (TensorRT then uses 2:4 sparse kernels where weights allow and it
  pays), an optional workspace limit.
- Inputs with dynamic dims get one optimization profile: min = opt = max = the benchmark
  shape (from ``input_shapes``, see ``graphopt.ir.inputs``) unless ``profiles`` gives
  ``(min, opt, max)`` for an input.
- ``build_serialized_network`` -> plan; ``Runtime.deserialize_cuda_engine``; one
  execution context per engine; I/O by tensor name (``set_input_shape``,
  ``set_tensor_address``) and ``execute_async_v3`` on a stream, synchronized per run.

Timing and A/B interleaving are those of ``graphopt.benchmark`` (ABBA rounds, median,
p90, ``ratio = a / b``). Inputs are copied to the device once; timings are the engine's
execution only.
"""

from __future__ import annotations

import functools
import logging
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graphopt.runtime.benchmark import (
    BenchmarkResult,
    Feed,
    LatencyStats,
    Timer,
    check_timing_args,
    interleaved_times,
    pick_feed,
)
from graphopt.errors import ConfigError, GraphoptError, UnsupportedModelError, check_known
from graphopt.ir.inputs import Shape, resolve_shapes
from graphopt.ir.model import (
    _EXTERNAL_THRESHOLD,
    ModelLike,
    as_model,
    save,
    serialized,
    tensor_bytes,
)
from graphopt.runtime.validate import check_same_inputs

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install graphopt[tensorrt] on a machine with an NVIDIA GPU"
DEVICE_HINT = (
    "install cuda-python (pip install cuda-python), pycuda, or a CUDA build of torch"
)

Profile = tuple[Shape, Shape, Shape]


@dataclass(frozen=True)
class Skipped:
    """Native TensorRT did not run here; ``reason`` says why and what to install."""

    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"skipped": self.reason}

    def __str__(self) -> str:
        return f"native TensorRT skipped: {self.reason}"


def import_tensorrt():
    """``(module, None)`` or ``(None, reason)``."""
    try:
        import tensorrt
    except ImportError:
        return None, f"tensorrt package not installed; {INSTALL_HINT}"
    except OSError as exc:  # the wheel is there but libnvinfer or CUDA is not
        return None, f"tensorrt package cannot load its libraries ({exc}); {INSTALL_HINT}"
    return tensorrt, None


def tensorrt_status() -> Skipped | None:
    """None when the ``tensorrt`` package imports, else why not."""
    _, reason = import_tensorrt()
    return Skipped(reason) if reason else None


# --------------------------------------------------------------------------- engine build


@functools.lru_cache(maxsize=1)
def _trt_logger(trt):
    """One logger for every builder/runtime (TensorRT treats it as a singleton), forwarding
    to Python logging; errors are also kept for the exception message."""

    levels = {
        trt.ILogger.Severity.INTERNAL_ERROR: logging.ERROR,
        trt.ILogger.Severity.ERROR: logging.ERROR,
        trt.ILogger.Severity.WARNING: logging.WARNING,
        trt.ILogger.Severity.INFO: logging.DEBUG,
        trt.ILogger.Severity.VERBOSE: logging.DEBUG,
    }

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            level = levels.get(severity, logging.INFO)
            if level >= logging.ERROR:
                self.errors.append(msg)
            logger.log(level, "tensorrt: %s", msg)

    return _Logger()


def _network_flags(trt) -> int:
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:  # 10.x is always explicit batch and deprecates the flag
        return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    return 0


def _parse(trt, parser, model: onnx.ModelProto, label: str) -> None:
    if tensor_bytes(model) > _EXTERNAL_THRESHOLD:
        with tempfile.TemporaryDirectory(prefix="graphopt-trt-") as tmp:
            path = Path(tmp) / "model.onnx"
            save(model, path, external_data=True)
            ok = parser.parse_from_file(str(path))
    else:
        ok = parser.parse(serialized(model))
    if not ok:
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        first = errors[0] if errors else "no detail"
        raise UnsupportedModelError(
            f"TensorRT cannot parse the {label}: {first} ({len(errors)} error(s); run with "
            "logging at DEBUG for TensorRT's log)"
        )


def build_engine(
    model: ModelLike,
    *,
    input_shapes: Mapping[str, Shape] | None = None,
    fp16: bool = False,
    sparse_weights: bool = False,
    workspace_mb: int | None = None,
    profiles: Mapping[str, Profile] | None = None,
    label: str = "model",
) -> bytes:
    """A serialized TensorRT engine (plan) for ``model``; see the module doc.

    Needs the ``tensorrt`` package (``GraphoptError`` with the install hint otherwise) and
    a GPU for the build itself.
    """
    trt, reason = import_tensorrt()
    if trt is None:
        raise GraphoptError(reason)
    if workspace_mb is not None and workspace_mb < 1:
        raise ConfigError(f"workspace_mb must be 1 or more, got {workspace_mb}")
    proto, label = as_model(model, label)
    shapes = resolve_shapes(proto, input_shapes)
    profiles = dict(profiles or {})
    check_known(profiles, shapes, "optimization profile for {unknown}, which are not model "
                "inputs (inputs: {known})")

    trt_logger = _trt_logger(trt)
    trt_logger.errors.clear()
    builder = trt.Builder(trt_logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, trt_logger)
    _parse(trt, parser, proto, label)

    config = builder.create_builder_config()
    if workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if fp16:
        if not builder.platform_has_fast_fp16:
            logger.warning("this GPU has no fast FP16; TensorRT may keep FP32 kernels")
        config.set_flag(trt.BuilderFlag.FP16)
    if sparse_weights:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)

    profile = builder.create_optimization_profile()
    needs_profile = False
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        name = tensor.name
        dims = tuple(tensor.shape)
        if name not in profiles and all(d >= 0 for d in dims):
            continue
        low, opt, high = profiles.get(name) or (shapes[name],) * 3
        profile.set_shape(name, tuple(low), tuple(opt), tuple(high))
        needs_profile = True
    if needs_profile:
        config.add_optimization_profile(profile)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        detail = trt_logger.errors[-1] if trt_logger.errors else "see TensorRT's log"
        raise GraphoptError(f"TensorRT could not build an engine for the {label}: {detail}")
    logger.info("built a TensorRT engine for %s (%d bytes)", label, plan.nbytes)
    return bytes(plan)


# --------------------------------------------------------------------------- device memory


class _CudaPython:
    name = "cuda-python"

    def __init__(self):
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart
        self.rt = cudart
        count = self._check(cudart.cudaGetDeviceCount())
        if not count:
            raise RuntimeError("no CUDA device")
        self.stream = self._check(cudart.cudaStreamCreate())
        self.pointers: list[int] = []

    def _check(self, result):
        err, *rest = result
        if err != self.rt.cudaError_t.cudaSuccess:
            raise RuntimeError(f"CUDA error {err}")
        return rest[0] if rest else None

    def alloc(self, nbytes: int) -> int:
        ptr = self._check(self.rt.cudaMalloc(max(nbytes, 1)))
        self.pointers.append(ptr)
        return int(ptr)

    def upload(self, array: np.ndarray) -> int:
        ptr = self.alloc(array.nbytes)
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self.rt.cudaMemcpy(ptr, array.ctypes.data, array.nbytes, kind))
        return ptr

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    def synchronize(self) -> None:
        self._check(self.rt.cudaStreamSynchronize(self.stream))

    def close(self) -> None:
        for ptr in self.pointers:
            self.rt.cudaFree(ptr)
        self.pointers.clear()
        self.rt.cudaStreamDestroy(self.stream)


class _PyCuda:
    name = "pycuda"

    def __init__(self):
        import pycuda.driver as cuda

        cuda.init()
        if cuda.Device.count() == 0:
            raise RuntimeError("no CUDA device")
        self.cuda = cuda
        # The primary context is the one the CUDA runtime (and so TensorRT) uses.
        self.context = cuda.Device(0).retain_primary_context()
        self.context.push()
        self.stream = cuda.Stream()
        self.buffers: list[Any] = []

    def alloc(self, nbytes: int) -> int:
        buf = self.cuda.mem_alloc(max(nbytes, 1))
        self.buffers.append(buf)
        return int(buf)

    def upload(self, array: np.ndarray) -> int:
        ptr = self.alloc(array.nbytes)
        self.cuda.memcpy_htod(self.buffers[-1], array)
        return ptr

    @property
    def stream_handle(self) -> int:
        return int(self.stream.handle)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def close(self) -> None:
        for buf in self.buffers:
            buf.free()
        self.buffers.clear()
        self.context.pop()


class _TorchCuda:
    name = "torch.cuda"

    def __init__(self):
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device (or is a CPU-only build)")
        self.torch = torch
        self.stream = torch.cuda.Stream()
        self.tensors: list[Any] = []

    def alloc(self, nbytes: int) -> int:
        t = self.torch.empty(max(nbytes, 1), dtype=self.torch.uint8, device="cuda")
        self.tensors.append(t)
        return int(t.data_ptr())

    def upload(self, array: np.ndarray) -> int:
        flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        t = self.torch.from_numpy(flat.copy()).to("cuda")
        self.tensors.append(t)
        self.torch.cuda.synchronize()  # the copy ran on the default stream
        return int(t.data_ptr())

    @property
    def stream_handle(self) -> int:
        return int(self.stream.cuda_stream)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def close(self) -> None:
        self.tensors.clear()


_BACKENDS = (_CudaPython, _PyCuda, _TorchCuda)


def pick_device() -> tuple[Any | None, str | None]:
    """``(backend, None)`` from the first device-memory library that works, else
    ``(None, reason)`` naming what was tried."""
    tried = []
    for backend in _BACKENDS:
        try:
            return backend(), None
        except ImportError:
            tried.append(f"{backend.name}: not installed")
        except Exception as exc:  # noqa: BLE001 - driver errors come in many types
            tried.append(f"{backend.name}: {exc}")
    return None, f"no CUDA device memory ({'; '.join(tried)}); {DEVICE_HINT}"


# --------------------------------------------------------------------------- timing


class _EngineRunner:
    """One deserialized engine with its context, device buffers and a run()."""

    def __init__(self, trt, plan: bytes, feed: Feed, device, label: str):
        self.label = label
        runtime = trt.Runtime(_trt_logger(trt))
        self.engine = runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise GraphoptError(f"TensorRT could not load the engine built for the {label}")
        self.runtime = runtime  # the engine must not outlive its runtime
        self.context = self.engine.create_execution_context()
        self.device = device
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.unknown_shape: str | None = None
        for name in inputs:
            if name not in feed:
                raise GraphoptError(f"the TensorRT engine for the {label} wants input {name}")
            if not self.context.set_input_shape(name, tuple(np.shape(feed[name]))):
                raise GraphoptError(
                    f"TensorRT refused shape {np.shape(feed[name])} for input {name} of the "
                    f"{label}; it must lie inside the optimization profile"
                )
        for name in names:
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            if name in inputs:
                array = np.ascontiguousarray(np.asarray(feed[name]).astype(dtype, copy=False))
                ptr = device.upload(array)
            else:
                shape = tuple(self.context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    self.unknown_shape = name
                    return
                ptr = device.alloc(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
            self.context.set_tensor_address(name, ptr)

    def run(self) -> None:
        if not self.context.execute_async_v3(self.device.stream_handle):
            raise GraphoptError(f"TensorRT failed to execute the engine for the {self.label}")
        self.device.synchronize()


def benchmark_tensorrt(
    model: ModelLike,
    *,
    vs: ModelLike | None = None,
    input_shapes: Mapping[str, Shape] | None = None,
    feeds: Sequence[Feed] | Feed | None = None,
    fp16: bool = False,
    sparse_weights: bool = False,
    workspace_mb: int | None = None,
    profiles: Mapping[str, Profile] | None = None,
    warmup: int = 5,
    rounds: int = 20,
    min_time: float = 1.0,
    seed: int = 0,
    timer: Timer = time.perf_counter,
) -> BenchmarkResult | Skipped:
    """Time ``model`` (A) and ``vs`` (B) as native TensorRT engines, or say why not.

    Same conventions as ``graphopt.runtime.benchmark.benchmark``: ``ratio = a / b`` medians
    (below 1: A is faster), ABBA-interleaved rounds. Returns ``Skipped`` when TensorRT or
    device memory is missing here; model problems raise ``GraphoptError`` subclasses.
    """
    check_timing_args(warmup, rounds, min_time)
    trt, reason = import_tensorrt()
    if trt is None:
        return Skipped(reason)
    models = [as_model(model, "model")]
    if vs is not None:
        models.append(as_model(vs, "vs"))
        check_same_inputs(models[0][0], models[1][0], "model", "--vs model")
    feed, shapes = pick_feed(models[0][0], feeds, input_shapes, seed)
    device, reason = pick_device()
    if device is None:
        return Skipped(reason)
    try:
        runners: list[_EngineRunner] = []
        for proto, label in models:
            plan = build_engine(proto, input_shapes=shapes, fp16=fp16,
                                sparse_weights=sparse_weights, workspace_mb=workspace_mb,
                                profiles=profiles, label=label)
            runner = _EngineRunner(trt, plan, feed, device, label)
            if runner.unknown_shape:
                return Skipped(
                    f"output {runner.unknown_shape} of the {label} has a data-dependent "
                    "shape; timing it needs an output allocator, which graphopt does not "
                    "provide yet"
                )
            runners.append(runner)
        runs: list[Callable[[], Any]] = [r.run for r in runners]
        for run in runs:
            run()
        times = interleaved_times(runs, warmup=warmup, rounds=rounds, min_time=min_time,
                                  timer=timer)
    finally:
        device.close()
    stats = [LatencyStats.from_seconds(label, t) for (_, label), t in zip(models, times)]
    notes = ["inputs placed on the device once; timings are engine execution only"]
    if fp16:
        notes.append("FP16 enabled")
    if sparse_weights:
        notes.append("sparse weights enabled")
    return BenchmarkResult.from_rounds(
        stats, times, provider="tensorrt-native",
        session_providers=[f"tensorrt {trt.__version__}", device.name], threads=None,
        shapes=shapes, warmup=warmup, notes=notes)

