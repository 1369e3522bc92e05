"""The 1-D Winograd plan shared by the TVM stem kernel and the ONNX Runtime library's WinogradConvMaxPool
(bnnc.runtimes.winograd): exact transform matrices, the cut of a row into vectors of tiles, and the
transformed weights, each against closed-form expectations."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from bnnc.runtimes.winograd import row_parts, transform_weights, winograd_matrices


@pytest.mark.parametrize("m,r", [(1, 4), (2, 3), (4, 3), (4, 4), (3, 4), (2, 5)])
def test_winograd_matrices_compute_the_correlation_exactly(m, r):
    """Aᵀ[(G g) ⊙ (Bᵀ d)] = the correlation Σ_k g[k]·d[j+k], in exact rational arithmetic, and Bᵀ (the
    transform applied in float32 to the input) has integer entries."""
    at, g, bt = winograd_matrices(m, r)
    n = m + r - 1
    assert (len(at), len(at[0]), len(g), len(g[0]), len(bt)) == (m, n, n, r, n)
    assert all(e.denominator == 1 for row in bt for e in row)
    rng = np.random.default_rng(m * 10 + r)
    for _ in range(3):
        gv = [Fraction(int(v)) for v in rng.integers(-9, 10, r)]
        dv = [Fraction(int(v)) for v in rng.integers(-9, 10, n)]
        u = [sum(g[xi][k] * gv[k] for k in range(r)) for xi in range(n)]
        v = [sum(bt[xi][s] * dv[s] for s in range(n)) for xi in range(n)]
        y = [sum(at[j][xi] * u[xi] * v[xi] for xi in range(n)) for j in range(m)]
        assert y == [sum(gv[k] * dv[j + k] for k in range(r)) for j in range(m)]


def test_winograd_matrices_reject_too_few_points():
    with pytest.raises(ValueError, match="needs 8 distinct finite points"):
        winograd_matrices(6, 4)


@pytest.mark.parametrize("ow,vec,want", [
    (112, 16, [(4, 0, 16), (3, 64, 16)]),  # the ResNet stem at 224²: no idle lane
    (90, 16, [(4, 0, 16), (2, 64, 13)]),
    (112, 8, [(4, 0, 8), (4, 32, 8), (4, 64, 8), (2, 96, 8)]),
    (12, 16, [(1, 0, 12)]),
    (200, 16, [(4, 0, 16), (4, 64, 16), (4, 128, 16), (1, 192, 8)]),
])
def test_row_parts_cover_the_row(ow, vec, want):
    parts, slots = row_parts(ow, 7, vec)
    assert [(p["m"], p["col"], p["ntile"]) for p in parts] == want
    assert all(p["npt"] == p["m"] + 3 for p in parts)  # r = 4 taps per phase of a 7-wide kernel
    assert [p["slot"] for p in parts] == list(np.cumsum([0] + [p["npt"] for p in parts])[:-1])
    assert slots == sum(p["npt"] for p in parts)
    last = parts[-1]
    assert last["col"] + last["m"] * last["ntile"] >= ow > last["col"] + last["m"] * (last["ntile"] - 1)


def test_transform_weights_is_g_times_the_phase_taps():
    """U[o / 8, c, kh, p, slot, o % 8] = Σ_k G[point, k] · w[o, c, kh, 2k + p] (0 past the kernel)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 3, 7, 7)).astype(np.float32)
    parts, slots = row_parts(112, 7, 16)
    u = transform_weights(w, parts, 8)
    assert u.shape == (2, 3, 7, 2, slots, 8) and u.dtype == np.float32
    for pt in parts:
        for xi in range(pt["npt"]):
            for p in range(2):
                taps = [w[:, :, :, 2 * k + p].astype(np.float64) if 2 * k + p < 7 else 0.0 for k in range(4)]
                want = sum(float(pt["g"][xi][k]) * taps[k] for k in range(4))
                got = u[:, :, :, p, pt["slot"] + xi, :].transpose(0, 3, 1, 2).reshape(16, 3, 7)
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
