"""Export PyTorch modules and Hugging Face ``transformers`` models to ONNX, checked by ORT.

``export(module, example_inputs, path, ...)``:

1. The module runs in eval mode (its training flag is restored afterwards) under
   ``torch.no_grad``; its outputs on ``example_inputs`` are the reference.
2. ``exporter="auto"`` tries the dynamo exporter (``torch.onnx.export(..., dynamo=True)``)
   first and falls back to the TorchScript exporter, with a logged warning, when dynamo
   fails or its model disagrees with torch. ``"dynamo"``/``"torchscript"`` use one only.
   The dynamo exporter is much slower (tiny BERT: ~6 s against ~0.25 s), which is why the
   choice is exposed.
3. ``dynamic_axes`` (``{"x": {0: "batch"}}`` or ``{"x": [0]}``) is given to both exporters
   as is: torch 2.13 turns it into ``dynamic_shapes`` for dynamo and renames the axes, so
   the saved model carries the names given here.
4. ``check=True`` runs ONNX Runtime on the example inputs and compares with torch
   (``atol``/``rtol``); a mismatch raises ``ExportError`` and nothing is written.
5. The model is saved with ``graphopt.save`` (atomic, IR version the installed ORT reads,
   external data over 2 GB).
6. ``optimize=False`` keeps the graph as traced (BatchNormalization, Dropout as Identity,
   unfused Pad, shape arithmetic), which is what graphopt's lossless passes then clean up;
   the default lets the exporter fold constants and BatchNorm itself.

``export_hf(source, path, ...)`` wraps a ``transformers`` model (an instance, a local
folder, or a config for random weights) so it takes plain tensors and returns a tuple,
builds dummy inputs (token ids/mask/token types, or pixel values) with dynamic batch and
sequence axes, and calls ``export``. It never downloads: folders are read with
``local_files_only=True`` and a name that is not a local path is refused.

torch is imported only when an export runs, so ``import graphopt.exporters`` is cheap.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import re
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graphopt.errors import ExportError
from graphopt.ir.model import TWO_GB, load, save, tensor_bytes

logger = logging.getLogger(__name__)

EXPORTERS = ("auto", "dynamo", "torchscript")

# Input names the text dummy-input builder knows, and the dynamic axes each gets.
_TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_TASKS = {
    "feature-extraction": "AutoModel",
    "fill-mask": "AutoModelForMaskedLM",
    "text-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "image-classification": "AutoModelForImageClassification",
}


def _torch():
    try:
        import torch
    except ImportError as exc:
        raise ExportError(
            "PyTorch is not installed; install it with `pip install graphopt[torch]`"
        ) from exc
    return torch


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ExportError(
            "transformers is not installed; install it with `pip install graphopt[hf]`"
        ) from exc
    return transformers


# --------------------------------------------------------------------------- export


def export(
    module: Any,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping[str, Mapping[int, str] | Sequence[int]] | None = None,
    opset: int | None = None,
    check: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    exporter: str = "auto",
    optimize: bool = True,
) -> Path:
    """Export ``module`` on ``example_inputs`` to ``path`` and return the path.

    ``example_inputs`` is a tensor, a tuple of tensors (positional arguments) or a mapping
    (keyword arguments). Input names default to the mapping's keys or the names of
    ``forward``'s parameters; output names to ``output`` / ``output_0``, ``output_1``, ....
    """
    torch = _torch()
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    if not isinstance(module, torch.nn.Module):
        raise ExportError(f"expected a torch.nn.Module, got {type(module).__name__}")
    path = Path(path)
    args, kwargs = _split_inputs(torch, example_inputs)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            reference = _flatten_tensors(torch, module(*args, **kwargs))
        if not reference:
            raise ExportError("the module returned no tensors; nothing to export")
        names_in = list(input_names) if input_names else _default_input_names(module, args, kwargs)
        names_out = list(output_names) if output_names else (
            ["output"] if len(reference) == 1 else [f"output_{i}" for i in range(len(reference))]
        )
        axes = _normalize_axes(dynamic_axes, names_in, names_out)
        flat_inputs = list(args) + [kwargs[k] for k in kwargs]
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(names_in, flat_inputs)
                 if isinstance(t, torch.Tensor)}
        expected = [t.detach().cpu().numpy() for t in reference]

        kinds = ("dynamo", "torchscript") if exporter == "auto" else (exporter,)
        problems: list[str] = []
        for i, kind in enumerate(kinds):
            last = i == len(kinds) - 1
            try:
                model = _export_once(torch, kind, module, args, kwargs, names_in, names_out, axes,
                                     opset, optimize, path.parent)
            except ExportError:
                raise
            except Exception as exc:  # noqa: BLE001 - exporters fail in many ways
                problems.append(f"{kind} exporter failed: {exc.__class__.__name__}: "
                                f"{_first_line(exc)}")
                if not last:
                    logger.warning("%s; falling back to the TorchScript exporter", problems[-1])
                continue
            if check:
                problem = _compare(model, feeds, expected, names_out, atol, rtol)
                if problem:
                    problems.append(f"{kind} export disagrees with torch: {problem}")
                    if not last:
                        logger.warning("%s; falling back to the TorchScript exporter",
                                       problems[-1])
                    continue
            save(model, path)
            return path
        raise ExportError(
            "; ".join(problems) + f" (nothing written to {path}; pass check=False to keep a "
            "mismatching export, or exporter='torchscript'/'dynamo' to pick one)"
        )
    finally:
        module.train(was_training)


def _split_inputs(torch, example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise ExportError(
        f"example_inputs must be a tensor, a tuple of tensors or a dict, not "
        f"{type(example_inputs).__name__}"
    )


def _flatten_tensors(torch, value: Any) -> list:
    """Tensors of a forward's result in the order exporters emit them (None dropped)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _flatten_tensors(torch, v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flatten_tensors(torch, v)]
    return []


def _default_input_names(module: Any, args: tuple, kwargs: dict) -> list[str]:
    try:
        params = [p for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params[: len(args)]]
    if len(names) < len(args):
        names = [f"input_{i}" for i in range(len(args))]
    return names + list(kwargs)


def _normalize_axes(axes: Mapping[str, Any] | None, names_in: list[str],
                    names_out: list[str]) -> dict[str, dict[int, str]] | None:
    if not axes:
        return None
    known = set(names_in) | set(names_out)
    out: dict[str, dict[int, str]] = {}
    for name, spec in axes.items():
        if name not in known:
            raise ExportError(
                f"dynamic_axes names '{name}', which is neither an input "
                f"({', '.join(names_in)}) nor an output ({', '.join(names_out)})"
            )
        if isinstance(spec, Mapping):
            out[name] = {int(k): str(v) for k, v in spec.items()}
        else:
            out[name] = {int(k): f"{name}_dim_{int(k)}" for k in spec}
    return out


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Exporters warn a lot (deprecations, axis renames); keep it in the debug log."""
    # torch's own loggers warn about optional packages (torchvision) on every first export.
    torch_logger = logging.getLogger("torch.onnx")
    level = torch_logger.level
    torch_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        torch_logger.setLevel(level)
    for w in caught:
        logger.debug("exporter warning: %s", w.message)


def _export_once(torch, kind: str, module, args: tuple, kwargs: dict, names_in: list[str],
                 names_out: list[str], axes, opset: int | None, optimize: bool,
                 folder: Path) -> onnx.ModelProto:
    """Run one exporter into a temporary folder and read the result back with its weights."""
    folder.mkdir(parents=True, exist_ok=True)
    options: dict[str, Any] = {
        "kwargs": kwargs or None, "input_names": names_in, "output_names": names_out,
        "dynamic_axes": axes, "opset_version": opset, "verbose": False,
    }
    if kind == "dynamo":
        # dynamic_axes is turned into dynamic_shapes here rather than by torch, whose
        # conversion fails on forward(*args) and may silently specialize a dim.
        options.update(dynamo=True, optimize=optimize, external_data=True, dynamic_axes=None,
                       dynamic_shapes=_dynamic_shapes(torch, module, args, kwargs, names_in,
                                                      axes))
    else:
        options.update(dynamo=False, do_constant_folding=optimize)
        if not optimize:
            # Eval mode folds BatchNorm into Conv even without constant folding.
            options.update(training=torch.onnx.TrainingMode.PRESERVE)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".graphopt-export-", dir=folder) as tmp:
        target = Path(tmp) / "model.onnx"
        with _quiet():
            torch.onnx.export(module, args, str(target), **options)
        model = load(target)
    logger.info("%s exporter finished in %.2f s", kind, time.perf_counter() - start)
    _label_dynamic_axes(model, axes, names_in)
    return model


def _identifier(name: str) -> str:
    text = re.sub(r"\W", "_", name)
    return text if text and not text[0].isdigit() else f"d_{text}"


def _dynamic_shapes(torch, module, args: tuple, kwargs: dict, names_in: list[str], axes):
    """``dynamic_axes`` as torch.export's ``dynamic_shapes``, structured like ``forward``'s
    parameters. Axes sharing a name share one ``Dim`` (they are equal, as in ONNX)."""
    if not axes:
        return None
    dims: dict[str, Any] = {}

    def spec(index: int):
        wanted = axes.get(names_in[index]) if index < len(names_in) else None
        if not wanted:
            return None
        return {axis: dims.setdefault(n, torch.export.Dim(_identifier(n)))
                for axis, n in wanted.items()}

    kw_index = {k: len(args) + i for i, k in enumerate(kwargs)}
    params = inspect.signature(module.forward).parameters.values()
    shapes: dict[str, Any] = {}
    position = 0
    for p in params:
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            if p.name in kwargs:
                shapes[p.name] = spec(kw_index[p.name])
            elif position < len(args):
                shapes[p.name] = spec(position)
                position += 1
        elif p.kind == p.VAR_POSITIONAL:
            shapes[p.name] = tuple(spec(i) for i in range(position, len(args)))
            position = len(args)
        elif p.kind == p.KEYWORD_ONLY and p.name in kwargs:
            shapes[p.name] = spec(kw_index[p.name])
        elif p.kind == p.VAR_KEYWORD:
            named = {k for k in kwargs if k in shapes}
            shapes[p.name] = {k: spec(kw_index[k]) for k in kwargs if k not in named}
    return shapes


def _label_dynamic_axes(model: onnx.ModelProto, axes, names_in: list[str]) -> None:
    """Give the requested axes their names on the graph inputs and outputs.

    An input axis the exporter made fixed is an export failure: the user asked for it to
    stay dynamic. An output axis that came out fixed only gets a warning (the model may
    really produce a fixed size there).
    """
    if not axes:
        return
    for vi in list(model.graph.input) + list(model.graph.output):
        wanted = axes.get(vi.name)
        if not wanted:
            continue
        dims = vi.type.tensor_type.shape.dim
        for axis, name in wanted.items():
            if axis >= len(dims):
                raise ExportError(f"'{vi.name}' has no axis {axis} (rank {len(dims)})")
            dim = dims[axis]
            if dim.HasField("dim_value"):
                message = (f"axis {axis} of '{vi.name}' came out fixed at {dim.dim_value}, "
                           f"not dynamic '{name}'")
                if vi.name in names_in:
                    raise _NotDynamicError(message)
                logger.warning("%s", message)
                continue
            dim.dim_param = name


class _NotDynamicError(Exception):
    """The exporter fixed an axis the user asked to keep dynamic (falls back in auto mode)."""


def _compare(model: onnx.ModelProto, feeds: dict[str, np.ndarray], expected: list[np.ndarray],
             names_out: list[str], atol: float, rtol: float) -> str | None:
    """None when ORT's outputs match torch's, else what differs."""
    try:
        got = _ort_outputs(model, feeds)
    except Exception as exc:  # noqa: BLE001 - ORT refuses models in many ways
        return f"onnxruntime cannot run it ({exc.__class__.__name__}: {_first_line(exc)})"
    if len(got) != len(expected):
        return f"{len(got)} outputs, torch gives {len(expected)}"
    for name, ref, out in zip(names_out, expected, got):
        if ref.shape != out.shape:
            return f"output '{name}' has shape {out.shape}, torch gives {ref.shape}"
        if ref.dtype.kind in "fc":
            if not np.allclose(out, ref, atol=atol, rtol=rtol, equal_nan=True):
                diff = float(np.max(np.abs(out.astype(np.float64) - ref.astype(np.float64))))
                return (f"output '{name}' differs by up to {diff:.3g} "
                        f"(atol={atol:g}, rtol={rtol:g})")
        elif not np.array_equal(out, ref):
            return f"output '{name}' differs"
    return None


def _ort_outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    from graphopt.runtime.session import ort_session

    # Over 2 GB the weights go to a temporary external-data file (a protobuf cannot hold them).
    return _run(ort_session(model, lean=tensor_bytes(model) >= TWO_GB), feeds)


def _run(session, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    wanted = [i.name for i in session.get_inputs()]
    missing = [n for n in wanted if n not in feeds]
    if missing:
        raise ExportError(f"the exported model wants inputs {missing} that were not given")
    return session.run(None, {n: feeds[n] for n in wanted})


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__


# --------------------------------------------------------------------------- transformers


def export_hf(
    source: Any,
    path: str | os.PathLike,
    *,
    task: str = "feature-extraction",
    inputs: Mapping[str, Any] | None = None,
    batch: int = 2,
    seq_len: int = 16,
    image_size: int | None = None,
    opset: int | None = None,
    exporter: str = "auto",
    check: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    seed: int = 0,
    optimize: bool = True,
) -> Path:
    """Export a Hugging Face ``transformers`` model with dynamic batch/sequence axes.

    1. ``source`` is a model instance, a local folder (``from_pretrained`` with
       ``local_files_only=True``), a config (``PretrainedConfig``, a dict with
       ``model_type``, or a path to a ``config.json``; random weights from ``seed``).
    2. ``task`` picks the head when building from a folder or config: one of
       ``feature-extraction`` (default), ``fill-mask``, ``text-classification``,
       ``token-classification``, ``question-answering``, ``image-classification``.
    3. Inputs: ``inputs`` (name -> tensor/array) if given; else the model's text inputs
       (``input_ids`` in the vocabulary, ``attention_mask`` of ones, ``token_type_ids`` of
       zeros, whichever ``forward`` takes) of ``batch x seq_len``, or ``pixel_values`` of
       ``batch x channels x image_size x image_size`` for vision models. Axis 0 is
       ``batch`` and, for text inputs, axis 1 is ``sequence``.
    4. Outputs are the tensors of the model's output object, named by its keys
       (``last_hidden_state``, ``pooler_output``, ``logits``, ...).
    5. ``opset``, ``exporter``, ``check``, ``atol``, ``rtol`` and ``optimize`` are
       ``export``'s.
    """
    torch = _torch()
    if batch < 1 or seq_len < 1:
        raise ExportError(f"batch and seq_len must be positive, got {batch} and {seq_len}")
    model = _hf_model(source, task, seed)
    model.eval()
    params = inspect.signature(model.forward).parameters
    feeds = _hf_inputs(torch, model, params, inputs, batch, seq_len, image_size, seed)
    extra = {k: False for k in ("use_cache", "output_attentions", "output_hidden_states")
             if k in params}
    wrapper = _HFWrapper(torch, model, list(feeds), extra)
    with torch.no_grad():
        out = model(**feeds, **extra, return_dict=True)
    output_names = [k for k, v in out.items() if isinstance(v, torch.Tensor)]
    wrapper.output_keys = output_names
    text = any(name in _TEXT_INPUTS for name in feeds)
    axes: dict[str, dict[int, str]] = {}
    for name, tensor in feeds.items():
        axes[name] = {0: "batch"}
        if name in _TEXT_INPUTS and tensor.dim() >= 2:
            axes[name][1] = "sequence"
    for name in output_names:
        # Per-token outputs of text models: [batch, sequence, ...].
        axes[name] = {0: "batch", 1: "sequence"} if text and out[name].dim() >= 3 else {0: "batch"}
    return export(wrapper, tuple(feeds.values()), path, input_names=list(feeds),
                  output_names=output_names, dynamic_axes=axes, opset=opset, check=check,
                  atol=atol, rtol=rtol, exporter=exporter, optimize=optimize)


def _hf_model(source: Any, task: str, seed: int):
    torch = _torch()
    transformers = _transformers()
    if isinstance(source, torch.nn.Module):
        return source
    if task not in _TASKS:
        raise ExportError(f"unknown task {task!r}; choose one of {', '.join(_TASKS)}")
    auto = getattr(transformers, _TASKS[task])
    config = None
    if isinstance(source, transformers.PretrainedConfig):
        config = source
    elif isinstance(source, Mapping):
        values = dict(source)
        model_type = values.pop("model_type", None)
        if not model_type:
            raise ExportError("a config dict needs a 'model_type' key (e.g. 'bert')")
        config = transformers.AutoConfig.for_model(model_type, **values)
    elif isinstance(source, (str, os.PathLike)):
        location = Path(source)
        if location.is_file():
            try:
                config = transformers.AutoConfig.from_pretrained(
                    str(location), local_files_only=True)
            except Exception as exc:  # noqa: BLE001
                raise ExportError(f"cannot read the config {location}: {_first_line(exc)}") from exc
        elif location.is_dir():
            try:
                return auto.from_pretrained(str(location), local_files_only=True)
            except Exception as exc:  # noqa: BLE001
                raise ExportError(
                    f"cannot load a {task} model from {location}: {_first_line(exc)} (for "
                    "random weights pass the folder's config.json instead)"
                ) from exc
        else:
            raise ExportError(
                f"{source} is not a local folder or config file; graphopt never downloads "
                "models (download it first, e.g. with `huggingface-cli download`)"
            )
    else:
        raise ExportError(
            f"expected a transformers model, config, folder or config path, not "
            f"{type(source).__name__}"
        )
    torch.manual_seed(seed)
    try:
        return auto.from_config(config)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"cannot build a {task} model from the config: {_first_line(exc)}"
                          ) from exc


def _hf_inputs(torch, model, params, inputs, batch: int, seq_len: int,
               image_size: int | None, seed: int) -> dict[str, Any]:
    if inputs is not None:
        feeds = {k: torch.as_tensor(v) for k, v in inputs.items()}
        unknown = [k for k in feeds if k not in params]
        if unknown:
            raise ExportError(f"the model's forward takes no input {unknown[0]!r}")
        return feeds
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    if "input_ids" in params:
        vocab = int(getattr(config, "vocab_size", 100) or 100)
        feeds = {"input_ids": torch.randint(0, vocab, (batch, seq_len), generator=generator)}
        if "attention_mask" in params:
            feeds["attention_mask"] = torch.ones(batch, seq_len, dtype=torch.long)
        if "token_type_ids" in params and getattr(config, "type_vocab_size", 0):
            feeds["token_type_ids"] = torch.zeros(batch, seq_len, dtype=torch.long)
        return feeds
    if "pixel_values" in params:
        size = image_size or getattr(config, "image_size", None)
        if isinstance(size, (tuple, list)):
            height, width = int(size[0]), int(size[-1])
        elif size:
            height = width = int(size)
        else:
            raise ExportError("the config names no image_size; pass image_size=")
        channels = int(getattr(config, "num_channels", 3) or 3)
        shape = (batch, channels, height, width)
        return {"pixel_values": torch.randn(*shape, generator=generator)}
    raise ExportError(
        f"cannot build dummy inputs for {type(model).__name__} (no input_ids or pixel_values "
        "argument); pass inputs={name: tensor}"
    )


@functools.lru_cache(maxsize=1)
def _hf_wrapper_class(torch):
    class HFWrapper(torch.nn.Module):
        """Plain tensors in (by position), a tuple of tensors out."""

        def __init__(self, model, input_keys: list[str], extra: dict[str, Any]):
            super().__init__()
            self.model = model
            self.input_keys = input_keys
            self.extra = extra
            self.output_keys: list[str] = []

        def forward(self, *tensors):
            out = self.model(**dict(zip(self.input_keys, tensors)), **self.extra,
                             return_dict=True)
            return tuple(out[k] for k in self.output_keys)

    return HFWrapper


def _HFWrapper(torch, model, input_keys: list[str], extra: dict[str, Any]):  # noqa: N802
    return _hf_wrapper_class(torch)(model, input_keys, extra)
