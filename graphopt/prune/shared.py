"""The calibration ``prune`` scores on, and one scoring capture for two runs of it.

1. ``calibration_copies``: the user's feeds and the copies the pass adds to them
   (``swap_tokens``' swapped-token copies, ``spans``' joined and cropped ones with their
   swapped twins), in blocks of the feeds' count, with the fold of each (``cv``).
2. ``scores``: the pass's data scores and layer damages (``graphopt.prune.streams``),
   captured with the copies interleaved behind their feed (feed 0, its copies, feed 1, ...:
   ``canonical``), so that the capture of feeds that begin another run's feeds is the
   beginning of that run's capture.
3. ``graphopt.optimize(final="all")`` runs the passes on the calibration without its
   held-out share (for the figure), then on all of it (the model written): it puts
   ``{"everything": all the feeds, "pass": the recipe's first lossy pass}`` in
   ``Context.shared`` (a later pass sees a model that differs by run). When the held-out run's
   scoring feeds are, in that order, the first feeds of the full run's (the share is
   whole feeds, and the copies of the first feeds are the same in both), one capture
   of the original model over the full run's feeds gives both runs' Gram sums
   (``accumulate``'s ``early``: the sums after the first feeds, as a capture of those
   alone ends) and stream statistics, so both get the scores a run of their own computes,
   number for number; the full run's are kept in ``Context.shared`` for it. BERT-base,
   256 sentences: one forward of the original over 384 sequences fewer
   (benchmarks/README.md). Otherwise each run captures its own, as it does when the pass
   keeps the scores' inverses for a search round (``search``, ``keep``).
4. ``keep_search`` / ``held_out_search``: a search round (``graphopt.prune.search``) in
   the held-out run leaves what it measured (per group and layer: units probed, measured
   and predicted damage) in ``Context.shared``; the run on all calibration, on the same
   input model with the same config, scales its own scores by those factors instead of
   probing again, so one ``optimize`` pays one round. The factors are ratios of
   end-to-end to local damage, properties of where a group sits more than of which
   sentences measured them (MiniLM: the factors of 4 probe feeds are those of 12 to ±0.1).
"""

from __future__ import annotations

import numpy as np

from .streams import StreamStats

SHARED_NOTE = ("scores: computed in the held-out run's capture of the original model (one "
               "capture of all calibration served both runs)")


def calibration_copies(feeds, model, cfg, data: bool):
    """(feeds with the pass's copies appended, fold per feed or None, notes) (module doc, 1)."""
    given = len(feeds)
    folds = [i % cfg.cv for i in range(given)] if data and cfg.cv and given >= cfg.cv \
        else None
    notes: list[str] = []
    if data and cfg.swap_tokens > 0:
        from graphopt.data.vary import replace_tokens

        more = replace_tokens(feeds, model, cfg.swap_tokens, copies=cfg.swap_copies)
        if more:  # a model without token-id inputs keeps its calibration as given
            folds = folds and folds * (1 + cfg.swap_copies)
            feeds = list(feeds) + more
            notes.append(f"calibration: {len(more)} more feeds with {cfg.swap_tokens:.0%} "
                         "of the tokens swapped for random vocabulary ids (swap_tokens)")
    if data and cfg.spans != "none":
        from graphopt.data.spans import vary_spans

        more = vary_spans(feeds[:given], model, cfg.spans.split("|"))
        if more and cfg.swap_tokens > 0:  # swapped twins: without them other text loses
            from graphopt.data.vary import replace_tokens

            more += replace_tokens(more, model, cfg.swap_tokens, copies=cfg.swap_copies,
                                   seed=7)
        if more:
            folds = folds and folds + folds[:given] * (len(more) // given)
            feeds = list(feeds) + more
            notes.append(f"calibration: {len(more)} more feeds of joined/cropped sentences "
                         f"({cfg.spans}; spans)")
    return feeds, folds, notes


def canonical(count: int, given: int) -> list[int]:
    """Feed order for a capture: each of the ``given`` feeds followed by its copies (the
    copies come in blocks of ``given``); as given when they do not."""
    if not given or count == given or count % given:
        return list(range(count))
    return sorted(range(count), key=lambda i: (i % given, i // given))


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(
        a[k] is b[k] or (np.shape(a[k]) == np.shape(b[k]) and np.array_equal(a[k], b[k]))
        for k in a)


def _key(model, cfg, max_ratio, count) -> tuple:
    return (max_ratio, count) + _search_key(model, cfg)


def scores(model, coupling, groups, method, feeds, given, blocks, *, cfg, ctx, damping,
           max_ratio, weights=None, keep=None, owner=None):
    """(scores, groups not scored, damage per block exit, note or None):
    ``graphopt.prune.scores.data_scores`` of ``groups`` divided by their stream norms, and
    the ``layer_damage`` of ``blocks``, the stream tensors taken from the scores' own
    capture runs (``StreamStats``' observers), on ``feeds`` (``given`` of them the user's,
    then the copies) in ``canonical`` order; shared between the two runs of
    ``final="all"`` where it can be (module doc, 3): only for the pass ``owner`` that
    ``Context.shared["pass"]`` names, the first lossy pass of the recipe, whose input
    model is the same in both runs. ``keep``: as ``data_scores``'."""
    from .scores import data_scores

    order = canonical(len(feeds), given)
    mine = [feeds[i] for i in order]
    share = _owned(ctx, owner)
    if share is not None and keep is None:
        kept = share.setdefault("scores", {}).pop(_key(model, cfg, max_ratio, len(feeds)),
                                                  None)
        if kept is not None and ctx.calibration is share.get("everything"):
            got, unscored, damage = kept
            return got, [g for g in groups if g.id in unscored], damage, SHARED_NOTE
    full = _full_run(model, cfg, ctx, mine, share) if keep is None else None
    run = full if full is not None else mine
    streams = StreamStats(model, groups, run, weights, blocks)
    early = None
    if full is not None:
        mine_stats = StreamStats(model, groups, mine, weights, blocks)
        early = {"norms": mine_stats}
        observe = {n: _into_both(streams, mine_stats, len(mine), n) for n in streams.names}
    else:
        observe = streams.observers()
    got, unscored = data_scores(model, coupling, groups, method, run, damping=damping,
                                max_ratio=max_ratio, norms=streams, weights=weights,
                                observe=observe, keep=keep, upto=len(mine) if full else None,
                                early=early)
    streams.capture(model)  # what the scores did not run (no group was scored)
    if full is None:
        return got, unscored, streams.damage(), None
    mine_stats.capture(model)
    full_key = _key(model, cfg, max_ratio, len(full))
    share["scores"][full_key] = (got, {g.id for g in unscored}, streams.damage())
    return early["scores"], unscored, mine_stats.damage(), None


def _into_both(full, early, upto, name):
    """An ``observe`` callback handing ``name``'s value to the full run's statistics, and to
    the early run's too for the first ``upto`` feeds."""
    def take(feed, value):
        full.observe(feed, name, value)
        if feed < upto:
            early.observe(feed, name, value)
    return take


def _full_run(model, cfg, ctx, mine, share):
    """The full run's scoring feeds in capture order when ``mine`` are their beginning
    (module doc, 3); else None."""
    if share is None or "everything" not in share or ctx.calibration is share["everything"]:
        return None
    everything = share["everything"]
    if len(everything) <= len(ctx.calibration):
        return None
    feeds, _, _ = calibration_copies(everything, model, cfg, True)
    full = [feeds[i] for i in canonical(len(feeds), len(everything))]
    if len(full) <= len(mine) or not all(_same(a, b) for a, b in zip(mine, full)):
        return None
    return full


def _owned(ctx, owner):
    share = getattr(ctx, "shared", None)
    return share if share is not None and share.get("pass") is owner else None


def _search_key(model, cfg) -> tuple:
    """The pass's config and the model's outline: what two runs' shares must agree on."""
    return (repr(cfg), tuple(n.op_type for n in model.graph.node),
            tuple((i.name, tuple(i.dims)) for i in model.graph.initializer))


def keep_search(ctx, owner, model, cfg, state) -> None:
    """The held-out run's search ``state`` kept for the run on all calibration (doc, 4)."""
    share = _owned(ctx, owner)
    if share is not None and state is not None and \
            ctx.calibration is not share.get("everything"):
        share.setdefault("search", {})[_search_key(model, cfg)] = state


def held_out_search(ctx, owner, model, cfg):
    """In the run on all calibration, the search state the held-out run kept for this
    pass, model and config (module doc, 4); else None."""
    share = _owned(ctx, owner)
    if share is None or ctx.calibration is not share.get("everything"):
        return None
    return share.get("search", {}).pop(_search_key(model, cfg), None)
