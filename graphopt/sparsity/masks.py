"""Which weights to zero, and SparseGPT, on the matrix view ``Wt`` [outputs, reduction].

1. ``scores(method, wt, norms)``: ``magnitude`` is |W|; ``wanda`` is |W|·‖X_j‖, with the
   activation norm of input column j over every calibration row (all tokens of 3-D
   activations, all pixels of conv inputs).
2. ``keep_mask(scores, ratio=..)`` zeroes the lowest ``ratio`` of the scores, over the whole
   matrix (magnitude) or per output row (``per_row``, Wanda's comparison group);
   ``keep_mask(scores, n=.., m=..)`` keeps the ``n`` best of every ``m`` consecutive columns
   of each row: the N:M groups lie along the reduction axis.
3. ``sparsegpt(wt, hessian, ...)``: SparseGPT (Frantar & Alistarh, 2023). The OBS update
   with the damped Hessian ``H = XᵀX + λ·mean(diag H)·I`` (``damp`` = λ): columns are
   pruned left to right, each pruned weight's error ``(w − q)/[H⁻¹]_jj`` is spread over the
   columns not yet processed through the upper Cholesky factor of ``H⁻¹``, and the mask is
   chosen adaptively (per block of ``block`` columns for unstructured ratios, per group of M
   for N:M) by ``w² / [H⁻¹]_jj²``. Updates inside a block are immediate; the rest of the
   matrix gets the block's accumulated error in one product (lazy batched updates).
4. ``output_error(wt, new, hessian)``: ``‖X(W − W')ᵀ‖² / ‖XWᵀ‖²`` from the Gram alone.
"""

from __future__ import annotations

import numpy as np

from graphopt.runtime.blas import one_blas_thread

METHODS = ("magnitude", "wanda", "sparsegpt")


def scores(method: str, wt: np.ndarray, norms: np.ndarray | None = None) -> np.ndarray:
    s = np.abs(wt.astype(np.float64))
    if method == "magnitude":
        return s
    if norms is None:
        raise ValueError(f"{method} needs activation norms")
    # [K] per column, or [G, K_g] per group of a grouped conv (its rows in group order)
    norms = np.asarray(norms)
    if norms.ndim == 2:
        return s * np.repeat(norms, s.shape[0] // norms.shape[0], axis=0)
    return s * norms[None, :]


def keep_mask(score: np.ndarray, *, ratio: float = 0.0, n: int = 0, m: int = 0,
              per_row: bool = False) -> np.ndarray:
    """True where a weight is kept (see the module doc)."""
    rows, cols = score.shape
    keep = np.ones(score.shape, dtype=bool)
    if m:
        groups = score.reshape(rows, cols // m, m)
        drop = np.argsort(groups, axis=-1, kind="stable")[..., : m - n]
        g = keep.reshape(rows, cols // m, m)
        np.put_along_axis(g, drop, False, axis=-1)
        return keep
    if ratio <= 0:
        return keep
    if per_row:
        k = int(cols * ratio)
        if k:
            drop = np.argsort(score, axis=1, kind="stable")[:, :k]
            np.put_along_axis(keep, drop, False, axis=1)
        return keep
    k = int(score.size * ratio)
    if k:
        flat = keep.reshape(-1)
        flat[np.argsort(score.reshape(-1), kind="stable")[:k]] = False
    return keep


def _upper_inverse_cholesky(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper triangular U with ``UᵀU = (H + damp·mean(diag)·I)⁻¹``, with more damping if H
    is not positive definite in float64.

    With J the reversal permutation, ``chol(J H J) = L`` gives ``H = R Rᵀ`` for the upper
    triangular ``R = J L J``, so ``U = R⁻¹``: one factorization and one inverse.
    """
    mean = float(np.mean(np.diag(h))) or 1.0
    eye = np.eye(h.shape[0])
    with one_blas_thread():  # graphopt.runtime.blas: faster on a busy machine
        for factor in (1, 10, 100, 1000):
            try:
                lower = np.linalg.cholesky((h + damp * factor * mean * eye)[::-1, ::-1])
            except np.linalg.LinAlgError:
                continue
            return np.linalg.inv(lower[::-1, ::-1])
    raise np.linalg.LinAlgError("the layer Hessian is not positive definite even damped")


def sparsegpt(wt: np.ndarray, hessian: np.ndarray, *, ratio: float = 0.0, n: int = 0,
              m: int = 0, damp: float = 0.01, block: int = 128) -> np.ndarray:
    """The pruned and updated ``Wt`` (float64); see the module doc.

    ``hessian`` is [K, K], or [G, K, K] for a grouped conv whose G groups of consecutive
    rows each have their own inputs: every row is updated with its group's factor, and an
    unstructured mask is still chosen over all rows of a block at once (the OBS saliencies
    ``w² / [H⁻¹]_jj²`` of different groups compare, as their inputs are channels of one
    tensor), so the sparsity may differ between groups as magnitude's does.
    """
    w = wt.astype(np.float64).copy()
    rows, cols = w.shape
    hs = hessian.astype(np.float64)
    hs = hs[None] if hs.ndim == 2 else hs
    u = np.empty_like(hs)
    for g, h in enumerate(hs):
        h = h.copy()
        dead = np.diag(h) == 0
        h[dead, dead] = 1.0
        u[g] = _upper_inverse_cholesky(h, damp)
        w[g * rows // len(hs):(g + 1) * rows // len(hs), dead] = 0.0
    # per-row factors only when there are groups: [rows, K, K] (small: grouped convs)
    ur = u[0] if len(u) == 1 else np.repeat(u, rows // len(u), axis=0)
    if m:
        block = max(m, block - block % m)
    row_ids = np.arange(rows)[:, None]
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].copy()
        q1 = np.zeros_like(w1)
        err1 = np.zeros_like(w1)
        u1 = ur[..., i1:i2, i1:i2]
        d1 = np.diagonal(u1, axis1=-2, axis2=-1)
        d1 = np.broadcast_to(d1, w1.shape)
        prune = np.zeros(w1.shape, dtype=bool)
        if not m and ratio > 0:
            prune = ~keep_mask(w1 ** 2 / d1 ** 2, ratio=ratio)
        for i in range(i2 - i1):
            if m and i % m == 0:
                tmp = w1[:, i:i + m] ** 2 / d1[:, i:i + m] ** 2
                drop = np.argsort(tmp, axis=1, kind="stable")[:, : m - n]
                prune[row_ids, i + drop] = True
            col = w1[:, i]
            q = np.where(prune[:, i], 0.0, col)
            q1[:, i] = q
            e = (col - q) / d1[:, i]
            w1[:, i:] -= e[:, None] * u1[..., i, i:]
            err1[:, i] = e
        w[:, i1:i2] = q1
        if u1.ndim == 2:
            w[:, i2:] -= err1 @ ur[i1:i2, i2:]
        else:
            w[:, i2:] -= np.einsum("rb,rbk->rk", err1, ur[:, i1:i2, i2:])
    return w


def masked_refit(wt: np.ndarray, h: np.ndarray, xt: np.ndarray, damp: float) -> np.ndarray:
    """``wt`` with its zeros kept and every row's other weights the least-squares fit
    ``min ‖X w − t‖² + λ‖w − w_now‖²`` on those columns (``h`` = XᵀX/n, ``xt`` = XᵀT/n
    [K, rows], λ = ``damp`` × mean diag ``h``): SparseGPT's column-by-column updates only
    approximate this optimum for its mask. Damping toward the current weights keeps the
    fit from chasing the calibration rows."""
    out = wt.astype(np.float64).copy()
    lam = damp * float(np.mean(np.diag(h)) or 1.0)
    with one_blas_thread():  # graphopt.runtime.blas: faster on a busy machine
        for r in range(out.shape[0]):
            keep = np.flatnonzero(out[r])
            if not keep.size:
                continue
            a = h[np.ix_(keep, keep)] + lam * np.eye(keep.size)
            out[r, keep] = np.linalg.solve(a, xt[keep, r] + lam * out[r, keep])
    return out


def output_error(wt: np.ndarray, new: np.ndarray, hessian: np.ndarray) -> float:
    """Relative squared output error of the layer on its calibration inputs."""
    wt = wt.astype(np.float64)
    delta = wt - new
    num = float(np.einsum("ij,ij->", delta @ hessian, delta))
    den = float(np.einsum("ij,ij->", wt @ hessian, wt))
    return num / den if den > 0 else 0.0


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``"unstructured"`` -> (0, 0); ``"2:4"`` -> (2, 4). ValueError otherwise."""
    if pattern == "unstructured":
        return 0, 0
    try:
        n_text, m_text = pattern.split(":")
        n, m = int(n_text), int(m_text)
    except ValueError:
        raise ValueError(f"pattern must be 'unstructured' or N:M such as 2:4 or 4:8, "
                         f"got '{pattern}'") from None
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern}: N:M needs 0 < N < M")
    return n, m
