"""Float32 CPU kernels for the real (non-binary) layers of a BNN: the stem conv (direct, or by 1-D Winograd
along the rows), the 1×1 downsample convs, max and average pooling (the stem conv and its max pool also
fused into one kernel) and the classifier (dense), NCHW.

Each builder returns a TIR PrimFunc (attribute ``bnnc.scheduled``) that :mod:`.graph` calls with
``call_tir``, plus the constants to pass after the input where it has any. ``vec`` is the vector width in
float32 lanes (16 on x86 AVX-512; the ARM family uses 8); the kernels are generic in it. The convs and the
pools are written loop by loop with TVM's IR builder (register tile, tail vectors and lane shuffles
explicit), the dense with a TE schedule. Timings in the docstrings: Sapphire Rapids, 1 thread, kernel
alone, best of interleaved runs.
"""

from __future__ import annotations

import contextlib

import numpy as np
from tvm import tirx

from ..winograd import row_parts, transform_weights

__all__ = ["float_avgpool2d_primfunc", "float_conv2d_maxpool_primfunc", "float_conv2d_primfunc",
           "float_dense_primfunc", "float_maxpool2d_primfunc"]

F32 = "float32"
_ATTRS = {"bnnc.scheduled": True, "op_pattern": 8, "tirx.noalias": True}


def _ramp(base, lanes: int):
    """Index of ``lanes`` consecutive elements from ``base`` (a scalar index when lanes == 1)."""
    return tirx.Ramp(base, 1, lanes) if lanes > 1 else base


def _bcast(value, lanes: int):
    return tirx.Broadcast(value, lanes) if lanes > 1 else value


def _chunks(ext: int, vec: int) -> list[tuple[int, int]]:
    """``[(start, lanes)]`` covering ``range(ext)``: whole vectors of ``vec`` lanes, then the tail in
    decreasing powers of two (never reads or writes past ``ext``)."""
    out, s = [], 0
    while s < ext:
        t = vec
        while t > ext - s:
            t //= 2
        out.append((s, t))
        s += t
    return out


def _conv_tiles(eh: int, ew: int, vec: int, ot: int, row_tile, col_vecs) -> tuple[int, int]:
    """(rows, vectors) of the register tile of ``ot`` channels: about 24 vector registers of accumulators
    (8 channels × 3 vectors of 16 lanes on AVX-512, the best of the measured tiles, see
    ``float_conv2d_primfunc``; 96 lanes for narrower SIMD). The whole row per tile when its whole vectors
    fit (a partial last vector rides along), else that many vectors along a single row (a flattened 1×1
    conv) or that many rows."""
    if row_tile is not None or col_vecs is not None:
        return max(1, min(int(row_tile or 1), eh)), max(1, int(col_vecs or 1))
    units = max(1, (384 if vec >= 16 else 96) // (ot * vec))
    if ew // vec <= units:
        nv = -(-ew // vec)
        return max(1, min(units // nv, eh)), nv
    return (1, units) if eh < units else (units, 1)


class _Conv:
    """Geometry, blocked constants and IR emitters of one direct conv (see ``float_conv2d_primfunc``)."""

    def __init__(self, x_shape, w, bias, strides, pads, vec, oc_tile):
        n, c, h, wd = [int(v) for v in x_shape]
        o, c2, kh, kw = [int(v) for v in w.shape]
        self.n, self.c, self.h, self.wd, self.o, self.kh, self.kw = n, c, h, wd, o, kh, kw
        if c2 != c:
            raise ValueError(f"Conv: input has {c} channels but the weights expect {c2}")
        self.sh, self.sw = sh, sw = [int(v) for v in strides]
        self.pads = pt, pl, pb, pr = [int(v) for v in pads]
        self.oh = (h + pt + pb - kh) // sh + 1
        self.ow = (wd + pl + pr - kw) // sw + 1
        if self.oh < 1 or self.ow < 1:
            raise ValueError(f"Conv: a {kh}×{kw} kernel does not fit the padded {h}×{wd} input")
        self.vec = int(vec)
        # a 1×1 stride-1 conv is a GEMM over the contiguous H*W pixels
        self.flat = kh == kw == 1 and sh == sw == 1 and not any(pads)
        # taps read the input itself, else a zero-padded copy split into column phases
        self.direct = self.flat or (not any(pads) and sw == 1)
        ot = max(1, int(oc_tile))
        while o % ot:
            ot //= 2
        self.ot = ot
        self.wblk = np.ascontiguousarray(w.astype(np.float32).reshape(o // ot, ot, c, kh, kw).transpose(0, 2, 3, 4, 1))
        self.bias = np.zeros(o, np.float32) if bias is None else np.asarray(bias, np.float32).reshape(o)

    def emit_args(self, T, out_shape, bits_shape=None):
        self.X = T.arg("X", T.Buffer((self.n, self.c, self.h, self.wd), F32))
        self.W = T.arg("W", T.Buffer(self.wblk.shape, F32))
        self.B = T.arg("B", T.Buffer((self.o,), F32))
        if bits_shape is not None:
            self.TH = T.arg("TH", T.Buffer((out_shape[1],), F32))
        y = T.arg("Y", T.Buffer(out_shape, F32))
        if bits_shape is not None:
            self.YB = T.arg("YB", T.Buffer(bits_shape, "uint32"))
        return y

    @contextlib.contextmanager
    def frame(self, out_shape, bits_shape=None):
        """The kernel around the conv: ``main(X, W, B, Y[out_shape])`` (with ``bits_shape``: ``main(X, W, B,
        TH, Y, YB[bits_shape])``, the thresholds and packed bits of a fused ``PackSign``) in block form (as
        Relax's op-pattern analysis expects) with the padded input stage emitted; yields ``(builder, Y)``."""
        from tvm.script.ir_builder import IRBuilder
        from tvm.script.ir_builder import tirx as T

        with IRBuilder() as ib, T.prim_func():
            T.func_name("main")
            Y = self.emit_args(T, out_shape, bits_shape)
            T.func_attr(dict(_ATTRS))
            with T.sblock("root"):
                self.emit_input(T)
                yield ib, Y

    def emit_input(self, T):
        """The padded phase-split copy where needed (a parallel loop); sets ``self.x_at``."""
        n, c, h, wd, kh, kw, sh, sw = self.n, self.c, self.h, self.wd, self.kh, self.kw, self.sh, self.sw
        pt, pl = self.pads[:2]
        X = self.X
        if self.flat:
            Xv = T.decl_buffer((n, c, 1, h * wd), F32, data=X.data)
            self.x_at = lambda i, ch, y, rw, x, t: Xv[i, ch, y, _ramp(x, t)]
            return
        if self.direct:
            self.x_at = lambda i, ch, y, rw, x, t: X[i, ch, y, _ramp(x + rw, t)]
            return
        hp = (self.oh - 1) * sh + kh  # padded rows read
        wq = self.ow + (kw - 1) // sw  # columns per phase
        vec = self.vec
        # stride 2: each chunk of 2·vec input columns is loaded as two vectors (masked: lanes outside the image,
        # or a padding row, read 0) and split into the two phases with one lane shuffle each; the phase rows
        # are padded to whole vectors (stem conv + max pool at 224²: 1.392 → 1.376 ms on 1 thread, 1.367 ms
        # with no copy at all; 0.748 → 0.725 ms on 2 threads). Other strides element by element.
        by_vectors = sw == 2 and vec > 1
        wqp = -(-wq // vec) * vec if by_vectors else wq
        xp = T.alloc_buffer((n, c, hp, sw, wqp), F32)
        with T.parallel(0, n * c * hp) as r:  # rows outer: a thread copies the rows its bands read (below)
            i, yp, ch = r // (c * hp), r // c % hp, r % c
            yy = yp - pt
            if by_vectors:
                with T.serial(0, wqp // vec) as q:
                    for ph, v in enumerate(self.phase_vectors(i, ch, yy, q)):
                        T.buffer_store(xp, v, [i, ch, yp, ph, _ramp(q * vec, vec)])
            else:
                for ph in range(sw):
                    with T.serial(0, wq) as j:
                        xx = j * sw + ph - pl
                        ok = tirx.all(yy >= 0, yy < h, xx >= 0, xx < wd)
                        src = X[i, ch, tirx.max(tirx.min(yy, h - 1), 0), tirx.max(tirx.min(xx, wd - 1), 0)]
                        T.buffer_store(xp, tirx.if_then_else(ok, src, tirx.const(0.0, F32)), [i, ch, yp, ph, j])
        self.x_at = lambda i, ch, y, rw, x, t: xp[i, ch, y, rw % sw, _ramp(x + rw // sw, t)]

    def phase_vectors(self, i, ch, yy, q):
        """Columns ``q·vec`` to ``(q+1)·vec − 1`` of the two column phases of padded input row ``yy`` (an image
        row index; outside the image, and columns in the padding, read 0): two vectors of 2·vec input columns
        loaded (masked) and split with one lane shuffle each (stride 2 only)."""
        vec, h, wd, X = self.vec, self.h, self.wd, self.X
        row_ok = tirx.all(yy >= 0, yy < h)
        yc = tirx.max(tirx.min(yy, h - 1), 0)
        x0 = 2 * q * vec - self.pads[1]
        halves = []
        for hv in range(2):
            cols = _ramp(x0 + hv * vec, vec)
            mask = tirx.all(_bcast(row_ok, vec), cols >= _bcast(0, vec), cols < _bcast(wd, vec))
            # masked-off lanes of a masked load are undefined: select the zeros explicitly
            halves.append(tirx.Select(mask, tirx.call_intrin(f"{F32}x{vec}", "tirx.masked_load", X, i, ch, yc,
                                                             cols, mask),
                                      _bcast(tirx.const(0.0, F32), vec)))
        return [tirx.Shuffle(halves, [2 * k + ph for k in range(vec)]) for ph in range(2)]

    def emit_tile(self, T, i, oo, ys: list, x0, lanes: list[int], store):
        """Accumulate the register tile of ``ot`` channels × rows ``ys`` (output row expressions) × vectors
        of ``lanes`` lanes from column ``x0``; ``store(oi, yi, x, lanes, value)`` writes each vector."""
        ot, W, B, sh = self.ot, self.W, self.B, self.sh
        offs = [0]
        for t in lanes:
            offs.append(offs[-1] + t)
        nx, rows = offs[-1], len(ys)
        acc = T.alloc_buffer((ot * rows * nx,), F32, scope="local")  # constant indices: registers

        def a(oi, yi, xj):
            return _ramp((oi * rows + yi) * nx + offs[xj], lanes[xj])

        for oi in range(ot):
            for yi in range(rows):
                for xj, t in enumerate(lanes):
                    T.buffer_store(acc, _bcast(B[oo * ot + oi], t), [a(oi, yi, xj)])
        with T.serial(0, self.c) as rc, T.serial(0, self.kh) as rh:
            for rw in range(self.kw):
                xs = [[self.x_at(i, rc, y * sh + rh, rw, x0 + offs[xj], t) for xj, t in enumerate(lanes)] for y in ys]
                for oi in range(ot):
                    wv = W[oo, rc, rh, rw, oi]
                    for yi in range(rows):
                        for xj, t in enumerate(lanes):
                            k = a(oi, yi, xj)
                            T.buffer_store(acc, acc[k] + xs[yi][xj] * _bcast(wv, t), [k])
        for oi in range(ot):
            for yi in range(rows):
                for xj, t in enumerate(lanes):
                    store(oi, yi, x0 + offs[xj], t, acc[a(oi, yi, xj)])

    def emit_rows(self, T, i, oo, ys: list, ew: int, xv: int, store):
        """Every column of rows ``ys``: tiles of ``xv`` whole vectors, then the remainder."""
        xt = self.vec * xv
        nxt, xrem = divmod(ew, xt)
        if nxt:
            with T.serial(0, nxt) as xo:
                self.emit_tile(T, i, oo, ys, xo * xt, [self.vec] * xv, store)
        if xrem:
            self.emit_tile(T, i, oo, ys, nxt * xt, [t for _, t in _chunks(xrem, self.vec)], store)


def _lincomb(coefs, vecs, lanes: int, init=None):
    """``init + sum coefs[i]·vecs[i]`` over the nonzero ``coefs`` (±1 as adds and subtracts)."""
    out = init
    for cf, v in zip(coefs, vecs):
        if cf == 0:
            continue
        term = v if abs(cf) == 1 else v * _bcast(tirx.const(float(abs(cf)), F32), lanes)
        if out is None:
            out = term if cf > 0 else term * _bcast(tirx.const(-1.0, F32), lanes)
        else:
            out = out + term if cf > 0 else out - term
    return out


class _WinogradConv(_Conv):
    """A stride-2 float conv with wide kernels (the 7×7/2 stem) by 1-D Winograd F(m, r) along the rows.

    Each column phase of the stride-2 conv is a stride-1 correlation with ``r = ceil(kw / 2)`` taps (the odd
    phase's 3 taps of a 7-wide kernel padded to 4). Along a row the output columns are cut into tiles of
    ``m`` columns; one tile is ``Aᵀ [(G g) ⊙ (Bᵀ d)]`` over ``n = m + r − 1`` points, and the sum over input
    channels, kernel rows and the two phases is taken in the transformed domain. So per output row and
    channel the products are (channels × kernel rows × 2 phases × n) per m columns, 42 · 7 / 4 = 73.5 per
    column for the stem with m = 4 instead of 147 for the direct conv. Points 0, ±1, ±2, 1/2, ∞ (the first
    ``n − 1`` of them): on the stem the error vs float64 is about twice the direct float32 conv's (rms 7.5e-7
    vs 4.0e-7 on outputs of rms 1.8).

    Layout: tiles in the vector lanes, ``vec`` tiles per vector. A row's vectors take m = 4 (4·vec columns
    each) while that many columns remain, the last one the smallest m that covers the rest (the stem's 112
    columns: 64 by F(4, 4) and 48 by F(3, 4), 6 points; with m = 4 throughout, 4 of its 32 lanes idled:
    stem + max pool 1.078 → 1.000 ms). The input stage (one parallel loop over the padded rows) transforms
    every padded input row of each phase once: ``V[image, channel, row, phase, slot, lane]`` (a slot per
    vector and point). A register tile is then ``oc_tile`` channels × up to 3 output rows for one point and
    one vector of tiles (24 accumulators, one broadcast weight per channel and 3 vector loads per 24 FMAs, as
    the direct conv), stored per point to a small local buffer; the output transform combines the points
    with constants, adds the bias and interleaves the m columns of each tile back into consecutive columns
    (lane shuffles), and hands the rows to the caller's ``store`` as the direct conv does."""

    M = 4

    @staticmethod
    def applies(x_shape, w_shape, strides, vec) -> bool:
        kw = int(w_shape[3])
        return int(strides[1]) == 2 and 5 <= kw <= 8 and vec >= 4 and vec % _WinogradConv.M == 0

    def __init__(self, x_shape, w, bias, strides, pads, vec, oc_tile):
        super().__init__(x_shape, w, bias, strides, pads, vec, oc_tile)
        if not self.applies(x_shape, w.shape, strides, vec):
            raise ValueError("Winograd conv: needs a column stride of 2, a 5 to 8 wide kernel, vec a multiple of 4")
        self.parts, self.nslot = row_parts(self.ow, self.kw, self.vec, self.M)
        self.wblk = transform_weights(w, self.parts, self.ot)

    def emit_input(self, T):
        """``V[i, c, padded row, phase, slot, lane]``: each phase of every padded row gathered, per vector of
        tiles, into its tiles' ``n`` consecutive columns (lane shuffles of the phase row) and transformed by
        that part's ``Bᵀ`` (slot = the part's first slot + point)."""
        n, c, kh, sh, vec = self.n, self.c, self.kh, self.sh, self.vec
        hp = (self.oh - 1) * sh + kh
        last = self.parts[-1]
        nq = -(-(last["col"] + last["m"] * (vec - 1) + last["npt"]) // vec) + 1  # phase-row vectors read
        v = self.V = T.alloc_buffer((n, c, hp, 2, self.nslot, vec), F32)
        with T.parallel(0, n * c * hp) as rr:
            i, yp, ch = rr // (c * hp), rr // c % hp, rr % c
            # the row's phase vectors, constant indices only (registers, no store-to-load forwarding stalls)
            row = T.alloc_buffer((2, nq, vec), F32, scope="local")
            for q in range(nq):
                for ph, pv in enumerate(self.phase_vectors(i, ch, yp - self.pads[0], q)):
                    T.buffer_store(row, pv, [ph, q, _ramp(0, vec)])
            for ph in range(2):
                for pt in self.parts:
                    m, npt, q0 = pt["m"], pt["npt"], pt["col"] // vec
                    d = []
                    if m == 4:
                        # d[s][lane] = phase row[col + 4·lane + s]: de-interleave by 4 (two rounds of
                        # two-vector shuffles) of the 4 vectors from the part's column (s < 4) and from 4 on
                        for off in range(0, npt, m):
                            src = [row[ph, q0 + a, _ramp(0, vec)] for a in range(m + 1)]
                            if off:
                                src = [tirx.Shuffle([src[a], src[a + 1]], [off + e for e in range(vec)])
                                       for a in range(m)]
                            src = src[:m]
                            for _ in range(2):
                                src = [tirx.Shuffle([src[2 * k], src[2 * k + 1]], [2 * e + par for e in range(vec)])
                                       for par in range(2) for k in range(len(src) // 2)]
                            d += src[:npt - off]  # [even of evens, even of odds, odd of evens, odd of odds]
                    else:
                        nsrc = -(-(m * (vec - 1) + npt) // vec)
                        src = [row[ph, q0 + a, _ramp(0, vec)] for a in range(nsrc)]
                        d = [tirx.Shuffle(src, [m * e + s for e in range(vec)]) for s in range(npt)]
                    for xi in range(npt):
                        T.buffer_store(v, _lincomb(pt["bt"][xi], d, vec), [i, ch, yp, ph, pt["slot"] + xi,
                                                                             _ramp(0, vec)])

    def emit_rows(self, T, i, oo, ys: list, ew: int, xv: int, store):
        """Every column of rows ``ys`` (``ew`` must be the output width; ``xv`` is unused)."""
        ot, vec, sh, V, W, B = self.ot, self.vec, self.sh, self.V, self.W, self.B
        rows = len(ys)
        if ew != self.ow:
            raise ValueError("Winograd conv: rows are computed whole")
        mb = T.alloc_buffer((ot, rows, self.nslot, vec), F32, scope="local")  # per point, in L1
        for pt in self.parts:
            with T.serial(0, pt["npt"]) as xi:
                slot = pt["slot"] + xi
                acc = T.alloc_buffer((ot * rows * vec,), F32, scope="local")  # constant indices: registers
                for k in range(ot * rows):
                    T.buffer_store(acc, _bcast(tirx.const(0.0, F32), vec), [_ramp(k * vec, vec)])
                # (kernel rows unrolled, or 4 channels × 3 rows × both tile vectors: slower)
                with T.serial(0, self.c) as rc, T.serial(0, self.kh) as rh:
                    for ph in range(2):
                        xs = [V[i, rc, y * sh + rh, ph, slot, _ramp(0, vec)] for y in ys]
                        for oi in range(ot):
                            wv = _bcast(W[oo, rc, rh, ph, slot, oi], vec)
                            for yi in range(rows):
                                k = _ramp((oi * rows + yi) * vec, vec)
                                T.buffer_store(acc, acc[k] + xs[yi] * wv, [k])
                for oi in range(ot):
                    for yi in range(rows):
                        T.buffer_store(mb, acc[_ramp((oi * rows + yi) * vec, vec)], [oi, yi, slot, _ramp(0, vec)])
        # the output transform, a loop over the channels (unrolled, it only grows the code: the stem kernel
        # compiled in 2.4 s instead of 1.5 s, same speed)
        with T.serial(0, ot) as oi:
            bias = _bcast(B[oo * ot + oi], vec)
            for pt in self.parts:
                m = pt["m"]
                for yi in range(rows):
                    pv = [mb[oi, yi, pt["slot"] + xi, _ramp(0, vec)] for xi in range(pt["npt"])]
                    outs = [_lincomb(pt["at"][j], pv, vec, bias) for j in range(m)]  # column j of each tile
                    for q in range(m):  # vector q of the part's m·vec columns, in order
                        x = pt["col"] + q * vec
                        if x >= self.ow:
                            break
                        idx = [((q * vec + e) % m) * vec + (q * vec + e) // m for e in range(vec)]
                        for s0, t in _chunks(min(vec, self.ow - x), vec):
                            store(oi, yi, x + s0, t, tirx.Shuffle(outs, idx[s0:s0 + t]))


def _conv_class(x_shape, w, strides, vec, winograd):
    """``_WinogradConv`` where asked (``winograd`` True) or, by default (None), where it applies; else ``_Conv``."""
    if winograd is None:
        winograd = _WinogradConv.applies(x_shape, w.shape, strides, vec)
    return _WinogradConv if winograd else _Conv


def float_conv2d_primfunc(x_shape, w: np.ndarray, bias: np.ndarray | None, strides, pads, vec: int = 16,
                          oc_tile: int = 8, row_tile: int | None = None, col_vecs: int | None = None,
                          winograd: bool | None = None):
    """A direct float32 NCHW conv (groups 1, dilation 1) for CPUs, output columns in the vector lanes.

    Register tile: ``oc_tile`` output channels × ``row_tile`` output rows × ``col_vecs`` vectors of ``vec``
    columns, the accumulators initialised with the bias; per tap one weight scalar is broadcast into
    ``rows × vectors`` FMAs. Weights are pre-blocked to ``[O/oc_tile, C, KH, KW, oc_tile]`` (constants).
    With padding or a column stride the input is first copied to a zero-padded buffer split into ``stride``
    column phases (every tap then reads contiguous columns); a 1×1 stride-1 conv runs as a GEMM over the
    contiguous H·W pixels. The last vector of a row may be partial (no padding of the output, no read past
    the input). Default tile (``vec`` 16): 8 channels × 3 rows for the 7×7/2 stem, 3→64 at 224²: 1.28 ms,
    91 GMAC/s, about 85 % of what this CPU's FMA ports reach in a loop with the same loads (8×2 rows:
    1.32 ms, 16×1: 1.40 ms; the former TE schedule: 1.38 ms); 8 channels × 3 vectors for the 1×1 convs
    (64→128 at 28²: 0.065 ms, 128→256 at 14²: 0.074 ms, 256→512 at 7²: 0.077 ms, vs 0.092 / 0.086 /
    0.146 ms for the former schedule, whose 7-wide rows ran on 8-lane vectors).

    ``winograd``: a stride-2 conv with a 5 to 8 wide kernel (the stem) runs by 1-D Winograd F(4, r) along
    the rows by default (``None``; see ``_WinogradConv``): 3→64 at 224², 1 thread, 1.36 → 1.01 ms (one
    process, interleaved), at about twice the direct float32 conv's rounding error. ``False`` forces the
    direct conv, ``True`` requires Winograd (a ValueError where it does not apply).

    Returns ``(primfunc, [weight_blocked, bias], output_shape)``: the constants to pass after the input."""
    from tvm.script.ir_builder import tirx as T

    cv = _conv_class(x_shape, w, strides, vec, winograd)(x_shape, w, bias, strides, pads, vec, oc_tile)
    n, o, oh, ow, ot = cv.n, cv.o, cv.oh, cv.ow, cv.ot
    eh, ew = (1, cv.h * cv.wd) if cv.flat else (oh, ow)
    yt, xv = _conv_tiles(eh, ew, vec, ot, row_tile, col_vecs)
    if isinstance(cv, _WinogradConv):
        yt, xv = max(1, min(int(row_tile or 3), eh)), 1
    with cv.frame((n, o, oh, ow)) as (ib, Y):
        Yv = T.decl_buffer((n, o, 1, eh * ew), F32, data=Y.data) if cv.flat else Y

        def row_block(i, oo, y0, rows):
            def store(oi, yi, x, t, value):
                T.buffer_store(Yv, value, [i, oo * ot + oi, y0 + yi, _ramp(x, t)])

            cv.emit_rows(T, i, oo, [y0 + yi for yi in range(rows)], ew, xv, store)

        nyt, yrem = divmod(eh, yt)
        ntask = nyt + (1 if yrem else 0)
        with T.parallel(0, n * (o // ot) * ntask) as task:
            i, oo, yo = task // ((o // ot) * ntask), task // ntask % (o // ot), task % ntask
            if yrem and nyt:
                with T.If(yo < nyt):
                    with T.Then():
                        row_block(i, oo, yo * yt, yt)
                    with T.Else():
                        row_block(i, oo, nyt * yt, yrem)
            elif yrem:
                row_block(i, oo, 0, yrem)
            else:
                row_block(i, oo, yo * yt, yt)
    return ib.get(), [cv.wblk, cv.bias], [n, o, oh, ow]


def _pool_geometry(name, x_hw, kernel_shape, strides, pads):
    h, wd = x_hw
    kh, kw = [int(v) for v in kernel_shape]
    sh, sw = [int(v) for v in strides]
    pt, pl, pb, pr = [int(v) for v in pads]
    oh = (h + pt + pb - kh) // sh + 1
    ow = (wd + pl + pr - kw) // sw + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"{name}: a {kh}×{kw} window does not fit the padded {h}×{wd} input")
    if max(pt, pb) >= kh or max(pl, pr) >= kw:  # as ONNX Runtime: no window may lie in the padding
        raise ValueError(f"{name}: pads {[pt, pl, pb, pr]} must be smaller than the {kh}×{kw} window")
    return kh, kw, sh, sw, pt, pl, oh, ow


def _pool_columns(vmax: list, chunks, wd: int, ow: int, kw: int, sw: int, pl: int, vec: int, kind: str = "max"):
    """``[(x0, lanes, value)]``: the output vectors of one pooled row, each window's max (``kind`` "max")
    or sum ("sum") over columns gathered from the row's vectors ``vmax`` (chunks ``chunks`` of the ``wd``
    input columns) with lane shuffles; columns in the padding read -inf (max) or 0 (sum)."""
    ninf = tirx.const(-np.inf if kind == "max" else 0.0, F32)
    combine = tirx.max if kind == "max" else (lambda p, q: p + q)
    where = {s + lane: (k, lane) for k, (s, t) in enumerate(chunks) for lane in range(t)}  # column → (chunk, lane)
    out = []
    for x0, t in _chunks(ow, vec):
        m = None
        for rw in range(kw):
            src, idx = [], []  # [(key, vector, lanes)], lane indices into their concatenation
            for q in ((x0 + lane) * sw + rw - pl for lane in range(t)):
                if 0 <= q < wd:
                    k, lane = where[q]
                    key, e, ln = k, vmax[k], chunks[k][1]
                else:
                    key, e, ln, lane = -1, tirx.Broadcast(ninf, 2), 2, 0
                off = 0
                for kk, _, lk in src:
                    if kk == key:
                        break
                    off += lk
                else:
                    src.append((key, e, ln))
                idx.append(off + lane)
            v = tirx.Shuffle([e for _, e, _ in src], idx)
            m = v if m is None else combine(m, v)
        out.append((x0, t, m))
    return out


def float_conv2d_maxpool_primfunc(x_shape, w: np.ndarray, bias: np.ndarray | None, strides, pads, pool_kernel,
                                  pool_strides, pool_pads, vec: int = 16, oc_tile: int = 8,
                                  row_chunks: int | None = None, pool_rows_per_step: int | None = None,
                                  winograd: bool | None = None, pack: bool = False):
    """``MaxPool(Conv(x))`` in one kernel (the ResNet stem: conv 7×7/2 → max pool 3×3/2): the conv rows of
    each pooling window are computed into a small per-task buffer (``oc_tile`` channels × the window's
    rows × the row width, in L1) and pooled from there, so the full-resolution conv output (3.2 MB for
    64×112², more than a core's L2) is never written to memory and read back. Pool rows advance
    ``pool_rows_per_step`` (G) at a time: the last ``kernel - stride`` conv rows of a step are kept, G·stride
    new ones computed in register tiles of up to 3 rows (8 channels × 3 rows × 16 columns, the conv's best
    tile); by default G makes G·stride a multiple of 3 (G = 3 for the stem's stride 2: 6 new rows, two 3-row
    tiles; stem alone, 1 thread: 1.445 → 1.398 ms vs G = 1 with 2-row tiles; Bi-Real-18 4.232 → 4.176 ms,
    ReActNet-18 4.063 → 4.033 ms, A/B in one process). Each task takes ``oc_tile`` channels and one of
    ``row_chunks`` bands of pool rows (a band recomputes the conv rows it shares with the band above).
    Bi-Real-18 / ReActNet-18 at 224², 1 thread, whole network: 0.08–0.10 ms less than conv then pool.
    Every output is bit-identical whatever G (the same sums in the same order). The conv rows are computed
    by 1-D Winograd by default (``winograd``, as :func:`float_conv2d_primfunc`): the stem kernel at 224²,
    1 thread, 1.36 → 0.94 ms; Bi-Real-18 4.21 → 3.79 ms, ReActNet-18 4.26 → 3.88 ms (A/B in one process).

    ``pack``: the kernel also does the ``PackSign`` of its output (``bit = y >= TH[c]``, the semantics of
    ``bnnc.ops.deploy.pack_sign``): arguments ``(X, W, B, TH, Y, YB)`` with ``YB`` the packed bits
    ``[N, OH, OW, O/32]`` (uint32, NHWC). Each task ORs its ``oc_tile`` channels' compares into one byte per
    pixel (channels 8k..8k+7 are byte k of a pixel's words) from the pooled rows it has just stored (in L1):
    the separate PackSign kernel read the whole float output back (Bi-Real-18 at 224², 64×56² floats: 0.047 ms
    of 1 thread). Needs O a multiple of 32 and ``oc_tile`` of 8.

    Conv arguments as :func:`float_conv2d_primfunc`, pool ones as :func:`float_maxpool2d_primfunc`
    (floor mode, dilation 1, pads smaller than the window, kernel not smaller than the stride).
    Returns ``(primfunc, [weight_blocked, bias], output_shape)``."""
    from tvm.script.ir_builder import tirx as T

    cv = _conv_class(x_shape, w, strides, vec, winograd)(x_shape, w, bias, strides, pads, vec, oc_tile)
    n, o, oh, ow, ot = cv.n, cv.o, cv.oh, cv.ow, cv.ot
    pkh, pkw, psh, psw, ppt, ppl, poh, pow_ = _pool_geometry("MaxPool", (oh, ow), pool_kernel, pool_strides, pool_pads)
    if pkh < psh:
        raise ValueError(f"MaxPool: a pool stride {psh} larger than its {pkh}-row window is not supported here")
    if row_chunks is None:  # enough tasks for 16 threads, few bands (each band recomputes pkh - psh rows)
        row_chunks = max(1, min(poh, -(-16 // (n * (o // ot)))))
    band = -(-poh // int(row_chunks))
    nband = -(-poh // band)
    chunks = _chunks(ow, vec)
    keep = pkh - psh
    # pool rows per step: G·psh new conv rows, computed in register tiles of up to 3 rows (8 channels × 3 rows
    # × 16 columns: 24 accumulators, the conv's best tile); G = 3 for a stride of 2 (6 rows: two 3-row tiles)
    g = int(pool_rows_per_step) if pool_rows_per_step else next(
        (k for k in (1, 2, 3) if (k * psh) % 3 == 0), 1)
    g = max(1, min(g, band))
    wrows = keep + g * psh  # window buffer rows: the kept rows, then g·psh new ones
    nw = o // 32
    if pack and (o % 32 or ot % 8):
        raise ValueError(f"float_conv2d_maxpool_primfunc: pack needs O % 32 == 0 and oc_tile % 8 == 0 "
                         f"(O={o}, oc_tile={ot})")
    bits_shape = (n, poh, pow_, nw) if pack else None

    with cv.frame((n, o, poh, pow_), bits_shape) as (ib, Y), T.parallel(0, n * (o // ot) * nband) as task:
        # bands outer: with T threads, thread k takes the k-th share of the bands (all channels), whose input
        # rows it copied in the padded-input stage, not another core's cache lines (stem at 224², 2 threads:
        # 0.81 → 0.75 ms, 1.87× → 1.98× over 1 thread)
        i, bo, oo = task // ((o // ot) * nband), task // (o // ot) % nband, task % (o // ot)
        win = T.alloc_buffer((ot, wrows, ow), F32, scope="local")  # the conv rows of g pool windows
        yb8 = T.decl_buffer((n * poh * pow_ * nw * 4,), "uint8", data=cv.YB.data) if pack else None

        def conv_rows(py, first: int, last: int):
            """window rows ``first..last-1`` of the step starting at pool row ``py`` (window row q is conv
            row py·psh − ppt + q, clamped to real rows: a repeated row is in the same window, the max is
            unchanged), in register tiles of up to 3 rows"""
            qs = list(range(first, last))
            for t0 in range(0, len(qs), 3):
                part = qs[t0:t0 + 3]
                ys = [tirx.max(tirx.min(py * psh - ppt + q, oh - 1), 0) for q in part]

                def store(oi, yi, x, t, value, part=part):
                    T.buffer_store(win, value, [oi, part[yi], _ramp(x, t)])

                cv.emit_rows(T, i, oo, ys, ow, 1, store)

        def pool(py, q0):
            """pool row ``py`` from window rows ``q0..q0+pkh-1``"""
            for oi in range(ot):
                vmax = []
                for s, t in chunks:
                    m = None
                    for q in range(pkh):
                        v = win[oi, q0 + q, _ramp(s, t)]
                        m = v if m is None else tirx.max(m, v)
                    vmax.append(m)
                for x0, t, m in _pool_columns(vmax, chunks, ow, pow_, pkw, psw, ppl, vec):
                    T.buffer_store(Y, m, [i, oo * ot + oi, py, _ramp(x0, t)])
            if pack:
                pack_row(py)

        def pack_row(py):
            """the PackSign bits of pool row ``py``: per 8 channels, one byte per pixel (uint8 lanes OR-ed from
            the compares of the row just stored), stored at byte ``channel // 8`` of the pixel's words"""
            for b8 in range(ot // 8):
                for x0, t in _chunks(pow_, vec):
                    byte = None
                    for j in range(8):
                        ch = oo * ot + b8 * 8 + j
                        ge = tirx.GE(Y[i, ch, py, _ramp(x0, t)], _bcast(cv.TH[ch], t))
                        v = tirx.Select(ge, _bcast(tirx.const(1 << j, "uint8"), t), _bcast(tirx.const(0, "uint8"), t))
                        byte = v if byte is None else tirx.bitwise_or(byte, v)
                    base = ((i * poh + py) * pow_ + x0) * (nw * 4) + (oo * ot) // 8 + b8
                    stride = nw * 4  # bytes per pixel
                    # pixels per 64-byte masked store (AVX-512: vec 16; NEON has no masked stores: byte stores)
                    per = 64 // stride if t > 1 and stride <= 16 and vec >= 16 else 0
                    if not per:
                        T.buffer_store(yb8, byte, [tirx.Ramp(base, stride, t) if t > 1 else base])
                        continue
                    # byte k of the vector to lane k·stride of 64 (masked store from the byte's address: only
                    # those lanes written): 2 stores per 16 pixels at 64 channels, not 16 byte extracts
                    zero = _bcast(tirx.const(0, "uint8"), 64)
                    lanes = tirx.Ramp(0, 1, 64)
                    for k0 in range(0, t, per):
                        npx = min(per, t - k0)
                        val = tirx.Shuffle([byte, zero], [k0 + l // stride if l % stride == 0 and l // stride < npx
                                                          else t for l in range(64)])
                        mask = tirx.And(tirx.EQ(tirx.FloorMod(lanes, _bcast(stride, 64)), _bcast(0, 64)),
                                        tirx.LT(lanes, _bcast(stride * npx, 64)))
                        T.evaluate(T.masked_store(yb8, val, tirx.Ramp(base + k0 * stride, 1, 64), mask))

        def step(py, k: int):
            """pool rows py..py+k-1 (k <= g): window rows ``keep..keep+k·psh-1`` computed (rows below ``keep``
            are there already), then pooled"""
            conv_rows(py, keep, keep + k * psh)
            for gi in range(k):
                pool(py + gi, gi * psh)

        def shift():
            """the last ``keep`` rows of a full step become the first ones of the next"""
            for oi in range(ot):
                for q in range(keep):
                    for s, t in chunks:
                        T.buffer_store(win, win[oi, q + g * psh, _ramp(s, t)], [oi, q, _ramp(s, t)])

        p0 = bo * band
        # full steps of g pool rows, then one of the remaining (fewer than g) rows; every band has the same
        # size but the last. The first step's kept rows are computed first, so that every step computes the
        # same rows and the loop holds the only copy of its register tiles (the stem kernel compiles in 0.85 s;
        # 1.57 s with a first step of its own, 0.48 s with one pool row per step).
        nfull_last = (poh - (nband - 1) * band) // g  # full steps in the last band
        rem_last = (poh - (nband - 1) * band) % g
        nfull, rem = band // g, band % g

        def band_body(nf: int, rm: int):
            conv_rows(p0, 0, keep)
            if nf:
                with T.serial(0, nf) as ds:
                    step(p0 + ds * g, g)
                    shift()
            if rm:
                step(p0 + nf * g, rm)

        if (nfull, rem) == (nfull_last, rem_last):
            band_body(nfull, rem)
        else:
            with T.If(bo < nband - 1):
                with T.Then():
                    band_body(nfull, rem)
                with T.Else():
                    band_body(nfull_last, rem_last)
    return ib.get(), [cv.wblk, cv.bias], [n, o, poh, pow_]


def float_dense_primfunc(n: int, k: int, b_kn: np.ndarray, bias: np.ndarray | None, vec: int = 16, j_tile: int = 4):
    """``Y[n, j] = sum_k A[n, k] * B[k, j] (+ bias[j])`` with constant ``B``, vectorized over ``j``, ``j_tile``
    vectors of accumulators per task. ``B`` is stored blocked, ``[ceil(j / blk), k, blk]`` with ``blk = vec ·
    j_tile`` columns (zero-padded), so a task streams one contiguous block: with ``B`` as ``[k, j]`` each task
    read ``k`` short rows one page apart, which the prefetchers do not follow (ImageNet classifier 512 → 1000,
    1 thread, in ReActNet-18: 0.145 → 0.107 ms; alone from memory 0.266 → 0.232 ms). Returns ``(primfunc, [B, bias], shape)``."""
    from tvm import s_tir, te

    kk, j = [int(v) for v in b_kn.shape]
    if kk != k:
        raise ValueError(f"MatMul: A has {k} columns but B has {kk} rows")
    blk = vec * j_tile if j > vec * j_tile else -(-j // vec) * vec
    nb = -(-j // blk)
    bp = np.zeros((k, nb * blk), np.float32)
    bp[:, :j] = b_kn
    bp = np.ascontiguousarray(bp.reshape(k, nb, blk).transpose(1, 0, 2))
    bb = np.zeros(j, np.float32) if bias is None else np.broadcast_to(np.asarray(bias, np.float32), (j,)).copy()
    A = te.placeholder((n, k), "float32", name="A")
    Bp = te.placeholder((nb, k, blk), "float32", name="Bw")
    Bias = te.placeholder((j,), "float32", name="bias")
    r = te.reduce_axis((0, k), name="r")
    acc = te.compute((n, nb, blk), lambda i, jb, jj: te.sum(A[i, r] * Bp[jb, r, jj], axis=r), name="acc")
    out = te.compute((n, j), lambda i, jj: acc[i, jj // blk, jj % blk] + Bias[jj], name="out")
    sch = s_tir.Schedule(te.create_prim_func([A, Bp, Bias, out]))
    ba = sch.get_sblock("acc")
    i, jb, jj, rr = sch.get_loops(ba)
    ji, jv = sch.split(jj, [None, vec])
    sch.reorder(i, jb, rr, ji, jv)
    sch.parallel(sch.fuse(i, jb))
    sch.unroll(ji)
    sch.vectorize(jv)
    init = sch.decompose_reduction(ba, rr)
    sch.vectorize(sch.get_loops(init)[-1])
    lo = sch.get_loops(sch.get_sblock("out"))
    if j % vec == 0:
        _, v = sch.split(lo[-1], [None, vec])
        sch.vectorize(v)
    func = sch.mod["main"].with_attrs({"bnnc.scheduled": True, "op_pattern": 8})
    return func, [bp, bb], [n, j]


@contextlib.contextmanager
def _pool_rows(n, c, h, wd, oh, ow):
    """The frame of the float pooling kernels: ``main(X[n,c,h,wd], Y[n,c,oh,ow])`` with one parallel task
    per (image, channel) and a serial loop over output rows, in block form (as Relax's op-pattern analysis
    expects). Yields ``(builder, X, Y, image, channel, output row)``; the body stores into ``Y``."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    with IRBuilder() as ib, T.prim_func():
        T.func_name("main")
        X = T.arg("X", T.Buffer((n, c, h, wd), F32))
        Y = T.arg("Y", T.Buffer((n, c, oh, ow), F32))
        T.func_attr(dict(_ATTRS))
        with T.sblock("root"), T.parallel(0, n * c) as nc:
            with T.serial(0, oh) as y:
                yield ib, X, Y, nc // c, nc % c, y


def float_maxpool2d_primfunc(x_shape, kernel_shape, strides, pads, vec: int = 16):
    """Float32 NCHW max pooling (dilation 1, floor mode), one task per (image, channel), row by row.

    The window's input rows are reduced first (whole vectors along the input row; a row index in the
    padding is clamped to the nearest real row, which is in the same window, so the max is unchanged),
    then each output vector gathers its strided columns from those vectors with lane shuffles (one
    ``vpermt2ps`` per source pair on AVX-512; -inf lanes for the padded columns): no padded copy, nothing
    stored and re-read. 3×3/2 pad 1 on 64×112², 1 thread: 0.04 ms with the input in L2, 0.16 ms from L3
    (bound by reading its 3.2 MB), vs 0.20 ms for a padded phase-split copy."""
    n, c, h, wd = [int(v) for v in x_shape]
    kh, kw, sh, sw, pt, pl, oh, ow = _pool_geometry("MaxPool", (h, wd), kernel_shape, strides, pads)
    from tvm.script.ir_builder import tirx as T

    chunks = _chunks(wd, vec)
    with _pool_rows(n, c, h, wd, oh, ow) as (ib, X, Y, i, ch, y):
        rows = [tirx.max(tirx.min(y * sh + r - pt, h - 1), 0) for r in range(kh)]
        vmax = []
        for s, t in chunks:
            m = None
            for r in rows:
                v = X[i, ch, r, _ramp(s, t)]
                m = v if m is None else tirx.max(m, v)
            vmax.append(m)
        for x0, t, m in _pool_columns(vmax, chunks, wd, ow, kw, sw, pl, vec):
            T.buffer_store(Y, m, [i, ch, y, _ramp(x0, t)])
    return ib.get(), [n, c, oh, ow]


def float_avgpool2d_primfunc(x_shape, kernel_shape, strides, pads, count_include_pad: bool = False, vec: int = 16):
    """Float32 NCHW average pooling (dilation 1, floor mode), the max pool's loop structure: one task per
    (image, channel), row by row; the window's input rows are summed as whole vectors along the row (a row
    in the padding adds zeros: a select only where some output row's window reaches it), each output
    vector then gathers its strided columns from those sums with lane shuffles (0 for padded columns)
    and is divided by the window size (``count_include_pad``) or by the number of real input pixels in
    its window (rows from the output row, columns a per-lane constant). For the 2×2/2 pools on the
    downsample paths of Bi-Real / ReActNet, replacing TVM's legalized ``avg_pool2d``.

    Pads must be smaller than the window (as ONNX Runtime). Returns ``(primfunc, output_shape)``."""
    n, c, h, wd = [int(v) for v in x_shape]
    kh, kw, sh, sw, pt, pl, oh, ow = _pool_geometry("AveragePool", (h, wd), kernel_shape, strides, pads)
    from tvm.script.ir_builder import tirx as T

    chunks = _chunks(wd, vec)
    zero = tirx.const(0.0, F32)
    with _pool_rows(n, c, h, wd, oh, ow) as (ib, X, Y, i, ch, y):
        top = y * sh - pt
        vsum = []
        for s, t in chunks:
            acc = None
            for r in range(kh):
                ry = top + r
                v = X[i, ch, tirx.max(tirx.min(ry, h - 1), 0), _ramp(s, t)]
                if r - pt < 0 or (oh - 1) * sh + r - pt > h - 1:  # some window reaches the padding
                    v = tirx.if_then_else(tirx.all(ry >= 0, ry < h), v, _bcast(zero, t))
                acc = v if acc is None else acc + v
            vsum.append(acc)
        if count_include_pad:
            rows = None
        else:
            rows = tirx.Cast(F32, tirx.min(top + kh, h) - tirx.max(top, 0))
        for x0, t, m in _pool_columns(vsum, chunks, wd, ow, kw, sw, pl, vec, kind="sum"):
            if count_include_pad:
                div = _bcast(tirx.const(float(kh * kw), F32), t)
            else:
                left = _ramp(x0 * sw - pl, t) if t == 1 else tirx.Ramp(x0 * sw - pl, sw, t)
                cols = tirx.min(left + _bcast(kw, t), _bcast(wd, t)) - tirx.max(left, _bcast(0, t))
                div = _bcast(rows, t) * tirx.Cast(F32 if t == 1 else f"{F32}x{t}", cols)
            T.buffer_store(Y, m / div, [i, ch, y, _ramp(x0, t)])
    return ib.get(), [n, c, oh, ow]
