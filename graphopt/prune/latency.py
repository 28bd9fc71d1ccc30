"""A measured width response for the ``latency=`` budget: what each node costs at each kept
width, on the provider and thread count the model will run with.

A node's latency is not linear in its width: small layers keep a fixed overhead and thread
poorly, widths off the kernel's block size run slower. So instead of profiling once at full
width and charging a unit its linear share, ``measure`` profiles the model at a few
*uniformly reduced* widths and interpolates each node's time between them:

1. Levels: at kept share ``f`` (``LEVELS``: 1, 0.75, 0.5, 0.25, 0.125) every group the pass may cut
   keeps ``ceil(f * size)`` units rounded up to its step (``round_to``), at least
   ``min_keep``; the prune engine (``apply_removal``) builds each level's model.
2. Each level is profiled with onnxruntime's profiler, round-robin (level 1, 2, 3, 4, 1, ...,
   so load drift hits all levels alike), with ``session_options(threads)`` (the options
   every graphopt session uses, graph optimizations at ORT's default ``ORT_ENABLE_ALL``)
   on ``provider``.
3. Attribution (``attribute``): before profiling, node ``i`` is renamed ``gn{i}x`` and its
   outputs ``gt{i}x{k}``. ORT keeps a node's name when it runs it as is; an optimized node
   is named after the node or tensor it came from (NCHWc convs are named
   ``<output>_nchwc``, a Conv fused with its Relu/Add after one of them). So each kernel
   event's name gives an original node; if that node's op is not the kernel's (``Conv``
   event on a ``Relu``), the time goes to the nearest producer with the kernel's op (the
   Conv the Relu was fused into). Per kernel the 25th percentile of its times over the
   runs is taken. Events that name no node (layout reorders) and the wall time outside
   kernels are the ``overhead``; it is interpolated like a node's time, over the share of
   node time a level keeps (MiniLM: 2.8 ms of 22.8 at full width, 1.7 ms at 0.125).
4. Response (``LatencyTable.time``): node ``n``'s kept fraction at a level is the product
   over the groups touching it of ``1 - removed * share`` (``budget.unit_shares``, as
   ``budget.exact_removed`` counts it); its time is interpolated piecewise-linearly over
   the measured (kept fraction, time) points, made non-decreasing, and below the smallest
   measured fraction scaled linearly toward 0.
5. ``LatencyTable.removed`` is ``exact_removed`` with that response, and ``chunk_cost`` is
   what one chunk of a group saves (the difference of the response at the chunk's ends),
   so the allocator ranks units by their measured cost.

6. The table is a model: the pass then times the cut itself (``time_cut``, ``checks`` times
   at most) and, when the measured ratio misses the budget by more than ``TOLERANCE``,
   asks the table again for the budget scaled by predicted / measured.

The cost of building the table (seconds, runs, levels) is in ``LatencyTable.report``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from .budget import kept_fractions, unit_shares

LEVELS = (1.0, 0.75, 0.5, 0.25, 0.125)
_NAME = re.compile(r"g[nt](\d+)x")
_FUSED = ("Fused", "Nchwc", "QLinear")
# per kernel, this quantile of its times over the runs: on a shared machine the low quantile
# is the least contended estimate (on a quiet one it is the median's neighbour)
QUANTILE = 0.25
TOLERANCE = 0.03  # a cut whose measured latency ratio is within 3 % of the budget stays


@dataclass
class LatencyTable:
    """Per original node: full-width µs (``full``) and (kept fraction, µs) points."""

    full: np.ndarray
    points: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    overhead: float = 0.0
    overhead_points: tuple[np.ndarray, np.ndarray] | None = None  # (nodes' kept share, µs)
    levels: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    provider: str = "cpu"
    threads: int | None = None

    @property
    def total(self) -> float:
        """µs of one run at full width: the nodes plus the overhead."""
        return float(self.full.sum()) + self.overhead

    def time(self, node: int, kept: float) -> float:
        """µs of ``node`` at kept fraction ``kept`` (module doc, 4)."""
        if kept >= 1.0 - 1e-12 or node not in self.points:
            return float(self.full[node]) if kept >= 1.0 - 1e-12 else \
                float(self.full[node]) * max(kept, 0.0)
        xs, ts = self.points[node]
        kept = max(kept, 0.0)
        if kept < xs[0]:
            return float(ts[0]) * kept / xs[0] if xs[0] > 0 else 0.0
        return float(np.interp(kept, xs, ts))

    def removed(self, shares: Mapping[int, Mapping[object, float]],
                removal: Mapping[int, Sequence[int]], dead: set) -> float:
        """µs a cut removes: ``budget.exact_removed`` with the measured response."""
        kept = kept_fractions(shares, {g: len(u) for g, u in removal.items()})
        total = sum(float(self.full[n]) for n in dead if isinstance(n, int))
        for n, f in kept.items():
            if n not in dead:
                total += float(self.full[n]) - self.time(n, f)
        nodes = float(self.full.sum())
        return total + self.overhead - self.overhead_at(1.0 - total / nodes if nodes else 1.0)

    def overhead_at(self, share: float) -> float:
        """µs outside the nodes when the nodes keep ``share`` of their time (module doc, 3)."""
        if self.overhead_points is None or share >= 1.0:
            return self.overhead
        xs, ys = self.overhead_points
        if share < xs[0]:
            return float(ys[0]) * max(share, 0.0) / xs[0] if xs[0] > 0 else 0.0
        return float(np.interp(share, xs, ys))

    def chunk_cost(self, share: Mapping[object, float], start: int, count: int) -> float:
        """µs saved by removing units ``start .. start+count`` of one group (the others
        uncut)."""
        return sum(self.time(n, 1.0 - start * s) - self.time(n, 1.0 - (start + count) * s)
                   for n, s in share.items())

    def report(self) -> dict:
        return {"provider": self.provider, "threads": self.threads or "ort default",
                "seconds": round(self.seconds, 2), "total_us": round(self.total, 1),
                "overhead_us": round(self.overhead, 1), "levels": self.levels}


@functools.cache
def nchwc_block() -> int:
    """Channels per block of onnxruntime's NCHWc CPU kernels on this machine (MLAS: 16 with
    AVX-512F, 8 with AVX2), 1 where it cannot tell (no x86 flags in /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh
                          if line.startswith("flags")), [])
    except OSError:
        return 1
    if "avx512f" in flags:
        return 16
    return 8 if "avx2" in flags else 1


def time_cut(model: onnx.ModelProto, coupling, removal: Mapping[int, Sequence[int]],
             blocks: Sequence, feed: Mapping[str, np.ndarray], provider: str,
             threads: int | None, rounds: int = 25) -> float:
    """Latency of ``model`` with ``removal`` (and ``blocks``) cut over the model's, measured
    A/B interleaved (``graphopt.runtime.benchmark``) on ``provider`` with ``threads``."""
    from ..runtime.benchmark import benchmark
    from .apply import apply_removal
    from .blocks import remove_blocks

    work = onnx.ModelProto()
    work.CopyFrom(model)
    if removal:
        apply_removal(work, coupling, removal)
    if blocks:
        remove_blocks(work, list(blocks))
    result = benchmark(work, vs=model, provider=provider, feeds=dict(feed), threads=threads,
                       warmup=3, rounds=rounds, min_time=0.0)
    return float(result.ratio)


def checked_cut(first, total: float, fraction: float, checks: int, time_it, again):
    """Time the cut ``first`` = (allocation, removed µs on the table) with ``time_it`` and,
    while the measured ratio misses ``fraction`` by more than ``TOLERANCE``, ask ``again``
    (kept share on the table -> (allocation, removed) or None when it cannot be met) for
    the budget scaled by predicted / measured (after two timings: the secant through them),
    ``checks`` timings at most (module doc, 6). Returns the timed cut closest to the budget
    without passing it by more than the tolerance (else the fastest), the timings and a
    report line."""
    current, tried = first, []
    for _ in range(checks):
        measured = time_it(current[0])
        predicted = 1.0 - current[1] / total
        tried.append((current, predicted, measured))
        if abs(measured / fraction - 1.0) <= TOLERANCE or len(tried) == checks:
            break
        target = fraction * predicted / measured
        if len(tried) > 1:  # two timed cuts: the secant through them
            (_, p1, m1), (_, p2, m2) = tried[-2:]
            if m2 != m1 and (m2 - m1) / (p2 - p1 or 1e-12) > 0:
                target = p2 + (fraction - m2) * (p2 - p1) / (m2 - m1)
        # a timing on a loaded machine can be off by 10 %+: never move the ask by more than 30 %
        target = min(max(target, 0.7 * predicted), 1.3 * predicted)
        current = again(min(max(target, 1e-3), 1.0))
        if current is None:
            break
    ok = [t for t in tried if t[2] <= fraction * (1 + TOLERANCE)]
    pick = max(ok, key=lambda t: t[2]) if ok else min(tried, key=lambda t: t[2])
    rows = [{"predicted": round(t[1], 4), "measured": round(t[2], 4), "chosen": t is pick}
            for t in tried]
    note = "latency checks (cut timed against the model, A/B): " + ", ".join(
        f"table {t[1]:.3f} -> measured {t[2]:.3f}" + (" (kept)" if t is pick else "")
        for t in tried)
    return pick[0], rows, note


def latency_note(table: LatencyTable) -> str:
    """One report line: what the table measured and what it cost to build."""
    walls = ", ".join(f"{lv['keep']:g}: {lv['wall_us'] / 1000:.1f} ms" for lv in table.levels)
    return (f"latency table: measured on {table.provider}, threads "
            f"{table.threads or 'onnxruntime default'}, at uniform kept widths ({walls}) in "
            f"{table.seconds:.1f} s; each unit costs what its width saves on that response "
            "(graphopt.prune.latency)")


def monotone(values: Sequence[float]) -> np.ndarray:
    """The non-decreasing sequence closest to ``values`` in least squares (pool adjacent
    violators): a node's time may not fall as its kept width grows."""
    blocks: list[list[float]] = []  # [sum, count]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            a, b = blocks.pop(), blocks.pop()
            blocks.append([a[0] + b[0], a[1] + b[1]])
    return np.concatenate([np.full(int(c), s / c) for s, c in blocks])


def uniform_counts(groups, keep: float, steps: Mapping[int, int], min_keep: int
                   ) -> dict[int, int]:
    """Units each group loses at kept share ``keep`` (module doc, 1)."""
    out = {}
    for g in groups:
        step = steps.get(g.id, 1)
        kept = min(max(int(math.ceil(keep * g.size / step - 1e-9)) * step, min_keep, 1), g.size)
        if kept < g.size:
            out[g.id] = g.size - kept
    return out


def indexed(model: onnx.ModelProto, index_of: Mapping[str, int]) -> onnx.ModelProto:
    """A copy of ``model`` whose node ``j`` is named ``gn{i}x`` and its outputs ``gt{i}x{k}``,
    ``i`` = ``index_of[first output]`` (the original node's index), or a fresh ``gnew`` name
    when the node has no original."""
    from ..ir.model import max_ir_version

    work = onnx.ModelProto()
    work.CopyFrom(model)
    work.ir_version = min(work.ir_version, max_ir_version())
    rename: dict[str, str] = {}
    for j, node in enumerate(work.graph.node):
        i = index_of.get(node.output[0]) if node.output else None
        node.name = f"gn{i}x" if i is not None else f"gnew{j}"
        for k, out in enumerate(node.output):
            if out and i is not None:
                rename[out] = f"gt{i}x{k}"
    for node in work.graph.node:
        for k, name in enumerate(node.input):
            if name in rename:
                node.input[k] = rename[name]
        for k, name in enumerate(node.output):
            if name in rename:
                node.output[k] = rename[name]
    for vi in work.graph.output:
        vi.name = rename.get(vi.name, vi.name)
    del work.graph.value_info[:]
    return work


def attribute(events: Sequence[dict], nodes: Sequence[onnx.NodeProto]
              ) -> tuple[np.ndarray, float, float]:
    """(µs per node, unattributed kernel µs, wall µs) per run from one
    profile of a model made by ``indexed`` (module doc, 3): per kernel the ``QUANTILE`` of
    its times over runs; the wall time is the kernels plus the same quantile of the time a
    run spends outside them.
    ``nodes``: the original nodes."""
    per: dict[str, list[float]] = {}
    ops: dict[str, str] = {}
    runs = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")
    inside = [0.0] * len(runs)
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        name = e["name"][: -len("_kernel_time")]
        per.setdefault(name, []).append(float(e.get("dur", 0)))
        ops[name] = e.get("args", {}).get("op_name", "")
        for r, (a, b) in enumerate(runs):
            if a <= float(e.get("ts", 0)) <= b:
                inside[r] += float(e.get("dur", 0))
                break
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    out = np.zeros(len(nodes))
    other = 0.0
    for name, durs in per.items():
        t = float(np.quantile(durs, QUANTILE))
        m = _NAME.search(name)
        if m is None or int(m.group(1)) >= len(nodes):
            other += t
            continue
        out[_kernel_owner(int(m.group(1)), ops[name], nodes, producer)] += t
    # the time outside kernels, per run (a median of sums would count preemptions)
    gap = float(np.quantile([b - a - k for (a, b), k in zip(runs, inside)], QUANTILE)) \
        if runs else 0.0
    return out, other, float(out.sum()) + other + max(gap, 0.0)


def _kernel_owner(i: int, op: str, nodes, producer) -> int:
    """The node a kernel of op ``op`` named after node ``i`` belongs to: ``i``, or the
    nearest producer (breadth-first, 3 steps) whose op the kernel's is."""
    for prefix in _FUSED:
        op = op[len(prefix):] if op.startswith(prefix) else op
    if not op or nodes[i].op_type == op:
        return i
    frontier, seen = [i], {i}
    for _ in range(3):
        nxt = []
        for j in frontier:
            for name in nodes[j].input:
                p = producer.get(name)
                if p is None or p in seen:
                    continue
                if nodes[p].op_type == op:
                    return p
                seen.add(p)
                nxt.append(p)
        frontier = nxt
    return i


def profile(models: Sequence[onnx.ModelProto], feed: Mapping[str, np.ndarray], provider: str,
            threads: int | None, runs: int = 10, warmup: int = 2) -> list[list[dict]]:
    """ORT profile events of each model, run round-robin ``runs`` times after ``warmup``."""
    import onnxruntime as ort

    from ..runtime.providers import ort_providers
    from ..runtime.session import session_options

    out = []
    with tempfile.TemporaryDirectory(prefix="graphopt-latency-") as tmp:
        sessions, inputs = [], []
        for k, model in enumerate(models):
            options = session_options(threads)
            options.enable_profiling = True
            options.profile_file_prefix = os.path.join(tmp, f"level{k}")
            s = ort.InferenceSession(model.SerializeToString(), options,
                                     providers=ort_providers(provider))
            names = {i.name for i in s.get_inputs()}
            inputs.append({k2: v for k2, v in feed.items() if k2 in names})
            sessions.append(s)
        for s, x in zip(sessions, inputs):
            for _ in range(warmup):
                s.run(None, x)
        # the warm-up runs are in the profile too: drop them by position below
        for _ in range(runs):
            for s, x in zip(sessions, inputs):
                s.run(None, x)
        for s in sessions:
            with open(s.end_profiling(), encoding="utf-8") as fh:
                out.append(_drop_warmup(json.load(fh), warmup))
    return out


def _drop_warmup(events: list[dict], warmup: int) -> list[dict]:
    """The events after the ``warmup``-th ``model_run`` ended."""
    runs = sorted((e["ts"] + e.get("dur", 0)) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")
    if len(runs) <= warmup or warmup <= 0:
        return events
    start = runs[warmup - 1]
    return [e for e in events if e.get("ts", 0) >= start]


def measure(model: onnx.ModelProto, coupling, groups, feed: Mapping[str, np.ndarray],
            provider: str = "cpu", threads: int | None = None, *,
            steps: Mapping[int, int] | None = None, min_keep: int = 1,
            levels: Sequence[float] = LEVELS, runs: int = 10) -> LatencyTable:
    """The measured width response of ``model`` (module doc)."""
    from .apply import apply_removal

    start = time.perf_counter()
    nodes = list(model.graph.node)
    ones = np.ones(len(nodes))
    shares = {g.id: unit_shares(coupling, g, ones, "latency") for g in groups}
    index_of = {o: i for i, n in enumerate(nodes) for o in n.output[:1]}
    built, counts = [], []
    for keep in levels:
        c = uniform_counts(groups, keep, steps or {}, min_keep) if keep < 1 else {}
        work = onnx.ModelProto()
        work.CopyFrom(model)
        if c:
            by_id = {g.id: g for g in groups}
            apply_removal(work, coupling,
                          {gid: np.arange(by_id[gid].size - k, by_id[gid].size)
                           for gid, k in c.items()})
        built.append(indexed(work, index_of))
        counts.append(c)
    events = profile(built, feed, provider, threads, runs=runs)
    samples: dict[int, list[tuple[float, float]]] = {}
    full = overhead = None
    info = []
    for keep, c, ev in zip(levels, counts, events):
        per_node, other, wall = attribute(ev, nodes)
        kept = kept_fractions(shares, c)
        if full is None:
            full, overhead = per_node, max(wall - float(per_node.sum()), 0.0)
        for n in range(len(nodes)):
            samples.setdefault(n, []).append((kept.get(n, 1.0), float(per_node[n])))
        info.append({"keep": keep, "wall_us": round(wall, 1),
                     "nodes_us": round(float(per_node.sum()), 1),
                     "unattributed_us": round(wall - float(per_node.sum()), 1)})
    nodes_full = float(full.sum())
    walls = sorted((lv["nodes_us"] / nodes_full, lv["unattributed_us"]) for lv in info) \
        if nodes_full > 0 else []
    spare = None
    if len(walls) > 1:
        spare = (np.array([x for x, _ in walls]), monotone([max(y, 0.0) for _, y in walls]))
        overhead = float(spare[1][-1])
    points = {}
    for n, pts in samples.items():
        xs = sorted({x for x, _ in pts})
        if len(xs) < 2:
            continue
        ts = np.array([np.mean([t for x2, t in pts if x2 == x]) for x in xs])
        points[n] = (np.asarray(xs), monotone(ts))
        full[n] = points[n][1][-1] if xs[-1] >= 1.0 - 1e-12 else full[n]
    return LatencyTable(full=full, points=points, overhead=overhead, overhead_points=spare,
                        levels=info,
                        seconds=time.perf_counter() - start, provider=provider,
                        threads=threads)


def off_block_note(coupling, removal, kinds, block: int) -> list[str]:
    """The report's note when a cut leaves conv channel groups off the CPU's NCHWc
    ``block`` (a ``macs=``/``params=`` budget with ``round_to=0`` does not round them; a
    ``latency=`` budget does): [] when none is, or the block is unknown."""
    if block <= 1:
        return []
    off = []
    for gid, units in removal.items():
        size = coupling.group(gid).size
        if kinds.get(gid) == "channels" and size % block == 0 and (size - len(units)) % block:
            off.append(f"{size}->{size - len(units)}")
    if not off:
        return []
    return [f"conv channels were cut to widths off the CPU's NCHWc block of {block} in "
            f"{len(off)} group{'s' if len(off) != 1 else ''} "
            f"({', '.join(off[:4])}{', ...' if len(off) > 4 else ''}): onnxruntime runs those "
            "convs outside its blocked kernels, so fewer MACs may not run faster (the PP-OCR "
            "classifier at macs=0.8 ran slower than the original: benchmarks/RECONSTRUCT.md); "
            f"round_to={block} keeps widths on the block, and a latency= budget does so by "
            "itself"]
