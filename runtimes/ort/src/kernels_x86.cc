// x86 kernels: AVX2 and AVX-512 (F + VPOPCNTDQ). Each function carries its own target through
// `#pragma GCC target` regions, so the library is built for baseline x86-64 and only calls these after
// a run-time CPU check (bnnc_ort.cc). Everything here has internal linkage or is a plain extern
// function on raw pointers: no std templates are instantiated inside the target regions.
#if defined(__x86_64__) || defined(__i386__)
// GCC 12 warns about the intentionally undefined pass-through operand inside its own AVX-512 headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "kernels.h"

namespace bnnc {

// ------------------------------------------------------------------------------------------------
// AVX-512: 16 output channels per vector, VPOPCNTD on (broadcast patch word XOR weight words).
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vpopcntdq")

namespace {

// Bits output decided in the register block (popcount kernels with p.tpc): the row's class-table row, the
// row's output words.
struct RowBits {
  const int32_t* trow;  // tpc + rc[y]·NC·Opad
  const int32_t* cc;
  const uint16_t* neg;  // namx
  uint32_t* out;        // output words of the row's pixel 0
  int64_t Ow;
};

// PB pixels (x .. x + PB - 1) × OB 16-channel vectors (from o0) of one row: popcounts into pc (rows of Opad),
// or with rb (Bits) each pixel's output words straight from the accumulators: bit o = (pc <= T[class][o]) XOR
// neg[o], two 16-channel masks per word (o0 is a multiple of 64, so vector pairs are words).
template <int PB, int OB, bool Bits>
__attribute__((always_inline)) inline void block512(const RowSrc& src, const uint32_t* wt, int64_t Opad, int64_t x,
                                                    int64_t o0, int32_t* pc, const RowBits* rb) {
  __m512i acc[PB][OB];
  for (int q = 0; q < PB; ++q)
    for (int b = 0; b < OB; ++b) acc[q][b] = _mm512_setzero_si512();
  const uint32_t* wk = wt + o0;
  const int64_t xs = src.x_step;
  for (int64_t r = 0; r < src.nrows; ++r) {
    const uint32_t* a = src.base + r * src.row_stride + x * xs;
    for (int64_t t = 0; t < src.row_len; ++t, wk += Opad) {
      __m512i wv[OB];
      for (int b = 0; b < OB; ++b) wv[b] = _mm512_loadu_si512(reinterpret_cast<const void*>(wk + 16 * b));
      for (int q = 0; q < PB; ++q) {
        const __m512i av = _mm512_set1_epi32(static_cast<int>(a[q * xs + t]));
        for (int b = 0; b < OB; ++b)
          acc[q][b] = _mm512_add_epi32(acc[q][b], _mm512_popcnt_epi32(_mm512_xor_si512(av, wv[b])));
      }
    }
  }
  if (Bits) {
    const int64_t v0 = o0 / 16;
    for (int q = 0; q < PB; ++q) {
      const int32_t* tc = rb->trow + rb->cc[x + q] * Opad + o0;
      uint32_t* ow = rb->out + (x + q) * rb->Ow + o0 / 32;
      for (int b = 0; b < OB; b += 2) {
        uint32_t word = static_cast<uint32_t>(
            _mm512_cmple_epi32_mask(acc[q][b], _mm512_loadu_si512(tc + 16 * b)) ^ rb->neg[v0 + b]);
        if (b + 1 < OB)
          word |= static_cast<uint32_t>(static_cast<uint16_t>(
                      _mm512_cmple_epi32_mask(acc[q][b + 1], _mm512_loadu_si512(tc + 16 * b + 16)) ^
                      rb->neg[v0 + b + 1]))
                  << 16;
        ow[b / 2] = word;
      }
    }
    return;
  }
  for (int q = 0; q < PB; ++q)
    for (int b = 0; b < OB; ++b)
      _mm512_storeu_si512(reinterpret_cast<void*>(pc + (x + q) * Opad + o0 + 16 * b), acc[q][b]);
}

// The row's pixels 4 at a time and the last 1-3 as one block: single-pixel blocks load OB weight vectors
// per OB popcounts (7²×512, where 3 of 7 pixels went so, on one Zen 4 core: bits 0.162 → 0.119 ms, float
// 0.156 → 0.141; chain_bench, interleaved with the previous library).
template <int OB, bool Bits>
inline void cols512(const ConvPlan& p, const RowSrc& src, int32_t* pc, int64_t o0, const RowBits* rb) {
  int64_t x = 0;
  for (; x + 4 <= p.OW; x += 4) block512<4, OB, Bits>(src, p.wt, p.Opad, x, o0, pc, rb);
  switch (p.OW - x) {
    case 3: block512<3, OB, Bits>(src, p.wt, p.Opad, x, o0, pc, rb); break;
    case 2: block512<2, OB, Bits>(src, p.wt, p.Opad, x, o0, pc, rb); break;
    case 1: block512<1, OB, Bits>(src, p.wt, p.Opad, x, o0, pc, rb); break;
    default: break;
  }
}

template <bool Bits>
void conv_row512(const ConvPlan& p, const RowSrc& src, int32_t* pc, const RowBits* rb) {
  const int64_t nvec = p.Opad / 16;
  int64_t v = 0;
  for (; v + 4 <= nvec; v += 4) cols512<4, Bits>(p, src, pc, v * 16, rb);
  switch (nvec - v) {
    case 3: cols512<3, Bits>(p, src, pc, v * 16, rb); break;
    case 2: cols512<2, Bits>(p, src, pc, v * 16, rb); break;
    case 1: cols512<1, Bits>(p, src, pc, v * 16, rb); break;
    default: break;
  }
}

// In-register transpose of a 16×16 float matrix (row q → t[q] becomes column q).
__attribute__((always_inline)) inline void transpose16(__m512* t) {
  __m512 a[16], b[16];
  for (int i = 0; i < 16; i += 2) {
    a[i] = _mm512_unpacklo_ps(t[i], t[i + 1]);
    a[i + 1] = _mm512_unpackhi_ps(t[i], t[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    b[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a[i]), _mm512_castps_pd(a[i + 2])));
    b[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a[i]), _mm512_castps_pd(a[i + 2])));
    b[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a[i + 1]), _mm512_castps_pd(a[i + 3])));
    b[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a[i + 1]), _mm512_castps_pd(a[i + 3])));
  }
  // b[4k + j] holds, in each 128-bit lane L, column j of rows 4k..4k+3 (lane L = columns 4L + j)
  for (int h = 0; h < 2; ++h)
    for (int j = 0; j < 4; ++j) {
      a[8 * h + j] = _mm512_shuffle_f32x4(b[8 * h + j], b[8 * h + 4 + j], 0x88);
      a[8 * h + 4 + j] = _mm512_shuffle_f32x4(b[8 * h + j], b[8 * h + 4 + j], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    t[j] = _mm512_shuffle_f32x4(a[j], a[8 + j], 0x88);
    t[8 + j] = _mm512_shuffle_f32x4(a[j], a[8 + j], 0xdd);
  }
}

}  // namespace

void conv_row_pc_avx512(const ConvPlan& p, const RowSrc& src, int32_t* pc) { conv_row512<false>(p, src, pc, nullptr); }

void conv_row_bits_avx512(const ConvPlan& p, int64_t n, int64_t y, const RowSrc& src) {
  const RowBits rb{p.tpc + p.rc[y] * p.NC * p.Opad, p.cc, p.namx,
                   static_cast<uint32_t*>(p.y) + ((n * p.OH + y) * p.OW) * p.Ow, p.Ow};
  conv_row512<true>(p, src, nullptr, &rb);
}

namespace {

// One channel's 16 pixels through the fused element-wise chain (same float ops, same order as
// apply_chain_row); r = this channel's residual row at the first pixel, m = valid pixels.
__attribute__((always_inline)) inline __m512 chain16(const ConvPlan& p, __m512 v, int64_t o, const float* r,
                                                     __mmask16 m) {
  const float* c = p.chainc;
  for (int64_t i = 0; i < p.nchain; ++i) {
    switch (p.chain[i]) {
      case kChainAddResidual:
        v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, r));
        break;
      case kChainAddChannel:
        v = _mm512_add_ps(v, _mm512_set1_ps(c[o]));
        c += p.O;
        break;
      case kChainMulChannel:
        v = _mm512_mul_ps(v, _mm512_set1_ps(c[o]));
        c += p.O;
        break;
      case kChainPRelu: {
        const __mmask16 neg = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ);
        v = _mm512_mask_mul_ps(v, neg, v, _mm512_set1_ps(c[o]));
        c += p.O;
        break;
      }
      case kChainClip: {
        const __m512 lo = _mm512_set1_ps(c[o]), hi = _mm512_set1_ps(c[p.O + o]);
        v = _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(v, lo, _CMP_LT_OQ), lo);
        v = _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(v, hi, _CMP_GT_OQ), hi);
        c += 2 * p.O;
        break;
      }
      default:
        break;
    }
  }
  return v;
}

// Dot = false: pc holds popcounts, D = E - 2·pc (et = p.et). Dot = true (AMX): pc holds the ±1 dot
// products, D = (E - Kbits) + dot (et = p.etamx), the same integer.
template <bool Dot>
__attribute__((always_inline)) inline __m512i d16(const int32_t* e, const int32_t* c) {
  const __m512i ev = _mm512_loadu_si512(e), cv = _mm512_loadu_si512(c);
  return Dot ? _mm512_add_epi32(ev, cv) : _mm512_sub_epi32(ev, _mm512_slli_epi32(cv, 1));
}

// The packed bits of output rows [y0, y1) of image n (counts / dot products of row y, pixel x at
// pc + ((y - y0)·pc_row + x)·Opad): mask(class · Opad, counts of channel vector v, v) gives the output bits of
// those 16 channels; two masks make one word.
template <class Mask>
__attribute__((always_inline)) inline void bits_rows(const ConvPlan& p, int64_t n, int64_t y0, int64_t y1,
                                                     const int32_t* pc, int64_t pc_row, Mask mask) {
  const int64_t nvec = p.Opad / 16, Opad = p.Opad;
  for (int64_t y = y0; y < y1; ++y) {
    const int64_t r = p.rc[y];
    const int32_t* prow = pc + (y - y0) * pc_row * Opad;
    uint32_t* out = static_cast<uint32_t*>(p.y) + ((n * p.OH + y) * p.OW) * p.Ow;
    for (int64_t x = 0; x < p.OW; ++x) {
      const int64_t cls = (r * p.NC + p.cc[x]) * Opad;
      const int32_t* c = prow + x * Opad;
      uint32_t* ow = out + x * p.Ow;
      uint32_t word = 0;
      for (int64_t v = 0; v < nvec; ++v) {
        const uint32_t m = mask(cls, c + 16 * v, v);
        if ((v & 1) == 0) {
          word = m;
        } else {
          ow[v >> 1] = word | (m << 16);
        }
      }
      if (nvec & 1) ow[nvec >> 1] = word;
    }
  }
}

// One group of cnt (Full: 16) output pixels, counts / dot products of pixel q at cp[q], border-table row at
// ep[q], channel o of pixel q stored at dst[o·plane + q] (and, not Plain, through the chain, PackSign into bw).
template <bool Dot, bool Full, bool Plain>
__attribute__((always_inline)) inline void group512(const ConvPlan& p, const int32_t* const* ep,
                                                    const int32_t* const* cp, int64_t cnt, float* dst, int64_t plane,
                                                    uint32_t* bw, __m512i lane) {
  const int64_t nvec = p.Opad / 16, Ow = (p.O + 31) / 32;
  const __mmask16 m = static_cast<__mmask16>(Full ? 0xffffu : (1u << cnt) - 1u);
  __m512i word = _mm512_setzero_si512();
  for (int64_t v = 0; v < nvec; ++v) {
    const __m512 s0 = _mm512_loadu_ps(p.p0f + 16 * v), s1 = _mm512_loadu_ps(p.p1f + 16 * v);
    __m512 t[16];
    for (int q = 0; q < 16; ++q) {
      if (Full || q < cnt) {
        const __m512i d = d16<Dot>(ep[q] + 16 * v, cp[q] + 16 * v);
        t[q] = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d), s0), s1);
      } else {
        t[q] = _mm512_setzero_ps();
      }
    }
    transpose16(t);
    const int64_t o0 = 16 * v, oend = p.O - o0 < 16 ? p.O - o0 : 16;
    float* dv = dst + o0 * plane;
    if (Plain) {
      if (Full && oend == 16) {  // no per-store channel check
        for (int j = 0; j < 16; ++j) _mm512_storeu_ps(dv + j * plane, t[j]);
      } else {
        for (int64_t j = 0; j < oend; ++j) _mm512_mask_storeu_ps(dv + j * plane, m, t[j]);
      }
      continue;
    }
    const float* res = p.res ? p.res + (dv - static_cast<float*>(p.y)) : nullptr;
    for (int64_t j = 0; j < oend; ++j) {
      const __m512 val = p.nchain ? chain16(p, t[j], o0 + j, res ? res + j * plane : nullptr, m) : t[j];
      _mm512_mask_storeu_ps(dv + j * plane, m, val);
      if (bw) {
        const __m512 th = _mm512_set1_ps(p.tpack ? p.tpack[o0 + j] : 0.0f);
        word = _mm512_mask_or_epi32(word, _mm512_cmp_ps_mask(val, th, _CMP_GE_OQ), word,
                                    _mm512_set1_epi32(static_cast<int>(1u << ((o0 + j) & 31))));
      }
    }
    if (bw && ((v & 1) || v + 1 == nvec)) {  // word v / 2 of the 16 pixels complete
      uint32_t* yo = bw + (v >> 1);
      if (Ow == 1) _mm512_mask_storeu_epi32(yo, m, word);
      else _mm512_mask_i32scatter_epi32(yo, m, lane, word, 4);
      word = _mm512_setzero_si512();
    }
  }
}

// Float output of the flat pixel range [f_begin, f_end) of image n (pixel f = y·OW + x): 16 output pixels × 16
// channels at a time, transposed in registers, run through the fused chain and stored straight into the
// NCHW planes. The range runs over rows as one (the rows are consecutive in every plane), so only its last
// vector is partial (7×7 maps: 4 vectors instead of 7 half-empty ones; 56-wide rows two at a time: 7 whole
// vectors, each a whole cache line of its plane, instead of 8 with half of them straddling two lines). The
// counts / dot products of pixel (y, x) are at pc + (((y - ybase) mod slots)·pc_row + x)·Opad (a ring of
// `slots` rows). The fused PackSign compares the same registers and ORs channel c's bit into 16 pixel lanes,
// one packed word per two channel vectors.
template <bool Dot>
void float_range512(const ConvPlan& p, int64_t n, int64_t f_begin, int64_t f_end, const int32_t* pc, int64_t ybase,
                    int64_t slots, int64_t pc_row, const int32_t* et) {
  const int64_t Opad = p.Opad;
  float* out = static_cast<float*>(p.y);
  const int64_t plane = p.OH * p.OW, Ow = (p.O + 31) / 32, total = f_end - f_begin;
  const __m512i lane = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32(static_cast<int>(Ow)));
  uint32_t* bits0 = p.ybits ? p.ybits + (n * plane + f_begin) * Ow : nullptr;
  int64_t gy = f_begin / p.OW, gx = f_begin % p.OW;  // row and column of the group's first pixel
  int64_t gs = (gy - ybase) % slots;                  // and its ring slot
  for (int64_t f0 = 0; f0 < total; f0 += 16) {
    const int64_t cnt = total - f0 < 16 ? total - f0 : 16;
    const int32_t* ep[16];
    const int32_t* cp[16];
    for (int64_t q = 0; q < cnt; ++q) {
      ep[q] = et + (p.rc[gy] * p.NC + p.cc[gx]) * Opad;
      cp[q] = pc + (gs * pc_row + gx) * Opad;
      if (++gx == p.OW) {
        gx = 0;
        ++gy;
        if (++gs == slots) gs = 0;
      }
    }
    const int64_t off = n * p.O * plane + f_begin + f0;
    if (!p.nchain && !bits0) {
      if (cnt == 16) group512<Dot, true, true>(p, ep, cp, cnt, out + off, plane, nullptr, lane);
      else group512<Dot, false, true>(p, ep, cp, cnt, out + off, plane, nullptr, lane);
    } else {
      uint32_t* bw = bits0 ? bits0 + f0 * Ow : nullptr;
      if (cnt == 16) group512<Dot, true, false>(p, ep, cp, cnt, out + off, plane, bw, lane);
      else group512<Dot, false, false>(p, ep, cp, cnt, out + off, plane, bw, lane);
    }
  }
}

// Output rows [y0, y1) of image n; the counts / dot products of row y, pixel x at pc + ((y - y0)·pc_row + x)·Opad.
template <bool Dot>
void epilogue512(const ConvPlan& p, int64_t n, int64_t y0, int64_t y1, const int32_t* pc, int64_t pc_row,
                 const int32_t* et) {
  const int64_t nvec = p.Opad / 16, Opad = p.Opad;
  if (p.bits) {
    // one packed word per 32 channels of each pixel, from two 16-channel masks: with every P0 in {-1, 0, 1}
    // one compare of the dot product (AMX) or the popcount against the class's threshold, XOR the channels
    // whose P0 is -1 (prepare_plan: no multiply, no border-table add), else P0·D >= P1
    if (Dot && p.tamx)
      bits_rows(p, n, y0, y1, pc, pc_row, [&](int64_t cls, const int32_t* c, int64_t v) {
        return static_cast<uint32_t>(
            _mm512_cmpge_epi32_mask(_mm512_loadu_si512(c), _mm512_loadu_si512(p.tamx + cls + 16 * v)) ^ p.namx[v]);
      });
    else if (!Dot && p.tpc)
      bits_rows(p, n, y0, y1, pc, pc_row, [&](int64_t cls, const int32_t* c, int64_t v) {
        return static_cast<uint32_t>(
            _mm512_cmple_epi32_mask(_mm512_loadu_si512(c), _mm512_loadu_si512(p.tpc + cls + 16 * v)) ^ p.namx[v]);
      });
    else
      bits_rows(p, n, y0, y1, pc, pc_row, [&](int64_t cls, const int32_t* c, int64_t v) {
        const __m512i t = _mm512_mullo_epi32(_mm512_loadu_si512(p.p0i + 16 * v), d16<Dot>(et + cls + 16 * v, c));
        return static_cast<uint32_t>(_mm512_cmpge_epi32_mask(t, _mm512_loadu_si512(p.p1i + 16 * v)));
      });
    return;
  }
  float_range512<Dot>(p, n, y0 * p.OW, y1 * p.OW, pc, y0, y1 - y0, pc_row, et);
}
}  // namespace

void epilogue_row_avx512(const ConvPlan& p, int64_t n, int64_t y, const int32_t* pc, float* /*fbuf*/) {
  if (p.bits && !p.small_dir) {
    epilogue_scalar(p, n, y, 0, p.OW, pc);
    return;
  }
  epilogue512<false>(p, n, y, y + 1, pc, p.OW, p.et);
}

void epilogue_dot_rows_avx512(const ConvPlan& p, int64_t n, int64_t y0, int64_t y1, const int32_t* dot,
                              int64_t dot_row) {
  epilogue512<true>(p, n, y0, y1, dot, dot_row, p.etamx);
}

int64_t float_band_rows_avx512(const ConvPlan& p) {
  int64_t g = 16, w = p.OW;  // rows per band: the fewest whose pixels fill whole 16-pixel vectors ...
  while (w) {
    const int64_t t = g % w;
    g = w;
    w = t;
  }
  const int64_t band = 16 / g, half = (p.OH + 1) / 2;  // ... but at least two bands per image (2 threads)
  return band < half ? band : (half > 0 ? half : 1);
}

int64_t float_band_slots_avx512(const ConvPlan& p, int64_t band) {
  // the rows of < 16 pending pixels (at most ceil(15 / OW)) plus the row being computed
  const int64_t s = 15 / p.OW + 2;
  return s < band ? s : band;
}

void conv_band_float_avx512(const ConvPlan& p, int64_t n, int64_t y0, int64_t y1, uint32_t* patch, int32_t* pc) {
  const int64_t OW = p.OW, slots = float_band_slots_avx512(p, y1 - y0);
  int64_t done = y0 * OW, s = 0;  // pixels [y0·OW, done) stored
  for (int64_t y = y0; y < y1; ++y) {
    conv_row_pc_avx512(p, gather_row(p, n, y, patch), pc + s * OW * p.Opad);
    if (++s == slots) s = 0;
    const int64_t avail = (y + 1) * OW, upto = y + 1 == y1 ? avail : done + (avail - done) / 16 * 16;
    if (upto > done) {
      float_range512<false>(p, n, done, upto, pc, y0, slots, OW, p.et);
      done = upto;
    }
  }
}

// PackSign: 16 positions per vector; per channel one compare into a mask and one masked OR of the
// channel's bit, 4 vectors (64 positions, whole cache lines of every channel plane) per step. Channel c
// of the input at x + c * cstride (one image; the fused PackSign of a conv output row uses the plane stride).
void pack_sign_strided_avx512(const float* x, int64_t cstride, const float* t, int64_t C, int64_t S, uint32_t* y) {
  const int64_t Cw = (C + 31) / 32;
  const __m512i lane = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32(static_cast<int>(Cw)));
  for (int64_t wd = 0; wd < Cw; ++wd) {
    const int64_t c0 = wd * 32, c1 = C < c0 + 32 ? C : c0 + 32;
    uint32_t* yo = y + wd;
    int64_t s = 0;
    for (; s + 64 <= S; s += 64) {
      __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t c = c0; c < c1; ++c) {
        const float* xs = x + c * cstride + s;
        const __m512 th = _mm512_set1_ps(t ? t[c] : 0.0f);
        const __m512i bit = _mm512_set1_epi32(static_cast<int>(1u << (c & 31)));
        a0 = _mm512_mask_or_epi32(a0, _mm512_cmp_ps_mask(_mm512_loadu_ps(xs), th, _CMP_GE_OQ), a0, bit);
        a1 = _mm512_mask_or_epi32(a1, _mm512_cmp_ps_mask(_mm512_loadu_ps(xs + 16), th, _CMP_GE_OQ), a1, bit);
        a2 = _mm512_mask_or_epi32(a2, _mm512_cmp_ps_mask(_mm512_loadu_ps(xs + 32), th, _CMP_GE_OQ), a2, bit);
        a3 = _mm512_mask_or_epi32(a3, _mm512_cmp_ps_mask(_mm512_loadu_ps(xs + 48), th, _CMP_GE_OQ), a3, bit);
      }
      if (Cw == 1) {
        _mm512_storeu_si512(yo + s, a0);
        _mm512_storeu_si512(yo + s + 16, a1);
        _mm512_storeu_si512(yo + s + 32, a2);
        _mm512_storeu_si512(yo + s + 48, a3);
      } else {
        _mm512_i32scatter_epi32(yo + s * Cw, lane, a0, 4);
        _mm512_i32scatter_epi32(yo + (s + 16) * Cw, lane, a1, 4);
        _mm512_i32scatter_epi32(yo + (s + 32) * Cw, lane, a2, 4);
        _mm512_i32scatter_epi32(yo + (s + 48) * Cw, lane, a3, 4);
      }
    }
    for (; s < S; s += 16) {
      const __mmask16 m = S - s >= 16 ? static_cast<__mmask16>(0xffff)
                                      : static_cast<__mmask16>((1u << (S - s)) - 1u);
      __m512i a = _mm512_setzero_si512();
      for (int64_t c = c0; c < c1; ++c) {
        const __m512 v = _mm512_maskz_loadu_ps(m, x + c * cstride + s);
        const __mmask16 k = _mm512_mask_cmp_ps_mask(m, v, _mm512_set1_ps(t ? t[c] : 0.0f), _CMP_GE_OQ);
        a = _mm512_mask_or_epi32(a, k, a, _mm512_set1_epi32(static_cast<int>(1u << (c & 31))));
      }
      _mm512_mask_i32scatter_epi32(yo + s * Cw, m, lane, a, 4);
    }
  }
}

void pack_sign_avx512(const float* x, const float* t, int64_t N, int64_t C, int64_t S, uint32_t* y) {
  const int64_t Cw = (C + 31) / 32;
  for (int64_t n = 0; n < N; ++n) pack_sign_strided_avx512(x + n * C * S, S, t, C, S, y + n * S * Cw);
}

#pragma GCC pop_options

// ------------------------------------------------------------------------------------------------
// AVX2: 8 output channels per vector; popcount by nibble lookup (VPSHUFB) accumulated in bytes for up
// to 31 steps (31 * 8 = 248 < 256), then widened to 32-bit lanes.
#pragma GCC push_options
#pragma GCC target("avx2")

namespace {

constexpr int kByteSteps = 31;

template <int PB, int OB>
__attribute__((always_inline)) inline void block256(const RowSrc& src, const uint32_t* wt, int64_t Opad, int64_t x, int64_t o0, int32_t* pc) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                       0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i m0f = _mm256_set1_epi8(0x0f);
  const __m256i ones8 = _mm256_set1_epi8(1);
  const __m256i ones16 = _mm256_set1_epi16(1);
  __m256i acc[PB][OB];
  for (int q = 0; q < PB; ++q)
    for (int b = 0; b < OB; ++b) acc[q][b] = _mm256_setzero_si256();
  __m256i acc8[PB][OB];
  for (int q = 0; q < PB; ++q)
    for (int b = 0; b < OB; ++b) acc8[q][b] = _mm256_setzero_si256();
  const uint32_t* wk = wt + o0;
  const int64_t xs = src.x_step;
  int steps = 0;
  for (int64_t r = 0; r < src.nrows; ++r) {
    const uint32_t* a = src.base + r * src.row_stride + x * xs;
    for (int64_t t = 0; t < src.row_len; ++t, wk += Opad) {
      __m256i wv[OB];
      for (int b = 0; b < OB; ++b) wv[b] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk + 8 * b));
      for (int q = 0; q < PB; ++q) {
        const __m256i av = _mm256_set1_epi32(static_cast<int>(a[q * xs + t]));
        for (int b = 0; b < OB; ++b) {
          const __m256i v = _mm256_xor_si256(av, wv[b]);
          const __m256i lo = _mm256_and_si256(v, m0f);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m0f);
          const __m256i cnt = _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
          acc8[q][b] = _mm256_add_epi8(acc8[q][b], cnt);
        }
      }
      if (++steps == kByteSteps) {  // widen the byte counts before they can overflow
        steps = 0;
        for (int q = 0; q < PB; ++q)
          for (int b = 0; b < OB; ++b) {
            acc[q][b] = _mm256_add_epi32(acc[q][b],
                                         _mm256_madd_epi16(_mm256_maddubs_epi16(acc8[q][b], ones8), ones16));
            acc8[q][b] = _mm256_setzero_si256();
          }
      }
    }
  }
  for (int q = 0; q < PB; ++q)
    for (int b = 0; b < OB; ++b)
      acc[q][b] = _mm256_add_epi32(acc[q][b], _mm256_madd_epi16(_mm256_maddubs_epi16(acc8[q][b], ones8), ones16));
  for (int q = 0; q < PB; ++q)
    for (int b = 0; b < OB; ++b)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pc + (x + q) * Opad + o0 + 8 * b), acc[q][b]);
}

}  // namespace

void conv_row_pc_avx2(const ConvPlan& p, const RowSrc& src, int32_t* pc) {
  // Opad is a multiple of 16: blocks of 2 vectors (16 channels).
  for (int64_t o0 = 0; o0 < p.Opad; o0 += 16) {
    int64_t x = 0;
    for (; x + 4 <= p.OW; x += 4) block256<4, 2>(src, p.wt, p.Opad, x, o0, pc);
    for (; x < p.OW; ++x) block256<1, 2>(src, p.wt, p.Opad, x, o0, pc);
  }
}

void epilogue_row_avx2(const ConvPlan& p, int64_t n, int64_t y, const int32_t* pc, float* fbuf) {
  if (p.bits && !p.small_dir) {
    epilogue_scalar(p, n, y, 0, p.OW, pc);
    return;
  }
  const int64_t nvec = p.Opad / 8, Opad = p.Opad;
  const int64_t r = p.rc[y];
  if (p.bits) {
    uint32_t* out = static_cast<uint32_t*>(p.y) + ((n * p.OH + y) * p.OW) * p.Ow;
    for (int64_t x = 0; x < p.OW; ++x) {
      const int32_t* e = p.et + (r * p.NC + p.cc[x]) * Opad;
      const int32_t* c = pc + x * Opad;
      uint32_t* ow = out + x * p.Ow;
      for (int64_t j = 0; j < p.Ow; ++j) ow[j] = 0;
      for (int64_t v = 0; v < nvec; ++v) {
        const __m256i d = _mm256_sub_epi32(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(e + 8 * v)),
            _mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 8 * v)), 1));
        const __m256i t = _mm256_mullo_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.p0i + 8 * v)), d);
        const __m256i lt = _mm256_cmpgt_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.p1i + 8 * v)), t);
        const uint32_t m = (~static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(lt)))) & 0xffu;
        if (m) ow[v >> 2] |= m << (8 * (v & 3));
      }
    }
  } else {
    for (int64_t x = 0; x < p.OW; ++x) {
      const int32_t* e = p.et + (r * p.NC + p.cc[x]) * Opad;
      const int32_t* c = pc + x * Opad;
      float* f = fbuf + x * Opad;
      for (int64_t v = 0; v < nvec; ++v) {
        const __m256i d = _mm256_sub_epi32(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(e + 8 * v)),
            _mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 8 * v)), 1));
        const __m256 prod = _mm256_mul_ps(_mm256_cvtepi32_ps(d), _mm256_loadu_ps(p.p0f + 8 * v));
        _mm256_storeu_ps(f + 8 * v, _mm256_add_ps(prod, _mm256_loadu_ps(p.p1f + 8 * v)));
      }
    }
    store_float_row(p, n, y, fbuf);
  }
}

#pragma GCC pop_options

}  // namespace bnnc
#endif  // x86
