"""Force the MIX of units a ``prune`` budget cuts, then measure as ``bench_reconstruct.py``.

    HF_HUB_OFFLINE=1 python benchmarks/bench_mix.py --layers 2 -- minilm "prune:macs=0.6" --mirror 128 --holdout 0 --no-latency
    HF_HUB_OFFLINE=1 python benchmarks/bench_mix.py --cap neurons=0.4 -- minilm "prune:macs=0.6" --traffic 320 --no-latency

The budget stays what the row asks; only which candidates the allocation may take changes
(``Prune._candidates`` is wrapped, in this process only):

- ``--layers I,J``: those removable layers are taken first (their damage set to 0), the other
  layers are not candidates; ``--layers none``: no layer is. Unset: as the pass decides.
- ``--sub attention|mlp``: the removable blocks are those sub-blocks (with a post-norm
  model, the norm after the sub-block's Add goes with it) instead of whole layers.
- ``--cap KIND=R,...``: a group of that kind loses at most the share R of its units (below
  the row's ``max_ratio``); ``--group-caps KIND:R0,R1,...``: per group of that kind, in
  group-id order.
- ``--scale KIND=F,...``: that kind's damages times F (more of it is cut when F < 1).
- ``--print``: the layers' damage and cost, and the allocation's mix, as planned.

Every other argument goes to ``bench_reconstruct.py`` (its doc: the data, the figures).
Figures: benchmarks/RECONSTRUCT.md, section "The mix of units at macs=0.6".
"""

from __future__ import annotations

import argparse
import collections
import runpy
import sys
from pathlib import Path

import numpy as np


def _pairs(text: str) -> dict[str, float]:
    return {k: float(v) for k, v in (p.split("=") for p in text.split(",") if p)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", default=None)
    parser.add_argument("--sub", choices=["attention", "mlp"], default=None)
    parser.add_argument("--cap", default="")
    parser.add_argument("--group-caps", default="")
    parser.add_argument("--scale", default="")
    parser.add_argument("--print", action="store_true")
    args, rest = parser.parse_known_args()
    rest = [a for a in rest if a != "--"]

    import graphopt.passes.prune as P
    from graphopt.analysis.structure import find_structure

    try:
        caps, scale = _pairs(args.cap), _pairs(args.scale)
        forced = None if args.layers is None else \
            set() if args.layers == "none" else {int(i) for i in args.layers.split(",")}
        if args.group_caps:
            kind, values = args.group_caps.split(":")
            [float(v) for v in values.split(",")]
    except ValueError as e:
        parser.error(f"--layers I,J|none, --cap/--scale KIND=F,..., --group-caps "
                     f"KIND:R0,R1,...: {e}")
    candidates, allocate = P.Prune._candidates, P.Prune._allocate

    def wrapped(self, model, coupling, groups, blocks, feeds, data, cost, metric, plan,
                *more):
        out = candidates(self, model, coupling, groups, blocks, feeds, data, cost, metric, plan,
                         *more)
        if args.print:
            for c in out:
                if c.kind == "layers":
                    print(f"    layer {c.key}: damage {c.damage:.4g}, cost "
                          f"{c.cost / plan.total:.3f} of the total", flush=True)
        limit = {}
        if args.group_caps:
            kind, values = args.group_caps.split(":")
            ids = sorted({c.key for c in out if c.kind == kind})
            limit = dict(zip(ids, map(float, values.split(","))))
        size = {g.id: g.size for g in groups}
        used: collections.Counter = collections.Counter()
        kept = []
        for c in out:
            if c.kind == "layers":
                if forced is None:
                    kept.append(c)
                elif c.key in forced:
                    kept.append(P.Candidate(c.kind, c.key, c.units, 0.0, c.cost, c.order,
                                            c.layer))
                continue
            share = limit.get(c.key, caps.get(c.kind))
            if share is not None:
                if used[c.key] + len(c.units) > int(np.floor(share * size[c.key] + 1e-9)):
                    continue  # chunks come in removal order: the later ones are dropped too
                used[c.key] += len(c.units)
            if c.kind in scale:
                c = P.Candidate(c.kind, c.key, c.units, c.damage * scale[c.kind], c.cost,
                                c.order, c.layer)
            kept.append(c)
        return kept

    def printed(self, coupling, cands, blocks, cost, metric, need, table=None):
        alloc, removed = allocate(self, coupling, cands, blocks, cost, metric, need, table)
        kinds = {c.key: c.kind for c in cands if c.kind != "layers"}
        mix = collections.defaultdict(list)
        for key in sorted(alloc.removal):
            mix[kinds[key]].append(len(alloc.removal[key]))
        print(f"    allocation: layers {sorted(alloc.layers)}; " +
              "; ".join(f"{k} {v}" for k, v in mix.items()), flush=True)
        return alloc, removed

    def sub_blocks(model, plan):
        subs = find_structure(model).blocks(args.sub)
        return [(b, i) for i, b in enumerate(subs) if b.removable]

    P.Prune._candidates = wrapped
    if args.print:
        P.Prune._allocate = printed
    if args.sub:
        P.removable_blocks = sub_blocks
    here = Path(__file__).resolve().parent
    sys.argv = [str(here / "bench_reconstruct.py")] + rest
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
