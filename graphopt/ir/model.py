"""Model I/O: load and save ONNX files safely.

1. ``load`` takes a path or an ``onnx.ModelProto``; external data is read from the model's
   folder, and a location that escapes that folder is refused (path traversal).
2. ``save`` writes atomically (temp file in the target folder, then rename), refuses to
   write onto the file the model was read from, lowers the IR version to what the installed
   onnxruntime reads, and stores weights as external data when the model is over 2 GB or
   when asked.
3. Weights stored as ``Constant`` nodes count as weights like initializers
   (``constant_value``).
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from graphopt.errors import (
    ExternalDataError,
    ModelFormatError,
    ModelNotFoundError,
    UnsafePathError,
    UnsupportedModelError,
)

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike
TWO_GB = 2**31
# Protobuf refuses to serialize a message of 2 GB or more; keep headroom for the graph itself.
_EXTERNAL_THRESHOLD = TWO_GB - 64 * 2**20
# Tensors smaller than this stay inside the .onnx file when saving external data.
_EXTERNAL_MIN_BYTES = 1024
# Overrides _EXTERNAL_THRESHOLD (bytes), so tests run the large-model path on small models.
EXTERNAL_ENV = "GRAPHOPT_EXTERNAL_BYTES"


def external_threshold() -> int:
    """Weight bytes above which a model goes through files with external data rather than
    protobuf bytes: ``save`` writes ``<name>.data``, onnxruntime sessions read the model from
    a file, and validate/bench leave a model file's weights on disk. Just under protobuf's
    2 GB limit, or ``$GRAPHOPT_EXTERNAL_BYTES``."""
    value = os.environ.get(EXTERNAL_ENV)
    if value:
        try:
            return max(0, int(value))
        except ValueError:
            logger.warning("ignoring %s=%r (not a number of bytes)", EXTERNAL_ENV, value)
    return _EXTERNAL_THRESHOLD


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from iter_graphs(sub)


def iter_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto holding weights: initializers, sparse initializer parts and
    ``Constant``/attribute tensors, in all subgraphs."""
    for g in iter_graphs(graph):
        yield from g.initializer
        for sp in g.sparse_initializer:
            yield sp.values
            yield sp.indices
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.TENSORS:
                    yield from attr.tensors


def _external_location(tensor: onnx.TensorProto) -> str | None:
    for entry in tensor.external_data:
        if entry.key == "location":
            return entry.value
    return None


def _check_inside(base: Path, location: str, tensor_name: str) -> Path:
    base = base.resolve()
    target = (base / location).resolve()
    if os.path.isabs(location) or os.path.commonpath([base, target]) != str(base):
        raise UnsafePathError(
            f"tensor '{tensor_name}' points to external data '{location}' outside the model's "
            f"folder {base}; refusing to read it (move the data file next to the model)"
        )
    return target


def _load_external(model: onnx.ModelProto, base: Path, max_bytes: int | None = None) -> None:
    """Read the external tensors' bytes into ``model`` (``max_bytes``: only tensors up to
    that size; the others stay external), after checking every location."""
    small = []
    for tensor in iter_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        if max_bytes is not None and typed_bytes(tensor) <= max_bytes:
            small.append(tensor)
        location = _external_location(tensor)
        if location is None:
            raise ExternalDataError(f"tensor '{tensor.name}' is external but names no location")
        target = _check_inside(base, location, tensor.name)
        if not target.is_file():
            raise ExternalDataError(
                f"external data file '{location}' for tensor '{tensor.name}' is missing; "
                f"put it next to the model in {base}"
            )
    try:
        if max_bytes is None:
            onnx.external_data_helper.load_external_data_for_model(model, str(base))
        else:
            for tensor in small:
                onnx.external_data_helper.load_external_data_for_tensor(tensor, str(base))
    except (OSError, ValueError) as exc:
        raise ExternalDataError(f"cannot read external data from {base}: {exc}") from exc


def _check_supported(model: onnx.ModelProto, origin: str) -> None:
    if model.ir_version <= 0 or not model.HasField("graph") or not model.opset_import:
        raise ModelFormatError(f"{origin} is not an ONNX model (no IR version, graph or opset)")
    max_opset = onnx.defs.onnx_opset_version()
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > max_opset:
            raise UnsupportedModelError(
                f"{origin} uses opset {opset.version}; the installed onnx {onnx.__version__} "
                f"knows up to {max_opset} (upgrade onnx or re-export with a lower opset)"
            )


def load(source: PathLike | onnx.ModelProto, *, load_external: bool = True) -> onnx.ModelProto:
    """Read a model from a path (with its external data) or copy a ModelProto."""
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        _check_supported(model, "the given ModelProto")
        return model
    path = Path(source)
    if not path.exists():
        raise ModelNotFoundError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelNotFoundError(f"not a file: {path}")
    try:
        data = path.read_bytes()
        model = onnx.ModelProto()
        model.ParseFromString(data)
    except (DecodeError, RuntimeWarning, ValueError) as exc:
        raise ModelFormatError(
            f"{path} is not an ONNX model or is truncated ({exc.__class__.__name__})"
        ) from exc
    except OSError as exc:
        raise ModelNotFoundError(f"cannot read {path}: {exc.strerror or exc}") from exc
    del data
    _check_supported(model, str(path))
    if load_external:
        _load_external(model, path.parent)
    return model


@functools.lru_cache(maxsize=1)
def max_ir_version() -> int:
    """Highest IR version the installed onnxruntime loads, found by trying a one-node model."""
    import onnxruntime as ort

    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    vi_x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    vi_y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([node], "probe", [vi_x], [vi_y])
    probe = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    options = ort.SessionOptions()
    options.log_severity_level = 4
    for version in range(onnx.IR_VERSION, 6, -1):
        probe.ir_version = version
        try:
            ort.InferenceSession(
                probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
            return version
        except Exception:  # noqa: BLE001 - any refusal means "too new"
            continue
    return 7


def serialized(model: onnx.ModelProto) -> bytes:
    """``model``'s bytes with the IR version lowered to what onnxruntime reads; ``model``
    itself is left as it was."""
    original = model.ir_version
    model.ir_version = min(original, max_ir_version())
    try:
        return model.SerializeToString()
    finally:
        model.ir_version = original


ModelLike = PathLike | onnx.ModelProto


def as_model(source: ModelLike, label: str = "model") -> tuple[onnx.ModelProto, str]:
    """``(model, label)``: a ModelProto as given (named ``label``), or a path loaded (named
    by its path)."""
    if isinstance(source, onnx.ModelProto):
        return source, label
    return load(source), os.fspath(source)


@dataclass(frozen=True)
class Opened:
    """A model ready to run: ``model`` (loaded, or a file's outline: see ``open_for_run``),
    its ``label`` for messages, and ``runnable``, what onnxruntime is given (a path or the
    model)."""

    model: onnx.ModelProto
    label: str
    runnable: onnx.ModelProto | Path


def open_for_run(source: ModelLike | Opened, label: str = "model") -> Opened:
    """``source`` opened for onnxruntime (an ``Opened`` is returned as it is).

    1. A ModelProto: ``model`` and ``runnable`` are itself (sessions serialize it or, over
       ``external_threshold``, write it to a temporary folder:
       ``runtime.session.session_source``).
    2. A file: ``runnable`` is its path, from which onnxruntime reads the model and its
       external data itself (a 1.8 GB file: 1.1x its size, against 3x from bytes), unless
       its IR version is newer than onnxruntime reads (then the loaded model, lowered when
       serialized). ``model`` is the file loaded, or when its weights exceed
       ``external_threshold`` its outline (``is_outline``: the external tensors over 64 KB
       left on disk; inputs, outputs, dims and shape constants are there), so no second
       copy of a model over 2 GB is held.
    """
    if isinstance(source, Opened):
        return source
    if isinstance(source, onnx.ModelProto):
        return Opened(source, label, source)
    path = Path(source)
    model = load(path, load_external=False)
    large = stored_bytes(model) > external_threshold()
    _load_external(model, path.parent, max_bytes=_OUTLINE_BYTES if large else None)
    if model.ir_version > max_ir_version():
        if large:
            _load_external(model, path.parent)
        return Opened(model, os.fspath(source), model)
    return Opened(model, os.fspath(source), path)


def is_outline(model: onnx.ModelProto) -> bool:
    """Whether some of ``model``'s tensors are still on disk (``open_for_run``'s outline)."""
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in iter_tensors(model.graph))


# External tensors up to this size are read into a model file's outline: shape constants,
# index tables and the like, which analyses of the graph read.
_OUTLINE_BYTES = 1 << 16


def stored_bytes(model: onnx.ModelProto) -> int:
    """Bytes of weight data, inline or external (external tensors by their length entry,
    else by dims and type)."""
    total = tensor_bytes(model)
    for t in iter_tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            where = {e.key: e.value for e in t.external_data}
            total += int(where["length"]) if where.get("length", "").isdigit() else typed_bytes(t)
    return total


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of weight data held in the proto (external tensors count as 0)."""
    total = 0
    for t in iter_tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            continue
        total += len(t.raw_data) if t.HasField("raw_data") else typed_bytes(t)
    return total


def typed_bytes(t: onnx.TensorProto) -> int:
    """Bytes a tensor's dims and type call for, without reading its data (reading
    ``raw_data`` would copy it); an unknown type counts 4 bytes an element."""
    n = 1
    for d in t.dims:
        n *= int(d)
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        itemsize = 4
    return n * itemsize


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the main graph's initializers, from dims and types (``typed_bytes``): the
    size that decides external data, lean sessions and memory release."""
    return sum(typed_bytes(t) for t in model.graph.initializer)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def save(
    model: onnx.ModelProto,
    path: PathLike,
    *,
    external_data: bool | None = None,
    protect: tuple[PathLike, ...] = (),
) -> Path:
    """Write ``model`` to ``path`` atomically and return the path.

    1. ``protect`` lists files that must never be overwritten (the input model); writing
       onto one raises ``GraphoptError`` before anything is written.
    2. ``external_data=None`` stores weights in ``<name>.data`` beside the model only when
       they exceed 2 GB (``external_threshold``); ``True`` always does; ``False`` never does (and fails over 2 GB).
    3. The IR version is lowered to what the installed onnxruntime reads; the caller's
       proto is left unchanged.
    """
    from graphopt.errors import GraphoptError

    path = Path(path)
    for p in protect:
        if Path(p).resolve() == path.resolve() or _same_file(Path(p), path):
            raise GraphoptError(f"refusing to overwrite the input model {p}; choose another -o path")
    if path.is_dir():
        raise GraphoptError(f"output path {path} is a folder; give a file name ending in .onnx")
    folder = path.parent if str(path.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)

    original_ir = model.ir_version
    limit = max_ir_version()
    if model.ir_version > limit:
        model.ir_version = limit
    try:
        big = tensor_bytes(model) > external_threshold()
        if external_data is False and big:
            raise GraphoptError(
                f"model weights exceed 2 GB; save {path} with external data enabled"
            )
        if external_data or (external_data is None and big):
            _save_external(model, path, folder)
        else:
            _atomic_write(folder, path, None, writer=lambda fh: write_streamed(model, fh))
    finally:
        model.ir_version = original_ir
    logger.info("saved %s", path)
    return path


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _delimited_header(field_number: int, length: int) -> bytes:
    return _varint(field_number << 3 | 2) + _varint(length)


def write_streamed(model: onnx.ModelProto, fh) -> None:
    """Write ``model``'s protobuf encoding one initializer at a time.

    ``SerializeToString`` builds the whole file in memory (BERT-base: +1.3x the model's
    size at the moment of saving, the run's peak); this writes the same message with the
    main graph's initializers encoded one by one, after the graph's other fields (protobuf
    readers merge fields in any order), so saving costs one tensor at a time.
    """
    shell = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(shell, field, value)
    graph = onnx.GraphProto()
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _copy_field(graph, field, value)
    graph_number = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
    init_number = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
    sizes = [t.ByteSize() for t in model.graph.initializer]
    graph_head = graph.SerializeToString()
    graph_size = len(graph_head) + sum(len(_delimited_header(init_number, n)) + n for n in sizes)
    fh.write(shell.SerializeToString())
    if not model.HasField("graph"):
        return
    fh.write(_delimited_header(graph_number, graph_size))
    fh.write(graph_head)
    for tensor, size in zip(model.graph.initializer, sizes):
        fh.write(_delimited_header(init_number, size))
        fh.write(tensor.SerializeToString())


def _copy_field(dst, field, value) -> None:
    if field.is_repeated:
        getattr(dst, field.name).extend(value)
    elif field.message_type is not None:
        getattr(dst, field.name).CopyFrom(value)
    else:
        setattr(dst, field.name, value)


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(folder: Path, path: Path, data: bytes | None, writer=None) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            if writer is not None:
                writer(fh)
            else:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; give what open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _save_external(model: onnx.ModelProto, path: Path, folder: Path) -> None:
    """Write the weights to ``<name>.data`` and the rest to ``path``; ``model`` unchanged.

    What is serialized is a shell of ``model``: its main-graph initializers are copied
    without their bytes, which go to the data file straight from ``model``, one tensor at a
    time; other tensors of 1 KB or more (``Constant`` nodes, subgraphs) are copied with the
    shell and moved out of it. (Swapping the bytes out of ``model`` and back, as this once
    did, costs two more copies of the weights: protobuf's upb runtime keeps the bytes of a
    field cleared or replaced in place until the whole message is freed. A 2.6 GiB model
    peaked at 3.0x its size saving; this way, 1x and one tensor.)
    """
    for t in iter_tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            raise ExternalDataError(
                f"tensor '{t.name}' still refers to external data; load the model with "
                "its data before saving"
            )
    location = path.name + ".data"
    shell = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(shell, field, value)
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _copy_field(shell.graph, field, value)
    sources: list[tuple[onnx.TensorProto, onnx.TensorProto]] = []
    for t in model.graph.initializer:
        copy = shell.graph.initializer.add()
        if t.HasField("raw_data") and typed_bytes(t) >= _EXTERNAL_MIN_BYTES:
            copy_tensor_without_data(t, copy)
            sources.append((copy, t))
        else:
            copy.CopyFrom(t)

    def write_data(fh) -> None:
        offset = 0

        def put(target: onnx.TensorProto, raw: bytes) -> None:
            nonlocal offset
            offset = spill_tensor(fh, offset, target, raw, location)

        for target, source in sources:
            put(target, source.raw_data)
        for t in iter_tensors(shell.graph):
            if t.data_location == onnx.TensorProto.EXTERNAL:
                continue
            if not t.HasField("raw_data"):
                if typed_bytes(t) < _EXTERNAL_MIN_BYTES:
                    continue
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t), t.name))
            raw = t.raw_data
            if len(raw) >= _EXTERNAL_MIN_BYTES:
                put(t, raw)

    _atomic_write(folder, folder / location, None, writer=write_data)
    _atomic_write(folder, path, shell.SerializeToString())


def spill_tensor(fh, offset: int, target: onnx.TensorProto, raw: bytes, location: str) -> int:
    """Write ``raw`` to the data file ``fh`` (now at ``offset``) from the next page boundary,
    so runtimes can mmap it, and point ``target`` at it as external data in ``location``;
    returns the offset after it. One layout for saved models and session/rollback files."""
    pad = (-offset) % 4096
    fh.write(b"\0" * pad)
    offset += pad
    fh.write(raw)
    target.ClearField("raw_data")
    target.data_location = onnx.TensorProto.EXTERNAL
    del target.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)),
                       ("length", str(len(raw)))):
        entry = target.external_data.add()
        entry.key, entry.value = key, value
    return offset + len(raw)


def copy_tensor_without_data(src: onnx.TensorProto, dst: onnx.TensorProto) -> None:
    """Every field of ``src`` but ``raw_data`` into ``dst`` (``src``'s bytes are never read,
    so never copied)."""
    for field in src.DESCRIPTOR.fields:
        if field.name == "raw_data":
            continue
        if field.is_repeated:
            values = getattr(src, field.name)
            if len(values):
                getattr(dst, field.name).extend(values)
        elif src.HasField(field.name):
            _copy_field(dst, field, getattr(src, field.name))


def constant_value(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    """The value of ``name`` if it is an initializer or a ``Constant`` node's output."""
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] == name:
            from graphopt.ir.graph import constant_node_value

            return constant_node_value(node)
    return None


def model_size_bytes(model: onnx.ModelProto) -> int:
    """Approximate serialized size: weight bytes plus the graph structure."""
    return tensor_bytes(model) + 1024 * len(model.graph.node)
