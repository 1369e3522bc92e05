"""1-D Winograd / Toom-Cook correlation for the float stem conv, shared by the TVM kernel
(:mod:`bnnc.runtimes.tvm.float_kernels`) and the ONNX Runtime library's op (``WinogradConvMaxPool``, written
by :mod:`bnnc.runtimes.ort.fuse`): the transform matrices, how a row of output columns is cut into vectors
of tiles, and the transformed weights, computed once here in exact / float64 arithmetic.

A stride-2 conv with a ``kw``-wide kernel is, per column phase p (input columns 2u + p), a stride-1
correlation with ``r = ceil(kw / 2)`` taps (kernel columns 2k + p; the odd phase of an odd width padded
with a zero tap). Along an output row the columns are cut into tiles of ``m``; a tile is
``Aᵀ [(G g) ⊙ (Bᵀ d)]`` over ``n = m + r − 1`` points, and the sum over input channels, kernel rows and both
phases is taken between the transforms. Kernels keep ``vec`` tiles in the vector lanes.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

__all__ = ["POINTS", "row_parts", "transform_weights", "winograd_matrices"]

# interpolation points, in the order they are taken (then infinity): the first n − 1 for F(m, r)
POINTS = (0, 1, -1, 2, -2, Fraction(1, 2), Fraction(-1, 2))


def winograd_matrices(m: int, r: int, points=POINTS):
    """Exact (``Fraction``) matrices of the 1-D Winograd / Toom-Cook correlation F(m, r):
    ``y[j] = sum_k g[k]·d[j+k] = (Aᵀ [(G g) ⊙ (Bᵀ d)])[j]`` for ``j < m``, ``k < r``, with ``n = m + r − 1``
    interpolation points, the first ``n − 1`` of ``points`` and infinity. ``Bᵀ = V⁻ᵀ`` for the n×n
    Vandermonde matrix ``V`` of the points (the row of infinity picks the top power), each of its rows scaled
    to coprime integers with the inverse factor moved into ``G`` (the weights are transformed once, in
    float64). Returns ``(At [m][n], G [n][r], Bt [n][n])`` as lists of lists."""
    n = m + r - 1
    pts = [Fraction(p) for p in points[:n - 1]]
    if len(pts) != n - 1 or len(set(pts)) != n - 1:
        raise ValueError(f"F({m}, {r}) needs {n - 1} distinct finite points")
    v = [[p ** l for l in range(n)] for p in pts] + [[Fraction(int(l == n - 1)) for l in range(n)]]
    # solve Vᵀ · Bt = I by Gauss-Jordan over the rationals
    a = [[v[xi][l] for xi in range(n)] + [Fraction(int(l == s)) for s in range(n)] for l in range(n)]
    for col in range(n):
        piv = next(rw for rw in range(col, n) if a[rw][col] != 0)
        a[col], a[piv] = a[piv], a[col]
        a[col] = [e / a[col][col] for e in a[col]]
        for rw in range(n):
            if rw != col and a[rw][col] != 0:
                a[rw] = [e - a[rw][col] * f for e, f in zip(a[rw], a[col])]
    bt = [row[n:] for row in a]
    at = [[v[xi][j] if xi < n - 1 else Fraction(int(j == m - 1)) for xi in range(n)] for j in range(m)]
    g = [[v[xi][k] if xi < n - 1 else Fraction(int(k == r - 1)) for k in range(r)] for xi in range(n)]
    for xi in range(n):
        den = math.lcm(*[e.denominator for e in bt[xi]])
        num = math.gcd(*[(e * den).numerator for e in bt[xi]])
        f = Fraction(den, num)
        bt[xi] = [e * f for e in bt[xi]]
        g[xi] = [e / f for e in g[xi]]
    return at, g, bt


def row_parts(ow: int, kw: int, vec: int, m_max: int = 4) -> tuple[list[dict], int]:
    """How a row of ``ow`` output columns of a stride-2, ``kw``-wide conv is cut into vectors of ``vec``
    tiles: F(m_max, r) while ``m_max·vec`` columns remain, then F(m, r) with the smallest m that covers the
    rest in one vector (the stem's 112 columns at 16 lanes: 64 by F(4, 4), 48 by F(3, 4), no idle lane).
    Returns ``(parts, slots)``: per vector ``dict(m, npt, at, g, bt, col, slot, ntile)`` (first output
    column, first slot of its points, tiles in use) and the number of slots (points over all vectors)."""
    r = -(-int(kw) // 2)
    parts, col, slot = [], 0, 0
    while col < ow:
        rest = ow - col
        m = m_max if rest >= m_max * vec else -(-rest // vec)
        at, g, bt = winograd_matrices(m, r)
        npt = m + r - 1
        parts.append(dict(m=m, npt=npt, at=at, g=g, bt=bt, col=col, slot=slot, ntile=min(vec, -(-rest // m))))
        col += m * vec
        slot += npt
    return parts, slot


def transform_weights(w: np.ndarray, parts: list[dict], oc_tile: int) -> np.ndarray:
    """``U[o / oc_tile, c, kh, phase, slot, oc_tile]`` (float32, computed in float64): for each vector of
    tiles, ``G`` times the taps of each column phase (phase p tap k = kernel column 2k + p, zero past the
    kernel)."""
    o, c, kh, kw = w.shape
    r = len(parts[0]["g"][0])
    taps = np.zeros((o, c, kh, 2, r))
    w64 = w.astype(np.float64)
    for p in range(2):
        k = len(range(p, kw, 2))
        taps[:, :, :, p, :k] = w64[:, :, :, p::2]
    u = np.concatenate([taps @ np.array(pt["g"], dtype=np.float64).T for pt in parts], axis=-1)
    slots = u.shape[-1]
    return np.ascontiguousarray(
        u.astype(np.float32).reshape(o // oc_tile, oc_tile, c, kh, 2, slots).transpose(0, 2, 3, 4, 5, 1))
