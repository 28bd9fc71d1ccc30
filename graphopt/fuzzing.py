"""A seeded mutation fuzzer for the lossless passes, run through the CLI as a user runs it.

Test helpers, like ``graphopt.testing``: library code never imports this module.

One case (``run_case``): a base model (``graphopt.fuzz_models``) gets one to three
mutations (``graphopt.fuzz_mutations``; about one case in five gets a *breaking* one), is
written to a file, and ``graphopt optimize`` runs on it in process
(``graphopt.cli.commands.main``) with the lossless passes in a random order, sometimes one
pass, sometimes with ``--input-shape``. The outcome:

- ``ok``: exit 0, the output passes the checker, loads in onnxruntime and matches the input
  (within 1e-4 + 1e-5 of each output's largest magnitude: float rounding of a folded
  BatchNorm scales with the values it multiplies) at every *probe* size: the sizes the input runs at among
  1, 2, 3, 5, 8, 16, 32 and 64 (the fuzzer's own choice, not the manager's), feeding every
  overridable initializer a new value too;
- ``refused``: exit 2 with one ``error:`` line, nothing written: right for a broken input,
  a failure (``refused-valid``) for one the checker and onnxruntime accept;
- ``unverified``: exit 1, nothing written, the report names the pass (fine);
- failures: ``wrong`` (exit 0 with different outputs, or an output the checker or
  onnxruntime refuses), ``unverified exit 0``, ``rolled back`` (of an input the checker and
  onnxruntime accept), ``internal`` (internal error or traceback), ``modified`` (the input
  file changed), ``hang`` (over ``timeout`` seconds).

``campaign(cases, seed)`` runs many and tallies them; ``python -m graphopt.fuzzing`` (or
``benchmarks/fuzz_lossless.py``) prints the table.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import signal
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from graphopt.fuzz_models import shipped_models, tiny_cnn
from graphopt.fuzz_mutations import BREAKING, VALID

LOSSLESS = ("cleanup", "fold-batchnorm", "fold-pad")
FAILURES = ("wrong", "unverified exit 0", "rolled back", "internal", "modified", "hang",
            "refused-valid")
PROBE_SIZES = (1, 2, 3, 5, 8, 16, 32, 64)


@dataclass
class Case:
    seed: int
    base: str
    mutations: list[str]
    args: list[str]
    outcome: str = ""
    detail: str = ""
    valid: bool = False  # the input passes the checker and runs in onnxruntime


@dataclass
class Tally:
    cases: list[Case] = field(default_factory=list)

    @property
    def counts(self) -> Counter:
        return Counter(c.outcome for c in self.cases)

    @property
    def failures(self) -> list[Case]:
        return [c for c in self.cases if c.outcome in FAILURES]


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _deadline(seconds: float):
    def fire(signum, frame):  # noqa: ARG001
        raise _Timeout()

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _feeds(session, model: onnx.ModelProto, size: int, rng) -> dict[str, np.ndarray]:
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for meta in session.get_inputs():
        if meta.name in inits:
            continue
        shape = [d if isinstance(d, int) and d > 0 else (1 if i == 0 else size)
                 for i, d in enumerate(meta.shape)]
        feeds[meta.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _quiet():
    import onnxruntime as ort

    options = ort.RunOptions()
    options.log_severity_level = 4
    return options


_QUIET = _quiet()


def probe(model: onnx.ModelProto, rng, limit: int = 4):
    """(sizes the model runs at, their feeds, outputs); the session is the model's own."""
    session = _session(model)
    found = []
    for size in PROBE_SIZES:
        feed = _feeds(session, model, size, rng)
        try:
            out = session.run(None, feed, _QUIET)
        except Exception:  # noqa: BLE001 - not at this size
            continue
        found.append((size, feed, out))
        if len(found) == limit or not any(
                not isinstance(d, int) for m in session.get_inputs() for d in m.shape):
            break
    return found


def _overrides(model: onnx.ModelProto, rng) -> dict[str, np.ndarray]:
    """New values for initializers that are also graph inputs (IR >= 4)."""
    if model.ir_version < 4:
        return {}
    inputs = {i.name for i in model.graph.input}
    out = {}
    for t in model.graph.initializer:
        if t.name in inputs:
            value = onnx.numpy_helper.to_array(t)
            out[t.name] = np.asarray(
                value + rng.standard_normal(value.shape) if value.dtype == np.float32
                else value, dtype=value.dtype)
    return out


def _is_valid(model: onnx.ModelProto) -> bool:
    try:
        onnx.checker.check_model(model)
        _session(model)
        return True
    except Exception:  # noqa: BLE001
        return False


def _compare(src: onnx.ModelProto, out: onnx.ModelProto, probes, rng) -> str | None:
    try:
        onnx.checker.check_model(out)
    except Exception as exc:  # noqa: BLE001
        return f"output refused by the checker: {str(exc).splitlines()[0]}"
    try:
        got_session, ref_session = _session(out), _session(src)
    except Exception as exc:  # noqa: BLE001
        return f"output does not load in onnxruntime: {str(exc)[:200]}"
    extra = _overrides(src, rng)
    for size, feed, want in probes:
        for feeds in ([feed, {**feed, **extra}] if extra else [feed]):
            try:
                got = got_session.run(None, feeds)
                want = ref_session.run(None, feeds) if feeds is not feed else want
            except Exception as exc:  # noqa: BLE001
                return f"output fails at size {size}: {str(exc)[:200]}"
            for a, b in zip(want, got):
                a, b = np.asarray(a), np.asarray(b)
                if a.shape != b.shape:
                    return f"size {size}: shape {b.shape} instead of {a.shape}"
                if a.dtype.kind != "f":
                    if not np.array_equal(a, b):
                        return f"size {size}: integer/bool outputs differ"
                    continue
                # Float rounding scales with the output's magnitude (a folded BatchNorm
                # reassociates products of values in the hundreds), not with each element.
                finite = np.abs(a[np.isfinite(a)])
                scale = float(finite.max()) if finite.size else 0.0
                with np.errstate(invalid="ignore"):
                    diff = np.abs(a.astype(np.float64) - b)
                diff[(a == b) | (np.isnan(a) & np.isnan(b))] = 0.0  # equal infinities too
                worst = float(diff.max()) if a.size else 0.0
                if not worst <= 1e-4 + 1e-5 * scale:  # NaN on one side only fails too
                    return f"size {size}: max abs difference {worst:.3g} (output scale {scale:.3g})"
    return None


def _bases(rng, extra: dict[str, onnx.ModelProto]) -> tuple[str, onnx.ModelProto]:
    names = ["tiny_cnn"] * 3 + sorted(extra)
    name = names[int(rng.integers(len(names)))]
    if name == "tiny_cnn":
        return name, tiny_cnn(rng)
    model = onnx.ModelProto()
    model.CopyFrom(extra[name])
    return name, model


def run_case(seed: int, folder: Path, extra: dict[str, onnx.ModelProto] | None = None,
             timeout: float = 120.0, keep: Path | None = None) -> Case:
    """One fuzz case (see the module doc); never raises. With ``keep``, the input of a case
    that did not end ``ok`` or ``refused`` is copied there as ``seed_N.onnx``."""
    from graphopt.cli.commands import main

    rng = np.random.default_rng(seed)
    name, model = _bases(rng, extra or {})
    mutations: list[str] = []
    picks = [(VALID, "") for _ in range(int(rng.integers(1, 4)))]
    if rng.random() < 0.2:
        picks.append((BREAKING, "!"))
    for table, mark in picks:
        key = list(table)[int(rng.integers(len(table)))]
        work = _copy(model)
        try:
            mutated = table[key](work, rng)
        except Exception:  # noqa: BLE001 - a mutation that does not fit this model
            mutated = None
        if mutated is not None:
            model = mutated
            mutations.append(mark + key)
    passes = list(LOSSLESS)
    rng.shuffle(passes)
    passes = passes[: int(rng.choice([1, 3, 3, 2]))]
    src, out, report = folder / f"in_{seed}.onnx", folder / f"out_{seed}.onnx", \
        folder / f"report_{seed}.json"
    src.write_bytes(model.SerializeToString())
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    args = ["optimize", str(src), "-o", str(out), "--report", str(report)]
    for p in passes:
        args += ["--pass", p]
    case = Case(seed, name, mutations, args[4:])
    try:
        probes = probe(model, rng)
    except Exception:  # noqa: BLE001 - onnxruntime cannot load it
        probes = []
    case.valid = bool(probes) and _is_valid(model)
    if probes and rng.random() < 0.25:
        feed = probes[int(rng.integers(len(probes)))][1]
        for k, v in feed.items():
            args += ["--input-shape", f"{k}:{'x'.join(str(d) for d in v.shape)}"]
        case.args = args[4:]
    stderr = io.StringIO()
    try:
        with _deadline(timeout), contextlib.redirect_stderr(stderr), \
                contextlib.redirect_stdout(io.StringIO()):
            code = main(args)
    except _Timeout:
        case.outcome, case.detail = "hang", f"over {timeout:.0f} s"
        return case
    except BaseException as exc:  # noqa: BLE001 - a traceback escaped main()
        case.outcome, case.detail = "internal", f"{exc.__class__.__name__}: {exc}"
        return case
    lines = [ln for ln in stderr.getvalue().splitlines() if ln.startswith("error:")]
    if hashlib.sha256(src.read_bytes()).hexdigest() != digest:
        case.outcome = "modified"
    elif code == 0:
        data = json.loads(report.read_text()) if report.exists() else {}
        if data.get("unverified"):
            case.outcome = "unverified exit 0"
        elif not probes:
            case.outcome, case.detail = "ok", "input runs at no probe size; output written"
            if not out.exists():
                case.outcome = "wrong"
        else:
            problem = _compare(model, onnx.load(str(out)), probes, rng)
            case.outcome, case.detail = ("wrong", problem) if problem else ("ok", "")
    elif code == 1:
        data = json.loads(report.read_text()) if report.exists() else {}
        rolled = [p for p in data.get("passes", []) if p.get("status") == "rolled back"]
        if rolled:
            case.outcome = "rolled back" if case.valid else "rolled back (invalid input)"
            case.detail = (rolled[0].get("error") or "")[:300]
        elif data.get("unverified") and not out.exists():
            case.outcome, case.detail = "unverified", (lines[0] if lines else "")[:300]
        else:
            case.outcome, case.detail = "mismatch", (lines[0] if lines else "")[:300]
    elif code == 2 and len(lines) == 1 and not out.exists():
        case.outcome = "refused-valid" if case.valid else "refused"
        case.detail = lines[0][:300]
    else:
        case.outcome, case.detail = "internal", f"exit {code}: {' | '.join(lines)[:300]}"
    if keep is not None and case.outcome not in ("ok", "refused"):
        keep.mkdir(parents=True, exist_ok=True)
        (keep / f"seed_{seed}.onnx").write_bytes(src.read_bytes())
    for path in (src, out, report, Path(str(out) + ".data")):
        path.unlink(missing_ok=True)
    return case


def campaign(cases: int, seed: int = 0, *, shipped: bool = False,
             extra: dict[str, onnx.ModelProto] | None = None, progress=None) -> Tally:
    """``cases`` seeded cases (seeds ``seed .. seed+cases-1``); ``shipped`` adds the PP-OCR
    models when rapidocr-onnxruntime is installed."""
    import logging

    import onnxruntime

    onnxruntime.set_default_logger_severity(4)
    models = dict(extra or {})
    if shipped:
        models.update(shipped_models())
    tally = Tally()
    logging.disable(logging.WARNING)
    try:
        with tempfile.TemporaryDirectory(prefix="graphopt-fuzz-") as tmp:
            for i in range(cases):
                tally.cases.append(run_case(seed + i, Path(tmp), models))
                if progress:
                    progress(tally.cases[-1])
    finally:
        logging.disable(logging.NOTSET)
    return tally
