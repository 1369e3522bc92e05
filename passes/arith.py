"""The folding arithmetic of ``../shared/spec/deploy.md`` (§3–§5), as plain NumPy functions.

Passes call these; tests check them against the float graph. Nothing here touches a graph.
"""

from __future__ import annotations

import numpy as np

from bnnc.ops.deploy import border_classes, pack_bits


def pack_conv_weights(w: np.ndarray) -> np.ndarray:
    """OIHW float weights → packed sign bits [O, KH, KW, ceil(I/32)] (bit 1 ⇔ w ≥ 0)."""
    return pack_bits(np.transpose(np.asarray(w) >= 0, (0, 2, 3, 1)))


def border_tables(w: np.ndarray, in_hw, strides, pads, dilations, pad_level: int = 0):
    """Per-border-class constants for the padding convention (deploy.md §4).

    The kernel counts pc = Σ over all taps of popcount(x XOR w) with padded positions read as 0 bits.
    A padded tap then adds the number of +1 weight bits at that tap, so for the valid taps V:
    Σ_V s_w·s_a = |V|·Cin + 2·P1 − 2·pc, where P1 counts +1 weight bits on padded taps.
    Returns ``(E, row_class, col_class)`` with E[o, rc, cc] = |V|·Cin + 2·P1 (``pad_level=0``, zero padding).

    ``pad_level=+1`` ("one" padding: padded positions hold s = +1) adds Σ_pad s_w = 2·P1 − n_pad, and
    ``pad_level=−1`` adds −(2·P1 − n_pad), so that E − 2·pc is the sum over all K taps (n_pad = padded taps·Cin).
    """
    if pad_level not in (-1, 0, 1):
        raise ValueError(f"pad_level must be -1, 0 or +1, got {pad_level!r}")
    w = np.asarray(w)
    o, cin, kh, kw = w.shape
    rcls, rvalid = border_classes(in_hw[0], kh, strides[0], pads[0], pads[2], dilations[0])
    ccls, cvalid = border_classes(in_hw[1], kw, strides[1], pads[1], pads[3], dilations[1])
    plus = (w >= 0).sum(axis=1)  # [O, KH, KW]: +1 weight bits per tap
    e = np.zeros((o, len(rvalid), len(cvalid)), np.int64)
    for r, rv in enumerate(rvalid):
        for c, cv in enumerate(cvalid):
            valid = rv[:, None] & cv[None, :]
            p1 = plus[:, ~valid].sum(axis=1)
            e[:, r, c] = valid.sum() * cin + 2 * p1 + pad_level * (2 * p1 - (~valid).sum() * cin)
    return e.astype(np.int32), rcls, ccls


def batchnorm_affine(scale, bias, mean, var, eps):
    """BatchNormalization as z = g·y + h (float64)."""
    g = np.asarray(scale, np.float64) / np.sqrt(np.asarray(var, np.float64) + float(eps))
    h = np.asarray(bias, np.float64) - np.asarray(mean, np.float64) * g
    return g, h


def batchnorm_f32(y, scale, bias, mean, var, eps):
    """BatchNormalization in float32, in the order of the ONNX spec: (y − mean) / sqrt(var + eps) · scale + B."""
    f = np.float32
    c = (1, -1) + (1,) * (np.ndim(y) - 2)
    std = np.sqrt(np.asarray(var, f) + f(eps)).reshape(c)
    return ((y - np.asarray(mean, f).reshape(c)) / std * np.asarray(scale, f).reshape(c)
            + np.asarray(bias, f).reshape(c)).astype(f)


def threshold_from_decisions(decide: np.ndarray, k_max: int):
    """Turn a decision table ``decide[o, D + k_max]`` (D = −k_max…k_max) into ``dir·D ≥ thr`` (int32).

    direction 0 marks a constant channel (thr ≤ 0: always +1; thr = 1: always −1). Raises
    ``ValueError`` naming the channel when a decision is not monotone in D (one step at most).
    """
    o = decide.shape[0]
    direction = np.zeros(o, np.int32)
    thr = np.zeros(o, np.int32)
    for c in range(o):
        dc = decide[c]
        if dc.all() or not dc.any():
            thr[c] = 0 if dc.all() else 1
            continue
        steps = np.flatnonzero(dc[1:] != dc[:-1])
        if len(steps) != 1:
            raise ValueError(f"channel {c}: the binary decision is not monotone in the popcount")
        first = int(steps[0]) + 1 - k_max  # first D after the step
        if dc[-1]:  # off → on: s = [D ≥ first]
            direction[c], thr[c] = 1, first
        else:  # on → off: s = [D ≤ first − 1] = [−D ≥ 1 − first]
            direction[c], thr[c] = -1, 1 - first
    return direction, thr


def popcount_grid(r, k_max: int, c=None) -> np.ndarray:
    """The conv output for every reachable D, shaped [1, O, 2K+1, 1]: fl32(D·r) (the export form of a
    plain binary conv), or fl32(fl32(D·r) + c) with a per-channel constant ``c`` (the float epilogue
    ``BinaryConv2dPacked`` computes)."""
    r = np.asarray(r, np.float32).reshape(-1)
    d = np.arange(-k_max, k_max + 1, dtype=np.float32)
    y = (d[None, :] * r[:, None]).astype(np.float32)
    if c is not None:
        y = (y + np.asarray(c, np.float32).reshape(-1)[:, None]).astype(np.float32)
    return y[None, :, :, None]


def integer_threshold(r, theta, k_max: int, bn=None):
    """Fold ``s = [BN(fl32(D·r)) ≥ θ]`` into ``s = [dir·D ≥ thr]`` for every integer |D| ≤ k_max, with
    BatchNorm evaluated in float32 in the ONNX spec's order (see ``threshold_from_decisions``)."""
    y = popcount_grid(r, k_max)
    if bn is not None:
        y = batchnorm_f32(y, *bn)
    theta = np.broadcast_to(np.asarray(theta, np.float32).reshape(-1), (y.shape[1],))
    return threshold_from_decisions(y[0, :, :, 0] >= theta[:, None], k_max)
