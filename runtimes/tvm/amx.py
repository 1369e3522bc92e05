"""AMX-INT8 ``BinaryConv2dPacked`` for x86 CPUs with Intel AMX (Sapphire Rapids and later).

With ±1 values (bit 1 → +1, bit 0 → −1) the int32 sums of ``TDPBSSD`` are exact:
``Σ a·w = Kbits − 2·popcount(x XOR w)`` with ``Kbits = KH·KW·32·Cw``, so the op's
``D = E[o, RowClass[y], ColClass[x]] − 2·pc`` is ``dot + (E − Kbits)`` with ``dot`` the int8 GEMM of the
unpacked input and weights. One TDPBSSD is a 16×16×64 int8 product (1024 MACs per cycle), three times the
xor+popcnt+add bound of 512-bit VPOPCNTDQ.

The kernel (:func:`binary_conv2d_amx_primfunc`) is written directly in TIR (TVMScript) and takes the same
arguments and gives the same results, bit for bit, as :func:`kernels.binary_conv2d_packed_primfunc`, except
that ``W`` is the AMX weight layout made once at compile time by :func:`amx_conv_weights`:

* **Unpack** (parallel over rows): the packed input becomes a zero-copy im2col image of int8 ±1, one plane
  per stride phase (plane ``(a, b)`` holds padded rows ``a, a+sh, …`` and columns ``b, b+sw, …``), each
  row ``RL = ceil(Wp / sw)`` positions of ``CB = 32·Cw`` rounded up to 64 bytes. Padding positions are −1
  (a zero word, as in the reference); bytes past ``32·Cw`` are don't-care (their weights are 0). A 64-bit
  word of input bits becomes 64 bytes with one mask move (``kmovq``) and a masked byte blend.
* **GEMM**: "virtual" output pixels ``v = y·RL + x`` (x < RL; columns x ≥ OW are computed and dropped).
  Tap (i, j) of pixel v reads plane ``((i·dh) % sh, (j·dw) % sw)`` at position
  ``v + ((i·dh) // sh)·RL + (j·dw) // sw``: 16 consecutive pixels are one A tile with row stride CB,
  whatever the stride or dilation. Register blocking 2 A tiles (32 pixels) × 2 B tiles (32 channels)
  = 4 accumulator tiles; per parallel task a block of pixels × a group of output channels, channel pairs
  outer, pixel pairs inner (the B tiles of a channel pair stay in L1/L2 across the pixel pairs). Tasks are
  ordered channel group outer, pixel block inner, so the runtime's contiguous split over threads gives each
  thread whole channel groups: its share of the weights, and its share of the partial last pixel blocks.
* **Epilogue** in the same task, on the task's int32 block while it is in L1: ``bits``:
  ``int64(P0)·D ≥ int64(P1)`` on 32 channels at once (compare into a mask, ``kmovd`` gives the packed
  word).
* **Float output** (:func:`binary_conv2d_amx_chain_primfunc`, NCHW): the GEMM is transposed (output
  channels in the tile rows, pixels in the columns), so the epilogue ``float32(D)·P0 + P1`` (the product
  rounded once to float32 by a ``vmulps`` with embedded rounding, which LLVM cannot contract into an FMA: the
  same value as the float64 product of ``kernels.py`` rounded to float32) runs on 16-pixel vectors (masked per output row), and can go on with the element-wise chain that follows
  the conv in the graph (residual Add, bias, PReLU, Clip, …) and the next ``PackSign``: the graph
  translator (``graph.py``) emits conv + chain + pack as one kernel, writing the float value only when
  something else reads it.

The tile configuration is per thread: each parallel task loads it (``ldtilecfg``) and releases the tiles.

**Popcount engines** (x86 with AVX-512 VPOPCNTDQ, no AMX needed; :func:`pop_engine` picks them): the same two
kernels, word planes of the packed input instead of int8 images, and AVX-512 register tiles of
``dot = Kbits − 2·popcount(x XOR w)`` instead of AMX tiles (:func:`_popcount_macros`): ``pop_channels`` (32
output channels in the lanes, up to 8 pixels of a row per tile; any stride; weights
``kernels.block_conv_weights``) for the bits and the float output. The int32 block and the epilogues are the
AMX kernels' (the float epilogue per output row, the [pixel][channel] block transposed 16×16 in registers).

Linux keeps the AMX tile state disabled until the process asks for it (``arch_prctl(ARCH_REQ_XCOMP_PERM,
XFEATURE_XTILEDATA)``); without it the first tile instruction raises SIGILL. :func:`enabled` makes that
request once and is the gate for every use (kernel selection, model load). ``BNNC_TVM_AMX=0`` in the
environment disables AMX (the popcount schedules are used instead).
"""

from __future__ import annotations

import ctypes
import os
import platform

import numpy as np

from bnnc.ops import WORD_BITS as WORD
from bnnc.ops.deploy import num_words

__all__ = [
    "AMX_MCPUS",
    "amx_conv_weights",
    "amx_bits_table",
    "pop_bits_table",
    "amx_e_table",
    "pop_engine",
    "POP_ENGINES",
    "binary_conv2d_amx_primfunc",
    "check_can_run",
    "enabled",
    "request_permission",
    "target_has_amx",
    "use_amx",
]

# LLVM CPU names with AMX-INT8 (Intel server cores from Sapphire Rapids on).
AMX_MCPUS = frozenset({"sapphirerapids", "emeraldrapids", "graniterapids", "graniterapids-d", "diamondrapids"})

_SYS_ARCH_PRCTL = 158
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18

_STATE: dict = {}

_TILE = 16        # rows (pixels) / columns (channels) of a tile
_TILE_BYTES = 1024


def _cpu_has_amx() -> bool:
    from .target import cpu_info

    flags, _ = cpu_info()
    return {"amx_tile", "amx_int8"} <= flags


def request_permission() -> bool:
    """Ask Linux (once per process) for the AMX tile state; True when granted. False on CPUs without
    AMX-INT8, other operating systems, or kernels that refuse (older than 5.16)."""
    if "ok" not in _STATE:
        ok = False
        if platform.system() == "Linux" and platform.machine().lower() in ("x86_64", "amd64") and _cpu_has_amx():
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.syscall.restype = ctypes.c_long
                ok = libc.syscall(ctypes.c_long(_SYS_ARCH_PRCTL), ctypes.c_long(_ARCH_REQ_XCOMP_PERM),
                                  ctypes.c_long(_XFEATURE_XTILEDATA)) == 0
            except (OSError, AttributeError):
                ok = False
        _STATE["ok"] = ok
    return _STATE["ok"]


def disabled_by_env() -> bool:
    return os.environ.get("BNNC_TVM_AMX", "1").strip().lower() in ("0", "false", "no", "off")


def enabled() -> bool:
    """Whether AMX kernels may be selected in this process: not disabled by ``BNNC_TVM_AMX=0``, an x86-64
    Linux CPU with AMX-INT8, and the tile state granted (:func:`request_permission`)."""
    return not disabled_by_env() and request_permission()


def check_can_run(target, path="this model") -> None:
    """Before a compiled model runs: request the tile state; raise if the model was compiled for an AMX
    CPU (it may contain AMX kernels) and this process cannot execute tile instructions (it would die of
    SIGILL)."""
    granted = request_permission()
    if target is not None and not granted and target_has_amx(target):
        raise RuntimeError(f"cannot run {path} here: it was compiled for an AMX CPU "
                           f"({target.get('mcpu') if isinstance(target, dict) else target}) and this "
                           f"machine/OS does not grant the AMX tile state; recompile it here")


def amx_bits_table(e: np.ndarray, p0: np.ndarray, p1: np.ndarray, w_shape, wbits: bool | None = None) -> np.ndarray:
    """The table of the bits-output kernel (:func:`binary_conv2d_amx_primfunc`, ``e_table``), made at compile
    time from constant E ``[O, R, C]``, P0 and P1 (int32 ``[O]``) — what the kernel otherwise tabulates on each
    call: int32 ``[R·C + 1, Opad]``, rows ``r·C + c`` the per-channel thresholds ``clamp(ceil(P1/|P0|) −
    sign(P0)·(E[o, r, c] − Kbits))`` (P0 = 0: P1) of ``sign(P0)·dot >= thr`` (exact in int64, clamped into
    int32: |dot| <= Kbits, so clamping never changes a decision), the last row ``sign(P0)``; padded channels:
    sign 0, threshold 1 (bit 0). ``wbits``: as for :func:`amx_e_table` (False for the popcount engines)."""
    e = np.asarray(e)
    o, kh, kw, cw = [int(s) for s in w_shape]
    if e.ndim != 3 or e.shape[0] != o:
        raise ValueError(f"amx_bits_table: E must be [O={o}, R, C], got {list(e.shape)}")
    p0 = np.asarray(p0, np.int64).reshape(-1)
    p1 = np.asarray(p1, np.int64).reshape(-1)
    if p0.shape != (o,) or p1.shape != (o,):
        raise ValueError(f"amx_bits_table: P0 and P1 must have {o} elements")
    kbits = _table_kbits(w_shape, wbits)
    opad = _round_up(o, 2 * _TILE)
    nrc = e.shape[1] * e.shape[2]
    sg = np.zeros(opad, np.int64)
    tq = np.ones(opad, np.int64)
    sg[:o] = np.sign(p0)
    ap = np.abs(p0)
    tq[:o] = np.where(p0 != 0, -((-p1) // np.maximum(ap, 1)), p1)  # ceil(P1 / |P0|)
    ekv = np.zeros((nrc, opad), np.int64)
    ekv[:, :o] = e.reshape(o, nrc).T.astype(np.int64) - kbits
    t = np.empty((nrc + 1, opad), np.int64)
    t[:nrc] = np.clip(tq[None, :] - sg[None, :] * ekv, -(2**31) + 1, 2**31 - 1)
    t[nrc] = sg
    return t.astype(np.int32)


def pop_bits_table(e: np.ndarray, p0: np.ndarray, p1: np.ndarray, w_shape) -> np.ndarray:
    """The bits-output table of the popcount engine (``pop_channels`` with ``e_table``), made at compile time:
    :func:`amx_bits_table`'s decision ``sign(P0)·dot >= thr`` with ``dot = Kbits − 2·pc`` rewritten as one
    compare of the popcount ``pc`` itself, ``(pc <= T) XOR neg``, so the engine decides the bits in its register
    tile: int32 ``[R·C + 1, Opad]``, rows ``r·C + c`` the thresholds T (sign 1: ``floor((Kbits − thr)/2)``; sign
    −1: ``ceil((thr + Kbits)/2) − 1``, complemented; sign 0: the constant ``0 >= thr`` as T = INT32_MAX or −1),
    the last row ``neg`` (1 where the compare is complemented); padded channels T = −1 (bit 0)."""
    t = amx_bits_table(e, p0, p1, w_shape, wbits=False).astype(np.int64)
    kbits = _table_kbits(w_shape, False)
    thr, sg = t[:-1], t[-1]
    pos = kbits - thr  # sign 1: pc <= floor(pos / 2)
    neg = thr + kbits  # sign -1: pc >= ceil(neg / 2), the complement of pc <= ceil(neg / 2) - 1
    const = np.where(thr <= 0, 2**31 - 1, -1)  # sign 0: 0 >= thr for every pc
    out = np.empty_like(t)
    out[:-1] = np.where(sg > 0, np.floor_divide(pos, 2), np.where(sg < 0, -np.floor_divide(-neg, 2) - 1, const))
    out[-1] = (sg < 0).astype(np.int64)
    return np.clip(out, -(2**31), 2**31 - 1).astype(np.int32)


def _x86_mcpu(target) -> str:
    """The ``mcpu`` of ``target`` (None/"cpu" = host, a dict or a ``tvm.target.Target``) when it is an x86 LLVM
    target, else ""."""
    from .target import resolve_target, target_family

    if isinstance(target, str) and target not in ("cpu", "host"):
        return ""  # a family name ("x86") or another target names no CPU model
    try:
        if target_family(target) != "x86":
            return ""
        t = resolve_target(target)
    except ValueError:
        return ""
    if isinstance(t, dict):
        return str(t.get("mcpu", ""))
    return str(t.attrs["mcpu"]) if "mcpu" in t.attrs else ""


def target_has_amx(target) -> bool:
    """Whether ``target`` (None/"cpu" = host, a dict or a ``tvm.target.Target``) is an x86 LLVM target whose
    ``mcpu`` has AMX-INT8."""
    return _x86_mcpu(target) in AMX_MCPUS


# LLVM CPU names with AVX-512 VPOPCNTDQ and BW (Intel from Ice Lake, AMD from Zen 4): the popcount engines
POPCNT512_MCPUS = frozenset({"icelake-client", "icelake-server", "tigerlake", "rocketlake", "sapphirerapids",
                             "emeraldrapids", "graniterapids", "graniterapids-d", "diamondrapids", "znver4",
                             "znver5"})


def target_has_popcnt512(target) -> bool:
    """Whether ``target`` is an x86 LLVM target whose ``mcpu`` has AVX-512 VPOPCNTDQ and BW."""
    return _x86_mcpu(target) in POPCNT512_MCPUS


# output planes below this many positions: the popcount engine for a fused chain (larger: the TE kernels)
POP_CHAIN_MAX_POSITIONS = 400
# stride-1 planes below this many positions keep the TE kernel for a fused chain (7x7: 0.110 vs 0.115 ms)
POP_CHAIN_MIN_POSITIONS_STRIDE1 = 64


def pop_engine(x_shape, w_shape, *, strides, pads, dilations, target=None, use: str = "bits",
               in_channels: int | None = None) -> str | None:
    """The popcount engine (:data:`POP_ENGINES`) a conv of these shapes takes on ``target`` for ``use``
    (``"bits"``: bits output; ``"float"``: float output alone; ``"chain"``: float output with a fused chain and
    PackSign), or None for the TE kernels (``kernels.py``). Only on x86 targets with AVX-512 VPOPCNTDQ
    (:func:`target_has_popcnt512`), for at least 32 output channels (a tile's 32 lanes) and inputs the TE
    kernels do not pack several taps to a word (``in_channels`` <= 16); ``BNNC_TVM_POP=0`` in the environment
    turns the engines off.

    Measured on one Zen 4 core (kernels alone, interleaved, ms, TE → engine): bits output, channels in the
    lanes everywhere: 56²×64 0.187 → 0.119, 28²×128 0.161 → 0.124, 14²×256 0.121 → 0.104, 7²×512 0.139 →
    0.102, stride 2 56²→28² 0.100 → 0.065, 28²→14² 0.078 → 0.056, 14²→7² 0.077 → 0.054 (the TE kernels'
    bit-packing epilogues ran 20–30 % of their time); float output alone, channels in the lanes: 14²×256 0.139
    → 0.112, 7²×512 0.118 → 0.109, 28²→14² 0.074 → 0.064, 14²→7² 0.077 → 0.061, and with its block transposed
    in registers on every plane (the retired pixels-in-the-lanes engine, 8 channels × 48 pixels per tile, had
    taken planes >= 400 positions; engine A/B in one process, min of 31 rounds: 56²×64 0.1488 → 0.1427, 28²×128
    0.126 → 0.117, stride-2 56²→28² 0.0756 → 0.0731; 2 threads 0.078 → 0.079, 0.074 → 0.067, 0.048 → 0.045);
    conv + residual Add + PackSign: channels in the lanes on planes below 400 positions (14²×256
    0.129 → 0.119, 28²→14² 0.076 → 0.071, 14²→7² 0.076 → 0.067) but for stride-1 7²×512 (0.110 → 0.115:
    the TE kernel stays), the TE kernels on larger planes (pixels in the lanes 56²×64 even, 28²×128 0.135 →
    0.143: the float residual stream, not the popcounts, sets the time there)."""
    if use not in ("bits", "float", "chain"):
        raise ValueError(f"pop_engine: use must be 'bits', 'float' or 'chain', got {use!r}")
    if os.environ.get("BNNC_TVM_POP", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if not target_has_popcnt512(target):
        return None
    from .kernels import _tap_field_bits, conv_geometry

    _, h, w, cw = [int(s) for s in x_shape]
    o, kh, kw, _ = [int(s) for s in w_shape]
    (sh, sw), _p, _d, (oh, ow) = conv_geometry(h, w, kh, kw, strides, pads, dilations)
    if oh < 1 or ow < 1 or o < 32 or _tap_field_bits(cw, in_channels) is not None:
        return None
    if use in ("bits", "float"):
        return "pop_channels"
    npos = oh * ow  # use == "chain"
    if npos < POP_CHAIN_MAX_POSITIONS and not ((sh, sw) == (1, 1) and npos < POP_CHAIN_MIN_POSITIONS_STRIDE1):
        return "pop_channels"
    return None


def _round_up(a: int, m: int) -> int:
    return -(-a // m) * m


MIN_INPUT_POSITIONS = 100  # smaller input planes stay on the popcount kernels (see use_amx)


def use_amx(x_shape, w_shape, *, strides, pads, dilations, target=None) -> bool:
    """The selection rule, measured on one Sapphire Rapids core (``bench/amx_layers.py``, bits output):
    AMX for k×k convs (k > 1) with at least 64 input and 32 output channels on an AMX target in a process
    where :func:`enabled` holds (1.4–2.7× the popcount kernels on the ResNet-18 3×3 layers), except small
    input planes (< 100 positions): there the per-image unpack and tile set-up outweigh the GEMM (IR-Net
    ResNet-20, batch 128, whole network: 35.9 ms with AMX on its 8×8×64 layers vs 33.1 ms without), and at
    7²×512, whose int8 weights do not fit in L2, the bit-weight kernels (:func:`weight_bits`: 0.107 ms vs
    0.134 ms popcount, bits out, kernel alone) lose once packing and the epilogue are included: layer chain
    float out 0.155 vs 0.136 ms, bits out 0.143 vs 0.145 ms (``bnnc bench --layers``, interleaved). The
    bit-weight path stays available (``MIN_INPUT_POSITIONS = 0``) and tested."""
    if not (target_has_amx(target) and enabled()):
        return False
    _, h, w, cw = [int(s) for s in x_shape]
    o, kh, kw, _ = [int(s) for s in w_shape]
    if kh * kw == 1 or cw < 2 or o < 32 or h * w < MIN_INPUT_POSITIONS:
        return False
    from .kernels import conv_geometry

    oh, ow = conv_geometry(h, w, kh, kw, strides, pads, dilations)[3]
    return oh >= 1 and ow >= 1


# int8 weights above this size (bytes) are kept as bits and expanded tile by tile (see weight_bits)
BIT_WEIGHT_MIN_BYTES = 2 * 1024 * 1024


def int8_weight_bytes(w_shape) -> int:
    """Bytes of the int8 AMX tiles of packed weights of shape ``[O, KH, KW, Cw]``."""
    o, kh, kw, cw = [int(s) for s in w_shape]
    return _round_up(o, 2 * _TILE) * kh * kw * _round_up(WORD * cw, 64)


def weight_bits(w_shape) -> bool:
    """Whether the AMX kernels keep the weights of this shape as bits (``uint64`` tile rows, 8× smaller)
    and expand each ±1 int8 tile into an L1 buffer right before its use, with 1 weight tile × 4 pixel tiles
    per step (each expanded tile used 4 times): when the int8 tiles exceed :data:`BIT_WEIGHT_MIN_BYTES`
    (2 MiB, the L2 of a core), where they would stream from L3. Measured (``bench/amx_layers.py``, one
    Sapphire Rapids core shared with other work, ms, int8 → bit weights): 7²×512 (2.36 MB int8 → 295 KB)
    bits output 0.139 → 0.107, float 0.189 → 0.140; 14²→7² 256→512 (1.18 MB, fits L2) 0.069 → 0.076 and
    0.095 → 0.100: int8 stays there. Depends on the weight shape only, so that :func:`amx_conv_weights`
    and the kernels agree without other information."""
    return int8_weight_bytes(w_shape) > BIT_WEIGHT_MIN_BYTES


def amx_conv_weights(w: np.ndarray, output: str = "bits", bits: bool | None = None) -> np.ndarray:
    """Packed weights ``[O, KH, KW, Cw]`` (uint32) → the weights of the AMX kernel of that ``output``.

    ``Opad`` is O rounded up to 32 (zero filters appended), ``nkc = ceil(32·Cw / 64)`` chunks of 64 input
    bits per tap; bytes past 32·Cw are 0.

    * ``output="bits"`` (pixels in tile rows): B tiles ``[Opad/16, KH·KW, nkc, 16, 16, 4]``; tile (ob, tap,
      q) row r, column n, byte k holds weight bit ``q·64 + 4r + k`` of output channel ``16·ob + n`` as ±1
      (the VNNI layout of a TDPBSSD B operand).
    * ``output="float"`` (channels in tile rows, the float / fused-chain kernel): A tiles
      ``[Opad/16, KH·KW, nkc, 16, 64]``; tile (ob, tap, q) row n, byte j holds weight bit ``q·64 + j`` of
      output channel ``16·ob + n`` as ±1.

    ``bits`` (default :func:`weight_bits` of the shape): the ``"bits"`` (VNNI B) tiles, for either output
    (with bit weights both kernels run pixels in the tile rows), as bit masks: ``uint64``
    ``[Opad/16, KH·KW, nkc, 16]``, one per tile row (bit ``i`` = byte ``i`` of the row is +1, else −1).
    Missing bits (padded filters, input bits past 32·Cw) are −1 there, not 0: the input bytes past 32·Cw
    are always −1 too, so they add the constant ``KH·KW·(64·nkc − 32·Cw)`` to every dot product, which
    the kernels subtract."""
    if output not in ("bits", "float"):
        raise ValueError(f"amx_conv_weights: output must be 'bits' or 'float', got {output!r}")
    w = np.asarray(w)
    if w.ndim != 4:
        raise ValueError(f"amx_conv_weights: expected W of shape [O, KH, KW, Cw], got {w.shape}")
    w = w.astype(np.uint32)
    o, kh, kw, cw = w.shape
    if bits is None:
        bits = weight_bits(w.shape)
    opad = _round_up(o, 2 * _TILE)
    cb = _round_up(WORD * cw, 64)
    wb = np.unpackbits(w.astype("<u4").view(np.uint8).reshape(o, kh * kw, cw * 4), axis=-1, bitorder="little")
    nkc = cb // 64
    if bits:
        vb = np.zeros((opad, kh * kw, cb), np.uint8)
        vb[:o, :, : WORD * cw] = wb
        # both outputs: the VNNI B tiles (row r = quad r of 16 channels): [ob, n, taps, nkc, r, k] →
        # [ob, taps, nkc, r, n, k]
        t = vb.reshape(opad // _TILE, _TILE, kh * kw, nkc, _TILE, 4).transpose(0, 2, 3, 4, 1, 5)
        t = np.packbits(np.ascontiguousarray(t).reshape(-1, 64), axis=-1, bitorder="little")
        return np.ascontiguousarray(t.view("<u8").astype(np.uint64).reshape(opad // _TILE, kh * kw, nkc, _TILE))
    vals = np.zeros((opad, kh * kw, cb), np.int8)
    vals[:o, :, : WORD * cw] = np.where(wb.astype(bool), 1, -1).astype(np.int8)
    if output == "float":
        # [opad, taps, nkc, 64] → [ob, n, taps, nkc, j] → [ob, taps, nkc, n, j]
        t = vals.reshape(opad // _TILE, _TILE, kh * kw, nkc, 64).transpose(0, 2, 3, 1, 4)
        return np.ascontiguousarray(t)
    # [opad, taps, nkc, 16 r, 4 k] → [ob, n, taps, nkc, r, k] → [ob, taps, nkc, r, n, k]
    t = vals.reshape(opad // _TILE, _TILE, kh * kw, nkc, _TILE, 4).transpose(0, 2, 3, 4, 1, 5)
    return np.ascontiguousarray(t)


def _table_kbits(w_shape, wbits: bool | None) -> int:
    """Kbits of the compile-time tables: the dot's length, ``KH·KW·64·nkc`` with bit weights (``wbits``, default
    :func:`weight_bits` of ``w_shape``), else ``KH·KW·32·Cw``."""
    o, kh, kw, cw = [int(s) for s in w_shape]
    wbits = weight_bits(w_shape) if wbits is None else bool(wbits)
    return kh * kw * (_round_up(WORD * cw, 64) if wbits else WORD * cw)


def amx_e_table(e: np.ndarray, w_shape, wbits: bool | None = None) -> np.ndarray:
    """The border table of the float-output AMX kernel, ``E`` ``[O, R, C]`` (int32, C <= 16) → int32
    ``[R, Opad, 16]`` with ``T[r, c, j] = E[c, r, j] − Kbits`` (0 for padded channels and columns j >= C):
    the ``e_table`` argument of :func:`binary_conv2d_amx_chain_primfunc`, made once at compile time.
    ``Kbits = KH·KW·64·nkc`` with bit weights (:func:`weight_bits` of ``w_shape``: the input bytes past 32·Cw
    count, both −1 there), else ``KH·KW·32·Cw``. ``wbits``: the weight form of the kernel the table is for
    (default :func:`weight_bits` of ``w_shape``; False for the popcount engine)."""
    e = np.asarray(e)
    o, kh, kw, cw = [int(s) for s in w_shape]
    if e.ndim != 3 or e.shape[0] != o or e.shape[2] > _TILE:
        raise ValueError(f"amx_e_table: E must be [O={o}, R, C <= {_TILE}], got {list(e.shape)}")
    nr, nc = e.shape[1], e.shape[2]
    kbits = _table_kbits(w_shape, wbits)
    t = np.zeros((nr, _round_up(o, 2 * _TILE), _TILE), np.int64)
    t[:, :o, :nc] = e.astype(np.int64).transpose(1, 0, 2) - kbits
    if t.min() < -(2**31) or t.max() >= 2**31:
        raise ValueError("amx_e_table: E - Kbits does not fit int32")
    return t.astype(np.int32)


ACC_BYTES = 16 * 1024  # int32 block of a task (mb pixels x og channels), bits output
# float output: the epilogue writes og rows of mb floats (NCHW) per task; longer rows, fewer tasks (measured
# with bench/amx_layers.py-style sweeps: 56²×64 0.182 → 0.159 ms, 28²×128 0.130 → 0.120, 28²→14² s2 0.086 →
# 0.077; the bits kernel gains nothing)
ACC_BYTES_FLOAT = 32 * 1024
ACC_BYTES_FLOAT_LARGE = 48 * 1024  # planes of >= 2048 positions
# float output with int8 weights: larger int32 blocks run the epilogue per 32 × 32 register block (see
# binary_conv2d_amx_chain_primfunc, block_epilogue)
ACC_L1_BYTES = 32 * 1024


def _geometry(x_shape, w_shape, strides, pads, dilations, *, mb=None, og=None, wbits=False, float_out=False,
              quant=None):
    from .kernels import conv_geometry

    n, h, w, cw = [int(s) for s in x_shape]
    o, kh, kw, _ = [int(s) for s in w_shape]
    (sh, sw), (pt, pl, _, pr), (dh, dw), (oh, ow) = conv_geometry(h, w, kh, kw, strides, pads, dilations)
    if oh < 1 or ow < 1:
        raise ValueError(f"BinaryConv2dPacked: empty output {oh}x{ow}")
    wp = w + pl + pr
    g = dict(n=n, h=h, w=w, cw=cw, o=o, kh=kh, kw=kw, sh=sh, sw=sw, pt=pt, pl=pl, dh=dh, dw=dw, oh=oh, ow=ow)
    g["rl"] = rl = -(-wp // sw)
    g["nph"] = sh * sw
    g["cb"] = cb = _round_up(WORD * cw, 64)
    g["nkc"] = cb // 64
    g["opad"] = opad = _round_up(o, 2 * _TILE)
    g["taps"] = kh * kw
    nv = oh * rl  # virtual pixels of one image
    # output-channel group per task: all channels unless the plane is small and the layer wide
    if og is None:
        og = opad
        while og > 64 and og % 2 == 0 and (og // 2) % 32 == 0 and nv * og * 4 > 64 * 1024:
            og //= 2
    if quant is None:  # pixels per register block: 1 x 4 tiles with bit weights, else 2 x 2
        quant = 64 if wbits else 32
    if mb is None:
        # pixels per task: the int32 block (mb x og) in about ACC_BYTES(_FLOAT), at least 64 pixels (measured)
        acc = ACC_BYTES if not float_out else ACC_BYTES_FLOAT_LARGE if nv >= 2048 else ACC_BYTES_FLOAT
        mb = max(quant * -(-64 // quant), (acc // (4 * og)) // quant * quant)
        mb = min(mb, _round_up(nv, quant))
    if mb % quant or og % 32 or opad % og:
        raise ValueError(f"AMX BinaryConv2dPacked: mb={mb} must be a multiple of {quant} and og={og} a "
                         f"multiple of 32 dividing {opad}")
    g["og"], g["mb"] = og, mb
    g["wbits"] = wbits
    # dot products include +1 per input byte past 32·Cw with bit weights (both −1 there)
    g["kpad"] = kh * kw * (g["cb"] - WORD * cw) if wbits else 0
    g["npb"] = npb = -(-nv // mb)
    g["ncg"] = opad // og
    maxoff = (((kh - 1) * dh) // sh) * rl + ((kw - 1) * dw) // sw
    g["lrows"] = lrows = -(-(npb * mb + maxoff) // rl)  # rows of each phase plane
    g["lpos"] = lrows * rl
    return g


def _plane_source(row, c, g, h, w):
    """Where position ``c`` of phase-plane row ``row`` (image i, phase ph, plane row pr) reads the packed input:
    padded row pr·sh + ph // sw, column c·sw + ph % sw. Returns ``(i, ph, inside, pixel)``, ``pixel`` clamped
    into the image (its value is used only ``inside``)."""
    from tvm import tirx

    nph, lrows, sh, sw, pt, pl = (g[k] for k in ("nph", "lrows", "sh", "sw", "pt", "pl"))
    i = row // (nph * lrows)
    ph = row // lrows % nph
    yy = row % lrows * sh + ph // sw - pt
    xx = c * sw + ph % sw - pl
    inside = tirx.And(tirx.And(yy >= 0, yy < h), tirx.And(xx >= 0, xx < w))
    pix = (i * h + tirx.max(tirx.min(yy, h - 1), 0)) * w + tirx.max(tirx.min(xx, w - 1), 0)
    return i, ph, inside, pix


def _amx_macros(g, h, w, cw):
    """TVMScript fragments both AMX kernels use, closed over the geometry ``g`` of :func:`_geometry`:

    * ``tile_config(cfg)``: palette 1, eight 16 × 64-byte tiles, loaded (``cfg``: 64 bytes, 64-aligned);
    * ``zero_tiles()``: the accumulator tiles tmm0-3 set to 0;
    * ``store_2x2(acc, cbase, rs)``: the accumulators of a 2 × 2 register block into ``acc`` (rows of ``rs``
      int32 from ``cbase``): tmm0 at (0, 0), tmm1 16 rows down, tmm2 16 columns right, tmm3 both;
    * ``unpack_rows(img, Xf, X64)``: the packed input (``Xf`` its uint32 words, ``X64`` the same memory as
      uint64) as one row of CB bytes (±1) per position of each phase plane: pixels in the A tile rows;
    * ``gemm_bitweights(img, Wq, acc, ti, tg, tp)``: the int32 block ``acc[pixel][channel]`` of task (image
      ``ti``, channel group ``tg``, pixel block ``tp``) from bit weights ``Wq`` (1 weight tile × 4 pixel tiles
      per step; the weight tiles expanded from their bit masks into two L1 slots of one tap each: the next
      tap's tiles are written while this tap's are used — a tile load right after the stores to its memory
      would wait for them to commit)."""
    from tvm.script import tirx as T

    n, nph, lrows, rl, nkc, cb = (g[k] for k in ("n", "nph", "lrows", "rl", "nkc", "cb"))
    sh, sw, dh, dw, kw = (g[k] for k in ("sh", "sw", "dh", "dw", "kw"))
    taps, og, mb, lpos = g["taps"], g["og"], g["mb"], g["lpos"]
    nrows = n * nph * lrows
    x64 = cw % 2 == 0
    cw64 = max(1, cw // 2)
    i8 = "int8x64"

    @T.macro
    def tile_config(cfg):
        for k in range(64):
            cfg[k] = T.uint8(0)
        cfg[0] = T.uint8(1)
        for k in range(8):
            cfg[16 + 2 * k] = T.uint8(64)
            cfg[48 + k] = T.uint8(16)
        T.call_llvm_intrin("void", "llvm.x86.ldtilecfg", T.address_of(cfg[0]))

    @T.macro
    def zero_tiles():  # the four accumulator tiles tmm0-3 (unrolled: tile ids are immediates)
        for k in T.unroll(4):
            T.call_llvm_intrin("void", "llvm.x86.tilezero", T.Cast("int8", k))

    @T.macro
    def store_2x2(acc, cbase, rs):
        for k in T.unroll(4):
            T.call_llvm_intrin("void", "llvm.x86.tilestored64", T.Cast("int8", k),
                               acc.access_ptr("w", offset=cbase + (k % 2) * 16 * rs + (k // 2) * 16, extent=16 * rs),
                               T.int64(rs * 4))

    @T.macro
    def unpack_rows(img, Xf, X64):
        for row in T.parallel(nrows):
            for c in range(rl):
                for q in range(nkc):
                    _i, _ph, inside, pix = T.meta_var(_plane_source(row, c, g, h, w))
                    if x64:
                        m = T.meta_var(T.if_then_else(inside, X64[pix * cw64 + q], T.uint64(0)))
                    else:
                        m = T.meta_var(T.if_then_else(
                            inside,
                            T.Cast("uint64", Xf[pix * cw + 2 * q])
                            | T.shift_left(T.Cast("uint64", T.if_then_else(2 * q + 1 < cw,
                                                                           Xf[pix * cw + T.min(2 * q + 1, cw - 1)],
                                                                           T.uint32(0))), T.uint64(32)),
                            T.uint64(0)))
                    img[T.Ramp((row * rl + c) * cb + q * 64, 1, 64)] = (
                        T.reinterpret("uint1x64", m).astype(i8) * T.Broadcast(T.int8(2), 64)
                        - T.Broadcast(T.int8(1), 64))

    @T.macro
    def gemm_bitweights(img, Wq, acc, ti, tg, tp):
        wexp = T.alloc_buffer((2 * nkc * _TILE_BYTES,), "int8", align=64)
        for q in range(nkc):
            for r in T.unroll(_TILE):
                wexp[T.Ramp(((0) * nkc + q) * _TILE_BYTES + r * 64, 1, 64)] = (
                    T.reinterpret("uint1x64", Wq[(((tg * og) // _TILE + 0) * taps * nkc + (0) * nkc + q) * _TILE + r])
                    .astype(i8) * T.Broadcast(T.int8(2), 64) - T.Broadcast(T.int8(1), 64))
        for cp in range(og // _TILE):
            for pp in range(mb // 64):
                zero_tiles()
                for t in range(taps):
                    for q in range(nkc):
                        gk = T.meta_var((cp * (mb // 64) + pp) * taps + t)  # tap blocks so far: slot gk % 2
                        # the next tap block: tap t + 1, or tap 0 of the next pixel block or channel tile
                        ncp = T.meta_var(T.min(cp + T.if_then_else(T.And(t == taps - 1, pp == mb // 64 - 1), 1, 0),
                                               og // _TILE - 1))
                        for r in T.unroll(_TILE):
                            wexp[T.Ramp((((gk + 1) % 2) * nkc + q) * _TILE_BYTES + r * 64, 1, 64)] = (
                                T.reinterpret("uint1x64", Wq[(((tg * og) // _TILE + ncp) * taps * nkc + ((t + 1) % taps) * nkc + q) * _TILE + r])
                                .astype(i8) * T.Broadcast(T.int8(2), 64) - T.Broadcast(T.int8(1), 64))
                        a = T.meta_var(t // kw)
                        b = T.meta_var(t % kw)
                        wt = T.meta_var(wexp.access_ptr("r", offset=((gk % 2) * nkc + q) * _TILE_BYTES, extent=_TILE_BYTES))
                        abase = T.meta_var(((ti * nph + ((a * dh) % sh) * sw + (b * dw) % sw) * lpos
                                            + tp * mb + pp * 64 + ((a * dh) // sh) * rl
                                            + (b * dw) // sw) * cb + q * 64)
                        T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.int8(4), wt, T.int64(64))
                        # pixel tile k through tmm5/6/7/5 into accumulator k (unrolled: immediate tile ids)
                        for k in T.unroll(4):
                            T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.Cast("int8", 5 + k % 3),
                                               T.address_of(img[abase + k * 16 * cb]), T.int64(cb))
                            T.call_llvm_intrin("void", "llvm.x86.tdpbssd", T.Cast("int8", k),
                                               T.Cast("int8", 5 + k % 3), T.int8(4))
                for k in T.unroll(4):
                    T.call_llvm_intrin("void", "llvm.x86.tilestored64", T.Cast("int8", k),
                                       acc.access_ptr("w", offset=(pp * 64 + k * 16) * og + cp * _TILE,
                                                      extent=16 * og), T.int64(og * 4))

    return tile_config, zero_tiles, store_2x2, unpack_rows, gemm_bitweights


# --------------------------------------------------------------------------------------------------
# The popcount engines: the same kernels (word planes in, int32 block ``dot = Kbits − 2·popcount`` per task,
# the same epilogues) with AVX-512 VPOPCNTDQ register tiles instead of AMX tiles, for x86 CPUs without AMX.

# channels in the lanes ("pop_channels", any stride): up to POP_XT pixels of an output row x 32 channels (2 zmm
# each), block [pixel][channel], weights blocked [O/32, KH, KW, Cw, 32]
POP_XT = 8
POP_ENGINES = ("pop_channels",)


def pop_row_tile(ow: int) -> int:
    """Pixels of a channels-in-lanes register tile: the largest divisor of the output width up to POP_XT."""
    return max(t for t in range(1, min(POP_XT, ow) + 1) if ow % t == 0)


def _pop_geometry(x_shape, w_shape, strides, pads, dilations, *, mb=None, og=None, float_out=False):
    """:func:`_geometry` for the popcount engine: ``mb`` whole output rows (a given ``mb`` rounded up to them).
    (Rows rounded up to 16 pixels as well made 7 tasks of 464 pixels at 56²×64, bits output: 2 threads got 4
    and 3.)"""
    rl = _geometry(x_shape, w_shape, strides, pads, dilations, og=og, float_out=float_out, quant=1)["rl"]
    return _geometry(x_shape, w_shape, strides, pads, dilations, mb=None if mb is None else _round_up(mb, rl),
                     og=og, float_out=float_out, quant=rl)


def _popcount_macros(g, lp, cwq, bits_table=None):
    """TVMScript fragments of the popcount engines, closed over the geometry ``g`` (``lp`` positions per
    word plane, ``cwq`` words per pixel in the planes); ``bits_table`` (``(nc, opad, nwo, sgo)``: column classes,
    padded channels, output words per pixel, offset of the neg row; bits output with
    :func:`pop_bits_table`): ``gemm_channels`` decides the output bits in its register tile instead of writing
    the int32 block:

    * ``word_planes(wpl, Xf)``: the packed input as word planes ``[image, phase, word, position]`` (0 outside
      the image and for words >= Cw), the layout the engine (and the AMX float kernel's unpack) reads;
    * ``gemm_channels(Wb, wpl, acc, aoff, ti, tg, tp, fb)``: ``acc[pixel][channel]`` (mb × og), weights blocked
      ``[O/32, KH, KW, Cw, 32]`` (:func:`kernels.block_conv_weights`); pixels x >= OW are not written; with
      ``bits_table``, ``fb = (table, RowClass, ColClass, Y words)`` and the packed bits go to Y instead."""
    from tvm.script import tirx as T

    n, h, w, cw, o, kh, kw = (g[k] for k in ("n", "h", "w", "cw", "o", "kh", "kw"))
    nph, rl, sh, sw, dh, dw, lrows = (g[k] for k in ("nph", "rl", "sh", "sw", "dh", "dw", "lrows"))
    og, mb, oh, ow, npb, taps = (g[k] for k in ("og", "mb", "oh", "ow", "npb", "taps"))
    kbits = taps * WORD * cw
    L = _TILE
    i32v = f"int32x{L}"
    nrows = n * nph * lrows
    xt = pop_row_tile(ow)
    rows = mb // rl if npb > 1 else oh  # output rows of a task (channels in the lanes)
    fused = bits_table is not None
    fnc, fopad, fnwo, fsgo = bits_table if fused else (1, 1, 1, 0)

    def plane(ti, a, b, wq):  # word plane of tap (a, b), word wq of image ti, shifted by the tap's offset
        return ((((ti * nph + ((a * dh) % sh) * sw + (b * dw) % sw) * cwq + wq) * lp)
                + ((a * dh) // sh) * rl + (b * dw) // sw)

    @T.macro
    def word_planes(wpl, Xf):
        for row in T.parallel(nrows):
            for c in range(rl):
                for wq in range(cwq):
                    i, ph, inside, pix = T.meta_var(_plane_source(row, c, g, h, w))
                    wpl[((i * nph + ph) * cwq + wq) * lp + row % lrows * rl + c] = T.if_then_else(
                        T.And(inside, wq < cw), Xf[pix * cw + T.min(wq, cw - 1)], T.uint32(0))

    @T.macro
    def gemm_channels(Wb, wpl, acc, aoff, ti, tg, tp, fb):
        # per (tap, word): two weight vectors (32 channels), one broadcast input word per pixel
        for cb in range(og // 32):
            for yr in range(rows):
                for xb in range(ow // xt):
                    if tp * rows + yr < oh:
                        v0 = T.meta_var((tp * rows + yr) * rl + xb * xt)
                        racc = T.alloc_buffer((2 * xt * L,), "int32", scope="local")
                        for k in T.unroll(2 * xt):
                            racc[T.Ramp(k * L, 1, L)] = T.Broadcast(T.int32(0), L)
                        for a in range(kh):
                            for b in range(kw):
                                for wq in range(cw):
                                    wbase = T.meta_var(((((tg * og) // 32 + cb) * kh + a) * kw + b) * cw + wq)
                                    for j in T.unroll(xt):
                                        xv = T.meta_var(T.Broadcast(wpl[plane(ti, a, b, wq) + v0 + j], L))
                                        for k in T.unroll(2):
                                            racc[T.Ramp((2 * j + k) * L, 1, L)] = racc[T.Ramp((2 * j + k) * L, 1, L)] \
                                                + T.Cast(i32v, T.popcount(T.bitwise_xor(
                                                    xv, Wb[T.Ramp(wbase * 32 + k * L, 1, L)])))
                        if fused:
                            # the output word of each pixel's 32 channels from the popcounts in registers:
                            # (pc <= T[class]) XOR neg (pop_bits_table), no int32 block, no second pass
                            tb, rcb, ccb, yb = T.meta_var(fb)
                            y = T.meta_var(tp * rows + yr)
                            ch0 = T.meta_var(tg * og + cb * 32)
                            # the complemented channels of these 32 as one word, once per tile
                            ngw = T.alloc_buffer((2,), "uint32", scope="local")
                            for k in T.unroll(2):
                                ng = T.meta_var(tb[T.Ramp(fsgo + ch0 + k * L, 1, L)] != T.Broadcast(T.int32(0), L))
                                ngw[k] = T.Cast("uint32", T.reinterpret("uint16", ng.astype("uint1x16")))
                            for j in T.unroll(xt):
                                x = T.meta_var(xb * xt + j)
                                cls = T.meta_var(rcb[y] * fnc + ccb[x])
                                m = T.alloc_buffer((2,), "uint32", scope="local")
                                for k in T.unroll(2):
                                    le = T.meta_var(racc[T.Ramp((2 * j + k) * L, 1, L)]
                                                    <= tb[T.Ramp(cls * fopad + ch0 + k * L, 1, L)])
                                    m[k] = T.Cast("uint32", T.reinterpret("uint16", le.astype("uint1x16")))
                                yb[((ti * oh + y) * ow + x) * fnwo + ch0 // 32] = \
                                    (m[0] | (m[1] << T.uint32(16))) ^ (ngw[0] | (ngw[1] << T.uint32(16)))
                        else:
                            for j in T.unroll(xt):
                                for k in T.unroll(2):
                                    acc[T.Ramp(aoff + (v0 + j - tp * mb) * og + cb * 32 + k * L, 1, L)] = \
                                        T.Broadcast(T.int32(kbits), L) - racc[T.Ramp((2 * j + k) * L, 1, L)] \
                                        * T.Broadcast(T.int32(2), L)

    return word_planes, gemm_channels


def binary_conv2d_amx_primfunc(x_shape, w_shape, e_shape, *, out_channels, kernel_shape, strides, pads,
                               dilations, output, mb=None, og=None, wbits=None, e_table: bool = False,
                               engine: str = "amx", **_ignored):
    """The AMX kernel of ``BinaryConv2dPacked``: arguments (X, Wamx, E, RowClass, ColClass, P0, P1, Y) with
    ``Wamx = amx_conv_weights(W, output, wbits)``; ``w_shape`` is the ``[O, KH, KW, Cw]`` shape of the packed
    weights. ``wbits`` (default :func:`weight_bits` of ``w_shape``): the weights are bit masks, expanded
    tile by tile (1 weight tile × 4 pixel tiles per step). ``mb`` (pixels per task, a multiple of 32, of
    64 with bit weights) and ``og`` (output channels per task, a multiple of 32 dividing O rounded up to 32)
    override the blocking chosen from the shape. ``e_table``: E is the kernel's table made at compile time,
    :func:`amx_e_table` of E for float output (as for :func:`binary_conv2d_amx_chain_primfunc`),
    :func:`amx_bits_table` of (E, P0, P1) for bits output (P0 and P1 are then not read; with the popcount engine
    :func:`pop_bits_table`, and the engine decides the bits in its register tile); else the kernel makes it on
    each call (a serial loop of R·C·O elements: 2–4 µs at 28²–7², Zen 4) and decides the bits in a second pass
    over the task's int32 block."""
    from tvm.script import tirx as T

    if output not in ("float", "bits"):
        raise ValueError(f"BinaryConv2dPacked: output must be 'float' or 'bits', got {output!r}")
    if output == "float":  # channels in the tile rows, vectorized epilogue (weights amx_conv_weights(W, "float"))
        return binary_conv2d_amx_chain_primfunc(x_shape, w_shape, e_shape, out_channels=out_channels,
                                                kernel_shape=kernel_shape, strides=strides, pads=pads,
                                                dilations=dilations, mb=mb, og=og, wbits=wbits, e_table=e_table,
                                                engine=engine)
    from .kernels import check_conv_shapes

    n, h, w, cw, o, kh, kw = check_conv_shapes(x_shape, w_shape, out_channels, kernel_shape)
    if engine not in ("amx", "pop_channels"):
        raise ValueError(f"binary_conv2d_amx_primfunc: bits output with engine 'amx' or 'pop_channels', "
                         f"got {engine!r}")
    chan = engine == "pop_channels"
    if chan and wbits:
        raise ValueError("binary_conv2d_amx_primfunc: the popcount engine takes packed weights")
    wbits = False if chan else weight_bits(w_shape) if wbits is None else bool(wbits)
    if chan:
        g = _pop_geometry(x_shape, w_shape, strides, pads, dilations, mb=mb, og=og)
    else:
        g = _geometry(x_shape, w_shape, strides, pads, dilations, mb=mb, og=og, wbits=wbits)
    e_shape = tuple(int(s) for s in e_shape)
    if len(e_shape) != 3 or e_shape[0] != o:
        raise ValueError(f"BinaryConv2dPacked: E must be [O, R, C], got {list(e_shape)}")
    nr, nc = e_shape[1], e_shape[2]
    oh, ow, rl, nph, cb, nkc = g["oh"], g["ow"], g["rl"], g["nph"], g["cb"], g["nkc"]
    opad, taps, og, mb, npb, ncg, lpos = (g[k] for k in ("opad", "taps", "og", "mb", "npb", "ncg", "lpos"))
    sh, sw, dh, dw = (g[k] for k in ("sh", "sw", "dh", "dw"))
    kbits = taps * WORD * cw + g["kpad"]
    nwo = num_words(o)
    wshape = (opad // 32, kh, kw, cw, 32) if chan else (opad // _TILE, taps, nkc, _TILE) if wbits else \
        (opad // _TILE, taps, nkc, _TILE, _TILE, 4)
    wdt = "uint32" if chan else "uint64" if wbits else "int8"
    yshape = (n, oh, ow, nwo)
    cw64 = max(1, cw // 2)
    nimg = 64 if chan else n * nph * lpos * cb
    lp = _round_up(lpos, _TILE)
    nwpl = n * nph * cw * lp if chan else 1
    ntask = n * npb * ncg
    tile_config, zero_tiles, store_2x2, unpack_rows, gemm_bitweights = _amx_macros(g, h, w, cw)
    # the engine decides the bits in its register tile (pop_bits_table) instead of a pass over the int32 block:
    # kernel alone, 1 thread, min of 21 interleaved rounds: 56²×64 0.124 → 0.106 ms, 28²×128 0.108 → 0.101,
    # 14²×256 0.102 → 0.099, 7²×512 0.098 → 0.097, stride-2 56²→28² 0.062 → 0.055 (2 threads: 0.090 → 0.077,
    # 0.060 → 0.054, the others even)
    fused = chan and e_table
    e_arg_shape = (nr * nc + 1, opad) if e_table else e_shape
    sgo = nr * nc * opad  # the sign row of the table (e_table; pop_bits_table: the neg row)
    word_planes, gemm_channels = _popcount_macros(g, lp, cw, bits_table=(nc, opad, nwo, sgo) if fused else None)

    @T.prim_func
    def amx_conv(X: T.Buffer((n, h, w, cw), "uint32"), Wt: T.Buffer(wshape, wdt),
                 E: T.Buffer(e_arg_shape, "int32"), RC: T.Buffer((oh,), "int32"), CC: T.Buffer((ow,), "int32"),
                 P0: T.Buffer((o,), "int32"), P1: T.Buffer((o,), "int32"), Y: T.Buffer(yshape, "uint32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        Xf = T.decl_buffer((n * h * w * cw,), "uint32", data=X.data)
        X64 = T.decl_buffer((n * h * w * cw64,), "uint64", data=X.data)
        Wf = T.decl_buffer((opad // _TILE * taps * nkc * _TILE_BYTES,), "int8", data=Wt.data)
        Wq = T.decl_buffer((opad // _TILE * taps * nkc * _TILE,), "uint64", data=Wt.data)
        Wf32 = T.decl_buffer((opad * taps * cw if chan else 1,), "uint32", data=Wt.data)
        Ef = T.decl_buffer((o * nr * nc,), "int32", data=E.data)
        Et = T.decl_buffer(((nr * nc + 1) * opad if e_table else 1,), "int32", data=E.data)
        Yf = T.decl_buffer((n * oh * ow * nwo,), "uint32", data=Y.data)
        img = T.alloc_buffer((nimg,), "int8", align=64)
        wpl = T.alloc_buffer((nwpl,), "uint32", align=64)
        ek = T.alloc_buffer((nr * nc * opad,), "int32", align=64)
        sg = T.alloc_buffer((opad,), "int32", align=64)
        tq = T.alloc_buffer((opad,), "int64", align=64)
        # (float output: binary_conv2d_amx_chain_primfunc, returned above)
        # P0·D >= P1 with D = dot + E - Kbits is, per channel, sg·dot >= thr with sg = sign(P0) and
        # thr = ceil(P1/|P0|) - sg·(E - Kbits) (P0 = 0: thr = P1), exact in int64, then clamped into int32
        # (|dot| <= Kbits, so clamping never changes a decision); padded channels: sg = 0, thr = 1 (bit 0).
        if not e_table:
            for c in range(opad):
                p0v = T.meta_var(T.Cast("int64", T.if_then_else(c < o, P0[T.min(c, o - 1)], 0)))
                p1v = T.meta_var(T.Cast("int64", T.if_then_else(c < o, P1[T.min(c, o - 1)], 1)))
                sg[c] = T.if_then_else(p0v > T.int64(0), 1, T.if_then_else(p0v < T.int64(0), -1, 0))
                tq[c] = T.if_then_else(p0v != T.int64(0),
                                       T.floordiv(p1v + T.abs(p0v) - T.int64(1), T.max(T.abs(p0v), T.int64(1))),
                                       p1v)
            for r in range(nr * nc):
                for c in range(opad):
                    ekv = T.meta_var(T.if_then_else(c < o, Ef[T.min(c, o - 1) * (nr * nc) + r] - kbits, 0))
                    ek[r * opad + c] = T.Cast("int32", T.max(T.min(
                        tq[c] - T.Cast("int64", sg[c]) * T.Cast("int64", ekv), T.int64(2**31 - 1)),
                        T.int64(-(2**31) + 1)))
        if chan:
            word_planes(wpl, Xf)
        else:
            unpack_rows(img, Xf, X64)
        # GEMM + epilogue per task (image, pixel block, channel group)
        for task in T.parallel(ntask):
            cfg = T.alloc_buffer((64,), "uint8", align=64)
            acc = T.alloc_buffer((1 if fused else mb * og,), "int32", align=64)
            if not chan:
                tile_config(cfg)
            ti = T.meta_var(task // (npb * ncg))
            tg = T.meta_var(task // npb % ncg)  # channel group outer: with 2 threads each gets whole groups
            tp = T.meta_var(task % npb)         # (its share of the weights, the partial last pixel blocks)
            if chan:
                gemm_channels(Wf32, wpl, acc, 0, ti, tg, tp, (Et, RC, CC, Yf))
            elif wbits:
                gemm_bitweights(img, Wq, acc, ti, tg, tp)
            else:
                for cp in range(og // 32):
                    for pp in range(mb // 32):
                        zero_tiles()
                        for a in range(kh):
                            for b in range(kw):
                                for q in range(nkc):
                                    abase = T.meta_var(((ti * nph + ((a * dh) % sh) * sw + (b * dw) % sw) * lpos
                                              + tp * mb + pp * 32 + ((a * dh) // sh) * rl + (b * dw) // sw) * cb
                                             + q * 64)
                                    bbase = T.meta_var(((((tg * og + cp * 32) // _TILE) * taps + a * kw + b) * nkc + q)
                                             * _TILE_BYTES)
                                    T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.int8(4),
                                                       T.address_of(img[abase]), T.int64(cb))
                                    T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.int8(6),
                                                       T.address_of(Wf[bbase]), T.int64(64))
                                    T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.int8(5),
                                                       T.address_of(img[abase + 16 * cb]), T.int64(cb))
                                    T.call_llvm_intrin("void", "llvm.x86.tdpbssd", T.int8(0), T.int8(4), T.int8(6))
                                    T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.int8(7),
                                                       T.address_of(Wf[bbase + taps * nkc * _TILE_BYTES]),
                                                       T.int64(64))
                                    T.call_llvm_intrin("void", "llvm.x86.tdpbssd", T.int8(1), T.int8(5), T.int8(6))
                                    T.call_llvm_intrin("void", "llvm.x86.tdpbssd", T.int8(2), T.int8(4), T.int8(7))
                                    T.call_llvm_intrin("void", "llvm.x86.tdpbssd", T.int8(3), T.int8(5), T.int8(7))
                        store_2x2(acc, pp * 32 * og + cp * 32, og)
            if not chan:
                T.call_llvm_intrin("void", "llvm.x86.tilerelease")
            # epilogue on the task's block (none when the engine wrote the bits)
            for vl in range(0 if fused else mb):
                v = T.meta_var(tp * mb + vl)
                y = T.meta_var(v // rl)
                x = T.meta_var(v % rl)
                if y < oh and x < ow:
                    ebase = T.meta_var((RC[T.min(y, oh - 1)] * nc + CC[T.min(x, ow - 1)]) * opad)
                    for k in range(og // 32):
                        ch = T.meta_var(tg * og + k * 32)
                        sgv = T.meta_var(Et[T.Ramp(sgo + ch, 1, 32)] if e_table else sg[T.Ramp(ch, 1, 32)])
                        ekv = T.meta_var(Et[T.Ramp(ebase + ch, 1, 32)] if e_table else ek[T.Ramp(ebase + ch, 1, 32)])
                        bit = T.meta_var(sgv * acc[T.Ramp(vl * og + k * 32, 1, 32)] >= ekv)
                        Yf[((ti * oh + y) * ow + x) * nwo + tg * (og // 32) + k] = T.reinterpret(
                            "uint32", bit.astype("uint1x32"))

    # op_pattern 8 = kOpaque: Relax FuseOps must not fuse (and FuseTIR re-lower) this kernel
    return amx_conv.with_attrs({"bnnc.scheduled": True, "op_pattern": 8, "bnnc.amx": not chan})


# --------------------------------------------------------------------------------------------------
# Float output (+ the fused element-wise chain and PackSign): channels in the tile rows
#
# The float output is NCHW: contiguous along x. Here the GEMM is transposed (C' = W · Xᵀ): A tiles are 16
# output channels × 64 input bytes (``amx_conv_weights(w, "float")``), B tiles 16 "k-quads" × 16 pixels ×
# 4 bytes (the VNNI layout of the unpacked input, plane ``[image, phase, chunk q, quad r, position, 4]``:
# 16 consecutive positions of one quad are 64 contiguous bytes, any tap offset is a plain shift), so the
# int32 accumulator block is [channel][pixel] and the whole epilogue runs on 16-pixel vectors: one
# masked vector per output-row piece (a 16-pixel group crosses at most ``15 // RL + 2`` rows).

_MAX_EXTRAS = 8  # chain operands the fused AMX kernel takes (longer chains: unfused conv + chain_pack)
_ROUND_NEAREST_SAE = 8  # _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC: the embedded-rounding form of vmulps


def _chain_vec(val, steps, extras, ext_shapes, idx4, x0, mask, out_rank=4):
    """The chain ``steps`` (``kernels.CHAIN_OPS``) applied to the 16-lane float32 vector ``val`` at
    (image, channel, row) ``idx4[:3]`` and columns ``x0 + lane``: operands broadcast along x are scalars
    (broadcast to the lanes), the others masked vector loads (``mask``: the lanes of this row piece)."""
    from tvm import tirx

    from .kernels import chain_step

    for st in steps:
        kind = st[0]
        if kind in ("relu", "neg"):
            val = chain_step(kind, val, fence=True, lanes=_TILE)
            continue
        k = int(st[1])
        buf, shp = extras[k], ext_shapes[k]
        off = out_rank - len(shp)
        full = tuple(idx4[:3]) + (tirx.Ramp(x0, 1, _TILE),)
        ind = [0 if s == 1 else full[off + d] for d, s in enumerate(shp)]
        if len(shp) and shp[-1] != 1:  # varies along x: a vector of the row
            av = tirx.call_intrin(f"float32x{_TILE}", "tirx.masked_load", buf, *ind, mask)
        else:
            av = tirx.Broadcast(buf[tuple(ind)] if ind else buf[0], _TILE)
        val = chain_step(kind, val, av, fence=True, lanes=_TILE)  # kernels.chain_step: one definition per step
    return val


def _transpose16_shuffles() -> dict:
    """Lane indices (into the 32 lanes of a concatenated vector pair) of the shuffles of a 16×16 int32 transpose
    in registers: rounds of unpack lo/hi of dwords, of qwords, then two rounds of 128-bit-lane selections (even /
    odd lanes), which LLVM emits as ``vpunpck[lh]dq``, ``vpunpck[lh]qdq`` and ``vshufi64x2``: 64 shuffles per
    16×16 block."""
    lo = [i for b in range(4) for i in (4 * b, 16 + 4 * b, 4 * b + 1, 17 + 4 * b)]
    lod = [i for b in range(4) for i in (4 * b, 4 * b + 1, 16 + 4 * b, 17 + 4 * b)]
    return dict(lo=lo, hi=[i + 2 for i in lo], lod=lod, hid=[i + 2 for i in lod],
                even=[4 * s + k for s in (0, 2, 4, 6) for k in range(4)],
                odd=[4 * s + k for s in (1, 3, 5, 7) for k in range(4)])


def binary_conv2d_amx_chain_primfunc(x_shape, w_shape, e_shape, *, out_channels, kernel_shape, strides, pads,
                                     dilations, extra_shapes=(), steps=(), want_float=True, pack=False,
                                     with_threshold=False, mb=None, og=None, wbits=None, inplace=None,
                                     e_table: bool = False, block_epilogue: bool | None = None,
                                     engine: str = "amx", **_ignored):
    """The AMX kernel of a float-output ``BinaryConv2dPacked``, optionally followed by the element-wise
    chain ``steps`` over ``extra_shapes`` operands (semantics of :func:`kernels.chain_value_te`) and the
    ``PackSign`` (``v >= T[c]``, T = 0 without threshold) of the result, all in the conv's epilogue.

    Arguments ``(X, Wf, E, RowClass, ColClass, P0, P1, *extras, [T], [Yfloat], [Ybits])`` with
    ``Wf = amx_conv_weights(W, "float", wbits)`` (``wbits``: as in :func:`binary_conv2d_amx_primfunc`); ``Yfloat`` (NCHW float32) when ``want_float``, ``Ybits``
    (NHWC uint32 words) when ``pack``. Bit-identical to the float conv followed by ``chain_pack_primfunc``:
    per channel ``float32(D)·P0 + P1`` (product rounded once, no FMA), then the steps in order in float32.

    ``inplace=k``: the float result is written over chain operand ``k`` (of the output's shape; Relax's
    ``call_tir_inplace``), and there is no ``Yfloat`` argument. Safe because the epilogue reads each operand
    element once, before it writes the same element: the residual stream of a ResNet stays one buffer
    (56²×64: 0.175 → 0.158 ms, half the epilogue's cache footprint).

    ``e_table``: the E argument is :func:`amx_e_table` of E (the kernel's border table, made once at compile
    time from a constant E) instead of E ``[O, R, C]`` (``e_shape``), which the kernel then tabulates on each
    call: a serial loop of R·O·16 elements, 1–4 µs per call on Bi-Real-18's layers, on the critical path of
    every thread count.

    ``block_epilogue`` (int8 weights): the epilogue of each 32 × 32 register block right after its tile
    stores, from a 4 KB int32 buffer in L1, instead of once per task from the task's og × mb block; by default
    (None) where that block exceeds :data:`ACC_L1_BYTES`. Kernel alone, residual Add + PackSign, 1 / 2
    threads: 56²×64 (48 KB blocks) 0.136 → 0.128 / 0.084 → 0.075 ms; at 28²×128 (32 KB) 4 % faster on 1 thread
    but 8 % slower on 2 threads in Bi-Real-18, so 32 KB blocks keep the task epilogue."""
    from tvm import tirx
    from tvm.script import tirx as T

    from .kernels import check_chain

    if not (want_float or pack):
        raise ValueError("binary_conv2d_amx_chain_primfunc: nothing to produce")
    from .kernels import check_conv_shapes

    n, h, w, cw, o, kh, kw = check_conv_shapes(x_shape, w_shape, out_channels, kernel_shape)
    if engine not in ("amx",) + POP_ENGINES:
        raise ValueError(f"binary_conv2d_amx_chain_primfunc: engine must be one of "
                         f"{('amx',) + POP_ENGINES}, got {engine!r}")
    popc = engine in POP_ENGINES  # the popcount engine: the block is [pixel][channel]
    if popc and wbits:
        raise ValueError("binary_conv2d_amx_chain_primfunc: the popcount engines take packed weights")
    wbits = False if popc else weight_bits(w_shape) if wbits is None else bool(wbits)
    if e_table and not popc and wbits != weight_bits(w_shape):
        raise ValueError("binary_conv2d_amx_chain_primfunc: e_table is made for the default weight form "
                         "(amx_e_table); pass E instead with wbits overridden")
    if popc:
        g = _pop_geometry(x_shape, w_shape, strides, pads, dilations, mb=mb, og=og, float_out=True)
    else:
        g = _geometry(x_shape, w_shape, strides, pads, dilations, mb=mb, og=og, wbits=wbits, float_out=True)
    e_shape = tuple(int(s) for s in e_shape)
    if len(e_shape) != 3 or e_shape[0] != o:
        raise ValueError(f"BinaryConv2dPacked: E must be [O, R, C], got {list(e_shape)}")
    nr, nc = e_shape[1], e_shape[2]
    if nc > _TILE:
        raise ValueError(f"binary_conv2d_amx_chain_primfunc: {nc} column classes (at most {_TILE})")
    if len(extra_shapes) > _MAX_EXTRAS:
        raise ValueError(f"binary_conv2d_amx_chain_primfunc: {len(extra_shapes)} chain operands "
                         f"(at most {_MAX_EXTRAS})")
    oh, ow, rl, nph, cb, nkc = g["oh"], g["ow"], g["rl"], g["nph"], g["cb"], g["nkc"]
    yshape = (n, o, oh, ow)
    ext_shapes = check_chain(extra_shapes, steps, yshape)
    if inplace is not None and not (want_float and 0 <= int(inplace) < len(ext_shapes)
                                    and tuple(ext_shapes[int(inplace)]) == yshape):
        raise ValueError(f"binary_conv2d_amx_chain_primfunc: inplace={inplace} must name a chain operand of the "
                         f"output's shape {list(yshape)} (float output)")
    # the buffer the float result is written to: YF, the operand written over, or (no float output) any
    ysrc = int(inplace) if inplace is not None else _MAX_EXTRAS if want_float else _MAX_EXTRAS + 1
    opad, taps, og, mb, npb, ncg, lrows = (g[k] for k in ("opad", "taps", "og", "mb", "npb", "ncg", "lrows"))
    sh, sw, dh, dw = (g[k] for k in ("sh", "sw", "dh", "dw"))
    lp = _round_up(g["lpos"], _TILE)  # positions per plane (multiple of 16 for the vector unpack)
    kbits = taps * WORD * cw + g["kpad"]
    e_arg_shape = (nr, opad, _TILE) if e_table else e_shape
    nwo = num_words(o)
    nwg = og // 32  # words per channel group
    wshape = (opad // 32, kh, kw, cw, 32) if popc else \
        (opad // _TILE, taps, nkc, _TILE) if wbits else (opad // _TILE, taps, nkc, _TILE, 64)
    wdt = "uint32" if popc else "uint64" if wbits else "int8"
    # 32-bit words per pixel in the word plane (words >= cw are 0; the popcount engine reads words < cw only)
    cwq = cw if popc else 2 * nkc
    nquads = n * nph * nkc * _TILE
    # with bit weights the GEMM runs pixels in the tile rows (as the bits kernel: the weight tile stays the
    # B operand of 4 consecutive products), on the bits kernel's image, then transposes the int32 block
    cw64 = max(1, cw // 2)
    lpos = g["lpos"]
    tile_config, zero_tiles, store_2x2, unpack_rows, gemm_bitweights = _amx_macros(g, h, w, cw)
    word_planes, gemm_channels = _popcount_macros(g, lp, cwq)
    # int8 weights with several channel groups: the VNNI image twice. With T threads the runtime gives thread k
    # the k-th contiguous share of a parallel loop's iterations: thread k writes copy k (of the unpack loop
    # below) and its GEMM tasks (every pixel block of its channel groups) read copy k, in its own cache, not
    # the half another core just wrote (results never depend on which copy a task reads). 28²×128 / 14²×256
    # with 2 threads: 0.100 → 0.087 / 0.098 → 0.079 ms; 1 thread (the unpack done twice): +0.003 ms
    ncopy = 2 if not (wbits or popc) and ncg > 1 else 1
    if block_epilogue is None:
        block_epilogue = og * mb * 4 > ACC_L1_BYTES
    block_epilogue = bool(block_epilogue) and not (wbits or popc)
    by_pixels = ncg == 1 and nph == 1 and mb % _TILE == 0
    nimg8 = 64 if popc else n * nph * lpos * cb if wbits else ncopy * nquads * lp * 4
    nwpl = 1 if wbits else n * nph * cwq * lp
    ntask = n * npb * ncg
    nyk = 15 // rl + 2  # output rows a 16-pixel group can touch
    nyb = mb // rl + 2  # output rows a task's block can touch
    # popcount engines: the int32 block and the PackSign words padded by PW lanes (of pixels) on both sides
    PW = _TILE
    apad = PW * og if popc else 0
    wpad = PW if popc else 0
    wrow = mb + 2 * wpad
    ccpad = rl + 2 * _TILE  # CC padded by 16 on each side, indexed by x + 16
    yb_shape = (n, oh, ow, nwo) if pack else (1,)
    yf_shape = yshape if want_float else (1,)
    a_shapes = [ext_shapes[k] if k < len(ext_shapes) else (1,) for k in range(_MAX_EXTRAS)]
    L = _TILE
    f32v, i32v = f"float32x{L}", f"int32x{L}"
    tsh = _transpose16_shuffles()

    @T.macro
    def unpack_quad16(img, wpl, dst, t, pos):
        # quad plane t (image·phase, chunk q, quad r) at 16 positions from pos → ±1 bytes of plane dst of img:
        # quad r of chunk q = bits 4r..4r+3 of the chunk → 4 bytes per position (nibble · 0x00204081 &
        # 0x01010101 spreads the 4 bits to 4 bytes; 0xFF ^ b·0xFE maps 1 → 1, 0 → -1)
        iph = T.meta_var(t // (nkc * L))
        q = T.meta_var(t // L % nkc)
        r = T.meta_var(t % L)
        wv = T.meta_var(wpl[T.Ramp((iph * cwq + 2 * q + r // 8) * lp + pos, 1, L)])
        nib = T.meta_var(T.shift_right(wv, T.Broadcast(T.Cast("uint32", (r % 8) * 4), L))
                         & T.Broadcast(T.uint32(15), L))
        spread = T.meta_var((nib * T.Broadcast(T.uint32(0x00204081), L)) & T.Broadcast(T.uint32(0x01010101), L))
        img[T.Ramp(dst * lp + pos, 1, L)] = T.bitwise_xor(
            spread * T.Broadcast(T.uint32(0xFE), L), T.Broadcast(T.uint32(0xFFFFFFFF), L))

    @T.macro
    def epi_piece(accb, abase, arow, pst, y, x0, m, wbase, cwd, ti, tg, bufs):
        # the epilogue of channel word cwd (32 channels) at output row y, columns x0 + lane where mask m: channel
        # c32's 16 lanes at accb[abase + c32·arow + lane·pst], the PackSign words at wb[wbase + lane]. The 32
        # channels' PackSign bits are OR-ed into a register (one word per lane), read from / written to wb once
        # per word instead of once per channel (a load-after-store chain through memory). Conv + residual Add +
        # PackSign alone, 1 thread: 56²×64 0.173 → 0.155 ms, 28²×128 0.128 → 0.122, 7²×512 0.132 → 0.119,
        # stride-2 56² 0.107 → 0.102, 14² 0.085 → 0.080; 14²×256 unchanged (a channel-outer order, every
        # channel's rows in sequence, was slower: 0.22 ms at 56²)
        ekt, RC, ccp, P0, P1, A, YO, TH, wb = bufs
        ccv = T.meta_var(ccp[T.Ramp(x0 + L, 1, L)])
        wreg = T.alloc_buffer((L,), "uint32", scope="local")  # constant index: a register
        if pack:
            wreg[T.Ramp(0, 1, L)] = wb[T.Ramp(wbase, 1, L)]
        tr = T.alloc_buffer((32 * L if pst != 1 else 1,), "int32", scope="local")
        if pst != 1:
            # pixels pst apart ([pixel][channel] block, arow = 1): the 16 pixels × 32 channels as two 16×16
            # blocks transposed in registers (tr: channel c32's 16 pixels at 16·c32), instead of 16 scalar loads
            # and inserts per channel vector (vpgatherdd was slower still on Zen 4)
            for hh in range(2):
                tq = T.alloc_buffer((L * L,), "int32", scope="local")
                tu = T.alloc_buffer((L * L,), "int32", scope="local")
                for q in T.unroll(L):
                    tq[T.Ramp(q * L, 1, L)] = accb[T.Ramp(abase + q * pst + hh * L, 1, L)]
                # row q = pixel q's 16 channels → row c = channel c's 16 pixels (_transpose16_shuffles)
                for i in T.unroll(8):
                    tu[T.Ramp(2 * i * L, 1, L)] = T.Shuffle([tq[T.Ramp(2 * i * L, 1, L)],
                                                             tq[T.Ramp((2 * i + 1) * L, 1, L)]], tsh["lo"])
                    tu[T.Ramp((2 * i + 1) * L, 1, L)] = T.Shuffle([tq[T.Ramp(2 * i * L, 1, L)],
                                                                   tq[T.Ramp((2 * i + 1) * L, 1, L)]], tsh["hi"])
                for k in T.unroll(4):
                    for v in T.unroll(2):
                        tq[T.Ramp((4 * k + 2 * v) * L, 1, L)] = T.Shuffle(
                            [tu[T.Ramp((4 * k + v) * L, 1, L)], tu[T.Ramp((4 * k + v + 2) * L, 1, L)]], tsh["lod"])
                        tq[T.Ramp((4 * k + 2 * v + 1) * L, 1, L)] = T.Shuffle(
                            [tu[T.Ramp((4 * k + v) * L, 1, L)], tu[T.Ramp((4 * k + v + 2) * L, 1, L)]], tsh["hid"])
                for k in T.unroll(2):
                    for j in T.unroll(4):
                        tu[T.Ramp((8 * k + j) * L, 1, L)] = T.Shuffle(
                            [tq[T.Ramp((8 * k + j) * L, 1, L)], tq[T.Ramp((8 * k + 4 + j) * L, 1, L)]], tsh["even"])
                        tu[T.Ramp((8 * k + 4 + j) * L, 1, L)] = T.Shuffle(
                            [tq[T.Ramp((8 * k + j) * L, 1, L)], tq[T.Ramp((8 * k + 4 + j) * L, 1, L)]], tsh["odd"])
                for j in T.unroll(8):
                    tr[T.Ramp((hh * L + j) * L, 1, L)] = T.Shuffle(
                        [tu[T.Ramp(j * L, 1, L)], tu[T.Ramp((8 + j) * L, 1, L)]], tsh["even"])
                    tr[T.Ramp((hh * L + 8 + j) * L, 1, L)] = T.Shuffle(
                        [tu[T.Ramp(j * L, 1, L)], tu[T.Ramp((8 + j) * L, 1, L)]], tsh["odd"])
        for c32 in range(32):
            ch = T.meta_var(tg * og + cwd * 32 + c32)
            if ch < o:
                tab = T.meta_var(ekt[T.Ramp((RC[y] * opad + ch) * L, 1, L)])
                accv = T.meta_var(tr[T.Ramp(c32 * L, 1, L)] if pst != 1 else accb[T.Ramp(abase + c32 * arow, 1, L)])
                dd = T.meta_var(accv + T.call_llvm_pure_intrin(i32v, "llvm.x86.avx512.permvar.si.512", tab, ccv))
                # float32(D)·P0 rounded once (vmulps with embedded round-to-nearest: LLVM keeps the intrinsic, so
                # it is never contracted with + P1 into an FMA)
                val0 = T.meta_var(T.call_llvm_pure_intrin(
                    f32v, "llvm.x86.avx512.mul.ps.512", T.Cast(f32v, dd),
                    T.Broadcast(P0[ch], L), T.int32(_ROUND_NEAREST_SAE))
                                  + T.Broadcast(P1[ch], L))
                # bound once (not a meta_var, which would be re-expanded at each use): with ``inplace`` the store
                # overwrites the operand the chain reads
                val = _chain_vec(val0, steps, A, a_shapes, (ti, ch, y), x0, m)
                if want_float:
                    T.evaluate(T.masked_store(YO, val, ti, ch, y, T.Ramp(x0, 1, L), m))
                if pack:
                    thr = T.meta_var(TH[ch] if with_threshold else T.float32(0))
                    wreg[T.Ramp(0, 1, L)] = wreg[T.Ramp(0, 1, L)] | T.Select(
                        T.And(m, val >= T.Broadcast(thr, L)),
                        T.Broadcast(T.shift_left(T.uint32(1), T.Cast("uint32", c32)), L),
                        T.Broadcast(T.uint32(0), L))
        if pack:
            wb[T.Ramp(wbase, 1, L)] = wreg[T.Ramp(0, 1, L)]

    @T.macro
    def epi_group(accb, abase, arow, gi, cwd, ti, tg, tp, bufs):
        # the epilogue of 16-pixel group gi (of the task's block) and channel word cwd from the int32 block accb
        # (channel c32 of the word at accb[abase + c32·arow], 16 consecutive pixels), split into output-row
        # pieces (masked vectors)
        for yk in range(nyk):
            v0 = T.meta_var(tp * mb + gi * L)
            y = T.meta_var(v0 // rl + yk)
            x0 = T.meta_var(v0 - (v0 // rl + yk) * rl)
            if y < oh and x0 < ow and x0 > -L:
                xs = T.meta_var(T.Ramp(x0, 1, L))
                m = T.meta_var(T.And(xs >= T.Broadcast(0, L), xs < T.Broadcast(ow, L)))
                epi_piece(accb, abase, arow, 1, y, x0, m, cwd * mb + gi * L, cwd, ti, tg, bufs)

    @T.macro
    def epi_rows(accb, ti, tg, tp, bufs):
        # the popcount engines' epilogue of the task's block: per output row of the block, pieces of 16 columns
        # from x = 0 (fewer masked pieces than 16-pixel groups of the block, which cross row ends: 7²×512 with
        # its chain, channels in the lanes, kernel alone 0.119 → 0.115 ms); acc and wb are padded by 16 lanes
        # (PW) on both sides for the rows the block starts or ends in
        for yb in range(nyb):
            y = T.meta_var((tp * mb) // rl + yb)
            if y < oh and y * rl < tp * mb + mb:
                for xc in range((ow + L - 1) // L):
                    vl0 = T.meta_var(y * rl + xc * L - tp * mb)
                    xs = T.meta_var(T.Ramp(xc * L, 1, L))
                    vs = T.meta_var(T.Ramp(vl0, 1, L))
                    m = T.meta_var(T.And(xs < T.Broadcast(ow, L), T.And(vs >= T.Broadcast(0, L),
                                                                          vs < T.Broadcast(mb, L))))
                    for cwd in range(nwg):  # [pixel][channel]: 16 pixels og apart
                        epi_piece(accb, PW * og + vl0 * og + cwd * 32, 1, og, y, xc * L, m,
                                  cwd * wrow + PW + vl0, cwd, ti, tg, bufs)

    @T.prim_func
    def amx_conv_chain(X: T.Buffer((n, h, w, cw), "uint32"), Wt: T.Buffer(wshape, wdt),
                       E: T.Buffer(e_arg_shape, "int32"), RC: T.Buffer((oh,), "int32"), CC: T.Buffer((ow,), "int32"),
                       P0: T.Buffer((o,), "float32"), P1: T.Buffer((o,), "float32"),
                       A0: T.Buffer(a_shapes[0], "float32"), A1: T.Buffer(a_shapes[1], "float32"),
                       A2: T.Buffer(a_shapes[2], "float32"), A3: T.Buffer(a_shapes[3], "float32"),
                       A4: T.Buffer(a_shapes[4], "float32"), A5: T.Buffer(a_shapes[5], "float32"),
                       A6: T.Buffer(a_shapes[6], "float32"), A7: T.Buffer(a_shapes[7], "float32"),
                       TH: T.Buffer((o,), "float32"), YF: T.Buffer(yf_shape, "float32"),
                       YB: T.Buffer(yb_shape, "uint32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        ydst = T.meta_var((A0, A1, A2, A3, A4, A5, A6, A7, YF, X)[ysrc])
        YO = T.decl_buffer(yf_shape, "float32", data=ydst.data)
        Xf = T.decl_buffer((n * h * w * cw,), "uint32", data=X.data)
        Wf = T.decl_buffer((opad // _TILE * taps * nkc * _TILE_BYTES,), "int8", data=Wt.data)
        Wf32 = T.decl_buffer((opad * taps * cw if popc else 1,), "uint32", data=Wt.data)
        Wq = T.decl_buffer((opad // _TILE * taps * nkc * _TILE,), "uint64", data=Wt.data)
        X64 = T.decl_buffer((n * h * w * cw64,), "uint64", data=X.data)
        wpl = T.alloc_buffer((nwpl,), "uint32", align=64)
        # the image: VNNI planes (int8 weights, img as uint32 words) or the bits kernel's rows (bit weights);
        # none with the popcount engine (img, unused, then aliases wpl: an alias of an unused allocation fails
        # to lower, and the word planes must stay a uint32 allocation: vector loads through a uint32 view of an
        # int8 allocation read wrong words in TVM 0.27)
        img8 = T.alloc_buffer((nimg8,), "int8", align=64)
        img = T.decl_buffer((nimg8 // 4,), "uint32", data=wpl.data if popc else img8.data)
        # ekt[(row class, channel), column class] = E - Kbits (16 column classes: a vpermd table), given
        # (e_table) or made here (as amx_e_table)
        if e_table:
            ekt = T.decl_buffer((nr * opad * L,), "int32", data=E.data)
        else:
            Ef = T.decl_buffer((o * nr * nc,), "int32", data=E.data)
            ekt = T.alloc_buffer((nr * opad * L,), "int32", align=64)
            for r in range(nr):
                for c in range(opad):
                    for j in range(L):
                        ekt[(r * opad + c) * L + j] = T.if_then_else(
                            T.And(c < o, j < nc), Ef[(T.min(c, o - 1) * nr + r) * nc + T.min(j, nc - 1)] - kbits, 0)
        ccp = T.alloc_buffer((ccpad,), "int32", align=64)
        for j in range(ccpad):
            ccp[j] = CC[T.max(T.min(j - L, ow - 1), 0)]
        if wbits:
            unpack_rows(img8, Xf, X64)
        else:
            # word planes: image i, phase ph, word wq, position (plane row, column c) (0 outside the image and
            # for words >= cw)
            word_planes(wpl, Xf)
            # VNNI planes (unpack_quad16; the popcount engine reads the word planes)
            if popc:
                pass
            elif by_pixels:
                # one channel group, stride 1: the GEMM tasks split the pixel blocks over the threads, so the
                # unpack does too (task k unpacks pixel block k's positions of every quad), and each thread's
                # GEMM reads the image its own core wrote (but for a block's halo rows); split by quads, every
                # task read the half of its channels another core had written (56²×64, kernel alone, 2
                # threads: 0.093–0.098 → 0.089–0.092 ms, 1 thread unchanged; on the stride-2 56²→28² layer
                # within ±2 %, so the phase planes keep the quad split)
                for ck in T.parallel(n * npb):
                    for t0 in range(nph * nkc * L):
                        # block tp's positions; the last block also the rows below it (its taps' halo)
                        for pb in range(T.if_then_else(ck % npb == npb - 1, lp // L, (ck % npb + 1) * (mb // L))
                                        - ck % npb * (mb // L)):
                            t = T.meta_var(ck // npb * (nph * nkc * L) + t0)
                            unpack_quad16(img, wpl, t, t, (ck % npb * (mb // L) + pb) * L)
            else:
                for tt in T.parallel(ncopy * nquads):  # copy tt // nquads, quad t
                    for pb in range(lp // L):
                        unpack_quad16(img, wpl, tt, tt % nquads, pb * L)
        for task in T.parallel(ntask):
            cfg = T.alloc_buffer((64,), "uint8", align=64)
            # int32 block: the task's whole og × mb, or (block_epilogue) one 32 × 32 register block at a time,
            # its epilogue right after the block's tile stores, in L1 (a 48 KB block went out to L2 between its
            # stores and the epilogue's loads)
            acc = T.alloc_buffer((32 * 32 if block_epilogue else og * mb + 2 * apad,), "int32", align=64)
            wb = T.alloc_buffer((nwg * wrow,), "uint32", align=64)
            accp = T.alloc_buffer((mb * og if wbits else 1,), "int32", align=64)
            if pack:
                for k in range(nwg * wrow):
                    wb[k] = T.uint32(0)
            if not popc:
                tile_config(cfg)
            ti = T.meta_var(task // (npb * ncg))
            tg = T.meta_var(task // npb % ncg)  # channel group outer: with 2 threads each gets whole groups
            tp = T.meta_var(task % npb)         # (its share of the weights, the partial last pixel blocks)
            bufs = T.meta_var((ekt, RC, ccp, P0, P1, (A0, A1, A2, A3, A4, A5, A6, A7), YO, TH, wb))
            if popc:
                gemm_channels(Wf32, wpl, acc, apad, ti, tg, tp, None)
            elif wbits:
                gemm_bitweights(img8, Wq, accp, ti, tg, tp)  # pixels in the tile rows, as the bits kernel
            else:
                cpy = T.meta_var(task * ncopy // ntask * (nquads * lp * 4))  # the image copy this task reads
                for cp in range(og // 32):
                    for pp in range(mb // 32):
                        zero_tiles()
                        for a in range(kh):
                            for b in range(kw):
                                for q in range(nkc):
                                    bbase = T.meta_var((((ti * nph + ((a * dh) % sh) * sw + (b * dw) % sw) * nkc + q)
                                                        * L * lp + tp * mb + pp * 32 + ((a * dh) // sh) * rl
                                                        + (b * dw) // sw) * 4)
                                    abase = T.meta_var(((((tg * og + cp * 32) // L) * taps + a * kw + b) * nkc + q)
                                                       * _TILE_BYTES)
                                    T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.int8(4),
                                                       T.address_of(Wf[abase]), T.int64(64))
                                    T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.int8(6),
                                                       T.address_of(img8[cpy + bbase]), T.int64(lp * 4))
                                    T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.int8(5),
                                                       T.address_of(Wf[abase + taps * nkc * _TILE_BYTES]), T.int64(64))
                                    T.call_llvm_intrin("void", "llvm.x86.tdpbssd", T.int8(0), T.int8(4), T.int8(6))
                                    T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.int8(7),
                                                       T.address_of(img8[cpy + bbase + L * 4]), T.int64(lp * 4))
                                    T.call_llvm_intrin("void", "llvm.x86.tdpbssd", T.int8(1), T.int8(5), T.int8(6))
                                    T.call_llvm_intrin("void", "llvm.x86.tdpbssd", T.int8(2), T.int8(4), T.int8(7))
                                    T.call_llvm_intrin("void", "llvm.x86.tdpbssd", T.int8(3), T.int8(5), T.int8(7))
                        if block_epilogue:
                            store_2x2(acc, 0, 32)
                            for gg in range(2):  # its two 16-pixel groups
                                epi_group(acc, gg * L, 32, pp * 2 + gg, cp, ti, tg, tp, bufs)
                        else:
                            store_2x2(acc, cp * 32 * mb + pp * 32, mb)
            if not popc:
                T.call_llvm_intrin("void", "llvm.x86.tilerelease")
            if wbits:  # [pixel][channel] → [channel][pixel]
                for c in range(og):
                    for v in range(mb):
                        acc[c * mb + v] = accp[v * og + c]
            if not block_epilogue:  # the whole block, then the epilogue per 16-pixel group and channel word
                if popc:
                    epi_rows(acc, ti, tg, tp, bufs)
                else:
                    for gi in range(mb // L):
                        for cwd in range(nwg):
                            epi_group(acc, cwd * 32 * mb + gi * L, mb, gi, cwd, ti, tg, tp, bufs)
            if pack:
                for vl in range(mb):
                    vv = T.meta_var(tp * mb + vl)
                    if vv // rl < oh and vv % rl < ow:
                        for k in range(nwg):
                            YB[ti, vv // rl, vv % rl, tg * nwg + k] = wb[k * wrow + wpad + vl]

    keep = list(range(7)) + list(range(7, 7 + len(ext_shapes)))
    if with_threshold and pack:
        keep.append(7 + _MAX_EXTRAS)
    if want_float and inplace is None:
        keep.append(8 + _MAX_EXTRAS)
    if pack:
        keep.append(9 + _MAX_EXTRAS)
    f = tirx.PrimFunc([amx_conv_chain.params[k] for k in keep], amx_conv_chain.body, attrs=amx_conv_chain.attrs)
    # op_pattern 8 = kOpaque: Relax FuseOps must not fuse (and FuseTIR re-lower) this kernel
    return f.with_attrs({"bnnc.scheduled": True, "op_pattern": 8, "bnnc.amx": not popc})
