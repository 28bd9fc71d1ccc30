"""Post-norm row weights: score and refit a layer on the error its norm will see.

In a post-norm transformer (BERT, MiniLM) a layer's output is added into the residual
stream S and S goes straight into a ``LayerNormalization``: what the next layer (and the
embedding) sees of an error ΔS on token t is γ·(ΔS − mean)/σ_t, with σ_t S's standard
deviation over the hidden axis of that token. σ_t varies a lot: on all-MiniLM-L6-v2 a few
tokens per sentence carry ~15× the median norm after the FFN of layers 0 and 2 (mean
‖S‖² 16× the median's), so a plain least-squares score or refit spends itself on those
tokens, whose error the norm then divides away, and a layer's "relative" damage
(‖ΔS‖² over mean ‖S‖²) comes out many times too small. Weighting each row by 1 / σ_t²
makes the scores and the refit measure the post-norm error:

- ``norm_streams(model, sums)``: of the site outputs mapped to the residual sum they join
  (``graphopt.prune.reconstruct.stream_sums``), those whose sum is read by one
  ``LayerNormalization`` over the last axis alone, mapped to that sum (the
  ``weights`` argument of ``graphopt.data.gram.accumulate``); sites that join no such norm
  are left out (unweighted).

The OBS refit is right-equivariant (the optimal compensation is the same for any output
column weighting), so γ and the centering do not change it and are left out; the row
weights do change it.
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx


def _normalizes_last_axis(node: onnx.NodeProto) -> bool:
    for a in node.attribute:
        if a.name == "axis":
            return a.i == -1
    return True  # default axis -1


def norm_streams(model: onnx.ModelProto, sums: Mapping[str, str]) -> dict[str, str]:
    """The entries (site output -> residual sum) of ``sums`` whose sum one last-axis
    LayerNormalization alone reads (module doc)."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for x in node.input:
            readers.setdefault(x, []).append(node)
    out = {}
    for site, total in sums.items():
        nodes = readers.get(total, [])
        graph_out = any(o.name == total for o in model.graph.output)
        if len(nodes) == 1 and not graph_out and nodes[0].op_type == "LayerNormalization" \
                and nodes[0].input[0] == total and _normalizes_last_axis(nodes[0]):
            out[site] = total
    return out
