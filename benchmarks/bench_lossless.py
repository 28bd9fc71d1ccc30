"""Time and memory of load -> lossless passes -> save on BERT-base- and ResNet-50-sized models.

    python benchmarks/bench_lossless.py                      # both models, results table
    python benchmarks/bench_lossless.py --models bert --repeat 5 --json
    python benchmarks/bench_lossless.py --trace bert         # time and RSS of each step
    python benchmarks/bench_lossless.py --profile bert       # cProfile of one run

1. The models are built once (random weights, fixed seed) and cached in ``--cache``
   (default ``$TMPDIR/graphopt-bench``):
   - ``bert``: transformers ``BertModel.from_config`` with BERT-base's sizes (12 layers,
     hidden 768, FFN 3072, 12 heads, vocab 30522), exported by ``graphopt.exporters.export_hf``
     (TorchScript exporter, its default constant folding: the file a user gets).
   - ``resnet``: a ResNet-50 written here in plain ``torch.nn`` (bottlenecks [3, 4, 6, 3],
     widths 64-2048, BatchNorm, 224x224 input), exported with ``optimize=False`` so its 53
     BatchNorms and the Dropout-free graph are left to graphopt's passes.
2. Each measurement runs in a fresh Python process: imports, then ``graphopt.load`` ->
   ``PassManager([cleanup, fold-batchnorm, fold-pad])`` (verification on, as by default) ->
   ``graphopt.save``. Wall time covers load to save (imports excluded, reported apart).
3. Memory is the child's peak RSS (``ru_maxrss``). ``peak - base`` subtracts the RSS
   measured after imports (onnx, onnxruntime, graphsurgeon, graphopt and the passes), so it
   is what the model costs; both are given as multiples of the model file's size. The
   target (BERT-base: < 10 s, < 2.5x) is checked against ``peak - base``. CPU time
   (user + system) is given beside the wall time: on a shared machine it moves less.
4. ``--trace`` runs one measurement observed through the manager's hook (``observers``): seconds and RSS
   before/peak/after of every call, in order, and the step running at the highest RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from models import resnet50  # benchmarks/models.py, beside this script

PASSES = ("cleanup", "fold-batchnorm", "fold-pad")
MODELS = ("bert", "resnet")
TARGET_SECONDS = 10.0
TARGET_MEMORY = 2.5


# --------------------------------------------------------------------------- models


def build(name: str, path: Path) -> None:
    """Export one benchmark model to ``path`` (runs in a child process)."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    from graphopt.exporters import export, export_hf

    if name == "bert":
        import torch
        import transformers

        torch.manual_seed(0)
        config = transformers.BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                                         num_attention_heads=12, intermediate_size=3072)
        export_hf(config, path, exporter="torchscript", batch=2, seq_len=128)
    elif name == "resnet":
        import torch

        export(resnet50(trained_bn_stats=True), torch.randn(2, 3, 224, 224), path,
               input_names=["image"],
               output_names=["logits"], dynamic_axes={"image": {0: "batch"}},
               exporter="torchscript", optimize=False)
    else:
        raise SystemExit(f"unknown model {name!r}")


# --------------------------------------------------------------------------- measurement


def measure(path: Path, passes: list[str], out: Path, observers=()) -> dict:
    """load -> passes -> save in this (fresh) process; returns times and peak RSS."""
    import resource
    import time

    start_imports = time.perf_counter()
    import onnx  # noqa: F401
    import onnx_graphsurgeon  # noqa: F401
    import onnxruntime  # noqa: F401

    import graphopt
    from graphopt.analysis import shapes
    from graphopt.ir.model import max_ir_version
    from graphopt.core.contract import Context
    from graphopt.core.manager import PassManager
    from graphopt.core.registry import build_pass, registered_passes

    known = registered_passes()
    # Load ORT's symbolic shape inference now, so its import is not charged to the model.
    getattr(shapes, "_symbolic_class", lambda: None)()
    max_ir_version()
    imports = time.perf_counter() - start_imports
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    run = [p for p in passes if p in known]
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    loaded = [graphopt.load(path)]
    t1 = time.perf_counter()
    # The pipeline keeps no reference to the loaded proto: the manager may drop it once a
    # pass has replaced it (a caller that keeps it pays one more model size).
    model, report = PassManager([build_pass(p) for p in run], observers=observers).run(
        loaded.pop(), Context())
    t2 = time.perf_counter()
    graphopt.save(model, out)
    t3 = time.perf_counter()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak = usage.ru_maxrss * 1024
    cpu = usage.ru_utime + usage.ru_stime - usage0.ru_utime - usage0.ru_stime
    return {
        "cpu_s": cpu,
        "passes": run, "missing_passes": [p for p in passes if p not in known],
        "imports_s": imports, "load_s": t1 - t0, "passes_s": t2 - t1, "save_s": t3 - t2,
        "wall_s": t3 - t0, "base_rss": base, "peak_rss": peak,
        "per_pass": {p.name: {"status": p.status, "seconds": p.seconds, "counters": p.counters}
                     for p in report.passes},
        "ok": report.ok,
    }


class _Tracer:
    """Peak RSS and time per phase: a thread samples /proc/self/statm every 2 ms while the
    manager's steps (patched below) push and pop phase names."""

    def __init__(self):
        import threading

        self.page = os.sysconf("SC_PAGE_SIZE")
        self.stack: list[str] = ["(other)"]
        self.stats: dict[str, list[float]] = {}  # phase -> [calls, seconds, peak rss]
        self.events: list[tuple] = []  # (depth, phase, rss in, rss out, peak, seconds)
        self.top = (0, "")  # highest sampled RSS and the phases running then
        self._tokens: list[tuple] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self.page

    def _note(self, phase: str, rss: int) -> None:
        entry = self.stats.setdefault(phase, [0, 0.0, 0])
        entry[2] = max(entry[2], rss)

    def _sample(self) -> None:
        while not self.stop.wait(0.002):
            rss = self.rss()
            self._note(self.stack[-1], rss)
            if rss > self.top[0]:
                self.top = (rss, " > ".join(self.stack))

    def enter(self, label: str) -> tuple:
        import time

        self.stack.append(label)
        self.stats.setdefault(label, [0, 0.0, 0])
        before_peak = self.stats[label][2]
        self.stats[label][2] = 0
        return label, time.perf_counter(), self.rss(), before_peak

    def leave(self, token: tuple) -> None:
        import resource
        import time

        label, start, entry_rss, before_peak = token
        self._note(label, self.rss())
        call_peak = self.stats[label][2]
        max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.events.append((len(self.stack) - 1, label, entry_rss, self.rss(),
                            max(call_peak, self.rss()), time.perf_counter() - start, max_rss))
        self.stats[label][2] = max(before_peak, call_peak)
        entry = self.stats[label]
        entry[0] += 1
        entry[1] += time.perf_counter() - start
        self.stack.pop()

    def wrap(self, owner, attr: str, label: str) -> None:
        import functools

        original = getattr(owner, attr)

        @functools.wraps(original)
        def traced(*args, **kwargs):
            token = self.enter(label)
            try:
                return original(*args, **kwargs)
            finally:
                self.leave(token)

        setattr(owner, attr, traced)

    def observe(self, event) -> None:
        """The manager's observer hook (graphopt.core.observe): one phase per label."""
        label = _PHASE_LABELS.get(event.phase, event.phase)
        if event.phase == "run":
            label = f"pass {event.pass_name}.run"
        if event.phase == "snapshot":  # a point event: counted, not timed
            self.leave(self.enter(label))
        elif event.stage == "start":
            self._tokens.append(self.enter(label))
        else:
            self.leave(self._tokens.pop())


_PHASE_LABELS = {
    "pass": "  manager: all of a pass", "reference": "ort reference (session + run)",
    "session": "ort session (write weights + create)", "finalize": "finalize (cleanup + shapes)",
    "checker": "onnx.checker", "compare": "ort run of the result + compare",
    "snapshot": "snapshot write (rollback copy)", "restore": "restore (rollback)",
    "cost": "count_cost (shape inference)",
}


def trace(path: Path, passes: list[str], out: Path) -> None:
    """Run ``measure`` with each step of the manager timed and its peak RSS recorded."""
    import graphopt
    from graphopt.analysis import shapes

    tracer = _Tracer()
    base = tracer.rss()
    size = path.stat().st_size
    tracer.wrap(graphopt, "load", "load")
    tracer.wrap(graphopt, "save", "save")
    tracer.wrap(shapes, "infer_shapes", "  infer_shapes (inside finalize/cost)")
    result = measure(path, passes, out, observers=[tracer.observe])
    tracer.stop.set()
    print(f"model file {size / 2**20:.0f} MB; RSS after imports {base / 2**20:.0f} MB; "
          f"wall {result['wall_s']:.2f} s; peak RSS - base "
          f"{(result['peak_rss'] - base) / 2**20:.0f} MB = {(result['peak_rss'] - base) / size:.2f}x")
    print(f"highest sampled RSS - base {(tracer.top[0] - base) / size:.2f}x during: "
          f"{tracer.top[1]}")
    print(f"{'phase':48s} {'calls':>5s} {'seconds':>8s} {'peak RSS - base':>16s} {'x file':>7s}")
    for phase, (calls, seconds, peak) in tracer.stats.items():
        print(f"{phase:48s} {int(calls):5d} {seconds:8.2f} {(peak - base) / 2**20:13.0f} MB "
              f"{(peak - base) / size:6.2f}x")
    print("\ncalls in order of completion (RSS - base, as multiples of the file size):")
    print(f"{'phase':50s} {'in':>6s} {'peak':>6s} {'out':>6s} {'seconds':>8s} "
          f"{'max so far':>10s}")
    def x(v: float) -> str:
        return f"{(v - base) / size:5.2f}x"

    for depth, phase, rin, rout, peak, seconds, max_rss in tracer.events:
        print(f"{'  ' * depth + phase.strip():50s} {x(rin)} {x(peak)} {x(rout)} "
              f"{seconds:8.2f} {x(max_rss):>10s}")


def _child(args: list[str], profile: bool = False) -> dict:
    script = [sys.executable]
    if profile:
        script += ["-m", "cProfile", "-s", "cumtime"]
    proc = subprocess.run(script + [__file__, *args], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise SystemExit(f"child {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n"
                         f"{proc.stderr[-4000:]}")
    if profile:
        print(proc.stdout[:12000])
        return {}
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else {}


def _ensure_model(name: str, cache: Path) -> Path:
    path = cache / f"{name}.onnx"
    if not path.is_file():
        print(f"building {name} into {path} (once) ...", file=sys.stderr)
        _child(["--_build", name, str(path)])
    return path


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma-separated: bert, resnet (default both)")
    parser.add_argument("--passes", default=",".join(PASSES))
    parser.add_argument("--cache", type=Path,
                        default=Path(tempfile.gettempdir()) / "graphopt-bench")
    parser.add_argument("--repeat", type=int, default=1, help="runs per model (median kept)")
    parser.add_argument("--json", action="store_true", help="print raw results as JSON")
    parser.add_argument("--profile", metavar="MODEL", help="cProfile one run of MODEL")
    parser.add_argument("--trace", metavar="MODEL",
                        help="time and peak RSS of each step of one run of MODEL")
    parser.add_argument("--_build", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--_trace", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--_measure", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()

    passes = [p for p in args.passes.split(",") if p]
    if args._build:
        build(args._build[0], Path(args._build[1]))
        return
    if args._measure:
        result = measure(Path(args._measure[0]), passes, Path(args._measure[1]))
        print(json.dumps(result))
        return

    if args._trace:
        trace(Path(args._trace[0]), passes, Path(args._trace[1]))
        return

    args.cache.mkdir(parents=True, exist_ok=True)
    if args.trace:
        path = _ensure_model(args.trace, args.cache)
        proc = subprocess.run([sys.executable, __file__, "--passes", ",".join(passes),
                               "--_trace", str(path), str(args.cache / f"{args.trace}.opt.onnx")],
                              capture_output=True, text=True, check=False)
        print(proc.stdout, proc.stderr[-3000:] if proc.returncode else "")
        return
    if args.profile:
        path = _ensure_model(args.profile, args.cache)
        _child(["--passes", ",".join(passes), "--_measure", str(path),
                str(args.cache / f"{args.profile}.opt.onnx")], profile=True)
        return

    results = {}
    for name in [m for m in args.models.split(",") if m]:
        path = _ensure_model(name, args.cache)
        runs = [_child(["--passes", ",".join(passes), "--_measure", str(path),
                        str(args.cache / f"{name}.opt.onnx")]) for _ in range(args.repeat)]
        best = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
        best["wall_s_all"] = [r["wall_s"] for r in runs]
        best["wall_s"] = statistics.median(best["wall_s_all"])
        best["file_bytes"] = path.stat().st_size + sum(
            p.stat().st_size for p in path.parent.glob(f"{name}.onnx.data"))
        best["out_bytes"] = (args.cache / f"{name}.opt.onnx").stat().st_size
        results[name] = best

    if args.json:
        print(json.dumps(results, indent=2))
        return
    _render(results)


def _render(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"load -> {' -> '.join(next(iter(results.values()))['passes'])} "
                        f"-> save ({os.cpu_count()} cores)")
    for col in ("model", "file", "wall", "CPU", "load", "passes", "save", "peak RSS", "peak - base",
                "peak/file", "(peak-base)/file"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, r in results.items():
        size = r["file_bytes"]
        table.add_row(
            name, _mb(size), f"{r['wall_s']:.2f} s", f"{r['cpu_s']:.2f} s", f"{r['load_s']:.2f} s",
            f"{r['passes_s']:.2f} s", f"{r['save_s']:.2f} s", _mb(r["peak_rss"]),
            _mb(r["peak_rss"] - r["base_rss"]), f"{r['peak_rss'] / size:.2f}x",
            f"{(r['peak_rss'] - r['base_rss']) / size:.2f}x",
        )
    console = Console(width=max(Console().width, 150))
    console.print(table)
    for name, r in results.items():
        steps = ", ".join(f"{k} {v['status']} {v['seconds']:.2f} s" for k, v in r["per_pass"].items())
        console.print(f"{name}: {steps}; imports {r['imports_s']:.2f} s"
                      + (f"; not registered: {', '.join(r['missing_passes'])}"
                         if r["missing_passes"] else ""))
    if "bert" in results:
        r = results["bert"]
        ratio = (r["peak_rss"] - r["base_rss"]) / r["file_bytes"]
        ok = r["wall_s"] < TARGET_SECONDS and ratio < TARGET_MEMORY
        console.print(f"BERT-base target (< {TARGET_SECONDS:g} s, < {TARGET_MEMORY:g}x): "
                      f"{'met' if ok else 'MISSED'} ({r['wall_s']:.2f} s, {ratio:.2f}x)")


if __name__ == "__main__":
    main()
