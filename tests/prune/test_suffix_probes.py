"""Cheap sensitivity probes: suffix-only runs and probes on a subset of the feeds.

Model ``_two_blocks`` of ``test_reconstruct``: two residual blocks and a head. Oracles:

1. ``run_suffixes``: each probe (a group's consumer rewritten, a layer bypassed) run from
   its edit on, on tensors the original's prefix made, equals the whole edited copy run by
   onnxruntime from the graph inputs (1e-5), and the original's outputs come back as a
   plain run makes them. ``suffix_of`` starts at the edit: the nodes before it are not run.
2. ``measure``: the damage equals the relative error of the whole edited copy (compensated
   with the damped inverse of all feeds' Gram sums) against the original, on every feed, and on
   a ``subset`` of them the same quantity over that subset only (compensation still on
   all): the subset changes where it is measured, not the cut.
"""

from __future__ import annotations

import numpy as np

from graphopt.analysis.coupling import analyze
from graphopt.analysis.structure import find_structure
from graphopt.data.gram import accumulate, constants
from graphopt.prune.scores import _consumers, damped_inverse
from graphopt.prune.sensitivity import Probe, _edited, _relative_error, measure
from graphopt.prune.suffix import run_suffixes, suffix_of
from graphopt.testing import run

from .test_reconstruct import _feeds, _two_blocks


def _setup(weight: str = "Wa2"):
    """The group whose consumers include ``weight``: Wa2 reads block 0's hidden units (one
    consumer), Wa the stream s0 (three consumers, none with a bias: the edit adds them)."""
    model = _two_blocks()
    coupling = analyze(model, {"x": (16, 8)})
    consumers = {g.id: _consumers(model, coupling, g, constants(model))
                 for g in coupling.groups if g.prunable}
    gid = next(k for k, cs in consumers.items() if any(s.weight == weight for s, _ in cs))
    blocks = list(find_structure(model).blocks("layer"))
    return model, coupling, coupling.group(gid), {gid: consumers[gid]}, blocks


def _inverses(model, consumers, feeds):
    sites = [s for cs in consumers.values() for s, _ in cs]
    return {n: damped_inverse(st.xtx, 0.1) for n, st in accumulate(model, sites, feeds).items()}


def test_suffix_runs_equal_whole_runs_of_each_edited_copy():
    model, _, group, consumers, blocks = _setup()
    feeds = _feeds((16, 8), count=3)
    inverses = _inverses(model, consumers, feeds)
    probes = [Probe(("group", group.id), np.array([1, 4, 6])),
              Probe(("layer", 1), block=blocks[1])]
    works = [(p.key, *_edited(model, p, consumers, inverses)) for p in probes]
    nodes, boundary = suffix_of(model, works[0][1], works[0][2])
    assert len(nodes) < len(works[0][1].graph.node) and "x" not in boundary
    ref, got = run_suffixes(model, iter(works), feeds, ["y"])
    for f, feed in enumerate(feeds):
        assert np.allclose(ref[f]["y"], run(model, feed)["y"], atol=1e-6)
        for key, work, _ in works:
            whole = run(work, feed)["y"]
            assert np.abs(got[key][f]["y"] - whole).max() < 1e-5
            assert np.abs(whole - ref[f]["y"]).max() > 1e-3  # the probe changed something


def test_measure_equals_the_edited_copy_run_whole_on_all_feeds_and_on_a_subset():
    model, coupling, group, consumers, blocks = _setup("Wa")
    feeds = _feeds((16, 8), count=4)
    key = ("group", group.id)
    probes = [Probe(key, np.array([0, 3, 5])), Probe(("layer", 0), block=blocks[0])]
    inverses = _inverses(model, consumers, feeds)
    for subset in (None, [1, 3]):
        scored = feeds if subset is None else [feeds[i] for i in subset]
        got = measure(model, coupling, probes, feeds, consumers, damping=0.1, subset=subset)
        given = measure(model, coupling, probes, feeds, consumers, damping=0.1,
                        subset=subset, inverses=inverses)
        for p in probes:
            work, _ = _edited(model, p, consumers, inverses)
            oracle = _relative_error(scored, [{"y": run(model, f)["y"]} for f in scored],
                                     [{"y": run(work, f)["y"]} for f in scored])
            assert np.isclose(got[p.key], oracle, rtol=1e-4), (p.key, subset)
            assert np.isclose(given[p.key], oracle, rtol=1e-4)
    everywhere = measure(model, coupling, probes[:1], feeds, consumers, damping=0.1)[key]
    assert not np.isclose(everywhere, got[key], rtol=1e-3)  # the subset is not all feeds


def test_a_probe_that_fails_to_build_is_left_out_and_the_others_measured():
    model, coupling, group, consumers, blocks = _setup()
    bad = Probe(("group", group.id), np.array([99]))  # no such unit
    good = Probe(("layer", 1), block=blocks[1])
    out = measure(model, coupling, [bad, good], _feeds((16, 8), count=2), consumers)
    assert list(out) == [("layer", 1)] and out[("layer", 1)] > 0


def test_a_group_measured_harmless_is_cut_past_its_probe_only_at_predicted_damage():
    """Group 0 probed at 2 of its 6 units measured ~0 damage (factor 1e-6): its first
    chunk becomes free, the chunks after the probe keep at least their predicted damage,
    so a budget of 2 chunks (4 units) takes its first 2 and 2 of group 1's (probed whole, factor 1,
    1.5× group 0's predicted damage per unit), not 4 of group 0 as the bare factor would."""
    from graphopt.prune.budget import Candidate, allocate
    from graphopt.prune.search import SearchState, scaled

    cands = [Candidate("neurons", 0, (2 * k, 2 * k + 1), 1.0 + k, 1.0, k) for k in range(3)] + \
        [Candidate("neurons", 1, (2 * k, 2 * k + 1), 1.5 * (1.0 + k), 1.0, k) for k in range(3)]
    state = SearchState({("group", 0): (2, 1e-6, 1.0), ("group", 1): (6, 9.0, 9.0)})
    kinds = {0: "neurons", 1: "neurons"}
    safe = allocate(scaled(cands, state, kinds), 2.0)
    bare = allocate(scaled(cands, state, kinds, beyond="f"), 2.0)
    assert sorted(safe.removal[0]) == [0, 1] and sorted(safe.removal[1]) == [0, 1]
    assert sorted(bare.removal[0]) == [0, 1, 2, 3] and 1 not in bare.removal
    assert safe.removed_cost == bare.removed_cost == 2.0


def test_probes_read_logits_through_an_identity_after_the_softmax():
    """PP-OCR's classifier writes Softmax -> Identity -> output: the probes must read the
    logits (the Softmax's input), not the probabilities a confident classifier hides its
    change in. Oracle: the measured damage equals the logits' relative error of the edited
    copy, and differs from the probabilities'."""
    import onnx
    from onnx import helper

    from graphopt.prune.sensitivity import measured_tensors

    model = _two_blocks()
    g = model.graph
    head = g.output[0].name
    g.node.extend([helper.make_node("Softmax", [head], ["p"], axis=-1),
                   helper.make_node("Identity", ["p"], ["probs"])])
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("probs", onnx.TensorProto.FLOAT, None))
    assert measured_tensors(model) == [head]
    plain, coupling, group, consumers, _ = _setup()  # the logits as its output
    feeds = _feeds((16, 8), count=3)
    inverses = _inverses(model, consumers, feeds)
    probe = Probe(("group", group.id), np.array([1, 4, 6]))
    got = measure(model, coupling, [probe], feeds, consumers, inverses=inverses)[probe.key]
    work, _ = _edited(model, probe, consumers, inverses)
    cut, _ = _edited(plain, probe, consumers, inverses)
    logits = _relative_error(feeds, [{head: run(plain, f)[head]} for f in feeds],
                             [{head: run(cut, f)[head]} for f in feeds])
    probs = _relative_error(feeds, [{"probs": run(model, f)["probs"]} for f in feeds],
                            [{"probs": run(work, f)["probs"]} for f in feeds])
    assert np.isclose(got, logits, rtol=1e-4) and not np.isclose(got, probs, rtol=0.1)


def test_probe_feeds_by_default_hold_64_samples_of_the_given_feeds():
    """``probe_feeds`` None: the fewest given feeds (spread evenly, never a swapped copy)
    whose batches hold PROBE_SAMPLES (64) samples: 4 CNN feeds of 16 images, 8 MiniLM feeds
    of 8 sentences; all of them when fewer; an explicit N as before."""
    from graphopt.prune.search import PROBE_SAMPLES, feed_samples, probe_subset

    assert PROBE_SAMPLES == 64
    assert probe_subset(16, 8, None, [16] * 8) == [0, 2, 5, 7]
    assert probe_subset(32, 16, None, [8] * 16) == [0, 2, 4, 6, 9, 11, 13, 15]
    assert probe_subset(6, 3, None, [16] * 3) == [0, 1, 2]  # every given feed, no copy
    assert probe_subset(3, 3, None, [16] * 3) is None  # all, and no copies: every feed
    assert probe_subset(16, 8, 2, [16] * 8) == [0, 7] and probe_subset(16, 8, 0) is None
    feeds = [{"x": np.zeros((16, 3, 4, 4))}, {"ids": np.zeros((8, 5), np.int64)}]
    assert feed_samples(feeds) == [16, 8]
