// x86 AMX-INT8 kernels (Sapphire Rapids and later): BinaryConv2dPacked as an int8 GEMM on ±1 values.
//
// With a = ±1 (bit 1 → +1, bit 0 → -1) and w = ±1, Σ a·w over the 32·Cw bits of every tap is
// Kbits - 2·popcount(x XOR w) (Kbits = KH·KW·32·Cw), so popcount = (Kbits - dot) / 2 exactly: the int32
// accumulation of TDPBSSD (16×16 output tile, 64 int8 products per element per instruction = 1024 MACs per
// cycle) reproduces the XOR-popcount of the other kernels bit for bit, with 3× the throughput bound of
// 512-bit VPOPCNTD (341 bit-MACs per cycle).
//
// Layout. The input image is unpacked once per call into a zero-copy-im2col form: a padded image
// [rows][Wp][CB] of int8 (CB = 32·Cw rounded up to 64 bytes; padding positions are all -1, i.e. zero words,
// as in the reference; the bytes past 32·Cw are don't-care because the weights are 0 there). An A tile is
// 16 consecutive output pixels × 64 bytes of one tap: for stride-1 rows the output pixels run over the padded
// width ("virtual" pixels p = y·V + x, V = Wp / sw), so one tile row stride (sw·CB bytes) walks pixels across
// output rows and the border needs no special case (the border table E corrects the padded taps, as for
// every kernel); the few virtual pixels x ≥ OW are computed and dropped. For sh > 1 a tile stays inside one
// output row (V = OW rounded up to 16). Weights are pre-packed once per model in the VNNI B-tile layout:
// [out block of 16][tap][64-byte chunk][16 rows][16 channels][4 bytes].
//
// Blocking: 2 A tiles (32 pixels) × 2 B tiles (32 out channels) = 4 accumulator tiles (tmm0-3), A in
// tmm4-5, B in tmm6-7; out-channel pairs outer, pixel pairs inner, over blocks of output rows sized so that
// the int32 block result stays in L2; the AVX-512 epilogue runs on each block row right after.
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

struct Geom {
  int64_t CB, nkc, taps;
  bool flat;        // sh == 1: tiles may cross output rows
  int64_t Wp, V;    // padded input width; virtual pixels per output row
  int64_t rows;     // rows of the unpacked image buffer
  int64_t RB, nblk; // output rows per block, blocks per image
  int64_t Mmax;     // virtual pixels per block, rounded up to 32
};

inline int64_t round_up(int64_t a, int64_t m) { return (a + m - 1) / m * m; }

Geom geom(const ConvPlan& p) {
  Geom g;
  g.CB = round_up(32 * p.Cw, 64);
  g.nkc = g.CB / 64;
  g.taps = p.KH * p.KW;
  g.flat = p.sh == 1;
  const int64_t need = (p.OW - 1) * p.sw + (p.KW - 1) * p.dw + 1;
  g.Wp = round_up(need > p.pl + p.W ? need : p.pl + p.W, p.sw);
  g.V = g.flat ? g.Wp / p.sw : round_up(p.OW, kTile);
  const int64_t target = kBlockBytes / (4 * p.Opad) > 32 ? kBlockBytes / (4 * p.Opad) : 32;
  g.RB = target / g.V;
  if (g.RB < 1) g.RB = 1;
  if (g.RB > p.OH) g.RB = p.OH;
  g.nblk = (p.OH + g.RB - 1) / g.RB;
  g.Mmax = round_up(g.RB * g.V, 32);
  // Highest virtual pixel any tile reads: below (OH + 1)·V + 32 (last block start + Mmax).
  const int64_t pmax = p.OH * g.V + g.Mmax;
  const int64_t last = ((pmax / g.V) * p.sh + (p.KH - 1) * p.dh + 1) * g.Wp + g.V * p.sw + (p.KW - 1) * p.dw + 1;
  g.rows = (last + g.Wp - 1) / g.Wp + 1;
  if (g.rows < p.pt + p.H) g.rows = p.pt + p.H;
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

// (weights only: no spatial fields of p are read)
int64_t amx_weight_bytes(const ConvPlan& p) {
  return (p.Opad / kTile) * p.KH * p.KW * (round_up(32 * p.Cw, 64) / 64) * kTileBytes;
}

void amx_pack_weights(const ConvPlan& p, int8_t* dst) {
  struct {
    int64_t taps, nkc;
  } g{p.KH * p.KW, round_up(32 * p.Cw, 64) / 64};
  const int64_t nob = p.Opad / kTile, bits = 32 * p.Cw;
  std::memset(dst, 0, static_cast<size_t>(amx_weight_bytes(p)));
  for (int64_t ob = 0; ob < nob; ++ob)
    for (int64_t t = 0; t < g.taps; ++t)
      for (int64_t q = 0; q < g.nkc; ++q) {
        int8_t* tile = dst + ((ob * g.taps + t) * g.nkc + q) * kTileBytes;
        for (int64_t n = 0; n < kTile; ++n) {
          const int64_t o = ob * kTile + n;
          if (o >= p.O) continue;
          const uint32_t* wo = p.w + o * p.K + t * p.Cw;
          for (int64_t k = 0; k < 64; ++k) {
            const int64_t cb = q * 64 + k;
            if (cb >= bits) break;
            tile[(k >> 2) * 64 + n * 4 + (k & 3)] = ((wo[cb >> 5] >> (cb & 31)) & 1u) ? 1 : -1;
          }
        }
      }
}

int64_t amx_image_bytes(const ConvPlan& p) {
  const Geom g = geom(p);
  return g.rows * g.Wp * g.CB;
}

int64_t amx_blocks(const ConvPlan& p) { return geom(p).nblk; }

int64_t amx_scratch_words(const ConvPlan& p) { return geom(p).Mmax * p.Opad; }

// ------------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,amx-tile,amx-int8")

void amx_unpack_image(const ConvPlan& p, int64_t n, int8_t* dst) {
  const Geom g = geom(p);
  const __m512i plus = _mm512_set1_epi8(1), minus = _mm512_set1_epi8(-1);
  const int64_t Cw = p.Cw;
  for (int64_t r = 0; r < g.rows; ++r) {
    const int64_t yy = r - p.pt;
    const bool yin = yy >= 0 && yy < p.H;
    int8_t* drow = dst + r * g.Wp * g.CB;
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

// 32 pixels (tiles at a0, a1) × 16·NB out channels, accumulated over every tap and chunk; int32 results
// to c0 (pixels of a0) and c1 (pixels of a1), row stride cs bytes.
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

}  // namespace

void amx_conv_block(const ConvPlan& p, const int8_t* img, int64_t n, int64_t blk, int32_t* dot, float* fbuf) {
  (void)n;
  const Geom g = geom(p);
  const int64_t y0 = blk * g.RB, y1 = y0 + g.RB < p.OH ? y0 + g.RB : p.OH;
  const int64_t P0 = y0 * g.V, M = round_up((y1 - y0) * g.V, 32);
  const int64_t Opad = p.Opad, nob = Opad / kTile, tapstride = g.taps * g.nkc * kTileBytes;
  int64_t off[64];
  int64_t* offs = g.taps <= 64 ? off : new int64_t[g.taps];
  for (int64_t i = 0; i < p.KH; ++i)
    for (int64_t j = 0; j < p.KW; ++j) offs[i * p.KW + j] = ((i * p.dh) * g.Wp + j * p.dw) * g.CB;
  const int64_t as = p.sw * g.CB, cs = Opad * 4;
  auto base = [&](int64_t v) {  // first unpacked position read by virtual pixel v (tap 0)
    return img + (((v / g.V) * p.sh) * g.Wp + (v % g.V) * p.sw) * g.CB;
  };

  TileCfg cfg;
  std::memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int i = 0; i < 8; ++i) {
    cfg.colsb[i] = 64;
    cfg.rows[i] = 16;
  }
  _tile_loadconfig(&cfg);
  for (int64_t ob = 0; ob < nob; ob += 2) {
    const int8_t* b0 = p.wamx + ob * tapstride;
    for (int64_t m = 0; m < M; m += 32) {
      const int8_t* a0 = base(P0 + m);
      const int8_t* a1 = base(P0 + m + 16);
      int32_t* c0 = dot + m * Opad + ob * kTile;
      int32_t* c1 = c0 + 16 * Opad;
      if (ob + 1 < nob)
        tile_2xN<2>(a0, a1, as, offs, g.taps, g.nkc, b0, b0 + tapstride, c0, c1, cs);
      else
        tile_2xN<1>(a0, a1, as, offs, g.taps, g.nkc, b0, nullptr, c0, c1, cs);
    }
  }
  _tile_release();
  if (offs != off) delete[] offs;

  // popcount = Kbits/2 - dot/2 (dot is even), then the usual epilogue row by row
  const __m512i kh = _mm512_set1_epi32(static_cast<int>(g.taps * p.Cw * 16));
  for (int64_t y = y0; y < y1; ++y) {
    int32_t* row = dot + (y - y0) * g.V * Opad;
    for (int64_t i = 0; i < p.OW * Opad; i += 16) {
      const __m512i d = _mm512_loadu_si512(row + i);
      _mm512_storeu_si512(row + i, _mm512_sub_epi32(kh, _mm512_srai_epi32(d, 1)));
    }
    epilogue_row_avx512(p, n, y, row, fbuf);
  }
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
