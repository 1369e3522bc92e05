// WinogradConvMaxPool, x86 AVX-512: the float stem (conv 7×7/2 → max pool 3×3/2) of a ResNet-style BNN.
//
// The algorithm and every constant come from bnnc.runtimes.winograd (the same plan as the TVM kernel in
// runtimes/tvm/float_kernels.py): each column phase of the stride-2 conv is a stride-1 correlation with
// r = ceil(KW / 2) taps; a row's output columns are cut into vectors of 16 tiles of m columns (F(m, r),
// n = m + r - 1 points; the stem: 64 columns by F(4, 4), 48 by F(3, 4)); weights arrive transformed (G g,
// float64 in Python) as U[O/8][C][KH][2][slot][8].
//
// 1. wino_input_rows: per padded input row and phase, the phase row is split from the image row (masked
//    loads, one two-vector permute per phase), each part's tiles de-interleaved by m (two-vector permutes;
//    n vectors, lane l = tile l) and transformed by Bᵀ into V[c][row][phase][slot][16].
// 2. wino_band: per task (a band of pooled rows × 8 channels) the conv rows the band's windows read, in
//    register tiles of 8 channels × up to 3 rows per point (24 accumulators; per kernel tap 3 vector loads
//    and 8 broadcasts for 24 FMAs), then Aᵀ (+ bias) and the tiles' columns interleaved back (m permutes),
//    into a per-task buffer; then the pooled rows: the max over the window's real rows, split into even and
//    odd columns (one permute each), the max over the window's columns as shifted loads of those.
#if defined(__x86_64__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cmath>

#include "kernels.h"

namespace bnnc {

namespace {
inline int64_t round_up16(int64_t v) { return (v + 15) / 16 * 16; }
inline int64_t owp(const WinoPlan& p) { return round_up16(p.OW) + 16; }
inline int64_t band_conv_rows(const WinoPlan& p) { return (p.band - 1) * p.psh + p.pkh; }
}  // namespace

void wino_finish_plan(WinoPlan& p) {
  int64_t need = 0;
  for (int64_t pi = 0; pi < p.nparts; ++pi) {
    WinoPart& pt = p.parts[pi];
    for (int64_t q = 0; q < 4; ++q)
      for (int e = 0; e < 16; ++e) {
        const int64_t cc = 16 * q + e, t = pt.m ? cc / pt.m : 0, j = pt.m ? cc % pt.m : 0;
        pt.perm[q][0][e] = static_cast<int32_t>(j == 0 ? t % 16 : 0);
        for (int64_t jj = 1; jj < 4; ++jj) pt.perm[q][jj][e] = static_cast<int32_t>(jj == j ? 16 + t % 16 : e);
      }
    for (int64_t sidx = 0; sidx < 8; ++sidx) {
      pt.gmask[sidx] = 0;
      for (int e = 0; e < 16; ++e) {
        const int64_t at_ = pt.m * e + sidx;  // offset from the part's column
        pt.gidx[sidx][0][e] = static_cast<int32_t>(at_ & 31);
        pt.gidx[sidx][1][e] = static_cast<int32_t>((at_ - 32) & 31);
        if (at_ >= 32) pt.gmask[sidx] |= 1u << e;
      }
    }
    const int64_t last = pt.col + (pt.m == 4 ? 80 : 64);  // phase-row columns the part reads
    if (last > need) need = last;
  }
  p.nq = (need + 15) / 16 + 1;
}

int64_t wino_v_floats(const WinoPlan& p) { return p.C * p.HP * 2 * p.nslot * 16; }

int64_t wino_task_floats(const WinoPlan& p) {
  // conv rows of the band (8 channels) + the points of 3 rows (8 channels) + even and odd columns
  return kWinoOcTile * band_conv_rows(p) * owp(p) + kWinoOcTile * 3 * p.nslot * 16 + 2 * (owp(p) + 64);
}

#pragma GCC push_options
#pragma GCC target("avx512f")

namespace {

__attribute__((always_inline)) inline __m512i lanes_times(int64_t m, int64_t add) {
  alignas(64) int32_t v[16];
  for (int l = 0; l < 16; ++l) v[l] = static_cast<int32_t>(m * l + add);
  return _mm512_load_si512(v);
}

// init + Σ coef[k]·v[k] over all 8 slots (coefficients past the part's points are 0, their vectors zero):
// branch-free and fully unrolled (skipping the zero coefficients with a run-time test made the transforms
// branchy and the stem 9 % slower)
__attribute__((always_inline)) inline __m512 combine(const float* coef, const __m512* v, __m512 init) {
  __m512 acc = init;
#pragma GCC unroll 8
  for (int k = 0; k < 8; ++k) acc = _mm512_fmadd_ps(_mm512_set1_ps(coef[k]), v[k], acc);
  return acc;
}

// Aᵀ (+ bias) of one part of one row (the points at src + slot·16), the tiles' columns interleaved back
// (lane e of column vector q = tile (16q + e) / M, column (16q + e) % M: M permutes, tables from
// wino_finish_plan), stored from the part's first column.
template <int M, int NPT>
__attribute__((always_inline)) inline void out_part(const WinoPlan& p, const WinoPart& pt, const float* src,
                                                    __m512 bias, float* dst) {
  __m512 pv[NPT], outs[M];
#pragma GCC unroll 8
  for (int k = 0; k < NPT; ++k) pv[k] = _mm512_loadu_ps(src + (pt.slot + k) * 16);
#pragma GCC unroll 4
  for (int j = 0; j < M; ++j) {
    __m512 acc = bias;
#pragma GCC unroll 8
    for (int k = 0; k < NPT; ++k) acc = _mm512_fmadd_ps(_mm512_set1_ps(pt.at[j][k]), pv[k], acc);
    outs[j] = acc;
  }
#pragma GCC unroll 4
  for (int q = 0; q < M; ++q) {
    const int64_t x = pt.col + 16 * q;
    if (x >= p.OW) break;
    __m512 col = _mm512_permutexvar_ps(_mm512_loadu_si512(pt.perm[q][0]), outs[0]);
#pragma GCC unroll 3
    for (int jj = 1; jj < M; ++jj) col = _mm512_permutex2var_ps(col, _mm512_loadu_si512(pt.perm[q][jj]), outs[jj]);
    _mm512_storeu_ps(dst + x, col);
  }
}

template <int R>
void conv_rows(const WinoPlan& p, const float* v, int64_t ob, int64_t y0, float* rows_out, int64_t row_stride,
               float* mb) {
  const int64_t C = p.C, KH = p.KH, HP = p.HP, ns = p.nslot, ow_p = owp(p);
  for (int64_t pi = 0; pi < p.nparts; ++pi) {
    const WinoPart& pt = p.parts[pi];
    for (int64_t xi = 0; xi < pt.npt; ++xi) {
      const int64_t slot = pt.slot + xi;
      __m512 acc[kWinoOcTile][R];
      for (int o = 0; o < kWinoOcTile; ++o)
        for (int r = 0; r < R; ++r) acc[o][r] = _mm512_setzero_ps();
      for (int64_t c = 0; c < C; ++c)
        for (int64_t kh = 0; kh < KH; ++kh)
          for (int64_t ph = 0; ph < 2; ++ph) {
            __m512 xs[R];
            for (int r = 0; r < R; ++r)
              xs[r] = _mm512_loadu_ps(v + (((c * HP + 2 * (y0 + r) + kh) * 2 + ph) * ns + slot) * 16);
            const float* w = p.U + ((((ob * C + c) * KH + kh) * 2 + ph) * ns + slot) * kWinoOcTile;
            for (int o = 0; o < kWinoOcTile; ++o) {
              const __m512 wv = _mm512_set1_ps(w[o]);
              for (int r = 0; r < R; ++r) acc[o][r] = _mm512_fmadd_ps(xs[r], wv, acc[o][r]);
            }
          }
      for (int o = 0; o < kWinoOcTile; ++o)
        for (int r = 0; r < R; ++r) _mm512_storeu_ps(mb + ((o * 3 + r) * ns + slot) * 16, acc[o][r]);
    }
  }
  // output transform, bias, the tiles' columns back in order
  for (int o = 0; o < kWinoOcTile; ++o) {
    const __m512 bias = _mm512_set1_ps(p.B[ob * kWinoOcTile + o]);
    for (int r = 0; r < R; ++r) {
      float* dst = rows_out + (o * row_stride + r) * ow_p;
      const float* src = mb + (o * 3 + r) * ns * 16;
      for (int64_t pi = 0; pi < p.nparts; ++pi) {
        const WinoPart& pt = p.parts[pi];
        switch (pt.m * 10 + pt.npt) {
          case 47: out_part<4, 7>(p, pt, src, bias, dst); break;
          case 46: out_part<4, 6>(p, pt, src, bias, dst); break;
          case 36: out_part<3, 6>(p, pt, src, bias, dst); break;
          case 35: out_part<3, 5>(p, pt, src, bias, dst); break;
          case 25: out_part<2, 5>(p, pt, src, bias, dst); break;
          case 24: out_part<2, 4>(p, pt, src, bias, dst); break;
          case 14: out_part<1, 4>(p, pt, src, bias, dst); break;
          default: out_part<1, 3>(p, pt, src, bias, dst); break;  // (1, 3): the plan allows nothing else
        }
      }
    }
  }
}

}  // namespace

void wino_input_rows_avx512(const WinoPlan& p, const float* x, int64_t r0, int64_t r1, float* v) {
  const __m512i ev = lanes_times(2, 0), od = lanes_times(2, 1);
  const int64_t nq = p.nq, ns = p.nslot;
  alignas(64) float prow[2][(kWinoMaxParts + 2) * 64 + 64];
  for (int64_t rr = r0; rr < r1; ++rr) {
    const int64_t c = rr / p.HP, yp = rr % p.HP, yy = yp - p.pt;
    const bool row_ok = yy >= 0 && yy < p.H;
    const float* src = x + (c * p.H + (row_ok ? yy : 0)) * p.W;
    for (int64_t q = 0; q < nq; ++q) {
      __m512 half[2];
      for (int hv = 0; hv < 2; ++hv) {
        const int64_t x0 = 32 * q + 16 * hv - p.pl;
        const int64_t lo = x0 < 0 ? -x0 : 0, hi = p.W - x0 < 16 ? p.W - x0 : 16;  // lanes [lo, hi) in the row
        const __mmask16 mk = row_ok && hi > lo
                                 ? static_cast<__mmask16>(((1u << hi) - 1u) & ~((1u << (lo < 16 ? lo : 16)) - 1u))
                                 : 0;
        half[hv] = mk ? _mm512_maskz_loadu_ps(mk, src + x0) : _mm512_setzero_ps();
      }
      _mm512_store_ps(prow[0] + 16 * q, _mm512_permutex2var_ps(half[0], ev, half[1]));
      _mm512_store_ps(prow[1] + 16 * q, _mm512_permutex2var_ps(half[0], od, half[1]));
    }
    for (int64_t ph = 0; ph < 2; ++ph)
      for (int64_t pi = 0; pi < p.nparts; ++pi) {
        const WinoPart& pt = p.parts[pi];
        __m512 d[8];
        if (pt.m == 4) {
          // d[s] lane l = phase row[col + 4l + s]: de-interleave by 4 (two rounds of two-vector permutes) of
          // the 4 vectors from the part's column (s < 4) and of the same shifted by 4 lanes (s >= 4)
          const float* b = prow[ph] + pt.col;
          const __m512 a[5] = {_mm512_load_ps(b), _mm512_load_ps(b + 16), _mm512_load_ps(b + 32),
                               _mm512_load_ps(b + 48), _mm512_load_ps(b + 64)};
          for (int half = 0; half < 2; ++half) {
            __m512 sv[4];
            for (int k = 0; k < 4; ++k)
              sv[k] = half ? _mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(a[k + 1]),
                                                                     _mm512_castps_si512(a[k]), 4))
                           : a[k];
            const __m512 e0 = _mm512_permutex2var_ps(sv[0], ev, sv[1]), e1 = _mm512_permutex2var_ps(sv[2], ev, sv[3]);
            const __m512 o0 = _mm512_permutex2var_ps(sv[0], od, sv[1]), o1 = _mm512_permutex2var_ps(sv[2], od, sv[3]);
            d[4 * half + 0] = _mm512_permutex2var_ps(e0, ev, e1);
            d[4 * half + 1] = _mm512_permutex2var_ps(o0, ev, o1);
            d[4 * half + 2] = _mm512_permutex2var_ps(e0, od, e1);
            d[4 * half + 3] = _mm512_permutex2var_ps(o0, od, o1);
          }
          for (int s = static_cast<int>(pt.npt); s < 8; ++s) d[s] = _mm512_setzero_ps();
        } else {  // m <= 3: lane l = [col + m·l + s] < col + 64: two permutes of vector pairs and a blend
          const float* b = prow[ph] + pt.col;
          const __m512 a0 = _mm512_load_ps(b), a1 = _mm512_load_ps(b + 16), a2 = _mm512_load_ps(b + 32),
                       a3 = _mm512_load_ps(b + 48);
          for (int s = 0; s < 8; ++s) {
            if (s >= pt.npt) {
              d[s] = _mm512_setzero_ps();
              continue;
            }
            const __m512 lo = _mm512_permutex2var_ps(a0, _mm512_loadu_si512(pt.gidx[s][0]), a1);
            const __m512 hi = _mm512_permutex2var_ps(a2, _mm512_loadu_si512(pt.gidx[s][1]), a3);
            d[s] = _mm512_mask_blend_ps(static_cast<__mmask16>(pt.gmask[s]), lo, hi);
          }
        }
        float* out = v + ((rr * 2 + ph) * ns + pt.slot) * 16;
        for (int64_t xi = 0; xi < pt.npt; ++xi)
          _mm512_storeu_ps(out + 16 * xi, combine(pt.bt[xi], d, _mm512_setzero_ps()));
      }
  }
}

void wino_band_avx512(const WinoPlan& p, const float* v, int64_t task, float* y, float* scratch) {
  const int64_t nob = p.O / kWinoOcTile, ob = task % nob, bi = task / nob;
  const int64_t p0 = bi * p.band, p1 = p0 + p.band < p.POH ? p0 + p.band : p.POH;
  if (p0 >= p1) return;
  const int64_t ow_p = owp(p), nrow_max = band_conv_rows(p);
  int64_t ylo = p0 * p.psh - p.ppt, yhi = (p1 - 1) * p.psh - p.ppt + p.pkh - 1;
  if (ylo < 0) ylo = 0;
  if (yhi > p.OH - 1) yhi = p.OH - 1;
  float* rows = scratch;                                   // [8][nrow_max][ow_p]
  float* mb = rows + kWinoOcTile * nrow_max * ow_p;        // [8][3][nslot][16]
  float* ev = mb + kWinoOcTile * 3 * p.nslot * 16;         // even columns, then odd, each with -inf guards
  float* od = ev + ow_p + 64;
  for (int64_t y0 = ylo; y0 <= yhi; y0 += 3) {
    const int64_t n = yhi - y0 + 1 < 3 ? yhi - y0 + 1 : 3;
    float* dst = rows + (y0 - ylo) * ow_p;
    if (n == 3) conv_rows<3>(p, v, ob, y0, dst, nrow_max, mb);
    else if (n == 2) conv_rows<2>(p, v, ob, y0, dst, nrow_max, mb);
    else conv_rows<1>(p, v, ob, y0, dst, nrow_max, mb);
  }
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  const __m512i evi = lanes_times(2, 0), odi = lanes_times(2, 1);
  const int64_t half = (round_up16(p.OW) / 16 + 1) / 2;
  // the pool window's columns 2·px + dx - ppl, as even / odd column arrays shifted by whole columns
  const float* csrc[16];
  const int npk = p.pkw < 16 ? static_cast<int>(p.pkw) : 16;
  for (int dx = 0; dx < npk; ++dx) {
    const int64_t cc = dx - p.ppl, sh = cc >= 0 ? cc / 2 : -((-cc + 1) / 2);
    csrc[dx] = ((cc - 2 * sh) ? od : ev) + 16 + sh;
  }
  for (int o = 0; o < kWinoOcTile; ++o)
    for (int64_t py = p0; py < p1; ++py) {
      // the window's real rows (each window has one: pads < kernel)
      const float* rp[16];
      int nr = 0;
      for (int64_t dy = 0; dy < p.pkh && nr < 16; ++dy) {
        const int64_t yr = py * p.psh - p.ppt + dy;
        if (yr >= 0 && yr < p.OH) rp[nr++] = rows + (o * nrow_max + yr - ylo) * ow_p;
      }
      // max over them (columns past OW: -inf), split into even and odd columns, -inf guards of 16 lanes
      _mm512_storeu_ps(ev, ninf);
      _mm512_storeu_ps(od, ninf);
      for (int64_t k = 0; k < half; ++k) {
        __m512 mm[2];
        for (int hv = 0; hv < 2; ++hv) {
          const int64_t c0 = 32 * k + 16 * hv, valid = p.OW - c0;
          __m512 m = ninf;
          if (valid > 0) {
            m = _mm512_loadu_ps(rp[0] + c0);
            for (int i = 1; i < nr; ++i) m = _mm512_max_ps(m, _mm512_loadu_ps(rp[i] + c0));
            if (valid < 16) m = _mm512_mask_blend_ps(static_cast<__mmask16>((1u << valid) - 1u), ninf, m);
          }
          mm[hv] = m;
        }
        _mm512_storeu_ps(ev + 16 + 16 * k, _mm512_permutex2var_ps(mm[0], evi, mm[1]));
        _mm512_storeu_ps(od + 16 + 16 * k, _mm512_permutex2var_ps(mm[0], odi, mm[1]));
      }
      _mm512_storeu_ps(ev + 16 + 16 * half, ninf);
      _mm512_storeu_ps(od + 16 + 16 * half, ninf);
      float* out = y + ((ob * kWinoOcTile + o) * p.POH + py) * p.POW;
      for (int64_t px = 0; px < p.POW; px += 16) {
        __m512 m = _mm512_loadu_ps(csrc[0] + px);
        for (int dx = 1; dx < npk; ++dx) m = _mm512_max_ps(m, _mm512_loadu_ps(csrc[dx] + px));
        const int64_t valid = p.POW - px;
        if (valid >= 16) _mm512_storeu_ps(out + px, m);
        else _mm512_mask_storeu_ps(out + px, static_cast<__mmask16>((1u << valid) - 1u), m);
      }
    }
}

#pragma GCC pop_options

}  // namespace bnnc
#endif
