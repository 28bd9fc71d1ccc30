"""Every onnxruntime session graphopt makes, and running models once: ``ort_session`` (an
in-memory model; ``lean`` for verification without a serialized copy of the weights),
``ort_session_for`` (exactly the given execution providers, no fallback: what
``providers.create_session`` probes with), ``file_session`` (a model file), one option set
(``session_options``); ``run_model``/``outputs_of``, ``max_difference``, ``check_model``,
memory release, and on-disk snapshots of large models (the pass manager's rollback copies).
"""

from __future__ import annotations

import ctypes
import functools
import gc
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx

from graphopt.ir.model import initializer_bytes
from graphopt.ir.strip import stripped_copy

logger = logging.getLogger(__name__)


def check_model(model: onnx.ModelProto) -> None:
    """onnx.checker on a copy of ``model`` without its weights' bytes.

    Large tensors become empty placeholders of their type (dims ``[0]``): without
    ``full_check`` the checker never relates an initializer's dims to the ops reading it,
    and it refuses a tensor whose bytes do not fill its dims, so this checks the same
    structure, names, types, attributes and opsets with no copy of the weights, at any
    model size. The bytes are checked against the dims by the ORT load that follows in the
    manager. (Checking the model whole serializes it once more: BERT-base, ~2 s and +1x.)
    """
    from graphopt.ir.model import iter_tensors

    work = stripped_copy(model)
    _empty_stripped_sparse(work)
    for t in iter_tensors(work.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL or _has_values(t):
            continue
        if t.dims and all(d > 0 for d in t.dims):  # emptied by stripped_copy
            del t.dims[:]
            t.dims.append(0)
            t.raw_data = b""
    onnx.checker.check_model(work, full_check=False)


def _empty_stripped_sparse(model: onnx.ModelProto) -> None:
    """A sparse initializer whose values were stripped becomes an empty one of its dims
    (values and indices of length 0): the checker relates indices to values."""
    from graphopt.ir.model import iter_graphs

    for g in iter_graphs(model.graph):
        for sp in g.sparse_initializer:
            if _has_values(sp.values):
                continue
            for part in (sp.values, sp.indices):
                rank = len(part.dims)
                part.ClearField("raw_data")
                for f in ("float_data", "int32_data", "int64_data", "double_data",
                          "uint64_data", "string_data"):
                    part.ClearField(f)
                del part.dims[:]
                part.dims.extend([0] + ([len(sp.dims)] if rank == 2 and part is sp.indices
                                        else []))


def _has_values(t: onnx.TensorProto) -> bool:
    return t.HasField("raw_data") or any(
        len(getattr(t, f)) for f in ("float_data", "int32_data", "string_data", "int64_data",
                                     "double_data", "uint64_data"))


def ort_session(model: onnx.ModelProto, providers: Sequence[str] = ("CPUExecutionProvider",),
                threads: int | None = None, *, lean: bool = False):
    """An onnxruntime session on ``model`` (lowered to an IR version ORT reads).

    ``lean=True`` (the manager's verification sessions) writes the large initializers to a
    temporary external-data file and has ORT load the model from there: the session then
    costs about one copy of the weights (BERT-base: +0.85x the file size) instead of a
    serialized copy plus ORT's parsed copy (+2.3x), never serializes a 2 GB protobuf, and
    leaves ``model`` untouched. Same model, same kernels, same outputs.
    """
    import onnxruntime as ort

    with session_source(model, external=lean or None) as source:
        return ort.InferenceSession(source, session_options(threads), providers=list(providers))


Runnable = onnx.ModelProto | bytes | str | os.PathLike


@contextmanager
def session_source(model: Runnable, *, external: bool | None = None) -> Iterator[bytes | str]:
    """What an ``onnxruntime.InferenceSession`` is made from, for ``model``:

    1. bytes: themselves; a path (``str``/``PathLike``): the path, from which onnxruntime
       reads the model and its external data;
    2. a ModelProto with at most ``ir.model.external_threshold()`` bytes of weights (and
       ``external`` not True): its serialized bytes, IR version lowered for onnxruntime;
    3. a larger one (or ``external=True``): ``model.onnx`` + ``weights.bin`` written tensor by
       tensor to a temporary folder, whose path is given: no protobuf message of 2 GB is
       ever serialized, and the session costs one copy of the weights. The folder is
       removed on exit (a session has read its weights by then); ``model`` is unchanged.
    """
    from graphopt.ir.model import external_threshold, serialized

    if isinstance(model, bytes):
        yield model
        return
    if isinstance(model, (str, os.PathLike)):
        yield os.fspath(model)
        return
    if external is None:
        external = initializer_bytes(model) > external_threshold()
    if not external:
        yield serialized(model)
        return
    with tempfile.TemporaryDirectory(prefix="graphopt-session-",
                                     ignore_cleanup_errors=True) as tmp:
        yield str(_write_with_external_weights(model, Path(tmp)))


def ort_session_for(model: Runnable, providers: Sequence, threads: int | None = None):
    """A session with exactly ``providers`` (names or ``(name, options)`` pairs), ORT's
    constructor fallback off: a failing EP or a refused model raises onnxruntime's own
    exception (callers translate it). ``model`` as for ``session_source``."""
    import onnxruntime as ort

    with session_source(model) as source:
        return ort.InferenceSession(
            source, session_options(threads), providers=list(providers), enable_fallback=0
        )


def session_options(threads: int | None = None):
    """The options of every session graphopt makes: quiet logs, ``threads`` intra-op threads
    (None: onnxruntime's default), and intra-op threads that stop spinning when a run ends.

    The last one matters wherever graphopt holds two sessions: by default a session's
    workers busy-wait for a while after each run, so in an interleaved A/B timing the
    session that just ran keeps a core from the one being timed. Measured on the 2-vCPU
    machine this project runs on (ResNet-50, 2 threads): 40 ms -> 29 ms for the original,
    16 ms -> 8.5 ms for a 50%-channel prune; a lone session's timings are unchanged.
    Spinning still runs inside each run (``session.force_spinning_stop``: it restarts on
    the next Run).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.force_spinning_stop", "1")
    if threads:
        options.intra_op_num_threads = threads
    return options


def _write_with_external_weights(model: onnx.ModelProto, folder: Path) -> Path:
    """``model.onnx`` + ``weights.bin`` in ``folder``, the weights written tensor by tensor
    (page-aligned, ``ir.model.spill_tensor``), without changing ``model``. Not
    ``graphopt.save``: only the main graph's initializers the strip emptied are spilled, in
    their order, and tensors already external stay as they are (``Snapshot`` restores by
    index; save moves Constant and subgraph tensors out too and refuses external ones)."""
    from graphopt.ir.model import max_ir_version, spill_tensor

    work = stripped_copy(model, initializers_only=True)
    work.ir_version = min(work.ir_version, max_ir_version())
    originals = {t.name: t for t in model.graph.initializer}
    offset = 0
    with open(folder / "weights.bin", "wb") as fh:
        for t in work.graph.initializer:
            source = originals[t.name]
            if t.HasField("raw_data") or not source.HasField("raw_data"):
                continue
            offset = spill_tensor(fh, offset, t, source.raw_data, "weights.bin")
    path = folder / "model.onnx"
    path.write_bytes(work.SerializeToString())
    return path


def run_model(session, feeds: Mapping[str, np.ndarray], *, quiet: bool = False
              ) -> dict[str, np.ndarray]:
    """Outputs by name. ``quiet``: a failing run logs nothing (the check-size search tries
    sizes that may not run; onnxruntime would print each failure as an error)."""
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    options = None
    if quiet:
        import onnxruntime as ort

        options = ort.RunOptions()
        options.log_severity_level = 4
    results = session.run(names, {k: v for k, v in feeds.items() if k in wanted}, options)
    return dict(zip(names, results))


def outputs_of(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs of ``model`` on ``feeds`` through a one-off onnxruntime CPU session."""
    return run_model(ort_session(model), feeds)


def max_difference(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], atol: float,
                   rtol: float) -> tuple[float, str | None]:
    """Largest abs difference over shared outputs, and a message for the first mismatch."""
    worst = 0.0
    problem = None
    for name, ref in a.items():
        if name not in b:
            return float("inf"), f"output '{name}' disappeared"
        got = b[name]
        if ref.shape != got.shape:
            return float("inf"), f"output '{name}' changed shape {ref.shape} -> {got.shape}"
        if ref.size == 0:
            continue
        diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
        diff = np.where(np.isnan(diff), np.where(np.isnan(ref) & np.isnan(got), 0.0, np.inf), diff)
        worst = max(worst, float(diff.max()))
        # Relative to each element and, at a tenth of rtol, to the output's scale: a pass
        # that reassociates float math (BatchNorm into a conv weight) rounds in proportion
        # to the magnitudes it sums, so an element that cancels to near zero from values of
        # 1e5 carries 1e5-sized rounding (fuzz seed 463: 0.34 on an output of 3e5).
        finite = ref[np.isfinite(ref)] if ref.dtype.kind == "f" else ref[:0]
        scale = float(np.abs(finite).max(initial=0.0))
        bound = atol + rtol * (np.abs(ref.astype(np.float64)) + 0.1 * scale)
        if problem is None and (diff > bound).any():
            problem = f"output '{name}' differs by up to {float(diff.max()):.3g}"
    return worst, problem


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return None


def release_memory() -> None:
    """Free the dropped model copies now and give the memory back to the OS.

    1. ``gc.collect()``: analysis objects (graphsurgeon's lazy values, shape-inference
       helpers, graph indexes) sit in reference cycles that hold tensors of the model a
       pass replaced, and a sub-message keeps its whole model alive.
    2. glibc's ``malloc_trim`` (a no-op elsewhere): glibc keeps the freed blocks of a
       dropped copy and often does not reuse them for the next one.
    Without these, each pass can raise the peak by about one model size.
    """
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def file_session(path: Path):
    """An onnxruntime session on a model file, with the verification sessions' options."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])


class Snapshot:
    """A model as it was, kept on disk: the rollback copy of a large model.

    The files are the lean sessions' format (``_write_with_external_weights``: ``model.onnx``
    and a page-aligned ``weights.bin``), so one write serves as the model for an ORT session
    (the reference before a lossless pass, or the check after a pass, whose files then
    become the next pass's rollback copy), ``matches`` (a pass that reported no change left
    the model as it was) and ``restore`` (the model back, equal to the one written byte for
    byte when serialized). ``outline`` is the weight-less twin (inputs, dims) for feeds.
    """

    def __init__(self, model: onnx.ModelProto, folder: Path):
        folder.mkdir()
        self.folder = folder
        self.path = _write_with_external_weights(model, folder)
        self.ir_version = model.ir_version  # the file has it lowered for onnxruntime
        self.outline = stripped_copy(model, initializers_only=True)
        self._outline_bytes = self.outline.SerializeToString()
        written = onnx.ModelProto()
        written.ParseFromString(self.path.read_bytes())
        # (initializer index, offset, length, data_location set in the model) per tensor
        # written to weights.bin; tensors already external in the model stay as they were.
        self._spilled: list[tuple[int, int, int, bool]] = []
        for i, (t, before) in enumerate(zip(written.graph.initializer,
                                            self.outline.graph.initializer)):
            if (t.data_location == onnx.TensorProto.EXTERNAL
                    and before.data_location != onnx.TensorProto.EXTERNAL):
                where = {e.key: e.value for e in t.external_data}
                self._spilled.append((i, int(where["offset"]), int(where["length"]),
                                      before.HasField("data_location")))

    def matches(self, model: onnx.ModelProto) -> bool:
        """Whether ``model`` equals the snapshot: structure, then the spilled weights' bytes
        compared with the file one tensor at a time."""
        if stripped_copy(model, initializers_only=True).SerializeToString() != self._outline_bytes:
            return False
        inits = model.graph.initializer
        with open(self.folder / "weights.bin", "rb") as fh:
            for i, offset, length, _ in self._spilled:
                raw = inits[i].raw_data
                if len(raw) != length:
                    return False
                fh.seek(offset)
                if fh.read(length) != raw:
                    return False
        return True

    def restore(self) -> onnx.ModelProto:
        """The model as written, weights read back in (a new ModelProto)."""
        model = onnx.ModelProto()
        model.ParseFromString(self.path.read_bytes())
        model.ir_version = self.ir_version
        inits = model.graph.initializer
        with open(self.folder / "weights.bin", "rb") as fh:
            for i, offset, length, located in self._spilled:
                t = inits[i]
                fh.seek(offset)
                t.raw_data = fh.read(length)
                del t.external_data[:]
                if located:
                    t.data_location = onnx.TensorProto.DEFAULT
                else:
                    t.ClearField("data_location")
        return model

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
