"""The copy of the model a failing pass is rolled back to, behind one interface.

``rollback_store(model, where)`` gives the run's store: ``MemoryStore`` (an in-memory copy,
fast, for small models) or ``DiskStore`` (a ``Snapshot`` in a temporary folder: one model
size less at the peak; BERT-base 2.95x -> ~2x the file size). Per pass the manager asks the
store to ``keep`` the model, and the kept copy (a ``Kept``) answers everything it needs:

1. ``outline``: the model before the pass for generated feeds (weights may be stripped);
2. ``reference_session()``: an onnxruntime session on the model before the pass;
3. ``unchanged(model)``: the model before a pass that reported no change (which may have
   edited it all the same);
4. ``restore()``: the model before a pass that failed.

``store.check_session(result)`` opens the verification session on a pass's result (on disk
its files become the next pass's kept copy once ``accept``-ed; ``discard`` drops them when
the pass fails). ``close`` removes whatever the store wrote, however the run ends.

On disk, ``source`` (a file that holds exactly the model the run starts from, which
``graphopt.optimize`` passes when it loaded the model from a file and changed nothing in
it) is the first copy, ``InputFile``: nothing is written until a pass changes the model. It
keeps the file's outline and a digest of each weight (``matches``), reads the file back to
``restore``, and refuses to when the file changed on disk since.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal, Protocol

import onnx

from graphopt.errors import GraphoptError
from graphopt.ir.model import initializer_bytes, load
from graphopt.ir.strip import stripped_copy
from graphopt.runtime.session import Snapshot, file_session, ort_session

logger = logging.getLogger(__name__)

# Models with at least this many bytes of weights keep their rollback copy on disk.
DISK_ROLLBACK_BYTES = 64 * 2**20

Where = Literal["auto", "memory", "disk"]


class Kept(Protocol):
    """The model as it was before a pass."""

    on_disk: bool

    @property
    def outline(self) -> onnx.ModelProto: ...

    def reference_session(self): ...

    def unchanged(self, model: onnx.ModelProto) -> onnx.ModelProto: ...

    def restore(self) -> onnx.ModelProto: ...


class _MemoryCopy:
    on_disk = False

    def __init__(self, model: onnx.ModelProto):
        self._copy = onnx.ModelProto()
        self._copy.CopyFrom(model)

    @property
    def outline(self) -> onnx.ModelProto:
        return self._copy

    def reference_session(self):
        return ort_session(self._copy, lean=True)

    def unchanged(self, model: onnx.ModelProto) -> onnx.ModelProto:
        return self._copy

    def restore(self) -> onnx.ModelProto:
        return self._copy


class MemoryStore:
    """Rollback copies in memory."""

    on_disk = False

    def keep(self, model: onnx.ModelProto) -> Kept:
        return _MemoryCopy(model)

    def check_session(self, model: onnx.ModelProto):
        return ort_session(model, lean=True)

    def accept(self) -> None:
        pass

    def discard(self) -> None:
        pass

    def close(self) -> None:
        pass


class _DiskCopy:
    on_disk = True

    def __init__(self, snapshot: Snapshot):
        self.snapshot = snapshot

    @property
    def outline(self) -> onnx.ModelProto:
        return self.snapshot.outline

    def reference_session(self):
        return file_session(self.snapshot.path)

    def unchanged(self, model: onnx.ModelProto) -> onnx.ModelProto:
        if self.snapshot.matches(model):
            return model
        logger.warning("a pass that reported no change changed the model; restored")
        return self.snapshot.restore()

    def restore(self) -> onnx.ModelProto:
        return self.snapshot.restore()


def _digests(model: onnx.ModelProto) -> list[bytes]:
    return [hashlib.blake2b(t.SerializeToString(), digest_size=16).digest()
            for t in model.graph.initializer]


def _stamp(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


class InputFile:
    """The run's input file as the first rollback copy (module doc): ``Snapshot``'s
    interface, with nothing written and nothing to remove."""

    def __init__(self, model: onnx.ModelProto, path: str | os.PathLike):
        self.path = Path(path)
        self.outline = stripped_copy(model, initializers_only=True)
        self._outline_bytes = self.outline.SerializeToString()
        self._digests = _digests(model)
        self._stamp = _stamp(self.path)

    def matches(self, model: onnx.ModelProto) -> bool:
        return (stripped_copy(model, initializers_only=True).SerializeToString()
                == self._outline_bytes and _digests(model) == self._digests)

    def restore(self) -> onnx.ModelProto:
        if _stamp(self.path) != self._stamp:
            raise GraphoptError(f"cannot roll back: the input file {self.path} changed on "
                                "disk during the run")
        return load(self.path)

    def close(self) -> None:
        pass


class DiskStore:
    """Rollback copies as snapshots in a temporary folder; the files written for a pass's
    check session are the next pass's rollback copy, so a model is written once per change.
    ``on_write`` is told each time a snapshot is written (the manager's observers)."""

    on_disk = True

    def __init__(self, on_write: Callable[[], None] | None = None,
                 source: str | os.PathLike | None = None):
        self.folder = Path(tempfile.mkdtemp(prefix="graphopt-rollback-"))
        self._serial = 0
        self._source = source  # the input file, the first copy (module doc)
        self._current: Snapshot | InputFile | None = None  # of the model as it is now
        self._candidate: Snapshot | None = None  # the running pass's check files
        self._on_write = on_write

    def _write(self, model: onnx.ModelProto) -> Snapshot:
        self._serial += 1
        if self._on_write is not None:
            self._on_write()
        return Snapshot(model, self.folder / str(self._serial))

    def keep(self, model: onnx.ModelProto) -> Kept:
        if self._current is None and self._source is not None:
            self._current, self._source = InputFile(model, self._source), None
        elif self._current is None:
            self._current = self._write(model)
        return _DiskCopy(self._current)

    def check_session(self, model: onnx.ModelProto):
        self._candidate = self._write(model)
        return file_session(self._candidate.path)

    def accept(self) -> None:
        """The pass's result is the model now: its check files (if any) are its copy."""
        if self._current is not None:
            self._current.close()
        self._current, self._candidate = self._candidate, None

    def discard(self) -> None:
        if self._candidate is not None:
            self._candidate.close()
            self._candidate = None

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self._current = self._candidate = None


def rollback_store(model: onnx.ModelProto, where: Where = "auto",
                   on_write: Callable[[], None] | None = None,
                   source: str | os.PathLike | None = None) -> MemoryStore | DiskStore:
    """The store for a run on ``model``: ``auto`` puts models with ``DISK_ROLLBACK_BYTES`` of
    weights or more on disk; ``source``: the file holding ``model`` (module doc)."""
    if where == "disk" or (where == "auto" and initializer_bytes(model) >= DISK_ROLLBACK_BYTES):
        return DiskStore(on_write, source)
    return MemoryStore()
