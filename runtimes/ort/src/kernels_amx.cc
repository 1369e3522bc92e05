// x86 AMX-INT8 kernels (Sapphire Rapids and later): BinaryConv2dPacked as an int8 GEMM on ±1 values.
//
// With a = ±1 (bit 1 → +1, bit 0 → -1) and w = ±1, Σ a·w over the 32·Cw bits of every tap is
// Kbits - 2·popcount(x XOR w) (Kbits = KH·KW·32·Cw), so popcount = (Kbits - dot) / 2 exactly: the int32
// accumulation of TDPBSSD (16×16 output tile, 64 int8 products per element per instruction = 1024 MACs per
// cycle) reproduces the XOR-popcount of the other kernels bit for bit, with 3× the throughput bound of
// 512-bit VPOPCNTD (341 bit-MACs per cycle).
//
// Layout. The input image is unpacked once per call into a zero-copy-im2col form: a padded image of int8
// [sh row phases][PR rows][Wp][CB] (padded row r lives in phase r % sh at row r / sh; CB = 32·Cw rounded up
// to 64 bytes; padding positions are all -1, i.e. zero words, as in the reference; the bytes past 32·Cw are
// don't-care because the weights are 0 there). An A tile is 16 consecutive output pixels × 64 bytes of one
// tap. The output pixels run over the padded width ("virtual" pixels p = y·V + x, V = Wp / sw) and, thanks
// to the row phases, output row y + 1 reads the phase row after output row y's for every tap, so one tile
// row stride (sw·CB bytes) walks pixels across output rows for any stride; the border needs no special case
// (the border table E corrects the padded taps, as for every kernel); the few virtual pixels x ≥ OW are
// computed and dropped. Weights are pre-packed once per model as bits in the VNNI B-tile order
// ([out block of 16][tap][64-byte chunk][16 rows][16 channels][4 bytes], one bit per byte: 8× less memory
// and L3 traffic than int8 tiles) and expanded to ±1 int8 tiles per out-channel pair and row block; small
// weights (≤ kInt8Weights) are kept expanded as well, once per model.
//
// Blocking: 2 A tiles (32 pixels) × 2 B tiles (32 out channels) = 4 accumulator tiles (tmm0-3), A in
// tmm4-5, B in tmm6-7; out-channel pairs outer, pixel pairs inner, over blocks of output rows sized so that
// the int32 block result stays in L2. Blocks of ≤ 64 pixels (7×7 maps) use 4 A × 1 B instead, so that every
// B tile is loaded once; the AVX-512 epilogue (with the fused element-wise chain and PackSign) runs on the
// block's rows right after, as one flat pixel range, reading the dot products directly (D = E - Kbits + dot).
#if defined(__x86_64__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstring>

#include "kernels.h"

namespace bnnc {

namespace {

constexpr int64_t kTile = 16;                // pixels (rows) / out channels per tile
constexpr int64_t kTileBytes = 1024;         // 16 rows × 64 bytes
constexpr int64_t kBlockBytes = 128 * 1024;  // int32 block result target size
constexpr int64_t kSmallWeights = 64 * 1024;  // int8 weights up to this size: blocks of kBlockBytes / 2
constexpr int64_t kSmallBlock = 64;          // blocks of at most this many pixels: tile_4x1
constexpr int64_t kInt8Weights = 80 * 1024;  // int8 weights up to this size are expanded once per model

struct Geom {
  int64_t CB, nkc, taps;
  int64_t Wp, V;    // padded input width; virtual pixels per output row (Wp / sw)
  int64_t PR;       // rows per row phase (the image holds sh phases of PR rows: padded row r at r % sh, r / sh)
  int64_t RB, nblk; // output rows per block, blocks per image
  int64_t Mmax;     // virtual pixels per block, rounded up to 32
};

inline int64_t round_up(int64_t a, int64_t m) { return (a + m - 1) / m * m; }

// Pixels computed for a block of `v` virtual pixels: whole 2×2 tile pairs (32), or 64 for the 4 × 1 kernel.
inline int64_t block_pixels(int64_t v) { return v <= kSmallBlock ? kSmallBlock : round_up(v, 32); }

Geom geom(const ConvPlan& p) {
  Geom g;
  g.CB = round_up(32 * p.Cw, 64);
  g.nkc = g.CB / 64;
  g.taps = p.KH * p.KW;
  const int64_t need = (p.OW - 1) * p.sw + (p.KW - 1) * p.dw + 1;
  g.Wp = round_up(need > p.pl + p.W ? need : p.pl + p.W, p.sw);
  g.V = g.Wp / p.sw;
  // Every block expands the B tiles of all out channels once: with small weights (early layers) smaller
  // blocks keep the int32 block result closer to L1 (56×56×64: -10 %), with large ones fewer blocks win.
  const int64_t wbytes = p.Opad * p.KH * p.KW * round_up(32 * p.Cw, 64);
  const int64_t bb = wbytes <= kSmallWeights ? kBlockBytes / 2 : kBlockBytes;
  const int64_t target = bb / (4 * p.Opad) > 32 ? bb / (4 * p.Opad) : 32;
  // Rows per block: the fewest computed pixels (blocks are rounded up to whole tile pairs), one block's
  // weight expansion counted as 16 pixels (1 KiB tile: 16 stores vs 16 MAC-rows of 1024 / cycle), with the
  // block result at most twice the target size. (14×14×256: one block of 224 pixels instead of 2 × 128.)
  int64_t best = -1;
  g.RB = 1;
  for (int64_t rb = 1; rb <= p.OH; ++rb) {
    if (rb > 1 && rb * g.V > 2 * target) break;
    const int64_t full = p.OH / rb, rest = p.OH % rb;
    const int64_t cost = full * block_pixels(rb * g.V) + (rest ? block_pixels(rest * g.V) : 0) +
                         16 * (full + (rest ? 1 : 0));
    if (best < 0 || cost < best) {
      best = cost;
      g.RB = rb;
    }
  }
  g.nblk = (p.OH + g.RB - 1) / g.RB;
  g.Mmax = block_pixels(g.RB * g.V);
  // Every virtual pixel a tile touches is below OH·V + Mmax; with the tap's row and column offsets this
  // bounds the phase row read (valid pixels only ever read rows < pt + H + pb, the rest are dropped).
  const int64_t pmax = p.OH * g.V + g.Mmax;
  g.PR = pmax / g.V + ((p.KH - 1) * p.dh) / p.sh + ((p.KW - 1) * p.dw) / g.Wp + 2;
  const int64_t real = (p.pt + p.H + p.sh - 1) / p.sh;
  if (g.PR < real) g.PR = real;
  return g;
}

// Tile-configuration memory layout of palette 1.
struct alignas(64) TileCfg {
  uint8_t palette, start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

}  // namespace

// ------------------------------------------------------------------------------------------------
// CPU / OS support

bool amx_available() {
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = (d >> 24) & 1u, int8 = (d >> 25) & 1u;
    const bool avx512bw = (b >> 30) & 1u, avx512f = (b >> 16) & 1u;
    if (!(tile && int8 && avx512bw && avx512f)) return false;
    // Linux (5.16+) keeps the 8 KiB tile state off until a process asks for it.
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

// Weights are kept as bits, 16 uint64 masks per B tile (mask r, bit 4n + j: byte j of channel n in tile row
// r, i.e. input bit 4r + j of the tile's 64-bit chunk), and expanded to ±1 int8 tiles just before use
// (amx_conv_block): 8× less memory traffic than int8 tiles, which matters once the weights outgrow L2.
// (weights only: no spatial fields of p are read)
int64_t amx_weight_bytes(const ConvPlan& p) {
  return (p.Opad / kTile) * p.KH * p.KW * (round_up(32 * p.Cw, 64) / 64) * kTile * 8;
}

void amx_pack_weights(const ConvPlan& p, uint64_t* dst) {
  struct {
    int64_t taps, nkc;
  } g{p.KH * p.KW, round_up(32 * p.Cw, 64) / 64};
  const int64_t nob = p.Opad / kTile, bits = 32 * p.Cw;
  std::memset(dst, 0, static_cast<size_t>(amx_weight_bytes(p)));
  for (int64_t ob = 0; ob < nob; ++ob)
    for (int64_t t = 0; t < g.taps; ++t)
      for (int64_t q = 0; q < g.nkc; ++q) {
        uint64_t* tile = dst + ((ob * g.taps + t) * g.nkc + q) * kTile;
        for (int64_t n = 0; n < kTile; ++n) {
          const int64_t o = ob * kTile + n;
          if (o >= p.O) continue;
          const uint32_t* wo = p.w + o * p.K + t * p.Cw;
          for (int64_t k = 0; k < 64; ++k) {
            const int64_t cb = q * 64 + k;
            if (cb >= bits) break;
            if ((wo[cb >> 5] >> (cb & 31)) & 1u) tile[k >> 2] |= uint64_t{1} << (n * 4 + (k & 3));
          }
        }
      }
}

// Small weights are expanded to int8 tiles once, when the model is prepared, instead of once per row
// block and call (56×56×64 has 10 blocks). Measured end to end on Bi-Real-18 (weights cold in L3 between
// layers): int8 for the 56×56 layers and the 56→28 downsample (36 / 72 KiB) is ~5 % faster than bits only,
// adding the 28×28×128 layers (147 KiB) loses that again, and up to 590 KiB (14×14×256) is ~7 % slower:
// larger weights stay bits only (8× less memory traffic).
int64_t amx_int8_weight_bytes(const ConvPlan& p) {
  const int64_t n = 8 * amx_weight_bytes(p);
  return n <= kInt8Weights ? n : 0;
}

int64_t amx_pad_dot(const ConvPlan& p) { return p.Cw % 2 ? 32 * p.KH * p.KW : 0; }

int64_t amx_image_bytes(const ConvPlan& p) {
  const Geom g = geom(p);
  return p.sh * g.PR * g.Wp * g.CB;
}

int64_t amx_blocks(const ConvPlan& p) { return geom(p).nblk; }

// int32 block result, then the expanded B tiles of two out-channel blocks (+ alignment)
int64_t amx_scratch_words(const ConvPlan& p) {
  const Geom g = geom(p);
  return g.Mmax * p.Opad + 2 * g.taps * g.nkc * kTileBytes / 4 + 16;
}

// ------------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,amx-tile,amx-int8")

void amx_unpack_image(const ConvPlan& p, int64_t n, int8_t* dst) {
  const Geom g = geom(p);
  const __m512i plus = _mm512_set1_epi8(1), minus = _mm512_set1_epi8(-1);
  const int64_t Cw = p.Cw;
  for (int64_t pr = 0; pr < p.sh * g.PR; ++pr) {
    const int64_t yy = (pr % g.PR) * p.sh + pr / g.PR - p.pt;  // phase pr / PR, index pr % PR
    const bool yin = yy >= 0 && yy < p.H;
    int8_t* drow = dst + pr * g.Wp * g.CB;
    for (int64_t c = 0; c < g.Wp; ++c) {
      const int64_t xx = c - p.pl;
      int8_t* d = drow + c * g.CB;
      if (!yin || xx < 0 || xx >= p.W) {
        for (int64_t q = 0; q < g.nkc; ++q) _mm512_storeu_si512(d + 64 * q, minus);
        continue;
      }
      const uint32_t* s = p.x + ((n * p.H + yy) * p.W + xx) * Cw;
      for (int64_t q = 0; q < g.nkc; ++q) {
        const uint64_t lo = s[2 * q];
        const uint64_t hi = 2 * q + 1 < Cw ? s[2 * q + 1] : 0u;
        _mm512_storeu_si512(d + 64 * q, _mm512_mask_blend_epi8(static_cast<__mmask64>(lo | (hi << 32)), minus, plus));
      }
    }
  }
}

namespace {

// One ±1 int8 B tile (1 KiB) from its 16 bit masks. Bits that do not exist (channels >= O, input bits >= 32·Cw
// in the upper half of an odd last chunk) are 0 → -1: padded channels are never read, and the activation
// bytes past 32·Cw are always -1 (amx_unpack_image), so they add the constant pad_dot(p) to every dot,
// which the epilogue's table etamx absorbs.
__attribute__((always_inline)) inline void expand_tile(const uint64_t* m, int8_t* dst) {
  const __m512i plus = _mm512_set1_epi8(1), minus = _mm512_set1_epi8(-1);
  for (int r = 0; r < 16; ++r)
    _mm512_store_si512(dst + 64 * r, _mm512_mask_blend_epi8(static_cast<__mmask64>(m[r]), minus, plus));
}

}  // namespace

void amx_expand_weights(const ConvPlan& p, int8_t* dst) {
  const int64_t tiles = amx_weight_bytes(p) / (kTile * 8);
  for (int64_t i = 0; i < tiles; ++i) expand_tile(p.wamx + i * kTile, dst + i * kTileBytes);
}

namespace {

// 32 pixels (tiles at a0, a1) × 16·NB out channels, accumulated over every tap and chunk; int32 results
// to c0 (pixels of a0) and c1 (pixels of a1), row stride cs bytes; int8 B tiles at b0 / b1.
template <int NB>
__attribute__((always_inline)) inline void tile_2xN(const int8_t* a0, const int8_t* a1, int64_t as, const int64_t* off,
                                                    int64_t ntap, int64_t nkc, const int8_t* b0, const int8_t* b1,
                                                    int32_t* c0, int32_t* c1, int64_t cs) {
  _tile_zero(0);
  _tile_zero(1);
  if (NB == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t t = 0; t < ntap; ++t) {
    const int8_t* pa0 = a0 + off[t];
    const int8_t* pa1 = a1 + off[t];
    for (int64_t q = 0; q < nkc; ++q) {
      _tile_loadd(4, pa0 + 64 * q, as);
      _tile_loadd(5, pa1 + 64 * q, as);
      _tile_loadd(6, b0, 64);
      b0 += kTileBytes;
      _tile_dpbssd(0, 4, 6);
      _tile_dpbssd(1, 5, 6);
      if (NB == 2) {
        _tile_loadd(7, b1, 64);
        b1 += kTileBytes;
        _tile_dpbssd(2, 4, 7);
        _tile_dpbssd(3, 5, 7);
      }
    }
  }
  _tile_stored(0, c0, cs);
  _tile_stored(1, c1, cs);
  if (NB == 2) {
    _tile_stored(2, c0 + kTile, cs);
    _tile_stored(3, c1 + kTile, cs);
  }
}

// 64 pixels (4 A tiles from a, 16 pixels = 16·as bytes apart) × 16 out channels, accumulated over every tap
// and chunk into tmm0-3; A through tmm4/5, B (tmm6) expanded from its bit masks into one of two L1 buffers
// one step ahead of its use (expanded right before it, the tile load seemingly waits on the fresh stores:
// 7×7×512 → 512 was ~20 % slower); w8 (not null): the B tiles pre-expanded.
// Results to c (row stride cs bytes).
__attribute__((always_inline)) inline void tile_4x1(const int8_t* a, int64_t as, const int64_t* off, int64_t ntap,
                                                    int64_t nkc, const uint64_t* mb, const int8_t* w8, int8_t* buf,
                                                    int32_t* c, int64_t cs) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const int64_t a16 = 16 * as, nk = ntap * nkc;
  if (!w8) expand_tile(mb, buf);
  const int8_t* pa = a + off[0];
  for (int64_t k = 0, q = 0, t = 0; k < nk; ++k) {
    if (w8) {
      _tile_loadd(6, w8 + k * kTileBytes, 64);
    } else {
      if (k + 1 < nk) expand_tile(mb + (k + 1) * kTile, buf + ((k + 1) & 1) * kTileBytes);
      _tile_loadd(6, buf + (k & 1) * kTileBytes, 64);
    }
    _tile_loadd(4, pa + 64 * q, as);
    _tile_dpbssd(0, 4, 6);
    _tile_loadd(5, pa + a16 + 64 * q, as);
    _tile_dpbssd(1, 5, 6);
    _tile_loadd(4, pa + 2 * a16 + 64 * q, as);
    _tile_dpbssd(2, 4, 6);
    _tile_loadd(5, pa + 3 * a16 + 64 * q, as);
    _tile_dpbssd(3, 5, 6);
    if (++q == nkc) {
      q = 0;
      if (++t < ntap) pa = a + off[t];
    }
  }
  const int64_t c16 = 16 * (cs / 4);
  _tile_stored(0, c, cs);
  _tile_stored(1, c + c16, cs);
  _tile_stored(2, c + 2 * c16, cs);
  _tile_stored(3, c + 3 * c16, cs);
}

// The one-compare bits epilogue (p.tamx, prepare_plan) of one 32-pixel × 32-channel register block, right
// after its tile stores (b: [pixel][32 channels] int32, in L1): virtual pixels v0 .. v0 + 31 (those past row
// y1 or column OW dropped), out-channel blocks ob (and ob + 1 when `two`), i.e. packed word ob / 2 of each
// pixel. The block's int32 result no longer goes out to L2 and back (56×56×64: a 74 KiB block).
__attribute__((always_inline)) inline void bits_block(const ConvPlan& p, int64_t n, int64_t v0, int64_t y1, int64_t V,
                                                      int64_t ob, bool two, const int32_t* b) {
  uint32_t* out = static_cast<uint32_t*>(p.y) + n * p.OH * p.OW * p.Ow + ob / 2;
  const uint32_t n0 = p.namx[ob], n1 = two ? p.namx[ob + 1] : 0u;
  int64_t y = v0 / V, x = v0 % V;
  for (int j = 0; j < 32; ++j) {
    if (y >= y1) break;
    if (x < p.OW) {
      const int32_t* t = p.tamx + (p.rc[y] * p.NC + p.cc[x]) * p.Opad + ob * kTile;
      const int32_t* c = b + 32 * j;
      uint32_t word = static_cast<uint32_t>(
          _mm512_cmpge_epi32_mask(_mm512_load_si512(c), _mm512_loadu_si512(t)) ^ n0);
      if (two)
        word |= static_cast<uint32_t>(
                    _mm512_cmpge_epi32_mask(_mm512_load_si512(c + 16), _mm512_loadu_si512(t + 16)) ^ n1) << 16;
      out[(y * p.OW + x) * p.Ow] = word;
    }
    if (++x == V) {
      x = 0;
      ++y;
    }
  }
}

}  // namespace

void amx_conv_block(const ConvPlan& p, const int8_t* img, int64_t n, int64_t blk, int32_t* dot, float* fbuf) {
  (void)n;
  const Geom g = geom(p);
  const int64_t y0 = blk * g.RB, y1 = y0 + g.RB < p.OH ? y0 + g.RB : p.OH;
  const int64_t P0 = y0 * g.V, M = block_pixels((y1 - y0) * g.V);
  const int64_t Opad = p.Opad, nob = Opad / kTile, tapstride = g.taps * g.nkc * kTileBytes;
  int64_t off[64];
  int64_t* offs = g.taps <= 64 ? off : new int64_t[g.taps];
  for (int64_t i = 0; i < p.KH; ++i)
    for (int64_t j = 0; j < p.KW; ++j)
      offs[i * p.KW + j] = ((((i * p.dh) % p.sh) * g.PR + (i * p.dh) / p.sh) * g.Wp + j * p.dw) * g.CB;
  const int64_t as = p.sw * g.CB, cs = Opad * 4;
  auto base = [&](int64_t v) {  // first unpacked position read by virtual pixel v (tap 0)
    return img + v * p.sw * g.CB;  // = ((v / V)·Wp + (v % V)·sw)·CB: output rows are consecutive phase rows
  };

  TileCfg cfg;
  std::memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int i = 0; i < 8; ++i) {
    cfg.colsb[i] = 64;
    cfg.rows[i] = 16;
  }
  _tile_loadconfig(&cfg);
  int32_t* bscr_words = dot + g.Mmax * Opad;
  int8_t* bscr = reinterpret_cast<int8_t*>(bscr_words) + (64 - reinterpret_cast<uintptr_t>(bscr_words) % 64) % 64;
  // Small blocks (deep layers: 7×7 maps): 4 A tiles × 1 B tile, each B tile expanded from bits right before
  // its only use, in L1. Otherwise 2 × 2, with the B tiles of an out-channel pair expanded once per block
  // (L1/L2 resident) and reused for every pixel pair. (Measured per ResNet-18 shape: 4×1 is 20-25 % faster
  // at 64 pixels, 2×2 10-40 % faster from 128 up.)
  const int64_t tiles = g.taps * g.nkc;
  // bits output with the one-compare epilogue and 2 × 2 blocking: the epilogue per register block (bits_block)
  const bool block_bits = p.bits && p.tamx && M > kSmallBlock;
  alignas(64) int32_t rblk[32 * 32];
  if (M <= kSmallBlock) {
    for (int64_t m = 0; m < M; m += 64)
      for (int64_t ob = 0; ob < nob; ++ob)
        tile_4x1(base(P0 + m), as, offs, g.taps, g.nkc, p.wamx + ob * tiles * kTile,
                 p.wamx8 ? p.wamx8 + ob * tiles * kTileBytes : nullptr, bscr, dot + m * Opad + ob * kTile, cs);
  } else {
    for (int64_t ob = 0; ob < nob; ob += 2) {
      const bool two = ob + 1 < nob;
      const int8_t* b0 = bscr;
      if (p.wamx8) {
        b0 = p.wamx8 + ob * tiles * kTileBytes;
      } else {
        const uint64_t* m0 = p.wamx + ob * tiles * kTile;
        for (int64_t i = 0; i < (two ? 2 * tiles : tiles); ++i) expand_tile(m0 + i * kTile, bscr + i * kTileBytes);
      }
      for (int64_t m = 0; m < M; m += 32) {
        const int8_t* a0 = base(P0 + m);
        const int8_t* a1 = base(P0 + m + 16);
        int32_t* c0 = block_bits ? rblk : dot + m * Opad + ob * kTile;
        int32_t* c1 = block_bits ? rblk + 16 * 32 : c0 + 16 * Opad;
        const int64_t rs = block_bits ? 32 * 4 : cs;
        if (two)
          tile_2xN<2>(a0, a1, as, offs, g.taps, g.nkc, b0, b0 + tapstride, c0, c1, rs);
        else
          tile_2xN<1>(a0, a1, as, offs, g.taps, g.nkc, b0, nullptr, c0, c1, rs);
        if (block_bits) bits_block(p, n, P0 + m, y1, g.V, ob, two, rblk);
      }
    }
  }
  _tile_release();
  if (offs != off) delete[] offs;

  // the epilogue of the block's rows, straight from the dot products (D = E - Kbits + dot); the
  // general-direction bits case goes through popcounts (popcount = Kbits/2 - dot/2, dot is even) and the
  // scalar epilogue, row by row
  const bool direct = !p.bits || p.small_dir;
  if (block_bits) {
    // done per register block above
  } else if (direct) {
    epilogue_dot_rows_avx512(p, n, y0, y1, dot, g.V);
  } else {
    const __m512i kh = _mm512_set1_epi32(static_cast<int>(g.taps * p.Cw * 16 + amx_pad_dot(p) / 2));
    for (int64_t y = y0; y < y1; ++y) {
      int32_t* row = dot + (y - y0) * g.V * Opad;
      for (int64_t i = 0; i < p.OW * Opad; i += 16) {
        const __m512i d = _mm512_loadu_si512(row + i);
        _mm512_storeu_si512(row + i, _mm512_sub_epi32(kh, _mm512_srai_epi32(d, 1)));
      }
      epilogue_scalar(p, n, y, 0, p.OW, row);
    }
  }
  (void)fbuf;
}

#pragma GCC pop_options

}  // namespace bnnc

// ------------------------------------------------------------------------------------------------
// Serial driver (self-test); plain C++, outside the target region.
#include <vector>

#include "plan.h"

namespace bnnc {

void run_conv_serial_amx(const ConvPlan& p) {
  std::vector<int8_t> img(static_cast<size_t>(amx_image_bytes(p)) + 64);
  std::vector<int32_t> dot(static_cast<size_t>(amx_scratch_words(p)) + 16);
  std::vector<float> fbuf(static_cast<size_t>(p.OW * p.Opad) + 1);
  int8_t* im = img.data() + (64 - reinterpret_cast<uintptr_t>(img.data()) % 64) % 64;
  for (int64_t n = 0; n < p.N; ++n) {
    amx_unpack_image(p, n, im);
    for (int64_t b = 0; b < amx_blocks(p); ++b) amx_conv_block(p, im, n, b, dot.data(), fbuf.data());
  }
}

}  // namespace bnnc
#endif  // __x86_64__
