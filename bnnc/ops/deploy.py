"""Deploy-form ops of the ``ai.bnnc`` domain: bit-packed tensors and integer epilogues.

Each op here has a schema (``DEPLOY_OPS``) and a NumPy reference kernel that is slow and obviously
correct. The reference executor, the tests and every compiled backend agree with these functions.

Encoding (``../shared/spec/deploy.md`` §2): a binary value s ∈ {−1, +1} is one bit, 1 ⇔ +1. Channels are
packed along the innermost axis (NHWC) into little-endian uint32 words: channel c is bit c % 32 of
word c // 32. Tail bits of the last word are always 0.
"""

from __future__ import annotations

import numpy as np

from . import WORD_BITS

__all__ = [
    "DEPLOY_OPS",
    "num_words",
    "pack_bits",
    "unpack_bits",
    "popcount32",
    "pack_sign",
    "unpack_sign",
    "binary_conv2d_packed",
    "maxpool_bits",
    "conv_output_size",
    "border_classes",
]


def num_words(channels: int) -> int:
    return (int(channels) + WORD_BITS - 1) // WORD_BITS


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Pack a boolean array along its last axis into uint32 words (channel c → bit c % 32)."""
    bits = np.asarray(bits, dtype=bool)
    c = bits.shape[-1]
    w = num_words(c)
    padded = np.zeros(bits.shape[:-1] + (w * WORD_BITS,), dtype=np.uint64)
    padded[..., :c] = bits
    padded = padded.reshape(bits.shape[:-1] + (w, WORD_BITS))
    weights = np.left_shift(np.uint64(1), np.arange(WORD_BITS, dtype=np.uint64))
    return (padded * weights).sum(axis=-1).astype(np.uint32)


def unpack_bits(words: np.ndarray, channels: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: uint32 words along the last axis → boolean array of ``channels``."""
    words = np.asarray(words, dtype=np.uint32)
    shifts = np.arange(WORD_BITS, dtype=np.uint32)
    bits = (words[..., None] >> shifts) & np.uint32(1)
    bits = bits.reshape(words.shape[:-1] + (words.shape[-1] * WORD_BITS,))
    return bits[..., :channels].astype(bool)


def popcount32(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.asarray(x, dtype=np.uint32)).astype(np.int32)


def conv_output_size(size: int, k: int, stride: int, pad_begin: int, pad_end: int, dilation: int = 1) -> int:
    return (size + pad_begin + pad_end - dilation * (k - 1) - 1) // stride + 1


def border_classes(size: int, k: int, stride: int, pad_begin: int, pad_end: int, dilation: int = 1):
    """Group output positions along one axis by which kernel taps fall on padding.

    Returns ``(cls, valid)``: ``cls[o]`` is the class index of output position o, and ``valid[c]`` is a
    boolean mask over the k taps of class c (True where the tap reads a real input position).
    """
    out = conv_output_size(size, k, stride, pad_begin, pad_end, dilation)
    patterns: dict[tuple, int] = {}
    cls = np.zeros(out, dtype=np.int32)
    for o in range(out):
        start = o * stride - pad_begin
        mask = tuple(0 <= start + t * dilation < size for t in range(k))
        cls[o] = patterns.setdefault(mask, len(patterns))
    valid = np.zeros((len(patterns), k), dtype=bool)
    for mask, i in patterns.items():
        valid[i] = mask
    return cls, valid


# --------------------------------------------------------------------------------------------------
# Reference kernels


def pack_sign(x: np.ndarray, threshold: np.ndarray | None = None) -> np.ndarray:
    """``PackSign``: float NCHW (or NC) → packed bits NHWC (or NC), bit = x ≥ threshold[c]."""
    x = np.asarray(x, dtype=np.float32)
    c = x.shape[1]
    t = np.zeros(c, np.float32) if threshold is None else np.asarray(threshold, np.float32).reshape(c)
    t = t.reshape((1, c) + (1,) * (x.ndim - 2))
    bits = x >= t
    return pack_bits(np.moveaxis(bits, 1, -1))


def unpack_sign(xp: np.ndarray, channels: int) -> np.ndarray:
    """``UnpackSign``: packed bits NHWC (or NC) → float ±1 NCHW (or NC)."""
    bits = unpack_bits(xp, channels)
    return np.moveaxis(np.where(bits, np.float32(1), np.float32(-1)), -1, 1).copy()


def _popcount_conv(xp, wp, strides, pads, dilations):
    """pc[n, o, oh, ow] = Σ over all kh·kw taps of popcount(x_pad XOR w); padded words are 0."""
    n, h, w, cw = xp.shape
    o, kh, kw, _ = wp.shape
    sh, sw = strides
    pt, pl, pb, pr = pads
    dh, dw = dilations
    oh = conv_output_size(h, kh, sh, pt, pb, dh)
    ow = conv_output_size(w, kw, sw, pl, pr, dw)
    xpad = np.zeros((n, h + pt + pb, w + pl + pr, cw), np.uint32)
    xpad[:, pt : pt + h, pl : pl + w] = xp
    pc = np.zeros((n, o, oh, ow), np.int32)
    for i in range(kh):
        for j in range(kw):
            win = xpad[:, i * dh : i * dh + sh * (oh - 1) + 1 : sh, j * dw : j * dw + sw * (ow - 1) + 1 : sw]
            # win: [n, oh, ow, cw]; w tap: [o, cw]
            x = win[:, None]  # n,1,oh,ow,cw
            wt = wp[:, i, j][None, :, None, None, :]
            pc += popcount32(np.bitwise_xor(x, wt)).sum(-1)
    return pc


def binary_conv2d_packed(
    xp, wp, e, row_class, col_class, p0, p1, *, in_channels, out_channels, kernel_shape, strides, pads,
    dilations, output,
):
    """``BinaryConv2dPacked``: XOR-popcount conv with an integer epilogue.

    D[n,o,y,x] = E[o, row_class[y], col_class[x]] − 2·pc[n,o,y,x] equals Σ_V s_w·s_a over the valid
    (non-padded) taps V. ``output="float"``: Y = P0[o]·D + P1[o] (float32, NCHW).
    ``output="bits"``: bit = (P0[o]·D ≥ P1[o]) with int32 P0 ∈ {−1, 0, +1}, packed NHWC.
    """
    del in_channels, kernel_shape
    pc = _popcount_conv(np.asarray(xp, np.uint32), np.asarray(wp, np.uint32), strides, pads, dilations)
    e = np.asarray(e, np.int32)
    base = e[:, np.asarray(row_class)[:, None], np.asarray(col_class)[None, :]]  # o, oh, ow
    d = base[None] - 2 * pc
    if output == "float":
        m = np.asarray(p0, np.float32).reshape(1, out_channels, 1, 1)
        c = np.asarray(p1, np.float32).reshape(1, out_channels, 1, 1)
        return (d.astype(np.float32) * m + c).astype(np.float32)
    if output == "bits":
        direction = np.asarray(p0, np.int64).reshape(1, out_channels, 1, 1)
        thr = np.asarray(p1, np.int64).reshape(1, out_channels, 1, 1)
        bits = direction * d.astype(np.int64) >= thr
        return pack_bits(np.moveaxis(bits, 1, -1))
    raise ValueError(f"BinaryConv2dPacked: output must be 'float' or 'bits', got {output!r}")


def maxpool_bits(xp, *, channels, kernel_shape, strides, pads, mode):
    """``MaxPoolBits``: max pooling of ±1 values on packed bits: OR (``mode="or"``) or AND (``"and"``)
    over the valid positions of each window (padding never contributes)."""
    if mode not in ("or", "and"):
        raise ValueError(f"MaxPoolBits: mode must be 'or' or 'and', got {mode!r}")
    xp = np.asarray(xp, np.uint32)
    n, h, w, cw = xp.shape
    kh, kw = kernel_shape
    sh, sw = strides
    pt, pl, pb, pr = pads
    oh = conv_output_size(h, kh, sh, pt, pb)
    ow = conv_output_size(w, kw, sw, pl, pr)
    full = pack_bits(np.ones(channels, bool))  # valid-channel mask (keeps tail bits 0)
    ident = np.uint32(0) if mode == "or" else None
    out = np.zeros((n, oh, ow, cw), np.uint32)
    for y in range(oh):
        for x in range(ow):
            acc = np.broadcast_to(full if mode == "and" else ident, (n, cw)).copy()
            for i in range(kh):
                for j in range(kw):
                    yy, xx = y * sh - pt + i, x * sw - pl + j
                    if 0 <= yy < h and 0 <= xx < w:
                        acc = acc | xp[:, yy, xx] if mode == "or" else acc & xp[:, yy, xx]
            out[:, y, x] = acc
    return out


# Schema: name → (inputs, outputs, attributes). Used by docs, the checker and the runtimes.
DEPLOY_OPS = {
    "PackSign": dict(
        inputs=["X: float32 [N,C,H,W] or [N,C]", "T: float32 [C] (optional threshold, default 0)"],
        outputs=["Y: uint32 [N,H,W,ceil(C/32)] or [N,ceil(C/32)]"],
        attributes={},
    ),
    "UnpackSign": dict(
        inputs=["X: uint32 packed NHWC or NC"],
        outputs=["Y: float32 ±1, NCHW or NC"],
        attributes={"channels": "int"},
    ),
    "BinaryConv2dPacked": dict(
        inputs=[
            "X: uint32 [N,H,W,Cw]", "W: uint32 [O,KH,KW,Cw]", "E: int32 [O,NR,NC]",
            "RowClass: int32 [OH]", "ColClass: int32 [OW]", "P0: float32|int32 [O]", "P1: float32|int32 [O]",
        ],
        outputs=["Y: float32 [N,O,OH,OW] (output=float) or uint32 [N,OH,OW,ceil(O/32)] (output=bits)"],
        attributes={
            "in_channels": "int", "out_channels": "int", "kernel_shape": "ints", "strides": "ints",
            "pads": "ints", "dilations": "ints", "output": "string: float|bits", "source": "string",
        },
    ),
    "MaxPoolBits": dict(
        inputs=["X: uint32 [N,H,W,Cw]"],
        outputs=["Y: uint32 [N,OH,OW,Cw]"],
        attributes={"channels": "int", "kernel_shape": "ints", "strides": "ints", "pads": "ints",
                    "mode": "string: or|and"},
    ),
}
