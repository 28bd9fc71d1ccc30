"""Running Gram sums of one site's rows: X̃ᵀX̃, X̃ᵀT and ‖T‖² (``GramStats``).

``graphopt.data.gram.accumulate`` fills them from calibration captures (its module doc
says what the sums are); the refit (``graphopt.prune.reconstruct``) and the scores
(``graphopt.prune.scores``) read them. ``mirror_lower`` copies a lower triangle onto the
upper one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class GramStats:
    """Running sums of one site (``graphopt.data.gram``'s module doc); ``n`` rows so far.

    Rows are buffered (float32 as captured) and multiplied out once about K of them are
    in: a Gram product of a few hundred rows costs its K² output more than its flops, so
    one product per batch would spend the time writing the sums. The product is
    BLAS's symmetric rank-k update (``syrk``: one triangle, half the flops of the general
    product) where scipy imports, mirrored to the other triangle when ``xtx`` is read.
    ``single``: the products of each flush's rows (X̃ᵀX̃ and X̃ᵀT) in float32 (twice as
    fast), summed in float64: ~1e-7 relative, for sums whose use is damped well above that
    (the pruning scores, a refit at damping ≥ 1e-3), not for a refit whose oracle needs
    float64 (exactly dependent units, damping 1e-9).
    ``widths``: the targets come in blocks of these widths, one per site reading the same
    rows (``add`` takes a list), each block's ‖T‖² summed on its own (``tts``); ``split``
    gives one site's sums each. The rows' products, the cost, are made once for them all.
    ``flusher`` (an executor of one thread, ``accumulate``'s): the products of a full
    buffer run there while the caller captures the next feeds (onnxruntime and BLAS then
    share the cores); one product of this site is in flight at a time, and every read of
    the sums (``xtx``, ``xty``, ``snapshot``, ``flush``) waits for it. One thread does
    every product in the order handed over, at the caller's BLAS thread count: the sums
    are those made in line, bit for bit."""

    def __init__(self, xtx: np.ndarray, xty: np.ndarray | None = None, tt: float = 0.0,
                 n: int = 0, single: bool = False, widths: Sequence[int] | None = None,
                 flusher=None):
        self._xtx, self._xty = xtx, xty
        self._flusher = flusher
        self._inflight = None  # the product handed to ``flusher`` (a Future)
        self.single = single
        self.tt = tt
        self.n = n
        self.widths = tuple(widths) if widths is not None else None
        self.tts = np.zeros(len(self.widths)) if self.widths is not None else None
        self._pending: list[tuple[np.ndarray, np.ndarray | None]] = []
        self._rows = 0
        self._half = False  # only the lower triangle of xtx[:k, :k] is summed so far
        self.parts: list[GramStats] = []  # per-fold sums (``accumulate``'s ``folds``)

    @property
    def xtx(self) -> np.ndarray:
        """X̃ᵀX̃, [K+1, K+1]."""
        self.flush()
        if self._half:
            mirror_lower(self._xtx[:self.k, :self.k])
            self._half = False
        return self._xtx

    @property
    def xty(self) -> np.ndarray | None:
        """X̃ᵀT, [K+1, N] (None without targets)."""
        self.flush()
        return self._xty

    @property
    def k(self) -> int:
        """Input features (without the ones column)."""
        return self._xtx.shape[0] - 1

    def add(self, x: np.ndarray, t: np.ndarray | None = None,
            w: np.ndarray | None = None) -> None:
        """Add rows ``x`` (and targets ``t``: with ``widths``, a list of one block per
        width); ``w``: a weight per row (sums of w·x̃x̃ᵀ)."""
        x = np.asarray(x)
        if t is not None and self._xty is not None:
            blocks = [np.asarray(b) for b in (t if self.widths is not None else [t])]
            norms = []
            for b in blocks:
                tt = np.einsum("ij,ij->i", b, b, dtype=np.float64)
                norms.append(float(tt.sum() if w is None else (tt * w).sum()))
            self.tt += sum(norms)
            if self.tts is not None:
                self.tts += norms
            t = blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=1)
        else:
            t = None
        self._pending.append((x, t, None if w is None else np.asarray(w, np.float64)))
        self._rows += x.shape[0]
        self.n += x.shape[0]
        if self._rows >= max(256, min(self.k, 4096)):
            if self._flusher is None:
                self.flush()
            else:
                self._wait()
                pending, self._pending, self._rows = self._pending, [], 0
                self._inflight = self._flusher.submit(self._multiply, pending)

    def _wait(self) -> None:
        if self._inflight is not None:
            done, self._inflight = self._inflight, None
            done.result()  # a product's error is raised here

    def flush(self) -> None:
        """Add the buffered rows into the sums (float64)."""
        self._wait()
        if not self._pending:
            return
        pending, self._pending, self._rows = self._pending, [], 0
        self._multiply(pending)

    def _multiply(self, pending) -> None:
        """Add the rows of ``pending`` (``add``'s buffer) into the sums."""
        x = np.concatenate([p[0] for p in pending])
        x = x.astype(np.float32 if self.single else np.float64, copy=False)
        weighted = any(p[2] is not None for p in pending)
        w = np.concatenate([p[2] if p[2] is not None else np.ones(len(p[0]))
                            for p in pending]) if weighted else None
        k = x.shape[1]
        if not self._add_syrk(x, w):
            # numpy sends x.T @ x to BLAS syrk and then mirrors it, which ran slower than
            # the general product on a second buffer here
            xw = x * w[:, None] if weighted else x.copy()
            self._xtx[:k, :k] += xw.T @ x  # both triangles (the lower one is what counts)
            del xw
        sums = w @ x if weighted else x.sum(0, dtype=np.float64)
        self._xtx[:k, k] += sums
        self._xtx[k, :k] += sums
        self._xtx[k, k] += float(w.sum()) if weighted else x.shape[0]
        if self._xty is not None and pending[0][1] is not None:
            t = np.concatenate([p[1] for p in pending]).astype(x.dtype, copy=False)
            tw = (t * w[:, None]).astype(x.dtype, copy=False) if weighted else t
            self._xty[:k] += x.T @ tw
            self._xty[k] += w @ t if weighted else t.sum(0, dtype=np.float64)

    def _add_syrk(self, x: np.ndarray, w: np.ndarray | None) -> bool:
        """Add xᵀ·diag(w)·x into the lower triangle of xtx[:k, :k] by ``dsyrk`` (False:
        scipy is missing or a weight is negative; nothing was added)."""
        if not x.shape[0]:
            return True
        if w is not None and np.any(w < 0):
            return False
        try:
            from scipy.linalg import blas
        except ImportError:
            return False
        a = x * np.sqrt(w)[:, None].astype(x.dtype) if w is not None else x
        # a.T is [k, rows] in Fortran order: syrk (trans=0) makes a.T·a without a copy, its
        # upper triangle (Fortran) being the lower one of the C-ordered transpose
        c = (blas.ssyrk if x.dtype == np.float32 else blas.dsyrk)(1.0, a.T, trans=0, lower=0)
        k = x.shape[1]
        self._xtx[:k, :k] += c.T
        self._half = True
        return True

    @classmethod
    def total(cls, parts: Sequence["GramStats"]) -> "GramStats":
        """The sums of ``parts`` (same shapes), which it keeps as ``.parts``."""
        xty = [p.xty for p in parts]
        out = cls(sum(p.xtx for p in parts),
                  None if xty[0] is None else sum(xty),
                  float(sum(p.tt for p in parts)), int(sum(p.n for p in parts)))
        out.parts = list(parts)
        return out

    def split(self) -> list["GramStats"]:
        """One ``GramStats`` per target block (``widths``): its X̃ᵀT columns and ‖T‖², and
        this X̃ᵀX̃ array itself, shared by all of them (read it, never write it in place)."""
        xtx, xty = self.xtx, self.xty
        out, at = [], 0
        for j, width in enumerate(self.widths):
            block = None if xty is None else np.ascontiguousarray(xty[:, at:at + width])
            out.append(GramStats(xtx, block, float(self.tts[j]), self.n, self.single))
            at += width
        return out

    def snapshot(self) -> "GramStats":
        """A copy with the rows added so far, flushed: the sums a capture ending here has."""
        self._wait()
        out = GramStats(self._xtx.copy(), None if self._xty is None else self._xty.copy(),
                        self.tt, self.n, self.single, self.widths)
        out.tts = None if self.tts is None else self.tts.copy()
        out._pending, out._rows, out._half = list(self._pending), self._rows, self._half
        out.flush()
        return out

    def minus(self, part: "GramStats") -> "GramStats":
        """The sums without ``part``'s rows."""
        return GramStats(self.xtx - part.xtx, None if self.xty is None else
                         self.xty - part.xty, self.tt - part.tt, self.n - part.n)

    def error(self, weight: np.ndarray, bias: np.ndarray | None = None) -> float:
        """‖X W + b − T‖² on the accumulated rows (``weight`` [K, N], ``bias`` [N])."""
        if self.xty is None:
            raise ValueError("error() needs targets (accumulate with targets=True)")
        v = np.concatenate([weight, (bias if bias is not None else
                                     np.zeros(weight.shape[1]))[None, :]], axis=0)
        v = v.astype(np.float64)
        return float(np.einsum("ij,ij->", v, self.xtx @ v) - 2 * np.einsum("ij,ij->", v, self.xty)
                     + self.tt)


def mirror_lower(a: np.ndarray, block: int = 256) -> np.ndarray:
    """Copy the lower triangle of the square ``a`` onto its upper one, in place, by
    blocks (a fancy-indexed copy of the triangle of a 3073² matrix takes ~1.4 s, this
    ~0.03 s). Returns ``a``."""
    k = a.shape[0]
    for i in range(0, k, block):
        end = min(i + block, k)
        if end < k:
            a[i:end, end:] = a[end:, i:end].T
        diag = a[i:end, i:end]
        upper = np.triu_indices(end - i, 1)
        diag[upper] = diag.T[upper]
    return a
