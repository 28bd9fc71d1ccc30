"""graphopt.runtime.providers: provider names, EP options, and detection of what a session really got.

This machine has the CPU build of onnxruntime and no GPU. The onnxruntime-gpu case (CUDA and
TensorRT listed, the session falling back to CPU) is simulated by patching the listing.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from graphopt.runtime import providers
from graphopt.errors import ConfigError, ModelFormatError, ProviderError
from graphopt.runtime.providers import (
    ProviderOptions,
    create_session,
    ort_providers,
    resolve_ort_providers,
    working_providers,
)
from graphopt.testing import make_model

pytestmark = pytest.mark.filterwarnings("ignore:Specified provider")


@pytest.fixture
def model():
    return make_model([helper.make_node("Relu", ["x"], ["y"])], {"x": [2, 3]}, ["y"])


@pytest.fixture
def gpu_build_without_gpu(monkeypatch):
    """onnxruntime-gpu on a machine with no GPU: everything listed, only CPU works."""
    working_providers.cache_clear()
    monkeypatch.setattr(providers, "listed_providers", lambda: ["tensorrt", "cuda", "cpu"])
    yield
    working_providers.cache_clear()


def test_cpu_session(model):
    """cpu gives a CPU session that runs."""
    session, name = create_session(model, "cpu")
    assert name == "cpu" and session.get_providers() == ["CPUExecutionProvider"]
    (y,) = session.run(None, {"x": -np.ones((2, 3), np.float32)})
    assert (y == 0).all()


@pytest.mark.parametrize("name", ["cuda", "tensorrt"])
def test_unlisted_provider_is_provider_error(model, name):
    """Plain onnxruntime does not list CUDA/TensorRT: one line naming what is offered."""
    with pytest.raises(ProviderError) as info:
        create_session(model, name)
    message = str(info.value)
    assert f"provider '{name}'" in message and "offers cpu" in message
    assert "\n" not in message


@pytest.mark.parametrize("name", ["cuda", "tensorrt"])
def test_listed_but_falling_back_is_provider_error(model, gpu_build_without_gpu, name):
    """Listed but the session fell back to CPU: ProviderError naming the working ones."""
    with pytest.raises(ProviderError, match=r"listed by onnxruntime but does not run here .*"
                                            r"fell back to cpu.*working: cpu;"):
        create_session(model, name)


def test_auto_resolves_to_cpu(model, gpu_build_without_gpu):
    """auto tries TensorRT, then CUDA, and settles on CPU without an error."""
    session, name = create_session(model, "auto")
    assert name == "cpu" and session.get_providers() == ["CPUExecutionProvider"]
    assert working_providers() == ("cpu",)


def test_unknown_provider_name(model):
    """A provider name outside cpu|cuda|tensorrt|auto is a ConfigError listing the choices."""
    with pytest.raises(ConfigError, match="cpu, cuda, tensorrt, auto"):
        create_session(model, "gpu")


def test_broken_model_is_model_error_not_provider_error(model):
    """A model ORT refuses is reported as the model's fault, even when asking for CUDA."""
    model.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(ModelFormatError, match="onnxruntime cannot load the model"):
        create_session(model, "cuda")


def test_tensorrt_options_and_cuda_fallback(tmp_path):
    """TensorRT EP gets fp16 and engine-cache options, with CUDA then CPU after it."""
    cache = tmp_path / "engines"
    got = ort_providers("tensorrt", ProviderOptions(trt_fp16=True, trt_cache=str(cache)))
    (trt_name, trt_opts), (cuda_name, _), cpu = got
    assert (trt_name, cuda_name, cpu) == (
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    assert trt_opts["trt_fp16_enable"] == "True"
    assert trt_opts["trt_engine_cache_enable"] == "True"
    assert trt_opts["trt_engine_cache_path"] == str(cache) and cache.is_dir()
    plain = ort_providers("tensorrt")[0][1]
    assert "trt_fp16_enable" not in plain and "trt_engine_cache_enable" not in plain


def test_threads_option(model):
    """threads sets intra_op_num_threads; 0 is refused."""
    session, _ = create_session(model, "cpu", ProviderOptions(threads=1))
    assert session.get_session_options().intra_op_num_threads == 1
    # workers stop spinning when a run ends (A/B timings would measure each other otherwise)
    assert session.get_session_options().get_session_config_entry(
        "session.force_spinning_stop") == "1"
    with pytest.raises(ConfigError, match="threads"):
        ProviderOptions(threads=0)


def test_short_names_in_provider_lists():
    """Short names expand to ORT names; ORT names and tuples pass through."""
    assert resolve_ort_providers("cpu") == ["CPUExecutionProvider"]
    assert resolve_ort_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert resolve_ort_providers(["cuda"])[-1] == "CPUExecutionProvider"
