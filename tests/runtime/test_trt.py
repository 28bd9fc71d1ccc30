"""graphopt.runtime.trt: native TensorRT skips cleanly here, and its engine/timing code is exercised
against a small fake of the ``tensorrt`` API (TensorRT itself cannot be installed here)."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import onnx
import pytest
from onnx import helper

from graphopt.runtime import trt as trt_mod
from graphopt.errors import ConfigError, GraphoptError, UnsupportedModelError
from graphopt.testing import make_model
from graphopt.runtime.trt import (
    Skipped,
    benchmark_tensorrt,
    build_engine,
    pick_device,
    tensorrt_status,
)


def _model(batch: int | str = "batch", op: str = "Relu"):
    """x[batch, 8] -> MatMul -> op -> y[batch, 4]."""
    w = np.ones((8, 4), np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node(op, ["h"], ["y"])]
    return make_model(nodes, {"x": [batch, 8]}, ["y"], {"W": w})


# --------------------------------------------------------------------------- a fake tensorrt


def _fake_tensorrt(log: list, *, dynamic_output: bool = False) -> types.ModuleType:
    """Just the API surface graphopt.runtime.trt uses; records what it was asked to do in ``log``."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0"

    class ILogger:
        Severity = types.SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3,
                                         VERBOSE=4)

        def __init__(self):
            pass

    trt.ILogger = ILogger
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.BuilderFlag = types.SimpleNamespace(FP16="fp16", SPARSE_WEIGHTS="sparse_weights")
    trt.TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")
    trt.nptype = lambda dtype: dtype

    class Tensor:
        def __init__(self, name, shape):
            self.name, self.shape = name, shape

    class Network:
        def __init__(self):
            self.inputs, self.outputs = [], []

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    def dims(vi):
        return tuple(d.dim_value if d.HasField("dim_value") else -1
                     for d in vi.type.tensor_type.shape.dim)

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.errors = network, []

        def parse(self, data):
            model = onnx.ModelProto.FromString(data)
            bad = [n.op_type for n in model.graph.node if n.op_type == "Celu"]
            if bad:
                self.errors = [f"In node 1 (Celu): UNSUPPORTED_NODE: no importer for {bad[0]}"]
                return False
            inits = {i.name for i in model.graph.initializer}
            self.network.inputs = [Tensor(vi.name, dims(vi)) for vi in model.graph.input
                                   if vi.name not in inits]
            self.network.outputs = [Tensor(vi.name, dims(vi)) for vi in model.graph.output]
            return True

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

    class Profile:
        def set_shape(self, name, low, opt, high):
            log.append(("profile", name, low, opt, high))

    class Config:
        def set_flag(self, flag):
            log.append(("flag", flag))

        def set_memory_pool_limit(self, pool, size):
            log.append(("pool", pool, size))

        def add_optimization_profile(self, profile):
            log.append(("add_profile",))

    class Plan:
        def __init__(self, data):
            self.data = data
            self.nbytes = len(data)

        def __bytes__(self):
            return self.data

    class Builder:
        platform_has_fast_fp16 = True

        def __init__(self, logger):
            pass

        def create_network(self, flags):
            log.append(("network_flags", flags))
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            spec = {"inputs": [[t.name, list(t.shape)] for t in network.inputs],
                    "outputs": [[t.name, list(t.shape)] for t in network.outputs]}
            return Plan(json.dumps(spec).encode())

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes = engine, {}

        def set_input_shape(self, name, shape):
            log.append(("input_shape", name, tuple(shape)))
            self.shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            if dynamic_output:
                return (-1, 4)
            batch = next(iter(self.shapes.values()))[0]
            return tuple(batch if d < 0 else d for d in self.engine.shapes[name])

        def set_tensor_address(self, name, ptr):
            log.append(("address", name, ptr))

        def execute_async_v3(self, stream):
            log.append(("execute", self.engine.label, stream))
            return True

    class Engine:
        def __init__(self, spec):
            self.inputs = [n for n, _ in spec["inputs"]]
            self.names = self.inputs + [n for n, _ in spec["outputs"]]
            self.shapes = {n: s for n, s in spec["inputs"] + spec["outputs"]}
            self.label = None

        @property
        def num_io_tensors(self):
            return len(self.names)

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return "input" if name in self.inputs else "output"

        def get_tensor_dtype(self, name):
            return np.float32

        def create_execution_context(self):
            return Context(self)

    engines = []

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, plan):
            engine = Engine(json.loads(bytes(plan)))
            engine.label = "AB"[len(engines) % 2]
            engines.append(engine)
            return engine

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    return trt


class _FakeDevice:
    name = "fake-device"
    stream_handle = 7

    def __init__(self, log):
        self.log, self.next_ptr, self.closed = log, 4096, False

    def alloc(self, nbytes):
        self.next_ptr += 4096
        return self.next_ptr

    def upload(self, array):
        self.log.append(("upload", array.dtype, array.shape))
        return self.alloc(array.nbytes)

    def synchronize(self):
        pass

    def close(self):
        self.closed = True


@pytest.fixture
def fake(monkeypatch):
    log: list = []
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(log))
    return log


# --------------------------------------------------------------------------- tests


def test_skipped_when_tensorrt_missing(monkeypatch):
    """Without the tensorrt package: a Skipped value with the install hint, no exception."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail
    result = benchmark_tensorrt(_model(), rounds=1, min_time=0.0)
    assert isinstance(result, Skipped)
    assert result.reason.startswith("tensorrt package not installed")
    assert "pip install graphopt[tensorrt] on a machine with an NVIDIA GPU" in result.reason
    assert result.to_dict() == {"skipped": result.reason}
    assert str(result).startswith("native TensorRT skipped: ")
    assert tensorrt_status() == result
    with pytest.raises(GraphoptError, match="tensorrt package not installed"):
        build_engine(_model())


def test_build_sets_flags_and_dynamic_profile(fake):
    """FP16 and sparse-weights flags are set; a dynamic input gets min=opt=max=its shape."""
    plan = build_engine(_model(), input_shapes={"x": (4, 8)}, fp16=True, sparse_weights=True,
                        workspace_mb=64)
    assert isinstance(plan, bytes)
    assert ("network_flags", 0) in fake  # TensorRT 10: explicit batch is implied
    assert ("flag", "fp16") in fake and ("flag", "sparse_weights") in fake
    assert ("pool", "workspace", 64 << 20) in fake
    assert ("profile", "x", (4, 8), (4, 8), (4, 8)) in fake and ("add_profile",) in fake


def test_static_model_needs_no_profile_unless_given(fake):
    """All-static inputs build without a profile; an explicit profile is applied as given."""
    build_engine(_model(batch=2))
    assert not any(entry[0] in ("profile", "add_profile") for entry in fake)
    build_engine(_model(), profiles={"x": ((1, 8), (8, 8), (32, 8))})
    assert ("profile", "x", (1, 8), (8, 8), (32, 8)) in fake
    with pytest.raises(ConfigError, match="not model inputs"):
        build_engine(_model(), profiles={"nope": ((1,), (1,), (1,))})


def test_parse_failure_is_unsupported_model(fake):
    """A model TensorRT's parser rejects: UnsupportedModelError with its first error."""
    with pytest.raises(UnsupportedModelError, match="cannot parse the model: In node 1 \\(Celu\\)"):
        build_engine(_model(op="Celu"))


def test_native_ab_benchmark_with_fake_device(fake, monkeypatch):
    """A/B through engines: shapes and addresses bound, ABBA executions, device released."""
    device = _FakeDevice(fake)
    monkeypatch.setattr(trt_mod, "pick_device", lambda: (device, None))
    result = benchmark_tensorrt(_model(), vs=_model(), input_shapes={"x": (3, 8)}, fp16=True,
                                warmup=1, rounds=3, min_time=0.0)
    assert result.provider == "tensorrt-native" and result.interleaved
    assert result.a.runs == result.b.runs == 3 and result.ratio is not None
    assert result.session_providers == ["tensorrt 10.3.0", "fake-device"]
    assert "FP16 enabled" in result.notes
    assert ("input_shape", "x", (3, 8)) in fake
    assert ("upload", np.dtype(np.float32), (3, 8)) in fake
    bound = {entry[1] for entry in fake if entry[0] == "address"}
    assert bound == {"x", "y"}
    executed = [entry[1] for entry in fake if entry[0] == "execute"]
    # one check run each, one warm-up round (AB), then timed rounds AB, BA, AB
    assert executed == ["A", "B"] + ["A", "B"] + ["A", "B", "B", "A", "A", "B"]
    assert all(entry[2] == 7 for entry in fake if entry[0] == "execute")
    assert device.closed


def test_data_dependent_output_shape_is_skipped(monkeypatch):
    """An output whose shape TensorRT cannot know before running: Skipped, device released."""
    log: list = []
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(log, dynamic_output=True))
    device = _FakeDevice(log)
    monkeypatch.setattr(trt_mod, "pick_device", lambda: (device, None))
    result = benchmark_tensorrt(_model(), rounds=1, min_time=0.0)
    assert isinstance(result, Skipped) and "data-dependent shape" in result.reason
    assert device.closed


def test_no_device_memory_library_is_skipped(fake, monkeypatch):
    """No usable device-memory library: Skipped naming each one tried and what to install."""

    class Missing:
        name = "cuda-python"

        def __init__(self):
            raise ImportError("no module named cuda")

    class NoGpu:
        name = "torch.cuda"

        def __init__(self):
            raise RuntimeError("torch sees no CUDA device")

    monkeypatch.setattr(trt_mod, "_BACKENDS", (Missing, NoGpu))
    device, reason = pick_device()
    assert device is None
    assert "cuda-python: not installed; torch.cuda: torch sees no CUDA device" in reason
    result = benchmark_tensorrt(_model(), rounds=1, min_time=0.0)
    assert isinstance(result, Skipped) and "pip install cuda-python" in result.reason
