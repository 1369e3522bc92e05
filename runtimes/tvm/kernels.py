"""TE compute definitions and CPU schedules for the ``ai.bnnc`` deploy ops.

Each ``*_te`` function builds the TE tensors of one op (static shapes); each ``*_primfunc`` function
returns a scheduled ``tirx.PrimFunc`` ready to be added to a Relax module (``call_tir``) or compiled on
its own. :func:`build_kernel` compiles one op for direct calls from NumPy (tests, micro-benchmarks).

Semantics are those of the NumPy references in :mod:`bnnc.ops.deploy`, bit for bit:

* packing: uint32 words, channel c is bit c % 32 of word c // 32, NHWC, tail bits 0;
* ``BinaryConv2dPacked``: ``D = E[o, RowClass[oh], ColClass[ow]] - 2*pc``; ``float``:
  ``Y = float32(float32(D) * P0[o]) + P1[o]`` (the product is formed exactly in float64 and rounded once
  to float32, so no FMA contraction can change the rounding); ``bits``: ``int64(P0)*D >= int64(P1)``.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import te, tirx

from bnnc.ops import WORD_BITS as WORD
from bnnc.ops.deploy import num_words

VEC = 16  # int32 lanes of a 512-bit vector; also fine (two registers) on AVX2

__all__ = [
    "num_words",
    "pack_sign_te",
    "unpack_sign_te",
    "maxpool_bits_te",
    "binary_conv2d_packed_te",
    "pack_sign_primfunc",
    "chain_value_te",
    "chain_pack_primfunc",
    "unpack_sign_primfunc",
    "maxpool_bits_primfunc",
    "binary_conv2d_packed_primfunc",
    "binary_conv2d_packed_chain_primfunc",
    "conv_weight_layout",
    "block_conv_weights",
    "build_kernel",
    "compile_kernel",
    "output_spec",
    "cuda_source",
    "nvcc_compile",
    "nvcc_env",
]


def _out_size(size, k, stride, pb, pe, dil=1):
    return (size + pb + pe - dil * (k - 1) - 1) // stride + 1


def conv_geometry(h, w, kh, kw, strides, pads, dilations):
    """The attributes of a 2-D conv as ints and its output size:
    ``((sh, sw), (pt, pl, pb, pr), (dh, dw), (oh, ow))``."""
    sh, sw = [int(v) for v in strides]
    pt, pl, pb, pr = [int(v) for v in pads]
    dh, dw = [int(v) for v in dilations]
    return (sh, sw), (pt, pl, pb, pr), (dh, dw), (_out_size(h, kh, sh, pt, pb, dh), _out_size(w, kw, sw, pl, pr, dw))


def _u32(v: int):
    return tirx.const(int(v) & 0xFFFFFFFF, "uint32")


def _or_all(terms):
    acc = terms[0]
    for t in terms[1:]:
        acc = acc | t
    return acc


# --------------------------------------------------------------------------------------------------
# PackSign / UnpackSign


def pack_sign_te(X: te.Tensor, T: te.Tensor | None = None) -> te.Tensor:
    """float32 NCHW (or NC) [, threshold [C]] → uint32 NHWC (or NC) packed, bit = X >= T."""
    shape = [int(s) for s in X.shape]
    c = shape[1]
    cw = num_words(c)

    def thr(ch):
        return T[ch] if T is not None else tirx.const(0.0, "float32")

    if len(shape) == 2:
        n = shape[0]

        def f2(i, k):
            terms = []
            for b in range(WORD):
                ch = k * WORD + b
                chc = tirx.min(ch, c - 1)
                bit = tirx.all(ch < c, X[i, chc] >= thr(chc))
                terms.append(tirx.Select(bit, _u32(1 << b), _u32(0)))
            return _or_all(terms)

        return te.compute((n, cw), f2, name="pack_sign")
    if len(shape) != 4:
        raise ValueError(f"PackSign: expected a 2-D or 4-D input, got shape {shape}")
    n, _, h, w = shape

    def f4(i, y, x, k):
        terms = []
        for b in range(WORD):
            ch = k * WORD + b
            chc = tirx.min(ch, c - 1)
            bit = tirx.all(ch < c, X[i, chc, y, x] >= thr(chc))
            terms.append(tirx.Select(bit, _u32(1 << b), _u32(0)))
        return _or_all(terms)

    return te.compute((n, h, w, cw), f4, name="pack_sign")


def unpack_sign_te(X: te.Tensor, channels: int) -> te.Tensor:
    """uint32 packed NHWC (or NC) → float32 ±1 NCHW (or NC)."""
    shape = [int(s) for s in X.shape]
    one, mone = tirx.const(1.0, "float32"), tirx.const(-1.0, "float32")

    def bit(word, ch):
        return ((word >> (ch % WORD).astype("uint32")) & _u32(1)) == _u32(1)

    if len(shape) == 2:
        return te.compute((shape[0], channels),
                          lambda i, ch: tirx.Select(bit(X[i, ch // WORD], ch), one, mone), name="unpack_sign")
    n, h, w, _ = shape
    return te.compute((n, channels, h, w),
                      lambda i, ch, y, x: tirx.Select(bit(X[i, y, x, ch // WORD], ch), one, mone),
                      name="unpack_sign")


# --------------------------------------------------------------------------------------------------
# Fused float chain → PackSign (the step after a float-output binary conv)
#
# ``steps`` is the element-wise chain that follows the conv, each step one ONNX op applied to the running
# value ``v`` (float32, NCHW) with the arithmetic of TVM's legalization of that op (and of ONNX):
#   ("add", k)  v + A_k        ("sub", k) v - A_k      ("rsub", k) A_k - v      ("mul", k) v * A_k
#   ("max", k)  max(v, A_k)    ("min", k) min(v, A_k)  ("prelu", k) where(v < 0, v * A_k, v)
#   ("relu",)   max(v, 0)      ("neg",)   -v
# ``A_k`` is the k-th extra operand, broadcast NumPy-style (rank <= 4, right-aligned) to the output shape.
# The fused kernel writes the final float value (when it is needed elsewhere, e.g. the residual path) and
# the packed sign bits ``v >= T[c]`` of the next binary layer, in one pass over the data.

CHAIN_OPS = ("add", "sub", "rsub", "mul", "max", "min", "prelu", "relu", "neg")


def _bcast_index(shape, out_rank, idx):
    """Indices into a tensor of ``shape`` broadcast (right-aligned) to ``out_rank`` dims at ``idx``."""
    off = out_rank - len(shape)
    return [0 if int(s) == 1 else idx[off + d] for d, s in enumerate(shape)]


def broadcasts_to(shape, target) -> bool:
    """Whether an operand of ``shape`` broadcasts (NumPy rules, right-aligned) to ``target`` without changing it."""
    shape, target = [int(v) for v in shape], [int(v) for v in target]
    return len(shape) <= len(target) and all(a in (1, b) for a, b in zip(shape, target[len(target) - len(shape):]))


def chain_value_te(Y: te.Tensor, extras, steps, name: str = "chain", fence: bool = False,
                   family: str = "x86") -> te.Tensor:
    """The float chain applied to ``Y`` (any rank), one TE stage (``fence``, ``family``: see :func:`chain_step`)."""
    shape = [int(s) for s in Y.shape]
    rank = len(shape)
    check_chain([a.shape for a in extras], steps, shape)
    return te.compute(tuple(shape), lambda *idx: _chain_apply(Y[idx], extras, steps, idx, rank, fence, family),
                      name=name)


def no_contract(p, lanes: int = 1, family: str = "x86"):
    """``p`` (a float32 product ``a * b``; ``lanes`` > 1: a float32xN vector) rounded on its own: the compiler may
    not fuse it with a following add into an FMA.

    TVM's LLVM backend contracts ``a*b + c`` by default (one rounding instead of two), and so does nvcc, which
    changes about a quarter of such results by an ulp against ONNX's op-by-op semantics (NumPy, ONNX Runtime)
    and can move a value across a sign threshold. On the LLVM targets (``family`` "x86", "arm")
    ``llvm.arithmetic.fence`` keeps the two roundings; on "cuda" the product is CUDA's ``__fmul_rn``, which
    nvcc never contracts."""
    if family == "cuda":
        if lanes != 1 or not isinstance(p, tirx.Mul):
            raise ValueError("no_contract on CUDA: a scalar product a * b expected")
        return tirx.call_pure_extern("float32", "__fmul_rn", p.a, p.b)
    return tirx.call_llvm_pure_intrin("float32" if lanes == 1 else f"float32x{lanes}", "llvm.arithmetic.fence", p)


def multiply_te(A: te.Tensor, B: te.Tensor, family: str = "x86", name: str = "multiply") -> te.Tensor:
    """ONNX ``Mul`` of two float32 tensors (NumPy broadcasting), every product rounded on its own
    (:func:`no_contract`), so that fused element-wise kernels keep ONNX's op-by-op rounding: Relax fuses a
    multiply with a following add into one loop, where the compiler would otherwise form FMAs."""
    sa, sb = [int(v) for v in A.shape], [int(v) for v in B.shape]
    shape = [int(v) for v in np.broadcast_shapes(tuple(sa), tuple(sb))]
    rank = len(shape)

    def f(*idx):
        a = A[tuple(_bcast_index(sa, rank, idx))] if sa else A[()]
        b = B[tuple(_bcast_index(sb, rank, idx))] if sb else B[()]
        return no_contract(a * b, 1, family)

    return te.compute(tuple(shape), f, name=name)


def chain_step(kind: str, v, av=None, fence: bool = False, lanes: int = 1, family: str = "x86"):
    """One step of a fused element-wise chain (:data:`CHAIN_OPS`) on ``v`` with operand ``av``: the single
    definition every chain kernel uses (scalar expressions, or ``lanes``-wide vectors). ``fence``: products
    are rounded before any following add (:func:`no_contract` for the schedule ``family``)."""
    zero = tirx.const(0.0, "float32")
    if lanes > 1:
        zero = tirx.Broadcast(zero, lanes)
    if kind not in CHAIN_OPS:
        raise ValueError(f"fused chain: unknown step {kind!r}")
    if kind == "relu":
        return tirx.max(v, zero)
    if kind == "neg":
        return -v
    if kind == "add":
        return v + av
    if kind == "sub":
        return v - av
    if kind == "rsub":
        return av - v
    if kind == "max":
        return tirx.max(v, av)
    if kind == "min":
        return tirx.min(v, av)
    prod = v * av
    if fence:
        prod = no_contract(prod, lanes, family)
    if kind == "mul":
        return prod
    return tirx.Select(v < zero, prod, v)  # prelu


def check_chain(extra_shapes, steps, y_shape) -> list[tuple]:
    """Validate a fused chain: every operand broadcasts to the output ``y_shape``, every step is one of
    :data:`CHAIN_OPS` and names an existing operand. Returns the operand shapes."""
    yshape = tuple(int(v) for v in y_shape)
    ext_shapes = [tuple(int(v) for v in s) for s in extra_shapes]
    for k, s in enumerate(ext_shapes):
        if not broadcasts_to(s, yshape):
            raise ValueError(f"fused chain: operand {k} of shape {list(s)} does not broadcast to {list(yshape)}")
    for st in steps:
        if st[0] not in CHAIN_OPS:
            raise ValueError(f"fused chain: unknown step {st[0]!r}")
        if st[0] not in ("relu", "neg") and not 0 <= int(st[1]) < len(ext_shapes):
            raise ValueError(f"fused chain: step {st} names a missing operand")
    return ext_shapes


def _chain_apply(v, extras, steps, idx, rank: int, fence: bool = False, family: str = "x86"):
    """The chain ``steps`` (validated by :func:`check_chain`) applied to the float32 scalar expression ``v`` at
    output index ``idx``."""
    for st in steps:
        if st[0] in ("relu", "neg"):
            v = chain_step(st[0], v, fence=fence, family=family)
            continue
        a = extras[st[1]]
        av = a[tuple(_bcast_index(a.shape, rank, idx))] if len(a.shape) else a[()]
        v = chain_step(st[0], v, av, fence=fence, family=family)
    return v


def _rows_lanes(h: int, w: int, vec: int) -> tuple[int, int]:
    """(rows per parallel task, vector lanes) for an NCHW plane of ``h`` x ``w``: the most lanes (a power
    of two <= ``vec``) that divide ``rows * w`` for some divisor ``rows`` of ``h``, then the fewest rows."""
    best = (1, 1)
    for rows in range(1, h + 1):
        if h % rows:
            continue
        ext = rows * w
        lanes = 1
        while lanes * 2 <= vec and ext % (lanes * 2) == 0:
            lanes *= 2
        if lanes > best[1]:
            best = (rows, lanes)
    return best


def _pack_sign_stage(V: te.Tensor, T, shape) -> te.Tensor:
    """``PackSign(V, T)`` of an NCHW float value ``V`` of ``shape`` as the TE stage ``pack_sign`` (uint32 NHWC
    words; ``T`` None: threshold 0), channel indices written so that the region analysis of
    ``reverse_compute_at`` stays exact (whole words, or one partial word)."""
    def thr(ch):
        return T[ch] if T is not None else tirx.const(0.0, "float32")

    if shape[1] % WORD == 0:
        # whole words: no clamped channel index (keeps the region analysis of reverse_compute_at exact)
        def fp(i, y, x, k):
            return _or_all([tirx.Select(V[i, k * WORD + b, y, x] >= thr(k * WORD + b), _u32(1 << b), _u32(0))
                            for b in range(WORD)])

        P = te.compute((shape[0], shape[2], shape[3], shape[1] // WORD), fp, name="pack_sign")
    elif shape[1] < WORD:
        # one partial word per pixel (bits >= C stay 0); channel k*C + b with k = 0 (an index the
        # region analysis of reverse_compute_at can solve for k, unlike a constant or k*32 + b)
        def f1(i, y, x, k):
            return _or_all([tirx.Select(V[i, k * shape[1] + b, y, x] >= thr(k * shape[1] + b), _u32(1 << b),
                                        _u32(0)) for b in range(shape[1])])

        P = te.compute((shape[0], shape[2], shape[3], 1), f1, name="pack_sign")
    else:
        P = pack_sign_te(V, T)
    return P


def _schedule_chain_pack_cuda(sch, want_float: bool, pack: bool) -> tirx.PrimFunc:
    """CUDA schedule of the ``chain`` and ``pack_sign`` stages (of :func:`chain_pack_primfunc` and the fused
    conv kernels): the chain a flat grid where its float value is an output, else inlined into the pack; the
    pack a flat grid with x innermost (neighbouring threads read neighbouring NCHW values)."""
    if want_float:
        _bind_flat(sch, sch.get_sblock("chain"))
    else:
        sch.compute_inline(sch.get_sblock("chain"))
    if pack:
        _bind_flat(sch, sch.get_sblock("pack_sign"), order=lambda l: (l[0], l[1], l[3], l[2]))
    return _finish(sch, gpu=True)


def chain_pack_primfunc(y_shape, extra_shapes, steps, *, want_float: bool = True, pack: bool = True,
                        with_threshold: bool = True, target=None) -> tirx.PrimFunc:
    """One kernel for ``v = chain(Y, extras)`` → (``v`` float32 NCHW if ``want_float``) + (``PackSign(v, T)``
    uint32 NHWC if ``pack``). Arguments: ``(Y, *extras, [T], [v_out], [bits_out])``.

    CPU schedule: parallel over (n, output row); per row the float chain of every channel is computed
    once (vectorized along x) into the float output, then packed from there while it is in L1. Without
    the float output the chain is computed inside the packing loop and nothing else is written."""
    if not (want_float or pack):
        raise ValueError("chain_pack_primfunc: nothing to produce")
    fam = _family(target)
    shape = [int(s) for s in y_shape]
    if len(shape) != 4 and pack:
        raise ValueError(f"chain_pack_primfunc: packing needs a 4-D NCHW value, got {shape}")
    Y = te.placeholder(tuple(shape), "float32", name="Y")
    extras = [te.placeholder(tuple(int(v) for v in s), "float32", name=f"A{k}") for k, s in enumerate(extra_shapes)]
    V = chain_value_te(Y, extras, steps, fence=True, family=fam)
    args = [Y] + extras
    outs = []
    T = None
    if pack:
        if with_threshold:
            T = te.placeholder((shape[1],), "float32", name="T")
            args.append(T)
        P = _pack_sign_stage(V, T, shape)
    if want_float:
        outs.append(V)
    if pack:
        outs.append(P)
    sch = tvm.s_tir.Schedule(te.create_prim_func(args + outs))
    if fam == "cuda":
        return _schedule_chain_pack_cuda(sch, want_float, pack)
    if not pack:
        _parallel_outer(sch, sch.get_sblock("chain"), 2 if len(shape) >= 3 else 1, vec_last=True,
                        vec_max=_cpu_vec(fam))
        return _finish(sch)
    bp = sch.get_sblock("pack_sign")
    bv = sch.get_sblock("chain")
    vec = _cpu_vec(fam)
    n, c, h, w = shape
    rows, lanes = _rows_lanes(h, w, vec)
    if lanes < 4 and 4 <= w <= vec:  # e.g. 7x7: one row, all its columns as one (odd-width) vector
        rows, lanes = 1, w

    def flat_vec(loops):
        """Fuse the (row-in-block, x) loops given (extent 1 ones already gone) and vectorize by ``lanes``:
        rows are contiguous in NCHW, and ``lanes`` divides the fused extent (no predicated tail, which
        TVM would not vectorize)."""
        f = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        if lanes > 1:
            _, v = sch.split(f, [None, lanes])
            sch.vectorize(v)

    def pack_inner(loops):
        """Packing loops of one block of rows, in block-iter order (y, x, k) minus extent-1 loops:
        the word loop outside, the positions flattened and vectorized."""
        exts = [e for e in (rows, w, num_words(c)) if e > 1]
        assert len(loops) == len(exts)
        has_k = num_words(c) > 1
        sp = loops[:-1] if has_k else loops
        if has_k and sp:
            sch.reorder(loops[-1], *sp)
        if sp:
            flat_vec(sp)

    if want_float and (c % WORD == 0 or c < WORD):
        # both blocks write outputs (an output block cannot be computed inside another): the float block
        # owns the parallel loop over blocks of rows, and the packing of those rows follows it there
        i, ch, y, x = sch.get_loops(bv)
        yo, yi = sch.split(y, [None, rows])
        sch.reorder(i, yo, ch, yi, x)
        blk = sch.fuse(i, yo)
        sch.parallel(blk)
        flat_vec([yi, x] if rows > 1 else [x])
        sch.reverse_compute_at(bp, blk)
        pack_inner(sch.get_loops(bp)[1:])
        return _finish(sch)
    if want_float:  # a partial last word: the float block as its own parallel loop nest first
        i, ch, y, x = sch.get_loops(bv)
        sch.parallel(sch.fuse(i, ch))
        hw_lanes = _rows_lanes(1, h * w, vec)[1]
        f = sch.fuse(y, x)
        if hw_lanes > 1:
            _, v = sch.split(f, [None, hw_lanes])
            sch.vectorize(v)
    else:
        sch.compute_inline(bv)
    lp = sch.get_loops(bp)
    i, y, x = lp[:3]
    yo, yi = sch.split(y, [None, rows])
    if len(lp) == 4:  # the word axis outside the positions
        sch.reorder(i, yo, lp[3], yi, x)
    sch.parallel(sch.fuse(i, yo))
    flat_vec([yi, x])
    return _finish(sch)


# --------------------------------------------------------------------------------------------------
# MaxPoolBits


def maxpool_bits_te(X: te.Tensor, channels, kernel_shape, strides, pads, mode) -> te.Tensor:
    if mode not in ("or", "and"):
        raise ValueError(f"MaxPoolBits: mode must be 'or' or 'and', got {mode!r}")
    n, h, w, cw = [int(s) for s in X.shape]
    kh, kw = [int(v) for v in kernel_shape]
    sh, sw = [int(v) for v in strides]
    pt, pl, pb, pr = [int(v) for v in pads]
    oh, ow = _out_size(h, kh, sh, pt, pb), _out_size(w, kw, sw, pl, pr)
    tail = int(channels) - (cw - 1) * WORD
    tail_mask = (1 << tail) - 1 if tail < WORD else 0xFFFFFFFF

    def f(i, y, x, k):
        if mode == "or":
            acc = _u32(0)
        else:
            acc = tirx.Select(k == cw - 1, _u32(tail_mask), _u32(0xFFFFFFFF))
        ident = _u32(0) if mode == "or" else _u32(0xFFFFFFFF)
        for a in range(kh):
            for b in range(kw):
                yy = y * sh - pt + a
                xx = x * sw - pl + b
                valid = tirx.all(yy >= 0, yy < h, xx >= 0, xx < w)
                v = tirx.if_then_else(valid, X[i, tirx.max(tirx.min(yy, h - 1), 0),
                                                tirx.max(tirx.min(xx, w - 1), 0), k], ident)
                acc = (acc | v) if mode == "or" else (acc & v)
        return acc

    return te.compute((n, oh, ow, cw), f, name="maxpool_bits")


# --------------------------------------------------------------------------------------------------
# BinaryConv2dPacked


def _padded_o(o: int) -> int:
    return max(WORD, num_words(o) * WORD)


def check_conv_shapes(x_shape, w_shape, out_channels, kernel_shape):
    """``(n, h, w, cw, o, kh, kw)`` of a ``BinaryConv2dPacked`` with packed input ``[N, H, W, Cw]`` and weights
    ``[O, KH, KW, Cw]``; a clear error where the shapes and attributes disagree. Every kernel builder uses it."""
    n, h, w, cw = [int(s) for s in x_shape]
    o, kh, kw, cw2 = [int(s) for s in w_shape]
    if cw2 != cw:
        raise ValueError(f"BinaryConv2dPacked: X has {cw} words per pixel but W has {cw2}")
    if int(out_channels) != o:
        raise ValueError(f"BinaryConv2dPacked: out_channels={int(out_channels)} but W has {o} filters")
    if [int(v) for v in kernel_shape] != [kh, kw]:
        raise ValueError("BinaryConv2dPacked: kernel_shape does not match W")
    return n, h, w, cw, o, kh, kw


def _padded_input(X, pads):
    """TE stage ``xpad``: the packed input ``X [N, H, W, Cw]`` zero-padded by ``pads`` (top, left, bottom,
    right); zero words are all −1 bits, the deploy contract's padding (the border tables E correct it)."""
    n, h, w, cw = [int(s) for s in X.shape]
    pt, pl, pb, pr = pads
    return te.compute(
        (n, h + pt + pb, w + pl + pr, cw),
        lambda i, y, x, c: tirx.if_then_else(
            tirx.all(y >= pt, y < pt + h, x >= pl, x < pl + w),
            X[i, tirx.max(tirx.min(y - pt, h - 1), 0), tirx.max(tirx.min(x - pl, w - 1), 0), c], _u32(0)),
        name="xpad")


def _conv_placeholders(x_shape, w_shape, e_shape, o: int, oh: int, ow: int, pdtype: str = "float32") -> list:
    """The TE placeholders ``[X, W, E, RowClass, ColClass, P0, P1]`` of a packed binary conv (``w_shape`` as
    the kernel takes W, OHWC or blocked; ``pdtype``: of P0/P1, float32, or int32 for bits out)."""
    def ph(shape, dtype, name):
        return te.placeholder(tuple(int(v) for v in shape), dtype, name=name)

    return [ph(x_shape, "uint32", "X"), ph(w_shape, "uint32", "W"), ph(e_shape, "int32", "E"),
            ph((oh,), "int32", "RowClass"), ph((ow,), "int32", "ColClass"), ph((o,), pdtype, "P0"),
            ph((o,), pdtype, "P1")]


def binary_conv2d_packed_te(X, W, E, RC, CC, P0, P1, *, out_channels, kernel_shape, strides, pads,
                            dilations, output, **_ignored):
    """TE stages: weight transpose (→ [KH,KW,Cw,Opad]), zero padding, popcount conv, epilogue."""
    n, h, w, cw, o, kh, kw = check_conv_shapes(X.shape, W.shape, out_channels, kernel_shape)
    (sh, sw), (pt, pl, pb, pr), (dh, dw), (oh, ow) = conv_geometry(h, w, kh, kw, strides, pads, dilations)
    if int(RC.shape[0]) != oh or int(CC.shape[0]) != ow:
        raise ValueError(f"BinaryConv2dPacked: RowClass/ColClass lengths {RC.shape}/{CC.shape} "
                         f"do not match the output size {oh}x{ow}")
    op = _padded_o(o)

    wt = te.compute(
        (kh, kw, cw, op),
        lambda a, b, c, oo: tirx.if_then_else(oo < o, W[tirx.min(oo, o - 1), a, b, c], _u32(0)),
        name="wt")
    xpad = _padded_input(X, (pt, pl, pb, pr))
    rk = te.reduce_axis((0, kh), name="rk")
    rw = te.reduce_axis((0, kw), name="rw")
    rc = te.reduce_axis((0, cw), name="rc")
    pc = te.compute(
        (n, oh, ow, op),
        lambda i, y, x, oo: te.sum(
            tirx.popcount(xpad[i, y * sh + rk * dh, x * sw + rw * dw, rc] ^ wt[rk, rw, rc, oo]).astype("int32"),
            axis=[rk, rw, rc]),
        name="pc")

    def dval(i, y, x, oo):
        return E[oo, RC[y], CC[x]] - 2 * pc[i, y, x, oo]

    if output == "float":
        return te.compute(
            (n, o, oh, ow),
            lambda i, oo, y, x: (dval(i, y, x, oo).astype("float64") * P0[oo].astype("float64")).astype("float32")
            + P1[oo],
            name="epilogue")
    if output == "bits":
        ow_words = num_words(o)

        def fb(i, y, x, k):
            terms = []
            for b in range(WORD):
                ch = k * WORD + b
                chc = tirx.min(ch, o - 1)
                d = (E[chc, RC[y], CC[x]] - 2 * pc[i, y, x, ch]).astype("int64")
                bit = tirx.all(ch < o, P0[chc].astype("int64") * d >= P1[chc].astype("int64"))
                terms.append(tirx.Select(bit, _u32(1 << b), _u32(0)))
            return _or_all(terms)

        return te.compute((n, oh, ow, ow_words), fb, name="epilogue")
    raise ValueError(f"BinaryConv2dPacked: output must be 'float' or 'bits', got {output!r}")


# --------------------------------------------------------------------------------------------------
# Schedules: one compute (above), one schedule per target family.
#
# * ``x86``  — AVX-512/AVX2 (16 int32 lanes), the schedules this module started with;
# * ``arm``  — AArch64 NEON (4 int32 lanes per q register, 32 registers): same loop structure with a
#   register tile sized for NEON; LLVM lowers the 32-bit popcount to ``cnt v.16b`` (byte-wise) followed by
#   widening pairwise adds (``uaddlp``/``uadalp``) into the int32 accumulators;
# * ``cuda`` — one thread per (output pixel, output channel) of the popcount stage (``__popc`` on 32-bit
#   words, accumulator in a register), flat 1-D thread grids for the element-wise ops.
#
# Every ``*_primfunc`` takes ``target`` (``None``/"cpu" = host, "arm", "cuda", a dict or a Target).

NEON_VEC = 4  # int32 / float32 lanes of a 128-bit NEON register
CUDA_THREADS = 256


def _family(target) -> str:
    from .target import target_family

    return target_family(target)


def _finish(sch, gpu: bool = False) -> tirx.PrimFunc:
    f = sch.mod["main"]
    # op_pattern 8 = kOpaque: Relax FuseOps must not fuse (and FuseTIR re-lower) a scheduled kernel.
    attrs = {"bnnc.scheduled": True, "op_pattern": 8}
    if gpu:
        attrs["tirx.is_scheduled"] = True  # dlight's ApplyDefaultSchedule leaves it alone
    return f.with_attrs(attrs)


def _parallel_outer(sch, block, n_fuse: int, vec_last: bool = False, vec_max: int = 16):
    loops = sch.get_loops(block)
    if vec_last and len(loops) > n_fuse:
        last = loops[-1]
        ext = _extent(sch, last)
        if ext is not None and ext > 1:
            if ext > vec_max:
                _, last = sch.split(last, [None, vec_max])
            sch.vectorize(last)
        loops = sch.get_loops(block)
    if n_fuse > 1:
        fused = sch.fuse(*loops[:n_fuse])
    else:
        fused = loops[0]
    sch.parallel(fused)


def _extent(sch, loop):
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def _cpu_vec(fam: str) -> int:
    return NEON_VEC if fam == "arm" else VEC


def _bind_flat(sch, block, threads: int = CUDA_THREADS, order=None):
    """Fuse all loops of ``block`` (optionally reordered by ``order(loops)``) into a 1-D CUDA grid."""
    loops = sch.get_loops(block)
    if order is not None:
        sch.reorder(*order(loops))
        loops = sch.get_loops(block)
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    total = _extent(sch, fused) or threads
    t = min(threads, max(32, -(-total // 32) * 32))
    bx, tx = sch.split(fused, [None, t])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")


def _schedule_elementwise(args, out, n_parallel: int, vectorize: bool, fam: str = "x86") -> tirx.PrimFunc:
    f = te.create_prim_func(list(args) + [out])
    sch = tvm.s_tir.Schedule(f)
    blk = sch.get_sblock(out.op.name)
    if fam == "cuda":
        _bind_flat(sch, blk)
        return _finish(sch, gpu=True)
    _parallel_outer(sch, blk, n_parallel, vec_last=vectorize, vec_max=_cpu_vec(fam))
    return _finish(sch)


def pack_sign_primfunc(x_shape, with_threshold: bool, target=None) -> tirx.PrimFunc:
    fam = _family(target)
    X = te.placeholder(tuple(x_shape), "float32", name="X")
    T = te.placeholder((int(x_shape[1]),), "float32", name="T") if with_threshold else None
    Y = pack_sign_te(X, T)
    args = [X] + ([T] if T is not None else [])
    if len(x_shape) == 2:
        return _schedule_elementwise(args, Y, 1, False, fam)
    f = te.create_prim_func(args + [Y])
    sch = tvm.s_tir.Schedule(f)
    blk = sch.get_sblock("pack_sign")
    if fam == "cuda":
        # threads adjacent along w: coalesced loads of the NCHW input planes
        _bind_flat(sch, blk, order=lambda l: (l[0], l[1], l[3], l[2]))
        return _finish(sch, gpu=True)
    # NCHW input, NHWC output: parallel over (n, h); vectorize over w (contiguous loads of X).
    vec = _cpu_vec(fam)
    i, y, x, k = sch.get_loops(blk)
    wext = int(x_shape[3])
    if wext % vec and (int(x_shape[2]) * wext) % vec == 0:
        # rows that are no whole number of vectors (56, 28 wide) but planes that are: whole vectors along
        # the contiguous H·W pixels of each channel plane, no row tail (which TVM left scalar). PackSign
        # alone, 1 thread: 64×56² 0.0375 → 0.0099 ms, 128×28² 0.0191 → 0.0044 ms
        s = sch.fuse(y, x)
        so, si = sch.split(s, [None, vec])
        sch.reorder(i, so, k, si)
        sch.vectorize(si)
        sch.parallel(sch.fuse(i, so))
        return _finish(sch)
    sch.reorder(i, y, k, x)
    if wext >= 4:
        if wext > vec:
            _, x = sch.split(x, [None, vec])
        sch.vectorize(x)
    sch.parallel(sch.fuse(i, y))
    return _finish(sch)


def unpack_sign_primfunc(x_shape, channels: int, target=None) -> tirx.PrimFunc:
    X = te.placeholder(tuple(x_shape), "uint32", name="X")
    Y = unpack_sign_te(X, int(channels))
    return _schedule_elementwise([X], Y, 1 if len(x_shape) == 2 else 3, True, _family(target))


def maxpool_bits_primfunc(x_shape, channels, kernel_shape, strides, pads, mode, target=None) -> tirx.PrimFunc:
    X = te.placeholder(tuple(x_shape), "uint32", name="X")
    Y = maxpool_bits_te(X, channels, kernel_shape, strides, pads, mode)
    return _schedule_elementwise([X], Y, 2, int(x_shape[3]) >= 4, _family(target))


def _best_tile(ext: int, limit: int) -> int:
    for t in range(min(ext, limit), 0, -1):
        if ext % t == 0:
            return t
    return 1


# the weight layout of the AVX-512 popcount engine (runtimes/tvm/amx.py): blocked (block_conv_weights), channels
# in the lanes
POP_LAYOUTS = ("pop_channels",)
# the layouts whose kernels are the hand-written TIR ones of runtimes/tvm/amx.py (AMX-INT8 and the popcount
# engines): they take E's table (conv_kernel_args) and write a fused chain's float result in place; the others
# ("OHWC", "blocked") are the TE kernels of this module
TIR_LAYOUTS = ("amx", *POP_LAYOUTS)


def pop_weights(w: np.ndarray, layout: str) -> np.ndarray:
    """Packed weights ``[O, KH, KW, Cw]`` → the weights of a popcount engine's kernel (:data:`POP_LAYOUTS`)."""
    if layout == "pop_channels":
        return block_conv_weights(w, 32)
    raise ValueError(f"pop_weights: layout must be one of {POP_LAYOUTS}, got {layout!r}")


def conv_kernel_layout(base: str, x_shape, w_shape, *, use: str, strides, pads, dilations, target=None,
                       in_channels: int | None = None) -> str:
    """The kernel (its weight layout) a conv with constant weights takes for ``use`` (``"bits"`` / ``"float"``
    output alone, ``"chain"``: float output with a fused chain), given ``base`` = :func:`conv_weight_layout`:
    AMX stays AMX; else the AVX-512 popcount engine :func:`runtimes.tvm.amx.pop_engine` picks, if any, else
    ``base``. The one rule of the graph translator and the layer bench."""
    if base == "amx":
        return base
    from .amx import pop_engine

    return pop_engine(x_shape, w_shape, strides=strides, pads=pads, dilations=dilations, target=target, use=use,
                      in_channels=in_channels) or base


def conv_kernel_args(layout: str, output: str, w: np.ndarray, e: np.ndarray, p0=None, p1=None):
    """Constant weights ``[O, KH, KW, Cw]`` and E ``[O, R, C]`` → ``(W, E argument, e_table)`` of the conv kernel
    of ``layout`` (:func:`conv_weight_layout`, :data:`POP_LAYOUTS`), made once at compile time: the weights laid
    out for it; for the AMX kernel and the popcount engine E's table in place of E (``amx_e_table`` for float
    output; for bits output when P0 and P1 are given too ``amx_bits_table``, or ``pop_bits_table`` for the
    popcount engine), else E as given (None: E is not a constant). What the graph translator passes and the layer
    bench times."""
    from .amx import amx_bits_table, amx_conv_weights, amx_e_table, pop_bits_table

    w = np.asarray(w, np.uint32)
    if layout == "amx":
        wk = amx_conv_weights(w, output)
    elif layout in POP_LAYOUTS:
        wk = pop_weights(w, layout)
    elif layout == "blocked":
        wk = block_conv_weights(w)
    else:
        wk = w
    if e is None or layout not in TIR_LAYOUTS:  # (E not constant: no table)
        return wk, e, False
    wbits = False if layout in POP_LAYOUTS else None
    if output == "float":
        return wk, amx_e_table(e, w.shape, wbits=wbits), True
    if p0 is not None and p1 is not None:
        if layout in POP_LAYOUTS:
            return wk, pop_bits_table(e, p0, p1, w.shape), True
        return wk, amx_bits_table(e, p0, p1, w.shape, wbits=wbits), True
    return wk, e, False


def conv_weight_layout(x_shape, w_shape, *, strides, pads, dilations, target=None, amx: bool = False,
                       **_ignored) -> str:
    """The weight layout the x86 schedule of this conv wants: ``"amx"`` (the AMX-INT8 kernel, weights
    :func:`runtimes.tvm.amx.amx_conv_weights`), ``"blocked"`` (channels in the vector lanes, weights
    ``[O/32, KH, KW, Cw, 32]``, see :func:`block_conv_weights`) or ``"OHWC"`` (as given).

    Rule: with ``amx=True`` (the graph translator asks so; callers that pass the weights as given keep the
    default), AMX where :func:`runtimes.tvm.amx.use_amx` says so (an AMX target in a process with AMX
    enabled, shapes where it was measured faster); else channels
    in the lanes for stride-1, dilation-1 convs whose output plane is small (< 400 positions, e.g. 14x14
    and 7x7), where the pixel-vectorized tile would leave lanes empty. Where this is not ``"amx"``,
    :func:`conv_kernel_layout` then asks :func:`runtimes.tvm.amx.pop_engine` whether an AVX-512 popcount engine
    (:data:`POP_LAYOUTS`, weights :func:`pop_weights`) takes the conv instead of the TE kernels."""
    if _family(target) != "x86":
        return "OHWC"
    if amx:
        from .amx import use_amx

        if use_amx(x_shape, w_shape, strides=strides, pads=pads, dilations=dilations, target=target):
            return "amx"
    _, h, w, _ = [int(s) for s in x_shape]
    _, kh, kw, _ = [int(s) for s in w_shape]
    pt, pl, pb, pr = [int(v) for v in pads]
    if [int(v) for v in strides] != [1, 1] or [int(v) for v in dilations] != [1, 1]:
        return "OHWC"
    oh, ow = _out_size(h, kh, 1, pt, pb), _out_size(w, kw, 1, pl, pr)
    return "blocked" if oh * ow < _X86_CHAN_VEC_MAX_POSITIONS else "OHWC"


def block_conv_weights(w: np.ndarray, ot: int | None = None) -> np.ndarray:
    """``W[O, KH, KW, Cw]`` (packed uint32) → ``[ceil(O/ot), KH, KW, Cw, ot]`` (zero filters appended), the
    layout of the channels-in-lanes x86 schedule; done once at compile time for constant weights."""
    ot = _X86_CV_OT if ot is None else int(ot)
    w = np.asarray(w, np.uint32)
    if w.ndim != 4:
        raise ValueError(f"block_conv_weights: expected W of shape [O, KH, KW, Cw], got {w.shape}")
    o = w.shape[0]
    nob = -(-o // ot)
    wp = np.zeros((nob * ot,) + w.shape[1:], np.uint32)
    wp[:o] = w
    return np.ascontiguousarray(wp.reshape(nob, ot, *w.shape[1:]).transpose(0, 2, 3, 4, 1))


def binary_conv2d_packed_primfunc(x_shape, w_shape, e_shape, *, out_channels, kernel_shape, strides, pads,
                                  dilations, output, target=None, weight_layout: str = "OHWC",
                                  in_channels: int | None = None, e_table: bool = False,
                                  **_ignored) -> tirx.PrimFunc:
    """Scheduled PrimFunc with arguments (X, W, E, RowClass, ColClass, P0, P1, Y).

    ``weight_layout="blocked"``: W is passed as :func:`block_conv_weights` of the ``[O, KH, KW, Cw]``
    weights (``w_shape`` stays the unblocked shape); allowed only where :func:`conv_weight_layout` says
    so. With ``"OHWC"`` a conv that gets the channels-in-lanes schedule transposes W in the kernel.
    ``e_table`` (AMX kernel, popcount engines): E is the kernel's table (:func:`conv_kernel_args`)."""
    fam = _family(target)
    n, h, w, cw = [int(s) for s in x_shape]
    o, kh, kw, _ = [int(s) for s in w_shape]
    (sh, sw), (pt, pl, pb, pr), (dh, dw), (oh, ow) = conv_geometry(h, w, kh, kw, strides, pads, dilations)
    if weight_layout in TIR_LAYOUTS:
        # the hand-written TIR kernels of runtimes/tvm/amx.py: AMX-INT8 (W = amx.amx_conv_weights(W)) or an
        # AVX-512 popcount engine (W = pop_weights(W, layout), see amx.pop_engine)
        from .amx import binary_conv2d_amx_primfunc

        return binary_conv2d_amx_primfunc(x_shape, w_shape, e_shape, out_channels=out_channels,
                                          kernel_shape=kernel_shape, strides=strides, pads=pads,
                                          dilations=dilations, output=output, e_table=e_table,
                                          engine=weight_layout)
    if e_table:
        raise ValueError("binary_conv2d_packed_primfunc: e_table only with the AMX kernel and the popcount engines")
    want = conv_weight_layout(x_shape, w_shape, strides=strides, pads=pads, dilations=dilations, target=target,
                              amx=False)
    if weight_layout not in ("OHWC", "blocked"):
        raise ValueError(f"BinaryConv2dPacked: weight_layout must be 'OHWC', 'blocked', 'amx' or 'pop_channels', "
                         f"got {weight_layout!r}")
    if weight_layout == "blocked" and want != "blocked":
        raise ValueError("BinaryConv2dPacked: blocked weights are only used by the x86 channels-in-lanes "
                         "schedule (stride 1, dilation 1, small output plane); see conv_weight_layout()")
    if output not in ("float", "bits"):
        raise ValueError(f"BinaryConv2dPacked: output must be 'float' or 'bits', got {output!r}")
    if want == "blocked":
        return _conv_x86_chan_vec(n, h, w, cw, o, kh, kw, (pt, pl, pb, pr), tuple(int(s) for s in e_shape),
                                  output, pre_blocked=weight_layout == "blocked")
    pdtype = "float32" if output == "float" else "int32"
    X, W, E, RC, CC, P0, P1 = _conv_placeholders((n, h, w, cw), (o, kh, kw, cw), e_shape, o, oh, ow, pdtype)
    Y = binary_conv2d_packed_te(X, W, E, RC, CC, P0, P1, out_channels=o, kernel_shape=(kh, kw),
                                strides=(sh, sw), pads=(pt, pl, pb, pr), dilations=(dh, dw), output=output)
    f = te.create_prim_func([X, W, E, RC, CC, P0, P1, Y])
    sch = tvm.s_tir.Schedule(f)
    op = _padded_o(o)
    if fam == "cuda":
        return _schedule_conv_cuda(sch, op)
    if fam == "arm":
        # NEON: 4 vectors of 4 lanes (16 output channels) x up to 4 output columns = 16 q-register
        # accumulators, leaving 16 registers for the weight vectors and the cnt/uaddlp temporaries.
        ot, vec = 4 * NEON_VEC, NEON_VEC
        xt = _best_tile(ow, 4)
    else:
        if (sh, sw) == (1, 1) or _STRIDED_PIXEL_VEC:
            return _conv_x86_pixel_vec(X, W, E, RC, CC, P0, P1, o=o, kh=kh, kw=kw, pads=(pt, pl, pb, pr),
                                       dil=(dh, dw), output=output, strides=(sh, sw), in_channels=in_channels)
        ot = min(op, 4 * VEC) if op % (4 * VEC) == 0 else 2 * VEC  # op is a multiple of 32
        vec = VEC
        xt = _best_tile(ow, max(1, 20 // (ot // VEC)))
    return _schedule_conv_cpu(sch, op, output, ot=ot, vec=vec, xt=xt)


# x86: the float-output conv with its element-wise chain (and the next PackSign) in the epilogue --------
#
# Without it a float conv writes Y (NCHW float32) and a separate chain_pack kernel reads it back with the
# chain's operands: at batch 128 both are memory-bound. Here the chain runs in the conv's epilogue, inside
# the conv's parallel loop over (image, block of <= 32 output channels), right after that block's popcount
# accumulators are complete (they are still in cache): the conv's float value exactly as the float
# epilogue computes it, then each step in order (chain_value_te), then the final float value is written
# (only when something else reads it) and/or the packed bits ``v >= T[c]`` of the block's word.


# With a fused chain the channels-in-lanes schedule is kept only for planes below this many output positions
# (7x7): its accumulators are [position, channel], so the NCHW chain epilogue gathers them (and E) across
# lanes; from 8x8 up the pixel-vectorized kernel with the chain was faster (CIFAR ResNet-20, batch 128, one
# core: 16x16x32 1.07 vs 1.60 ms, 8x8x64 0.70 vs 0.95 ms), though the plain conv may prefer channels in lanes.
_X86_CHAIN_CHAN_VEC_MAX_POSITIONS = 64


def _chain_outputs(value, n: int, o: int, oh: int, ow: int, chain: dict, materialize: bool = False) -> list:
    """TE stages ``chain`` (float32 NCHW, when ``chain["want_float"]``) and ``chain_bits`` (uint32 NHWC words,
    when ``chain["pack"]``) of the conv value ``value(i, c, cc, y, x)`` (``c``: the accumulator channel,
    an exact index; ``cc``: the channel for parameter reads, clamped where needed) followed by the chain.
    ``materialize``: the bits read a ``chain`` stage (an intermediate when the float value is not wanted)
    wherever the channel indices are exact."""
    extras, steps, T = chain["extras"], chain["steps"], chain["T"]
    exact = o % WORD == 0 or o < WORD

    def val(i, c, cc, y, x):
        return _chain_apply(value(i, c, cc, y, x), extras, steps, (i, cc, y, x), 4, fence=True)  # x86 only

    outs = []
    V = None
    if chain["want_float"] or (materialize and exact and chain["pack"]):
        V = te.compute((n, o, oh, ow), lambda i, c, y, x: val(i, c, c, y, x), name="chain")
        if chain["want_float"]:
            outs.append(V)
    if chain["pack"]:
        def thr(ch):
            return T[ch] if T is not None else tirx.const(0.0, "float32")

        # channel indices the region analysis of reverse_compute_at solves exactly (see chain_pack_primfunc)
        if exact:
            nb = WORD if o % WORD == 0 else o

            def fp(i, y, x, k):
                terms = []
                for b in range(nb):
                    ch = k * nb + b
                    v = V[i, ch, y, x] if V is not None else val(i, ch, ch, y, x)
                    terms.append(tirx.Select(v >= thr(ch), _u32(1 << b), _u32(0)))
                return _or_all(terms)
        else:  # a partial last word: recompute the value (accumulator index exact, parameter reads clamped)
            def fp(i, y, x, k):
                terms = []
                for b in range(WORD):
                    ch = k * WORD + b
                    cc = tirx.min(ch, o - 1)
                    bit = tirx.all(ch < o, val(i, ch, cc, y, x) >= thr(cc))
                    terms.append(tirx.Select(bit, _u32(1 << b), _u32(0)))
                return _or_all(terms)

        outs.append(te.compute((n, oh, ow, num_words(o)), fp, name="chain_bits"))
    return outs


def _vectorize_x(sch, loop) -> None:
    """Vectorize an output-column loop (split to at most ``VEC`` lanes; left scalar below 4)."""
    ext = _extent(sch, loop)
    if ext and ext >= 4:
        if ext > VEC:
            _, loop = sch.split(loop, [None, _best_tile(ext, VEC)])
        sch.vectorize(loop)


def _schedule_chain_epilogue(sch, blk, chain: dict, ow: int, o: int) -> None:
    """Schedule the chain stages: under ``blk`` (the conv's parallel loop over image x channel block), or
    with ``blk=None`` as their own parallel loop over (image, block of 32 channels) after the conv; both
    vectorized along the output columns."""
    exact = o % WORD == 0 or o < WORD
    if blk is not None:
        # reverse_compute_at leaves out loops of extent 1: "chain" gets (c, y, x) under blk, "chain_bits"
        # (y, x) (the block's word is one); the bits of a partial last word (recomputed from the
        # accumulators, clamped parameter reads) in their own parallel loop after the conv
        has_v = _has_block(sch, "chain")
        for name, want in (("chain", has_v), ("chain_bits", chain["pack"] and exact)):
            if want:
                b = sch.get_sblock(name)
                sch.reverse_compute_at(b, blk)
                if ow > 1:
                    _vectorize_x(sch, sch.get_loops(b)[-1])
        if chain["pack"] and not exact:
            b = sch.get_sblock("chain_bits")
            i, y, x, k = sch.get_loops(b)
            sch.reorder(i, k, y, x)
            sch.parallel(sch.fuse(i, k))
        return
    outer = row = None
    if chain["want_float"]:
        b = sch.get_sblock("chain")
        i, c, y, x = sch.get_loops(b)
        if o > WORD:
            cb, ci = sch.split(c, [None, WORD])
            sch.reorder(i, cb, ci, y, x)
            outer = sch.fuse(i, cb)
        else:
            sch.reorder(i, y, c, x)
            outer = i
        # one block: its rows in turn, each row's word packed right after the row's float values (in L1;
        # several blocks at batch 128 measured faster channel by channel, their word after all rows)
        row = y if o <= WORD else outer
        sch.parallel(outer)
        _vectorize_x(sch, x)
    if chain["pack"]:
        b = sch.get_sblock("chain_bits")
        if outer is not None and exact:
            # the word of the block's channels
            sch.reverse_compute_at(b, row)
            if ow > 1:
                _vectorize_x(sch, sch.get_loops(b)[-1])
        else:
            i, y, x, k = sch.get_loops(b)
            sch.reorder(i, k, y, x)
            sch.parallel(sch.fuse(i, k))
            _vectorize_x(sch, x)


def _has_block(sch, name: str) -> bool:
    try:
        sch.get_sblock(name)
        return True
    except Exception:  # noqa: BLE001 - tvm raises its own error types for a missing block
        return False


def binary_conv2d_packed_chain_primfunc(x_shape, w_shape, e_shape, *, out_channels, kernel_shape, strides, pads,
                                        dilations, extra_shapes=(), steps=(), want_float=True, pack=False,
                                        with_threshold=False, weight_layout: str = "OHWC", target=None,
                                        inplace: int | None = None, in_channels: int | None = None,
                                        e_columns: bool = False, e_table: bool = False,
                                        **_ignored) -> tirx.PrimFunc:
    """A float-output ``BinaryConv2dPacked`` followed by the element-wise chain ``steps`` over operands of
    ``extra_shapes`` (:data:`CHAIN_OPS`, semantics of :func:`chain_value_te`) and the ``PackSign``
    (``v >= T[c]``, T = 0 without threshold) of the result, as one x86 kernel.

    Arguments ``(X, W, E, RowClass, ColClass, P0, P1, *extras, [T], [Yfloat], [Ybits])``: ``Yfloat`` (NCHW
    float32, the chain's value) when ``want_float``, ``Ybits`` (NHWC uint32 words) when ``pack``. W as
    ``weight_layout`` says (:func:`conv_weight_layout`; ``"amx"``: the AMX kernel with the chain fused,
    :func:`runtimes.tvm.amx.binary_conv2d_amx_chain_primfunc`). Bit-identical to the float conv followed by
    :func:`chain_pack_primfunc`. ``inplace`` (AMX kernel only): the float result over chain operand ``k``.
    ``in_channels``: the input's channel count (<= 16 packs several taps to a word, see
    :func:`_conv_x86_pixel_vec`). ``e_columns`` (popcount kernels): E is given by output column,
    ``E[o, row class, x] = E[o, row class, ColClass[x]]`` (:func:`e_by_column`, made once at compile time;
    a batch then runs image by image). ``e_table`` (AMX kernel): E is the kernel's border table
    (:func:`runtimes.tvm.amx.amx_e_table`, made once at compile time)."""
    attrs = {"out_channels": out_channels, "kernel_shape": kernel_shape, "strides": strides, "pads": pads,
             "dilations": dilations}
    if not (want_float or pack):
        raise ValueError("binary_conv2d_packed_chain_primfunc: nothing to produce")
    if weight_layout in TIR_LAYOUTS:  # AMX or a popcount engine (runtimes/tvm/amx.py)
        from .amx import binary_conv2d_amx_chain_primfunc

        if e_columns:
            raise ValueError("binary_conv2d_packed_chain_primfunc: e_columns only with the TE popcount kernels")
        return binary_conv2d_amx_chain_primfunc(x_shape, w_shape, e_shape, extra_shapes=extra_shapes, steps=steps,
                                                want_float=want_float, pack=pack, with_threshold=with_threshold,
                                                inplace=inplace, e_table=e_table, engine=weight_layout, **attrs)
    if e_table:
        raise ValueError("binary_conv2d_packed_chain_primfunc: e_table only with the AMX kernel")
    if inplace is not None:
        raise ValueError("binary_conv2d_packed_chain_primfunc: inplace only with the AMX kernel")
    fam = _family(target)
    if fam == "cuda":
        if e_columns or weight_layout != "OHWC":
            raise ValueError("binary_conv2d_packed_chain_primfunc: CUDA takes E by class and OHWC weights")
        return _conv_cuda_chain(x_shape, w_shape, e_shape, attrs, extra_shapes, steps, want_float, pack,
                                with_threshold)
    if fam != "x86":
        raise ValueError(f"binary_conv2d_packed_chain_primfunc: x86 and CUDA schedules only (target family "
                         f"{fam!r}); use the float conv and chain_pack_primfunc")
    if weight_layout not in ("OHWC", "blocked"):
        raise ValueError(f"BinaryConv2dPacked: weight_layout must be 'OHWC', 'blocked' or 'amx', "
                         f"got {weight_layout!r}")
    n, h, w, cw, o, kh, kw = check_conv_shapes(x_shape, w_shape, out_channels, kernel_shape)
    (sh, sw), (pt, pl, pb, pr), (dh, dw), (oh, ow) = conv_geometry(h, w, kh, kw, strides, pads, dilations)
    ext_shapes = check_chain(extra_shapes, steps, (n, o, oh, ow))
    if e_columns and (len(e_shape) != 3 or int(e_shape[0]) != o or int(e_shape[2]) != ow):
        raise ValueError(f"binary_conv2d_packed_chain_primfunc: E by column must be [{o}, row classes, {ow}], "
                         f"got {list(e_shape)}")
    extras = [te.placeholder(s, "float32", name=f"A{k}") for k, s in enumerate(ext_shapes)]
    T = te.placeholder((o,), "float32", name="T") if (pack and with_threshold) else None
    chain = {"extras": extras, "steps": [tuple(st) for st in steps], "T": T, "want_float": bool(want_float),
             "pack": bool(pack), "args": extras + ([T] if T is not None else [])}
    want = conv_weight_layout(x_shape, w_shape, strides=strides, pads=pads, dilations=dilations, target=target)
    if weight_layout == "blocked" and want != "blocked":
        raise ValueError("BinaryConv2dPacked: blocked weights are only used by the x86 channels-in-lanes "
                         "schedule (stride 1, dilation 1, small output plane); see conv_weight_layout()")
    if want == "blocked" and oh * ow < _X86_CHAIN_CHAN_VEC_MAX_POSITIONS:
        return _conv_x86_chan_vec(n, h, w, cw, o, kh, kw, (pt, pl, pb, pr), tuple(int(s) for s in e_shape),
                                  "float", pre_blocked=weight_layout == "blocked", chain=chain, e_columns=e_columns)
    ws = (-(-o // _X86_CV_OT), kh, kw, cw, _X86_CV_OT) if weight_layout == "blocked" else (o, kh, kw, cw)
    X, W, E, RC, CC, P0, P1 = _conv_placeholders((n, h, w, cw), ws, e_shape, o, oh, ow)
    return _conv_x86_pixel_vec(X, W, E, RC, CC, P0, P1, o=o, kh=kh, kw=kw, pads=(pt, pl, pb, pr), dil=(dh, dw),
                               output="float", strides=(sh, sw), chain=chain, in_channels=in_channels,
                               e_columns=e_columns)


# x86, stride 1: output positions in the vector lanes ------------------------------------------------
#
# The input is relaid once per call into one zero-padded plane per packed word, flattened row-major
# (``xt[n, word, r*WP + c]``, WP = padded width). Output position ``q = y*WP + x`` then reads tap
# (a, b) at ``q + a*dh*WP + b*dw`` for every q: 16 consecutive outputs are one contiguous 512-bit load
# and the weight word is a broadcast (an embedded-broadcast operand of ``vpxord``), so the weights are
# used in their given [O, KH, KW, Cw] layout (no per-call transpose). Columns x >= OW of a row are
# computed and dropped (2/WP of the lanes for a 3x3 pad-1 conv). The register tile is
# ``_X86_OC`` output channels x up to 3 vectors of 16 positions (<= 24 zmm accumulators); the reduction
# over taps and words runs outside it. Epilogues read the [channels, positions] accumulators with
# contiguous vector loads; float output is NCHW (contiguous along x), bits output is one packed word
# per position and block of 32 channels. With <= 16 input channels (one word, ``in_channels`` given)
# several taps share a word: per call the kernel builds one image word zt[g, q] and one weight word per
# group of taps, each tap in its own bit field, so a 3x3 conv on 16 channels takes 5 xor+popcount+add per
# output instead of 9. A batch with a fused chain (E given by output column) runs image by image where
# the plane allows it (see ``per_image`` in :func:`_conv_x86_pixel_vec`).

_X86_OC = 8  # output channels per register tile


# x86, small output planes: output channels in the vector lanes ---------------------------------------
#
# ``pc[n, ob, y, x, ol]`` for blocks of ``_X86_CV_OT`` (32) output channels: the register tile is up to 8
# output columns x 2 vectors of 16 channels (<= 16 zmm accumulators); per (tap, word) the two weight
# vectors are loaded once from the blocked layout ``[O/32, KH, KW, Cw, 32]`` (made once at compile time,
# see block_conv_weights) and every input word is a broadcast operand. All lanes work whatever the plane
# size (7x7 uses 64 of 64 lanes, the pixel-vectorized tile 49). The zero-padded input is a small per-call
# copy; the epilogue runs per channel block in its own parallel loop (scalar: at 7x7, 7-lane vectors
# measured slower).

_X86_CV_OT = 32
_X86_CHAN_VEC_MAX_POSITIONS = 400


def _x86_scale(d, p0, k_bits: int):
    """``float32(float32(d) * p0)`` for the x86 epilogues: ``d`` (int32, |d| <= ``k_bits``) converts to float32
    exactly below 2**24, so one float32 product with its rounding kept (:func:`no_contract`: no FMA with the
    following add) equals the float64 product rounded once (the contract above), on 16 lanes instead of two
    halves of 8 (CIFAR ResNet-20's 32²×16 layer with its chain, one image: 9.2 → 8.5 µs); above 2**24 the
    float64 form."""
    if k_bits >= 1 << 24:
        return (d.astype("float64") * p0.astype("float64")).astype("float32")
    return no_contract(d.astype("float32") * p0)


def e_by_column(e: np.ndarray, col_class: np.ndarray) -> np.ndarray:
    """``E[o, r, ColClass[x]]`` as ``[O, row classes, OW]``: the E argument of the popcount chain kernels with
    ``e_columns=True`` (made once at compile time from constant E and ColClass)."""
    e = np.asarray(e, np.int32)
    return np.ascontiguousarray(e[:, :, np.asarray(col_class, np.int64)])


def _conv_x86_chan_vec(n, h, w, cw, o, kh, kw, pads, e_shape, output, *, pre_blocked: bool,
                       chain=None, e_columns: bool = False) -> tirx.PrimFunc:
    pt, pl, pb, pr = pads
    hp, wp = h + pt + pb, w + pl + pr
    oh, ow = hp - kh + 1, wp - kw + 1
    ot = _X86_CV_OT
    nob = -(-o // ot)
    xt = _best_tile(ow, 8)
    k_bits = kh * kw * cw * WORD  # bound on |D|
    pd = "float32" if output == "float" else "int32"
    ws = (nob, kh, kw, cw, ot) if pre_blocked else (o, kh, kw, cw)
    X, W, E, RC, CC, P0, P1 = _conv_placeholders((n, h, w, cw), ws, e_shape, o, oh, ow, pd)
    if pre_blocked:
        wb = W
    else:
        def wb_f(b, a, c, k, ol):
            oo = b * ot + ol
            return tirx.if_then_else(oo < o, W[tirx.min(oo, o - 1), a, c, k], _u32(0))

        wb = te.compute((nob, kh, kw, cw, ot), wb_f, name="wb")
    xpad = _padded_input(X, (pt, pl, pb, pr))
    rk = te.reduce_axis((0, kh), name="rk")
    rw = te.reduce_axis((0, kw), name="rw")
    rc = te.reduce_axis((0, cw), name="rc")
    pc = te.compute(
        (n, nob, oh, ow, ot),
        lambda i, b, y, x, ol: te.sum(
            tirx.popcount(xpad[i, y + rk, x + rw, rc] ^ wb[b, rk, rw, rc, ol]).astype("int32"), axis=[rk, rw, rc]),
        name="pc")
    if chain is not None:
        def value(i, c, cc, y, x):
            d = E[cc, RC[y], x if e_columns else CC[x]] - 2 * pc[i, c // ot, y, x, c % ot]
            return _x86_scale(d, P0[cc], k_bits) + P1[cc]

        outs = _chain_outputs(value, n, o, oh, ow, chain, materialize=True)
    elif output == "float":
        def ff(i, oo, y, x):
            d = E[oo, RC[y], x if e_columns else CC[x]] - 2 * pc[i, oo // ot, y, x, oo % ot]
            return _x86_scale(d, P0[oo], k_bits) + P1[oo]

        Y = te.compute((n, o, oh, ow), ff, name="epilogue")
    else:
        def fb(i, y, x, k):
            terms = []
            for bb in range(WORD):
                ch = k * WORD + bb
                chc = tirx.min(ch, o - 1)
                d = E[chc, RC[y], x if e_columns else CC[x]] - 2 * pc[i, ch // ot, y, x, ch % ot]
                bit = tirx.all(ch < o, P0[chc].astype("int64") * d.astype("int64") >= P1[chc].astype("int64"))
                terms.append(tirx.Select(bit, _u32(1 << bb), _u32(0)))
            return _or_all(terms)

        Y = te.compute((n, oh, ow, num_words(o)), fb, name="epilogue")
    if chain is not None:
        sch = tvm.s_tir.Schedule(te.create_prim_func([X, W, E, RC, CC, P0, P1] + chain["args"] + outs))
    else:
        sch = tvm.s_tir.Schedule(te.create_prim_func([X, W, E, RC, CC, P0, P1, Y]))
    if not pre_blocked:
        lw = sch.get_loops(sch.get_sblock("wb"))
        sch.parallel(sch.fuse(lw[0], lw[1]))
        sch.vectorize(lw[-1])
    lx = sch.get_loops(sch.get_sblock("xpad"))
    sch.parallel(sch.fuse(lx[0], lx[1]))
    b_pc = sch.get_sblock("pc")
    i, b, y, x, ol, r_k, r_w, r_c = sch.get_loops(b_pc)
    xo, xi = sch.split(x, [None, xt])
    ov, ol_ = sch.split(ol, [None, VEC])
    sch.reorder(i, b, y, xo, r_k, r_w, r_c, xi, ov, ol_)
    sch.parallel(sch.fuse(i, b))
    acc = sch.cache_write(b_pc, 0, "local")
    sch.reverse_compute_at(acc, xo)
    sch.vectorize(ol_)
    sch.unroll(ov)
    sch.unroll(xi)
    sch.decompose_reduction(b_pc, r_k)
    wl = sch.get_loops(acc)
    _, last = sch.split(wl[-1], [None, VEC])
    sch.vectorize(last)
    if chain is not None:
        _schedule_chain_epilogue(sch, sch.get_loops(b_pc)[0], chain, ow, o)
        return _finish(sch)
    el = sch.get_loops(sch.get_sblock("epilogue"))
    sch.parallel(sch.fuse(el[0], el[1]))
    return _finish(sch)


def _pick_qv(nq: int) -> int:
    """Vectors of 16 positions per register tile: least padding, then the larger tile."""
    def score(qv):
        waste = (-(-nq // qv) * qv) / nq
        return (round(waste, 2), -qv)
    return min((3, 2, 1), key=score)


# Strided convs use the same form on the input split into stride phases (below); False = the older
# output-channels-in-lanes schedule (_schedule_conv_cpu) for them.
_STRIDED_PIXEL_VEC = True


# image-by-image batches from this many flat positions per image (16x16 planes and up); at 8x8x64 the
# batch's accumulators (2.6 MB at batch 128) stay near L2 and the image-by-image form was slower (0.66 vs
# 0.57 ms at batch 128)
_PER_IMAGE_MIN_POSITIONS = 256


def _tap_field_bits(cw: int, in_channels) -> int | None:
    """Bits of one tap's field when several taps share a 32-bit word (``in_channels`` <= 16 in one packed
    word: 16, 8, 4, 2 or 1 bits, the next power of two), else None."""
    if cw != 1 or in_channels is None or not 0 < int(in_channels) <= WORD // 2:
        return None
    b = 1
    while b < int(in_channels):
        b *= 2
    return b


def _conv_x86_pixel_vec(X, W, E, RC, CC, P0, P1, *, o, kh, kw, pads, dil, output, strides=(1, 1),
                        chain=None, in_channels=None, e_columns: bool = False) -> tirx.PrimFunc:
    w_blocked = len(W.shape) == 5  # block_conv_weights layout [O/32, KH, KW, Cw, 32] (zero filters appended)
    n, h, w, cw = [int(s) for s in X.shape]
    pt, pl, pb, pr = pads
    dh, dw = dil
    sh, sw = strides
    hp, wp = h + pt + pb, w + pl + pr
    oh, ow = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    k_bits = kh * kw * cw * WORD  # bound on |D|
    # Stride > 1: the padded input is split into sh*sw phase planes (plane (a, b) holds rows a, a+sh, ...
    # and columns b, b+sw, ...), each flattened with row length rl; tap (rk, rw) of output q = y*rl + x
    # then reads plane ((rk*dh) % sh, (rw*dw) % sw) at q + ((rk*dh)//sh)*rl + (rw*dw)//sw: contiguous
    # along x again, so the stride-1 schedule applies unchanged.
    strided = (sh, sw) != (1, 1)
    rl = -(-wp // sw) if strided else wp
    oc = _X86_OC
    # channels per parallel block: one output word (bits), or up to 32 channels (float; a fused chain packs
    # the word of the block's channels)
    oblk = WORD if (o > WORD or output == "bits") else -(-o // oc) * oc
    opad = -(-o // oblk) * oblk
    nq = -(-(oh * rl) // VEC)
    qv = _pick_qv(nq)
    qp = -(-nq // qv) * qv * VEC
    length = -(-(qp + ((kh - 1) * dh // sh) * rl + (kw - 1) * dw // sw) // rl) * rl
    # A batch with a fused chain runs image by image: one parallel task per (image, channel block) makes
    # the image's padded copy, its popcount block and then the chain over it, so the block's int32
    # accumulators (70 KB at 32x32x16) are read back from L1/L2; the chain's own parallel loop after the
    # whole batch's accumulators (9 MB at batch 128) went through memory (CIFAR ResNet-20, batch 128,
    # kernels alone: 32²×16 1.39 -> 1.04 ms, 32²→16²×32 0.75 -> 0.55, 16²×32 0.84 -> 0.67). The
    # accumulators are then [rows, RL] instead of flat positions (the region analysis that moves the
    # chain under the task maps each index to one loop variable), so this needs whole rows (qp a
    # multiple of RL: every ResNet-20 layer but 16²→8²) and E by output column (a chain producer made per
    # call outside the task would block the move).
    per_image = (e_columns and chain is not None and n > 1 and qp % rl == 0 and qp >= _PER_IMAGE_MIN_POSITIONS
                 and (o % WORD == 0 or o < WORD))

    def pc_shape():
        return (n, opad, qp // rl, rl) if per_image else (n, opad, qp)

    def pc_q(*idx):  # (i, oo, flat q) of the accumulator stage's indices
        return (idx[0], idx[1], idx[2] * rl + idx[3]) if per_image else idx

    def pc_at(i, c, y, x):
        return pc[i, c, y, x] if per_image else pc[i, c, y * rl + x]

    def xt_f(i, c, pos):
        r, x = pos // wp, pos % wp
        inside = tirx.all(r >= pt, r < pt + h, x >= pl, x < pl + w)
        return tirx.if_then_else(
            inside, X[i, tirx.max(tirx.min(r - pt, h - 1), 0), tirx.max(tirx.min(x - pl, w - 1), 0), c], _u32(0))

    def xt_phase(i, c, ph, pos):
        r = (pos // rl) * sh + ph // sw
        x = (pos % rl) * sw + ph % sw
        inside = tirx.all(r >= pt, r < pt + h, x >= pl, x < pl + w)
        return tirx.if_then_else(
            inside, X[i, tirx.max(tirx.min(r - pt, h - 1), 0), tirx.max(tirx.min(x - pl, w - 1), 0), c], _u32(0))

    if strided:
        xt = te.compute((n, cw, sh * sw, length), xt_phase, name="xt")
    else:
        xt = te.compute((n, cw, length), xt_f, name="xt")

    def w_at(oo, a, b, c):
        if w_blocked:  # opad <= 32 * blocks: no clamping
            return W[oo // _X86_CV_OT, a, b, c, oo % _X86_CV_OT]
        return W[tirx.min(oo, o - 1) if opad != o else oo, a, b, c]

    def x_at(i, c, a, b, q):
        """input word ``c`` of tap (a, b) for output position q (a, b: ints or loop variables)"""
        if not strided:
            return xt[i, c, q + a * (dh * wp) + b * dw]
        return xt[i, c, ((a * dh) % sh) * sw + (b * dw) % sw, q + ((a * dh) // sh) * rl + (b * dw) // sw]

    tf = _tap_field_bits(cw, in_channels)
    if tf is None:
        rk = te.reduce_axis((0, kh), name="rk")
        rw = te.reduce_axis((0, kw), name="rw")
        rc = te.reduce_axis((0, cw), name="rc")
        def pc_f(*idx):
            i, oo, q = pc_q(*idx)
            return te.sum(tirx.popcount(x_at(i, rc, rk, rw, q) ^ w_at(oo, rk, rw, rc)).astype("int32"),
                          axis=[rk, rw, rc])

        pc = te.compute(pc_shape(), pc_f, name="pc")
    else:
        # Few input channels (<= 16 in a 32-bit word, the rest of the word zero by the packing contract):
        # the taps are packed 32 // tf to a word, tap j of a group in bits [j*tf, (j+1)*tf) of the group's
        # image word zt[g, q] and weight word wg[o, g]. The fields do not overlap, so the popcount of the
        # group's xor is the sum of its taps' popcounts: a 3x3 conv on 16 channels takes 5 xor+popcount+add
        # per output instead of 9 (the images are made once per call, 5 x 4 KB at 32x32).
        per = WORD // tf
        taps = [(a, b) for a in range(kh) for b in range(kw)]
        groups = [taps[j:j + per] for j in range(0, len(taps), per)]

        def pick(g, words):  # the word of group g (g is unrolled below: the selects fold)
            val = words[-1]
            for gi in range(len(words) - 2, -1, -1):
                val = tirx.Select(g == gi, words[gi], val)
            return val

        field = _u32((1 << int(in_channels)) - 1)  # the channels' bits only ("masked, never counted")

        def packed(words):
            v = words[0] & field
            for j, wj in enumerate(words[1:], 1):
                v = v | ((wj & field) << _u32(j * tf))
            return v

        zt = te.compute((n, len(groups), qp),
                        lambda i, g, q: pick(g, [packed([x_at(i, 0, a, b, q) for a, b in grp]) for grp in groups]),
                        name="zt")
        wg = te.compute((opad, len(groups)),
                        lambda oo, g: pick(g, [packed([w_at(oo, a, b, 0) for a, b in grp]) for grp in groups]),
                        name="wg")
        rg = te.reduce_axis((0, len(groups)), name="rg")
        def pc_f(*idx):
            i, oo, q = pc_q(*idx)
            return te.sum(tirx.popcount(zt[i, rg, q] ^ wg[oo, rg]).astype("int32"), axis=[rg])

        pc = te.compute(pc_shape(), pc_f, name="pc")
    stages = [X, W, E, RC, CC, P0, P1]
    # E by output column (E[o, row class, ColClass[x]]), so the epilogues read it contiguously along x: given
    # so (``e_columns``, made at compile time), else a stage per call
    ecol = E if e_columns else te.compute((o, int(E.shape[1]), ow), lambda oo, r, x: E[oo, r, CC[x]], name="ecol")
    if chain is not None:
        def value(i, c, cc, y, x):
            d = ecol[cc, RC[y], x] - 2 * pc_at(i, c, y, x)
            return _x86_scale(d, P0[cc], k_bits) + P1[cc]

        outs = _chain_outputs(value, n, o, oh, ow, chain)
    elif output == "float":
        def ff(i, oo, y, x):
            d = ecol[oo, RC[y], x] - 2 * pc_at(i, oo, y, x)
            return _x86_scale(d, P0[oo], k_bits) + P1[oo]

        Y = te.compute((n, o, oh, ow), ff, name="epilogue")
    elif output == "bits":
        nwo = num_words(o)

        def fb(i, y, x, k):
            terms = []
            for b in range(WORD):
                ch = k * WORD + b
                chc = tirx.min(ch, o - 1)
                d = ecol[chc, RC[y], x] - 2 * pc_at(i, ch, y, x)
                bit = tirx.all(ch < o, P0[chc].astype("int64") * d.astype("int64") >= P1[chc].astype("int64"))
                terms.append(tirx.Select(bit, _u32(1 << b), _u32(0)))
            return _or_all(terms)

        Y = te.compute((n, oh, ow, nwo), fb, name="epilogue")
    else:
        raise ValueError(f"BinaryConv2dPacked: output must be 'float' or 'bits', got {output!r}")
    if chain is not None:
        stages += chain["args"]
    sch = tvm.s_tir.Schedule(te.create_prim_func(stages + (outs if chain is not None else [Y])))

    b_pc = sch.get_sblock("pc")
    if per_image:
        i, oo, qy, qx, *rloops = sch.get_loops(b_pc)
        q = sch.fuse(qy, qx)
    else:
        i, oo, q, *rloops = sch.get_loops(b_pc)
    ob, oio, oi = sch.split(oo, [None, oblk // oc, oc])
    qo, qi, ql = sch.split(q, [None, qv, VEC])
    sch.reorder(i, ob, oio, qo, *rloops, oi, qi, ql)
    blk = sch.fuse(i, ob)
    sch.parallel(blk)
    # the register tile's write-back (a cache stage): with [rows, RL] accumulators a tile of flat positions
    # is no rectangle, so per image the tile accumulates into its buffer with every reduction loop
    # unrolled (LLVM keeps the tile in registers and stores it once)
    acc = None if per_image else sch.cache_write(b_pc, 0, "local")
    if acc is not None:
        sch.reverse_compute_at(acc, qo)
    sch.vectorize(ql)
    sch.unroll(qi)
    sch.unroll(oi)
    if per_image or tf is not None:  # every reduction loop (packed taps: the groups, a single loop)
        for r in rloops:
            sch.unroll(r)
    elif cw <= 4:  # short word loops: unroll the taps of a row and the words (no loop overhead)
        sch.unroll(rloops[1])
        sch.unroll(rloops[2])
    if tf is not None:
        # the group words: the image's per task (groups unrolled, positions vectorized), the weights' per call
        bz = sch.get_sblock("zt")
        sch.compute_at(bz, blk)
        zg, zq = sch.get_loops(bz)[-2:]
        sch.unroll(zg)
        sch.vectorize(sch.split(zq, [None, VEC])[1])
        sch.unroll(sch.get_loops(sch.get_sblock("wg"))[-1])
    sch.decompose_reduction(b_pc, rloops[0])
    if acc is not None:
        wl = sch.get_loops(acc)
        _, last = sch.split(wl[-1], [None, VEC])
        sch.vectorize(last)

    b_xt = sch.get_sblock("xt")
    if per_image:
        sch.compute_at(b_xt, blk)
    xpos = sch.get_loops(b_xt)[-1]
    sch.split(xpos, [None, rl])

    if not e_columns:
        _vectorize_x(sch, sch.get_loops(sch.get_sblock("ecol"))[-1])

    if per_image:
        # under the task, row by row: the float values of a row's channels, then their packed word (in L1)
        row = blk
        if _has_block(sch, "chain"):
            bc = sch.get_sblock("chain")
            sch.reverse_compute_at(bc, blk)
            c, y, x = sch.get_loops(bc)[-3:]
            sch.reorder(y, c, x)
            _vectorize_x(sch, x)
            row = y
        if chain["pack"]:
            bb = sch.get_sblock("chain_bits")
            sch.reverse_compute_at(bb, row)
            if ow > 1:
                _vectorize_x(sch, sch.get_loops(bb)[-1])
        return _finish(sch)
    if chain is not None:
        # flat accumulator positions y*RL + x, which the region analysis of reverse_compute_at cannot map
        # back to (y, x): the chain runs in its own parallel loop, like the float epilogue
        _schedule_chain_epilogue(sch, None, chain, ow, o)
        return _finish(sch)
    # Epilogue: its own parallel loop over (n, channel blocks | rows) once the accumulators are complete.
    b_epi = sch.get_sblock("epilogue")
    el = sch.get_loops(b_epi)
    last = el[-1]
    if output == "float":
        _vectorize_x(sch, last)
    else:
        # loops: blk, y, x, k → vectorize over x (k is the block's single word)
        xl = el[-2]
        ext = _extent(sch, xl)
        if ext and ext >= 4:
            if ext > VEC:
                _, xl = sch.split(xl, [None, _best_tile(ext, VEC)])
            sch.reorder(last, xl)
            sch.vectorize(xl)
    el = sch.get_loops(b_epi)
    sch.parallel(sch.fuse(el[0], el[1]))
    return _finish(sch)


def _schedule_conv_cpu(sch, op: int, output: str, *, ot: int, vec: int, xt: int) -> tirx.PrimFunc:
    # Weight transpose: tiny, parallel over taps.
    b_wt = sch.get_sblock("wt")
    a, b, c, oo = sch.get_loops(b_wt)
    sch.parallel(sch.fuse(a, b))
    sch.vectorize(oo) if op <= 64 else None

    # Zero padding: parallel over padded rows.
    b_pad = sch.get_sblock("xpad")
    i, y, x, c = sch.get_loops(b_pad)
    sch.parallel(sch.fuse(i, y))

    # Popcount conv: parallel over (n, oh); register tile (xt output columns) x (ot output channels);
    # reduction over taps and words outside the tile; innermost vec output channels vectorized.
    b_pc = sch.get_sblock("pc")
    b_epi = sch.get_sblock("epilogue")
    i, y, x, oo, rk, rw, rc = sch.get_loops(b_pc)
    xo, xi = sch.split(x, [None, xt])
    o_o, o_i = sch.split(oo, [None, ot])
    o_v, o_l = sch.split(o_i, [None, vec])
    sch.reorder(i, y, xo, o_o, rk, rw, rc, xi, o_v, o_l)
    row = sch.fuse(i, y)
    sch.parallel(row)
    acc = sch.cache_write(b_pc, 0, "local")
    sch.reverse_compute_at(acc, o_o)
    sch.vectorize(o_l)
    sch.unroll(o_v)
    sch.unroll(xi)
    sch.decompose_reduction(b_pc, rk)
    # write-back of the accumulator tile: vectorize over channels
    wl = sch.get_loops(acc)
    sch.vectorize(wl[-1]) if _extent(sch, wl[-1]) == ot else None

    # Epilogue per output row, inside the parallel loop (pc buffer shrinks to one row).
    sch.reverse_compute_at(b_epi, row)
    el = sch.get_loops(b_epi)
    if output == "float":
        # loops: row, o, x → vectorize over x
        last = el[-1]
        ext = _extent(sch, last)
        if ext and ext >= 4:
            if ext > vec:
                _, last = sch.split(last, [None, vec])
            sch.vectorize(last)
    return _finish(sch)


CUDA_SMS = 132  # streaming multiprocessors of the largest target GPU (H100 SXM): the grid should fill them


def _conv_cuda_chain(x_shape, w_shape, e_shape, attrs, extra_shapes, steps, want_float, pack, with_threshold):
    """CUDA form of :func:`binary_conv2d_packed_chain_primfunc`: the popcount stage as in
    :func:`_schedule_popcount_cuda`; the float epilogue, the chain and (without the float output) the PackSign in
    one element-wise kernel, so the conv's float value never goes to memory; with the float output the bits
    are packed from it in a third kernel (same expressions as the float conv + ``chain_pack_primfunc``)."""
    n, h, w, cw, o, kh, kw = check_conv_shapes(x_shape, w_shape, attrs["out_channels"], attrs["kernel_shape"])
    _, _, _, (oh, ow) = conv_geometry(h, w, kh, kw, attrs["strides"], attrs["pads"], attrs["dilations"])
    ext_shapes = check_chain(extra_shapes, steps, (n, o, oh, ow))
    X, W, E, RC, CC, P0, P1 = _conv_placeholders((n, h, w, cw), (o, kh, kw, cw), e_shape, o, oh, ow)
    Y = binary_conv2d_packed_te(X, W, E, RC, CC, P0, P1, output="float", **attrs)
    extras = [te.placeholder(s, "float32", name=f"A{k}") for k, s in enumerate(ext_shapes)]
    V = chain_value_te(Y, extras, [tuple(st) for st in steps], fence=True, family="cuda")
    T = te.placeholder((o,), "float32", name="T") if (pack and with_threshold) else None
    outs = ([V] if want_float else []) + ([_pack_sign_stage(V, T, (n, o, oh, ow))] if pack else [])
    sch = tvm.s_tir.Schedule(te.create_prim_func([X, W, E, RC, CC, P0, P1, *extras]
                                                 + ([T] if T is not None else []) + outs))
    _schedule_popcount_cuda(sch, _padded_o(o))
    sch.compute_inline(sch.get_sblock("epilogue"))
    return _schedule_chain_pack_cuda(sch, want_float, pack)


def _schedule_conv_cuda(sch, op: int) -> tirx.PrimFunc:
    """Three kernels: weight transpose, popcount conv (:func:`_schedule_popcount_cuda`), epilogue."""
    _schedule_popcount_cuda(sch, op)
    _bind_flat(sch, sch.get_sblock("epilogue"))
    return _finish(sch, gpu=True)


def _schedule_popcount_cuda(sch, op: int) -> None:
    """The weight transpose and popcount stages of a CUDA conv (the zero padding inlined).

    Popcount stage: a thread block of 32 × 8 threads covers 32·``orr`` (padded) output channels and
    8·``pr`` output pixels; each thread keeps a ``pr`` × ``orr`` register tile of int32 sums of
    ``__popc(x ^ w)``, so every weight word it loads serves ``pr`` pixels and every input word ``orr``
    channels (a 1 × 1 tile loads two words per popcount). threadIdx.x runs over consecutive channels, so
    the transposed weight words ``wt[rk, rw, rc, o]`` are read coalesced and the threads of a warp read the
    same input word (a broadcast). The tile shrinks where the grid would leave SMs idle (batch 1, late
    layers). The zero padding is inlined (a predicated load), so no padded copy of X is materialized.
    """
    sch.compute_inline(sch.get_sblock("xpad"))
    _bind_flat(sch, sch.get_sblock("wt"))

    b_pc = sch.get_sblock("pc")
    i, y, x, oo, rk, rw, rc = sch.get_loops(b_pc)
    ow = _extent(sch, x)
    npix = _extent(sch, i) * _extent(sch, y) * ow
    tx, ty = 32, CUDA_THREADS // 32

    def too_few_blocks(pr, orr):  # a grid that would leave SMs idle
        return -(-npix // (ty * pr)) * (op // (tx * orr)) < 2 * CUDA_SMS

    orr = 2 if op % 64 == 0 else 1
    pr = 4  # a thread's pixels are consecutive columns of one output row (a compact register tile)
    while pr > 1 and (ow % pr or too_few_blocks(pr, orr)):
        pr //= 2
    if orr > 1 and pr == 1 and too_few_blocks(1, orr):
        orr = 1
    x_o, pix_r = sch.split(x, [None, pr])
    pix = sch.fuse(i, y, x_o)
    pix_o, pix_t = sch.split(pix, [None, ty])
    o_o, o_t, o_r = sch.split(oo, [None, tx, orr])
    sch.reorder(pix_o, o_o, pix_t, o_t, rk, rw, rc, pix_r, o_r)
    bx = sch.fuse(pix_o, o_o)
    sch.bind(bx, "blockIdx.x")
    sch.bind(pix_t, "threadIdx.y")
    sch.bind(o_t, "threadIdx.x")
    acc = sch.cache_write(b_pc, 0, "local")
    sch.reverse_compute_at(acc, o_t)
    sch.decompose_reduction(b_pc, rk)
    sch.unroll(pix_r)
    sch.unroll(o_r)


# --------------------------------------------------------------------------------------------------
# Standalone builds (tests, benchmarks)

_TARGET_CACHE: dict = {}


def default_target():
    from .target import cpu_target

    key = "host"
    if key not in _TARGET_CACHE:
        _TARGET_CACHE[key] = tvm.target.Target(cpu_target())
    return _TARGET_CACHE[key]


class Kernel:
    """A compiled op callable on NumPy arrays: ``Kernel(*arrays) -> np.ndarray``."""

    def __init__(self, lib, out_shape, out_dtype, dev):
        self.lib, self.out_shape, self.out_dtype, self.dev = lib, tuple(out_shape), out_dtype, dev

    def __call__(self, *arrays):
        args = [tvm.runtime.tensor(np.ascontiguousarray(a), self.dev) for a in arrays]
        out = tvm.runtime.tensor(np.empty(self.out_shape, self.out_dtype), self.dev)
        self.lib(*args, out)
        return out.numpy()


def _as_target(target):
    from .target import resolve_target

    if target is None:
        return default_target()
    t = resolve_target(target)
    return t if isinstance(t, tvm.target.Target) else tvm.target.Target(t)


def compile_kernel(func: tirx.PrimFunc, target=None, name: str = "main"):
    """Compile one scheduled PrimFunc for ``target`` (host CPU, "arm", "cuda", dict, Target) without
    running it: an ``Executable`` (``.mod`` is the host module; for CUDA ``.mod.imports[0]`` holds the
    device code). ``name`` becomes the exported symbol. CUDA device code is compiled by ``nvcc``."""
    tgt = _as_target(target)
    mod = tvm.IRModule({name: func.with_attr("global_symbol", name)})
    if tgt.kind.name == "cuda":
        with nvcc_env():
            return tvm.compile(mod, target=tgt)
    return tvm.compile(mod, target=tgt)


def build_kernel(func: tirx.PrimFunc, target=None) -> Kernel:
    """Compile ``func`` and wrap it for calls from NumPy on this machine (host CPU, or a CUDA GPU).

    For an AArch64 target on another host use :class:`bnnc.runtimes.tvm.cross.QemuKernel`.
    """
    from .target import host_family

    fam = _family(target) if target is not None else None
    if fam == "arm" and host_family() != "arm":
        raise RuntimeError("an AArch64 kernel cannot run on this host; use runtimes.tvm.cross.QemuKernel "
                           "(qemu-aarch64) or compile_kernel() and export it")
    tgt = default_target() if target is None else _as_target(target)
    shape, dtype = output_spec(func)
    if fam == "cuda":
        with nvcc_env():
            lib = tvm.compile(tvm.IRModule({"main": func}), target=tgt)
        return Kernel(lib, shape, dtype, tvm.cuda(0))
    lib = tvm.compile(tvm.IRModule({"main": func}), target=tgt)
    return Kernel(lib, shape, dtype, tvm.cpu())


def output_spec(func: tirx.PrimFunc):
    """(shape, dtype) of a PrimFunc's last (output) parameter."""
    bmap = getattr(func, "buffer_map", None)
    out = bmap[func.params[-1]] if bmap is not None else func.params[-1]
    return [int(s) for s in out.shape], str(out.dtype)


# --------------------------------------------------------------------------------------------------
# CUDA code generation helpers (no GPU needed)


class nvcc_env:  # noqa: N801 - used as a context manager
    """Make TVM compile generated CUDA with ``nvcc`` (its default, NVRTC through the ``cuda-bindings``
    package, is usually absent) and without ``--use_fast_math`` (the float epilogue is rounding-exact:
    no flush-to-zero, no approximate arithmetic)."""

    _VARS = {"TVM_CUDA_COMPILE_MODE": "nvcc", "TVM_CUDA_NVCC_NO_FAST_MATH": "1"}

    def __enter__(self):
        import os

        self._saved = {k: os.environ.get(k) for k in self._VARS}
        for k, v in self._VARS.items():
            if k == "TVM_CUDA_COMPILE_MODE" and os.environ.get(k):
                continue  # an explicit user choice wins
            os.environ[k] = v
        return self

    def __exit__(self, *exc):
        import os

        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        return False


def cuda_source(executable_or_func, target=None) -> str:
    """CUDA C source of a compiled CUDA ``Executable`` (or of a CUDA-scheduled PrimFunc, compiled here)."""
    ex = executable_or_func
    if isinstance(ex, tirx.PrimFunc):
        ex = compile_kernel(ex, target if target is not None else "cuda")
    stack, seen = [ex.mod], set()
    while stack:  # the device module may sit deeper in the import tree (Relax VM → host lib → cuda)
        m = stack.pop()
        if m.kind == "cuda":
            return m.inspect_source()
        for sub in m.imports:
            if id(sub) not in seen:
                seen.add(id(sub))
                stack.append(sub)
    raise ValueError("no CUDA device module in this executable")


def nvcc_compile(source: str, arch: str = "sm_80", fmt: str = "cubin", nvcc: str = "nvcc",
                 options=()) -> bytes:
    """Compile CUDA C ``source`` with ``nvcc`` to ``fmt`` ("cubin", "ptx" or "fatbin") for ``arch``."""
    import subprocess
    import tempfile
    from pathlib import Path

    if fmt not in ("cubin", "ptx", "fatbin"):
        raise ValueError(f"fmt must be cubin, ptx or fatbin, got {fmt!r}")
    num = str(arch).replace("sm_", "").replace("compute_", "")
    with tempfile.TemporaryDirectory() as d:
        src, out = Path(d) / "k.cu", Path(d) / f"k.{fmt}"
        src.write_text(source)
        cmd = [nvcc, f"--{fmt}", "-O3", "-gencode", f"arch=compute_{num},code=sm_{num}", *options,
               "-o", str(out), str(src)]
        if fmt == "ptx":
            cmd[3:5] = ["-arch", f"compute_{num}"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{r.stderr}")
        return out.read_bytes()
