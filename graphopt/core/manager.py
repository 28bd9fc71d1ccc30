"""The pass contract, the registry and the manager that runs and verifies passes.

A pass (``Pass`` subclass, registered with ``@register``):

1. has a name (the CLI/recipe spelling), one frozen config dataclass ``Config`` whose
   ``__post_init__`` rejects out-of-range values with ``ConfigError``, and ``lossless``;
2. ``run(model, ctx)`` may change ``model`` in place or return a new one, in a
   ``PassResult`` with ``modified``, counters and skipped sites (data, with reasons);
3. never half-applies: it decides everything, then rewrites.

The manager alone runs cleanup, toposort and shape re-inference after a pass, then
verifies: ``onnx.checker``, an onnxruntime session load, and for lossless passes outputs
equal to the model before the pass. A pass that fails is rolled back and reported with its
name and the passes before it; the run stops (``on_error="stop"``) or goes on. The
re-inferred shapes (``value_info``) are for the passes and the checks: the returned model
keeps them only when the input had value_info (see ``PassManager.run``).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import time
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx

from graphopt.errors import ConfigError, GraphoptError, PassError
from graphopt.runtime.session import (  # noqa: F401 - re-exported: passes and tests import them from here
    _file_session,
    _Snapshot,
    _weight_bytes,
    check_model,
    max_difference,
    ort_session,
    release_memory,
    run_model,
)

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- contract


@dataclass(frozen=True)
class Skip:
    """A site a pass looked at and left alone, with the reason."""

    site: str
    reason: str


@dataclass
class PassResult:
    model: onnx.ModelProto
    modified: bool
    counters: dict[str, int] = field(default_factory=dict)
    skipped: list[Skip] = field(default_factory=list)


@dataclass
class Context:
    """What passes may need besides the model: input shapes and calibration data.

    ``calibration`` is a list of feed dicts; when None, passes that need data call
    ``calibration_feeds`` which generates them from the input specs.
    """

    input_shapes: Mapping[str, tuple[int, ...]] | None = None
    calibration: list[dict[str, np.ndarray]] | None = None
    seed: int = 0
    calibration_batches: int = 4

    def sample_feeds(self, model: onnx.ModelProto, count: int = 1) -> list[dict[str, np.ndarray]]:
        """Inputs for numeric checks: the calibration data if any, else generated."""
        if self.calibration:
            return self.calibration[:count]
        from graphopt.ir.inputs import generate_inputs

        return [
            generate_inputs(model, self.input_shapes, seed=self.seed + i) for i in range(count)
        ]

    def calibration_feeds(self, model: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
        if self.calibration:
            return self.calibration
        from graphopt.ir.inputs import generate_inputs

        return [
            generate_inputs(model, self.input_shapes, seed=self.seed + i, ragged=True)
            for i in range(self.calibration_batches)
        ]


@dataclass(frozen=True)
class NoConfig:
    """For passes without options."""


class Pass:
    """Base of every pass; see the module doc for the contract."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoConfig
    lossless: ClassVar[bool] = True
    # Which dims a lossless check should tolerate: passes that reassociate float math
    # (folding BN into a weight) are compared with this absolute/relative tolerance.
    atol: ClassVar[float] = 1e-4
    rtol: ClassVar[float] = 1e-4

    def __init__(self, config: Any = None, **options: Any):
        if config is not None and options:
            raise TypeError("give a config or keyword options, not both")
        self.config = config if config is not None else make_config(self.Config, options, self.name)

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


_REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass findable by its name from the CLI and recipes."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"pass name '{cls.name}' is taken by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def registered_passes() -> dict[str, type[Pass]]:
    import graphopt.passes  # noqa: F401 - importing registers the built-in passes

    return dict(sorted(_REGISTRY.items()))


def get_pass_class(name: str) -> type[Pass]:
    passes = registered_passes()
    if name not in passes:
        raise ConfigError(f"unknown pass '{name}' (known: {', '.join(passes)})")
    return passes[name]


# --------------------------------------------------------------------------- configs


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Turn a recipe/CLI value into the field's type, or raise ConfigError."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, args))}")
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else str
        return tuple(_coerce(v.strip() if isinstance(v, str) else v, inner, where) for v in items
                     if not (isinstance(v, str) and not v.strip()))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def make_config(config_cls: type, options: Mapping[str, Any], pass_name: str = "") -> Any:
    """Build a pass config from a mapping (recipe entry or parsed ``--pass`` options).

    Unknown keys, wrong types and out-of-range values raise ``ConfigError`` naming the pass
    and the option.
    """
    label = f"pass '{pass_name}'" if pass_name else config_cls.__name__
    hints = typing.get_type_hints(config_cls)
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = [k for k in options if k not in fields]
    if unknown:
        known = ", ".join(fields) or "none"
        raise ConfigError(f"{label}: unknown option '{unknown[0]}' (known options: {known})")
    values = {k: _coerce(v, hints[k], f"{label} option '{k}'") for k, v in options.items()}
    try:
        return config_cls(**values)
    except ConfigError as exc:
        raise ConfigError(f"{label}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{label}: {exc}") from None


def config_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {}


def parse_pass_spec(text: str) -> tuple[str, dict[str, str]]:
    """``"prune-layers:indices=3,4,ratio=0.5"`` -> ``("prune-layers", {...})``.

    A comma-separated token without ``=`` continues the previous option's value, so list
    values need no quoting.
    """
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name:
        raise ConfigError(f"bad --pass '{text}': expected NAME or NAME:key=value,...")
    options: dict[str, str] = {}
    last = None
    for token in filter(None, (t.strip() for t in rest.split(","))):
        if "=" in token:
            key, _, value = token.partition("=")
            key = key.strip().replace("-", "_")
            if not key:
                raise ConfigError(f"bad --pass '{text}': empty option name")
            options[key] = value.strip()
            last = key
        elif last is not None:
            options[last] += "," + token
        else:
            raise ConfigError(f"bad --pass '{text}': '{token}' is not key=value")
    return name, options


def build_pass(name: str, options: Mapping[str, Any] | None = None) -> Pass:
    cls = get_pass_class(name)
    return cls(make_config(cls.Config, dict(options or {}), name))


# --------------------------------------------------------------------------- report


@dataclass
class PassReport:
    name: str
    config: dict[str, Any]
    lossless: bool
    status: str  # "changed", "unchanged", "rolled back", "not run"
    counters: dict[str, int] = field(default_factory=dict)
    skipped: list[Skip] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    max_abs_diff: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["skipped"] = [dataclasses.asdict(s) for s in self.skipped]
        return d


@dataclass
class Report:
    passes: list[PassReport] = field(default_factory=list)
    validation: Any = None  # graphopt.validate.ValidationResult when asked for
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(p.status != "rolled back" for p in self.passes)

    @property
    def failed(self) -> list[PassReport]:
        return [p for p in self.passes if p.status == "rolled back"]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": self.ok, "passes": [p.to_dict() for p in self.passes]}
        out.update(self.metadata)
        if self.validation is not None:
            out["validation"] = self.validation.to_dict()
        return out


# --------------------------------------------------------------------------- manager


def finalize(model: onnx.ModelProto, input_shapes=None, *, in_place: bool = False
             ) -> onnx.ModelProto:
    """Cleanup, toposort and re-infer shapes: what the manager does after every pass.

    graphsurgeon works on a weight-less copy (``stripped_copy``) and the cleaned, sorted
    graph it returns is given back to the model, whose initializer messages stay where they
    are: no copy of the weights is made (BERT-base: 1.4 s and +1x model size saved).
    ``in_place=False`` (the default) leaves ``model`` unchanged and returns a new model;
    the manager finalizes in place.
    """
    import onnx_graphsurgeon as gs

    from graphopt.analysis.shapes import infer_shapes, stripped_copy

    if not in_place:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        model = copy
    graph = gs.import_onnx(stripped_copy(model, initializers_only=True))
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    _adopt_graph(model, gs.export_onnx(graph, do_type_check=False))
    if model.ir_version < 4:
        # graphsurgeon does not list initializers as graph inputs, which IR 3 requires;
        # IR 4 is the same format without that rule.
        model.ir_version = 4
    return infer_shapes(model, None)


def _adopt_graph(model: onnx.ModelProto, cleaned: onnx.ModelProto) -> None:
    """Give ``model`` the nodes, inputs, outputs and initializer set of ``cleaned`` (its
    weight-less, cleaned twin), keeping its own initializer messages and model fields."""
    graph, new = model.graph, cleaned.graph
    keep = {t.name for t in new.initializer}
    for i in reversed(range(len(graph.initializer))):
        if graph.initializer[i].name not in keep:
            del graph.initializer[i]
    have = {t.name for t in graph.initializer}
    graph.initializer.extend(t for t in new.initializer if t.name not in have)
    for name in ("node", "input", "output", "value_info"):
        target = getattr(graph, name)
        del target[:]
        target.extend(getattr(new, name))


def _copy_model_fields(src: onnx.ModelProto, dst: onnx.ModelProto) -> None:
    """graphsurgeon rebuilds the ModelProto; keep what it does not carry."""
    dst.ir_version = src.ir_version
    dst.producer_name = src.producer_name
    dst.producer_version = src.producer_version
    dst.domain = src.domain
    dst.model_version = src.model_version
    dst.doc_string = src.doc_string
    del dst.metadata_props[:]
    dst.metadata_props.extend(src.metadata_props)
    del dst.functions[:]
    dst.functions.extend(src.functions)
    versions = {o.domain: o.version for o in dst.opset_import}
    for opset in src.opset_import:
        if versions.get(opset.domain) != opset.version:
            versions[opset.domain] = opset.version
    del dst.opset_import[:]
    dst.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in versions.items())


# Below this many bytes of weights the manager does not call release_memory (a full gc pass
# costs ~0.1 s in a process with torch loaded; small models' copies do not matter).
_RELEASE_BYTES = 64 * 2**20


def _same_feeds(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


# Models with at least this many bytes of weights keep the copy a failing pass is rolled back
# to on disk (``_Snapshot``) instead of in memory: one model size less at the peak
# (BERT-base: 2.95x -> ~2x the file size). Smaller models keep the in-memory copy (faster).
_DISK_ROLLBACK_BYTES = 64 * 2**20


class PassManager:
    """Run passes in order, verify each, roll back failures.

    ``on_error``: "stop" raises ``PassError`` after rolling back the failing pass; "continue"
    records it and goes on with the model from before that pass.
    """

    def __init__(self, passes: Sequence[Pass], *, on_error: str = "stop", verify: bool = True,
                 progress: Callable[[str], None] | None = None):
        if on_error not in ("stop", "continue"):
            raise ConfigError(f"on_error must be 'stop' or 'continue', not {on_error!r}")
        self.passes = list(passes)
        self.on_error = on_error
        self.verify = verify
        self.progress = progress
        # (model, feeds, outputs): ORT outputs already computed for a model object, so the
        # next lossless pass's reference needs no second session on the same model.
        self._known: tuple[onnx.ModelProto, list, list] | None = None
        # The run's temporary folder for on-disk rollback copies, the check files of the
        # running pass, and a counter naming their folders (see run).
        self._spill: Path | None = None
        self._candidate: _Snapshot | None = None
        self._serial = 0

    def run(self, model: onnx.ModelProto, ctx: Context | None = None
            ) -> tuple[onnx.ModelProto, Report]:
        """Run the passes on ``model`` (changed in place or replaced) and report.

        Before each pass the manager keeps the model as it is, to roll back to: a copy in
        memory, or for models with ``_DISK_ROLLBACK_BYTES`` of weights or more a
        ``_Snapshot`` in a temporary folder, removed when the run ends however it ends.
        """
        from graphopt.analysis.cost import count_cost

        ctx = ctx or Context()
        report = Report()
        done: list[str] = []
        self._known = None
        cost = count_cost(model, ctx.input_shapes)
        weights = _weight_bytes(model)
        large = weights >= _RELEASE_BYTES
        # value_info inferred by finalize() serves the passes and their verification only:
        # kept in a model whose exporter wrote none, it lets onnxruntime apply fusions the
        # original does not get (MiniLM: SkipLayerNormalization, slower on some CPUs), so
        # a no-op run would change the speed. The result has value_info iff the input had.
        keep_value_info = len(model.graph.value_info) > 0
        self._spill = (Path(tempfile.mkdtemp(prefix="graphopt-rollback-"))
                       if weights >= _DISK_ROLLBACK_BYTES else None)
        snapshot: _Snapshot | None = None  # of `model` as it is now, when on disk
        try:
            for p in self.passes:
                if self.progress:
                    self.progress(p.name)
                entry = PassReport(p.name, config_dict(p.config), p.lossless, "not run",
                                   params_before=cost.params, macs_before=cost.macs)
                start = time.perf_counter()
                backup: onnx.ModelProto | _Snapshot
                if self._spill is None:
                    backup = onnx.ModelProto()
                    backup.CopyFrom(model)
                else:
                    if snapshot is None:
                        snapshot = self._new_snapshot(model)
                    backup = snapshot
                self._candidate = None
                # Outputs known for the model before this pass hold for the backup too.
                known = (self._known if self._known is not None and self._known[0] is model
                         else None)
                rolled_back = False
                try:
                    model, changed, diff = self._run_one(p, model, backup, ctx, entry,
                                                         tuple(done))
                    entry.status = "changed" if changed else "unchanged"
                    entry.max_abs_diff = diff
                    if changed:
                        cost = count_cost(model, ctx.input_shapes)
                        if snapshot is not None:  # the check's files, if any, are the model's
                            snapshot.close()
                            snapshot, self._candidate = self._candidate, None
                    elif known is not None:
                        self._known = (model, *known[1:])
                except PassError as exc:
                    rolled_back = True
                    if isinstance(backup, onnx.ModelProto):
                        model = backup
                    entry.status = "rolled back"
                    entry.error = str(exc)
                    logger.warning("%s; rolled back", exc)
                    if self.on_error == "stop":
                        entry.seconds = time.perf_counter() - start
                        entry.params_after, entry.macs_after = cost.params, cost.macs
                        report.passes.append(entry)
                        exc.report = report  # type: ignore[attr-defined]
                        raise
                finally:
                    if self._candidate is not None:  # the failed pass's check files
                        self._candidate.close()
                        self._candidate = None
                if rolled_back:
                    if isinstance(backup, _Snapshot):
                        # The failed model is let go of (with the exception's frames) first.
                        model = None
                        if large:
                            release_memory()
                        model = backup.restore()
                    if known is not None:
                        self._known = (model, *known[1:])
                entry.seconds = time.perf_counter() - start
                entry.params_after, entry.macs_after = cost.params, cost.macs
                report.passes.append(entry)
                done.append(p.name)
                # Let go of this pass's rollback copy before the next pass makes its own:
                # held over, it is a third copy of the weights while the next one is made.
                backup = known = None
                if large:
                    release_memory()
            if not keep_value_info:
                del model.graph.value_info[:]
            return model, report
        finally:
            if self._spill is not None:
                shutil.rmtree(self._spill, ignore_errors=True)
            self._spill = self._candidate = None

    def _new_snapshot(self, model: onnx.ModelProto) -> _Snapshot:
        """Write ``model`` to a new folder in this run's temporary folder."""
        assert self._spill is not None
        self._serial += 1
        return _Snapshot(model, self._spill / str(self._serial))

    def _as_before(self, model: onnx.ModelProto, backup: onnx.ModelProto | _Snapshot
                   ) -> onnx.ModelProto:
        """The model before a pass that reported no change (which may have edited it all
        the same): the in-memory copy, or ``model`` itself once compared with the snapshot."""
        if isinstance(backup, onnx.ModelProto):
            return backup
        if backup.matches(model):
            return model
        logger.warning("a pass that reported no change changed the model; restored")
        return backup.restore()

    def _run_one(self, p: Pass, model: onnx.ModelProto, backup: onnx.ModelProto | _Snapshot,
                 ctx: Context, entry: PassReport, before: tuple[str, ...]
                 ) -> tuple[onnx.ModelProto, bool, float | None]:
        known = self._known if self._known is not None and self._known[0] is model else None
        try:
            result = p.run(model, ctx)
        except GraphoptError as exc:
            raise PassError(p.name, str(exc), before) from exc
        except Exception as exc:  # noqa: BLE001 - a pass bug must not lose the user's model
            logger.debug("pass %s crashed", p.name, exc_info=True)
            raise PassError(p.name, f"crashed: {exc.__class__.__name__}: {exc}", before) from exc
        entry.counters = dict(result.counters)
        entry.skipped = list(result.skipped)
        if not result.modified:
            return self._as_before(model, backup), False, None
        self._known = None  # the model (perhaps the same object) has changed
        on_disk = isinstance(backup, _Snapshot)
        # The reference is computed only now, for a pass that changed something, and from
        # the outputs the previous pass's check already computed when it can.
        feeds = (ctx.sample_feeds(backup.outline if on_disk else backup, 1)
                 if self.verify else [])
        reference = None
        if self.verify and p.lossless:
            if known is not None and _same_feeds(known[1], feeds):
                reference = known[2]
            else:
                try:
                    session = (_file_session(backup.path) if on_disk
                               else ort_session(backup, lean=True))
                    reference = [run_model(session, f) for f in feeds]
                    del session
                except Exception as exc:  # noqa: BLE001 - the input model itself may not run
                    logger.warning("cannot run the model before '%s' (%s); numeric check "
                                   "skipped", p.name, exc)
        try:
            out = finalize(result.model, in_place=True)
        except Exception as exc:  # noqa: BLE001
            raise PassError(p.name, f"cleanup after the pass failed: {exc}", before) from exc
        if not self.verify:
            return out, True, None
        try:
            check_model(out)
        except onnx.checker.ValidationError as exc:
            raise PassError(p.name, f"onnx.checker refused the result: {exc}", before) from exc
        try:
            if on_disk:
                # Written for the check session, kept as the next pass's rollback copy.
                self._candidate = self._new_snapshot(out)
                session = _file_session(self._candidate.path)
            else:
                session = ort_session(out, lean=True)
        except Exception as exc:  # noqa: BLE001
            raise PassError(p.name, f"onnxruntime cannot load the result: {exc}", before) from exc
        diff = None
        if reference is not None:
            diff = 0.0
            outputs = []
            for feed, ref in zip(feeds, reference):
                try:
                    got = run_model(session, feed)
                except Exception as exc:  # noqa: BLE001
                    raise PassError(p.name, f"onnxruntime cannot run the result: {exc}",
                                    before) from exc
                worst, problem = max_difference(ref, got, p.atol, p.rtol)
                diff = max(diff, worst)
                if problem:
                    raise PassError(p.name, f"changed the outputs of a lossless pass: {problem}",
                                    before)
                outputs.append(got)
            self._known = (out, feeds, outputs)
        return out, True, diff
