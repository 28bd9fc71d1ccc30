"""Probe runs on the suffix of the graph only: the part a probe's edit can change.

A sensitivity probe (``graphopt.prune.sensitivity``) is a copy of the model with one
group's consumers rewritten (or one layer bypassed). Every node before the edit computes
what it computed in the original, so running the whole copy over the calibration feeds
repeats the prefix once per probe (MiniLM: 17 probes, ~17 forwards).

1. ``suffix_of``: the nodes of the copy that the edit can reach (the *changed* nodes, whose
   proto or weights differ from the original's, and every node reading what they make),
   and the *boundary*: the tensors those nodes read that they do not make themselves
   (made by unchanged nodes, so equal to the original's, or graph inputs).
2. ``run_suffixes``: probes in graph order share one ``graphopt.data.segments.Segments``
   over the original: each call runs the original only as far as the next probe's
   boundary, from what the call before kept, and the probe's session runs its suffix on
   those tensors, feed by feed. The original is run once in all, each probe only from its
   edit on; the outputs a probe cannot reach are the original's. The result equals a
   full run of each copy (to float rounding: ``tests/prune/test_suffix_probes.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx

from ..data.segments import Segments, _segment, _session, _shared
from ..ir.graph import node_reads


def _changed_initializers(original: onnx.ModelProto, work: onnx.ModelProto) -> set[str]:
    before = {t.name: t for t in original.graph.initializer}
    out = set()
    for t in work.graph.initializer:
        old = before.get(t.name)
        if old is None or old.raw_data != t.raw_data or list(old.dims) != list(t.dims) or \
                (not t.raw_data and old.SerializeToString() != t.SerializeToString()):
            out.add(t.name)
    return out


def suffix_of(original: onnx.ModelProto, work: onnx.ModelProto,
              touched: set[str] | None = None) -> tuple[list[int], list[str]]:
    """(indices of ``work``'s nodes the edit reaches, in graph order; boundary tensors).
    ``touched``: the initializers the edit may have rewritten (else every one is compared)."""
    same = {n.SerializeToString() for n in original.graph.node}
    changed_inits = _changed_initializers(original, work) if touched is None else \
        set(touched)
    inits = {t.name for t in work.graph.initializer}
    reached: set[str] = set()
    nodes = []
    for i, node in enumerate(work.graph.node):
        reads = node_reads(node)
        if reads & reached or reads & changed_inits or node.SerializeToString() not in same:
            nodes.append(i)
            reached.update(o for o in node.output if o)
    made = reached
    boundary = sorted({x for i in nodes for x in node_reads(work.graph.node[i])
                       if x not in made and x not in inits})
    return nodes, boundary


def run_suffixes(original: onnx.ModelProto, works: Iterable[tuple],
                 feeds: Sequence[Mapping[str, np.ndarray]], names: Sequence[str],
                 providers: Sequence[str] = ("CPUExecutionProvider",)
                 ) -> tuple[list[dict[str, np.ndarray]], dict[object, list[dict]]]:
    """The original's ``names`` per feed, and each probe's (``works``: (key, edited copy,
    the initializers rewritten or None), taken one at a time, best in graph order of their
    edits; module doc, 2)."""
    feeds = list(feeds)
    runner = Segments(feeds, providers=providers)
    arrays = {t.name: a for t in original.graph.initializer  # the weights, read once
              if (a := _shared(t)) is not None}
    graph_inputs = {vi.name for vi in original.graph.input}
    out: dict[object, list[dict]] = {}
    for key, work, touched in works:
        touched = _changed_initializers(original, work) if touched is None else set(touched)
        nodes, boundary = suffix_of(original, work, touched)
        produced = {o for i in nodes for o in work.graph.node[i].output if o}
        reach = [n for n in names if n in produced]
        got: list[dict] = []
        session = None
        kept = [b for b in boundary if b not in graph_inputs]
        for f, values in enumerate(runner.run(original, boundary)):
            if reach and session is None:
                same = {k: a for k, a in arrays.items() if k not in touched}
                seg, used = _segment(work, nodes, kept, values, reach, arrays_of=same)
                session = _session(seg, used, providers)
                wanted = [i.name for i in session.get_inputs()]
            if reach:
                args = {k: (values[k] if k in values else feeds[f][k]) for k in wanted}
                got.append(dict(zip(reach, session.run(reach, args))))
            else:
                got.append({})
        out[key] = got
        del session, work
    ref = list(runner.run(original, list(names)))
    for got in out.values():  # what a probe cannot reach is the original's
        for f, values in enumerate(got):
            for n in names:
                values.setdefault(n, ref[f][n])
    return ref, out
