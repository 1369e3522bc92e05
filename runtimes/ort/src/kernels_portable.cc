// Portable (any CPU) XOR-popcount kernels and the scalar epilogue. Compiled with -ffp-contract=off:
// the float epilogue is float(D) * P0 rounded, then + P1 rounded, as the NumPy reference.
#include "kernels.h"

namespace bnnc {

// SWAR popcount: plain shifts/adds (no multiply, no POPCNT), so the loop over output channels below
// auto-vectorizes on any SIMD baseline (SSE2 on x86-64, Advanced SIMD on AArch64) and stays fast as scalar.
static inline uint32_t popcount32(uint32_t v) {
  v = v - ((v >> 1) & 0x55555555u);
  v = (v & 0x33333333u) + ((v >> 2) & 0x33333333u);
  v = (v + (v >> 4)) & 0x0f0f0f0fu;
  v = v + (v >> 8);
  v = v + (v >> 16);
  return v & 0x3fu;
}

void conv_row_pc_portable(const ConvPlan& p, const RowSrc& src, int32_t* pc) {
  const int64_t Opad = p.Opad, L = src.row_len;
  for (int64_t x = 0; x < p.OW; ++x) {
    int32_t* __restrict out = pc + x * Opad;
    for (int64_t o = 0; o < Opad; ++o) out[o] = 0;
    const uint32_t* __restrict wk = p.wt;
    for (int64_t r = 0; r < src.nrows; ++r) {
      const uint32_t* a = src.base + r * src.row_stride + x * src.x_step;
      for (int64_t t = 0; t < L; ++t, wk += Opad) {
        const uint32_t av = a[t];
        for (int64_t o = 0; o < Opad; ++o) out[o] += static_cast<int32_t>(popcount32(av ^ wk[o]));
      }
    }
  }
}

void epilogue_scalar(const ConvPlan& p, int64_t n, int64_t y, int64_t x0, int64_t x1, const int32_t* pc) {
  const int64_t O = p.O, Opad = p.Opad;
  const int32_t r = p.rc[y];
  if (p.bits) {
    uint32_t* out = static_cast<uint32_t*>(p.y) + ((n * p.OH + y) * p.OW) * p.Ow;
    for (int64_t x = x0; x < x1; ++x) {
      const int32_t* e = p.et + (static_cast<int64_t>(r) * p.NC + p.cc[x]) * Opad;
      const int32_t* c = pc + x * Opad;
      uint32_t* ow = out + x * p.Ow;
      for (int64_t j = 0; j < p.Ow; ++j) ow[j] = 0;
      for (int64_t o = 0; o < O; ++o) {
        const int64_t d = static_cast<int64_t>(e[o]) - 2 * static_cast<int64_t>(c[o]);
        if (static_cast<int64_t>(p.p0i[o]) * d >= static_cast<int64_t>(p.p1i[o])) ow[o >> 5] |= 1u << (o & 31);
      }
    }
  } else {
    float* out = static_cast<float*>(p.y);
    const int64_t plane = p.OH * p.OW;
    for (int64_t x = x0; x < x1; ++x) {
      const int32_t* e = p.et + (static_cast<int64_t>(r) * p.NC + p.cc[x]) * Opad;
      const int32_t* c = pc + x * Opad;
      for (int64_t o = 0; o < O; ++o) {
        const int32_t d = e[o] - 2 * c[o];
        float v = static_cast<float>(d) * p.p0f[o];
        v = v + p.p1f[o];
        out[(n * O + o) * plane + y * p.OW + x] = v;
      }
    }
  }
}

void epilogue_row_portable(const ConvPlan& p, int64_t n, int64_t y, const int32_t* pc, float* /*fbuf*/) {
  epilogue_scalar(p, n, y, 0, p.OW, pc);
  if (!p.bits) finish_float_row(p, n, y);
}

// Plain loops over one contiguous output row per channel: the compiler vectorizes them for the baseline
// ISA; -ffp-contract=off keeps every step a separately rounded float operation, as in ONNX Runtime.
void apply_chain_row(const ConvPlan& p, int64_t n, int64_t y) {
  if (p.nchain == 0) return;
  const int64_t plane = p.OH * p.OW, OW = p.OW;
  float* out = static_cast<float*>(p.y);
  for (int64_t o = 0; o < p.O; ++o) {
    float* __restrict v = out + (n * p.O + o) * plane + y * OW;
    const float* c = p.chainc;
    for (int64_t i = 0; i < p.nchain; ++i) {
      switch (p.chain[i]) {
        case kChainAddResidual: {
          const float* __restrict r = p.res + (n * p.O + o) * plane + y * OW;
          for (int64_t x = 0; x < OW; ++x) v[x] = v[x] + r[x];
          break;
        }
        case kChainAddChannel: {
          const float k = c[o];
          c += p.O;
          for (int64_t x = 0; x < OW; ++x) v[x] = v[x] + k;
          break;
        }
        case kChainMulChannel: {
          const float k = c[o];
          c += p.O;
          for (int64_t x = 0; x < OW; ++x) v[x] = v[x] * k;
          break;
        }
        case kChainPRelu: {
          const float k = c[o];
          c += p.O;
          for (int64_t x = 0; x < OW; ++x) v[x] = v[x] < 0.0f ? v[x] * k : v[x];
          break;
        }
        case kChainClip: {
          const float lo = c[o], hi = c[p.O + o];
          c += 2 * p.O;
          for (int64_t x = 0; x < OW; ++x) {
            const float a = v[x] < lo ? lo : v[x];
            v[x] = a > hi ? hi : a;
          }
          break;
        }
        default:
          break;  // validated when the kernel is created
      }
    }
  }
}

void pack_sign_strided_portable(const float* x, int64_t cstride, const float* t, int64_t C, int64_t S, uint32_t* y) {
  const int64_t Cw = (C + 31) / 32;
  for (int64_t wd = 0; wd < Cw; ++wd) {
    uint32_t* yo = y + wd;
    for (int64_t s = 0; s < S; ++s) yo[s * Cw] = 0u;
    const int64_t cend = C < (wd + 1) * 32 ? C : (wd + 1) * 32;
    for (int64_t c = wd * 32; c < cend; ++c) {
      const float* xs = x + c * cstride;
      const float th = t ? t[c] : 0.0f;
      const unsigned b = static_cast<unsigned>(c & 31);
      for (int64_t s = 0; s < S; ++s) yo[s * Cw] |= static_cast<uint32_t>(xs[s] >= th) << b;
    }
  }
}

void pack_sign_portable(const float* x, const float* t, int64_t N, int64_t C, int64_t S, uint32_t* y) {
  const int64_t Cw = (C + 31) / 32;
  for (int64_t n = 0; n < N; ++n) pack_sign_strided_portable(x + n * C * S, S, t, C, S, y + n * S * Cw);
}

void finish_float_row(const ConvPlan& p, int64_t n, int64_t y) {
  apply_chain_row(p, n, y);
  if (p.ybits) {
    const int64_t plane = p.OH * p.OW;
    pack_sign_strided_portable(static_cast<const float*>(p.y) + n * p.O * plane + y * p.OW, plane, p.tpack, p.O,
                               p.OW, p.ybits + (n * p.OH + y) * p.OW * ((p.O + 31) / 32));
  }
}

static int64_t padded_span(const ConvPlan& p) { return (p.OW - 1) * p.sw + (p.KW - 1) * p.dw + 1; }

int64_t row_buf_words(const ConvPlan& p) {
  return p.dw == 1 ? p.KH * padded_span(p) * p.Cw : p.OW * p.K;
}

RowSrc gather_row(const ConvPlan& p, int64_t n, int64_t y, uint32_t* buf) {
  const int64_t Cw = p.Cw;
  if (p.dw == 1) {
    // KH input rows, each zero-padded to the columns the window reaches
    const int64_t span = padded_span(p), rs = span * Cw;
    for (int64_t i = 0; i < p.KH; ++i) {
      uint32_t* dst = buf + i * rs;
      const int64_t yy = y * p.sh - p.pt + i * p.dh;
      if (yy < 0 || yy >= p.H) {
        for (int64_t q = 0; q < rs; ++q) dst[q] = 0;
        continue;
      }
      const uint32_t* src = p.x + (n * p.H + yy) * p.W * Cw;
      const int64_t lo = p.pl < span ? p.pl : span;             // columns left of the input
      const int64_t hi = p.pl + p.W < span ? p.pl + p.W : span;  // end of the input columns
      for (int64_t q = 0; q < lo * Cw; ++q) dst[q] = 0;
      for (int64_t q = lo * Cw; q < hi * Cw; ++q) dst[q] = src[q - p.pl * Cw];
      for (int64_t q = (hi > lo ? hi : lo) * Cw; q < rs; ++q) dst[q] = 0;
    }
    return RowSrc{buf, p.KH, rs, p.sw * Cw, p.KW * Cw};
  }
  // dilated columns: full im2col, patch[x * K + (i * KW + j) * Cw + c]
  for (int64_t x = 0; x < p.OW; ++x) {
    uint32_t* dst = buf + x * p.K;
    for (int64_t i = 0; i < p.KH; ++i) {
      const int64_t yy = y * p.sh - p.pt + i * p.dh;
      const bool yok = yy >= 0 && yy < p.H;
      for (int64_t j = 0; j < p.KW; ++j, dst += Cw) {
        const int64_t xx = x * p.sw - p.pl + j * p.dw;
        if (yok && xx >= 0 && xx < p.W) {
          const uint32_t* src = p.x + ((n * p.H + yy) * p.W + xx) * Cw;
          for (int64_t c = 0; c < Cw; ++c) dst[c] = src[c];
        } else {
          for (int64_t c = 0; c < Cw; ++c) dst[c] = 0;
        }
      }
    }
  }
  return RowSrc{buf, 1, p.K, p.K, p.K};
}

void store_float_row(const ConvPlan& p, int64_t n, int64_t y, const float* fbuf) {
  float* out = static_cast<float*>(p.y);
  const int64_t plane = p.OH * p.OW;
  for (int64_t o = 0; o < p.O; ++o) {
    float* dst = out + (n * p.O + o) * plane + y * p.OW;
    const float* src = fbuf + o;
    for (int64_t x = 0; x < p.OW; ++x) dst[x] = src[x * p.Opad];
  }
  finish_float_row(p, n, y);
}

}  // namespace bnnc

// ------------------------------------------------------------------------------------------------
#include "plan.h"

namespace bnnc {

void prepare_plan(ConvPlan& p, ConvStorage& st, const int32_t* e, int64_t NR, int64_t NC, const void* p0,
                  const void* p1, bool amx) {
  p.K = p.KH * p.KW * p.Cw;
  p.Opad = (p.O + 15) / 16 * 16;
  p.NC = NC;
  const int64_t O = p.O, Opad = p.Opad, K = p.K;
  st.wt.assign(static_cast<size_t>(K * Opad), 0u);
  for (int64_t o = 0; o < O; ++o)
    for (int64_t k = 0; k < K; ++k) st.wt[k * Opad + o] = p.w[o * K + k];
  st.et.assign(static_cast<size_t>(NR * NC * Opad), 0);
  for (int64_t o = 0; o < O; ++o)
    for (int64_t rc = 0; rc < NR * NC; ++rc) st.et[rc * Opad + o] = e[o * NR * NC + rc];
  p.wt = st.wt.data();
  p.et = st.et.data();
  p.wamx = nullptr;
  p.wamx8 = nullptr;
  p.etamx = nullptr;
  p.tamx = nullptr;
  p.namx = nullptr;
  p.tpc = nullptr;
#if defined(__x86_64__)
  if (amx) {
    st.wamx.assign(static_cast<size_t>(amx_weight_bytes(p)) / 8, 0);
    amx_pack_weights(p, st.wamx.data());
    p.wamx = st.wamx.data();
    if (const int64_t nb = amx_int8_weight_bytes(p)) {
      st.wamx8.assign(static_cast<size_t>(nb + 64), 0);
      int8_t* w8 = st.wamx8.data() + (64 - reinterpret_cast<uintptr_t>(st.wamx8.data()) % 64) % 64;
      amx_expand_weights(p, w8);
      p.wamx8 = w8;
    }
    const int32_t kbits = static_cast<int32_t>(p.KH * p.KW * 32 * p.Cw + amx_pad_dot(p));
    st.etamx.resize(st.et.size());
    for (size_t i = 0; i < st.et.size(); ++i) st.etamx[i] = st.et[i] - kbits;
    p.etamx = st.etamx.data();
  }
#else
  (void)amx;
#endif
  if (p.bits) {
    const int32_t* a = static_cast<const int32_t*>(p0);
    const int32_t* b = static_cast<const int32_t*>(p1);
    st.p0i.assign(static_cast<size_t>(Opad), 0);
    st.p1i.assign(static_cast<size_t>(Opad), 1);  // padded channels: 0 >= 1 is false → bit 0
    p.small_dir = true;
    for (int64_t o = 0; o < O; ++o) {
      st.p0i[o] = a[o];
      st.p1i[o] = b[o];
      if (a[o] < -1 || a[o] > 1) p.small_dir = false;
    }
    p.p0i = st.p0i.data();
    p.p1i = st.p1i.data();
    p.Ow = (O + 31) / 32;
    if (p.small_dir) {
      // every P0 in {-1, 0, 1}: the output bit as one compare against a threshold per class and channel, XOR
      // the channels in namx (P0 = -1, or P0 = 0 with the constant 0 >= P1 false), thresholds clamped to int32.
      // Popcount kernels, bit = P0·(E - 2·pc) >= P1 (tpc, compare pc <= t): P0 = 1: t = floor((E - P1) / 2);
      // P0 = -1: pc >= ceil((P1 + E) / 2), the complement of t = ceil((P1 + E) / 2) - 1; P0 = 0: t = INT32_MAX.
      // AMX, bit = P0·(E' + dot) >= P1 with E' = etamx (tamx, compare dot >= t): P0 = 1: t = P1 - E';
      // P0 = -1: dot <= -P1 - E', the complement of t = 1 - P1 - E'; P0 = 0: t = INT32_MIN.
      auto floor2 = [](int64_t a) { return a >= 0 ? a / 2 : -((-a + 1) / 2); };
      auto clamp32 = [](int64_t t) {
        return static_cast<int32_t>(t < INT32_MIN ? INT32_MIN : t > INT32_MAX ? INT32_MAX : t);
      };
      const int64_t ncls = static_cast<int64_t>(st.et.size()) / Opad;
      st.tpc.assign(st.et.size(), 0);
      st.namx.assign(static_cast<size_t>(Opad / 16), 0);
      if (p.etamx) st.tamx.assign(st.etamx.size(), 0);
      for (int64_t o = 0; o < Opad; ++o) {
        const int64_t a = st.p0i[o], b = st.p1i[o];
        if (a == -1 || (a == 0 && !(0 >= b))) st.namx[o / 16] = static_cast<uint16_t>(st.namx[o / 16] | (1u << (o % 16)));
        for (int64_t c = 0; c < ncls; ++c) {
          const int64_t e = st.et[c * Opad + o];
          st.tpc[c * Opad + o] = clamp32(a == 1 ? floor2(e - b) : a == -1 ? -floor2(-(b + e)) - 1 : INT32_MAX);
          if (p.etamx) {
            const int64_t ea = st.etamx[c * Opad + o];
            st.tamx[c * Opad + o] = clamp32(a == 1 ? b - ea : a == -1 ? 1 - b - ea : INT32_MIN);
          }
        }
      }
      p.tpc = st.tpc.data();
      p.namx = st.namx.data();
      if (p.etamx) p.tamx = st.tamx.data();
    }
  } else {
    const float* a = static_cast<const float*>(p0);
    const float* b = static_cast<const float*>(p1);
    st.p0f.assign(static_cast<size_t>(Opad), 0.0f);
    st.p1f.assign(static_cast<size_t>(Opad), 0.0f);
    for (int64_t o = 0; o < O; ++o) {
      st.p0f[o] = a[o];
      st.p1f[o] = b[o];
    }
    p.p0f = st.p0f.data();
    p.p1f = st.p1f.data();
  }
}

void attach_plan(ConvPlan& p, const ConvPlan& q) {
  p.K = q.K;
  p.Opad = q.Opad;
  p.NC = q.NC;
  p.wt = q.wt;
  p.wamx = q.wamx;
  p.wamx8 = q.wamx8;
  p.et = q.et;
  p.etamx = q.etamx;
  p.tamx = q.tamx;
  p.namx = q.namx;
  p.tpc = q.tpc;
  p.small_dir = q.small_dir;
  p.p0i = q.p0i;
  p.p1i = q.p1i;
  p.p0f = q.p0f;
  p.p1f = q.p1f;
  p.Ow = q.Ow;
}

void run_conv_serial(const ConvPlan& p, ConvRowPcFn conv, EpilogueRowFn epi) {
  std::vector<uint32_t> patch(static_cast<size_t>(row_buf_words(p)) + 1);
  std::vector<int32_t> pc(static_cast<size_t>(p.OW * p.Opad) + 1);
  std::vector<float> fbuf(static_cast<size_t>(p.OW * p.Opad) + 1);
  for (int64_t n = 0; n < p.N; ++n)
    for (int64_t y = 0; y < p.OH; ++y) {
      conv(p, gather_row(p, n, y, patch.data()), pc.data());
      epi(p, n, y, pc.data(), fbuf.data());
    }
}

}  // namespace bnnc
