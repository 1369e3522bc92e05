// AArch64 NEON kernels: 4 output channels per vector; VCNT byte popcounts accumulated in bytes for up to
// 31 steps (31 * 8 = 248 < 256), then widened pairwise to 32-bit lanes. Advanced SIMD is part of every
// AArch64 CPU, so no run-time check is needed.
#if defined(__aarch64__)
#include <arm_neon.h>

#include "kernels.h"

namespace bnnc {
namespace {

constexpr int kByteSteps = 31;

template <int PB, int OB>
__attribute__((always_inline)) inline void block_neon(const RowSrc& src, const uint32_t* wt, int64_t Opad, int64_t x, int64_t o0, int32_t* pc) {
  uint32x4_t acc[PB][OB];
  for (int q = 0; q < PB; ++q)
    for (int b = 0; b < OB; ++b) acc[q][b] = vdupq_n_u32(0);
  uint8x16_t acc8[PB][OB];
  for (int q = 0; q < PB; ++q)
    for (int b = 0; b < OB; ++b) acc8[q][b] = vdupq_n_u8(0);
  const uint32_t* wk = wt + o0;
  const int64_t xs = src.x_step;
  int steps = 0;
  for (int64_t r = 0; r < src.nrows; ++r) {
    const uint32_t* a = src.base + r * src.row_stride + x * xs;
    for (int64_t t = 0; t < src.row_len; ++t, wk += Opad) {
      uint32x4_t wv[OB];
      for (int b = 0; b < OB; ++b) wv[b] = vld1q_u32(wk + 4 * b);
      for (int q = 0; q < PB; ++q) {
        const uint32x4_t av = vdupq_n_u32(a[q * xs + t]);
        for (int b = 0; b < OB; ++b)
          acc8[q][b] = vaddq_u8(acc8[q][b], vcntq_u8(vreinterpretq_u8_u32(veorq_u32(av, wv[b]))));
      }
      if (++steps == kByteSteps) {  // widen the byte counts before they can overflow
        steps = 0;
        for (int q = 0; q < PB; ++q)
          for (int b = 0; b < OB; ++b) {
            acc[q][b] = vaddq_u32(acc[q][b], vpaddlq_u16(vpaddlq_u8(acc8[q][b])));
            acc8[q][b] = vdupq_n_u8(0);
          }
      }
    }
  }
  for (int q = 0; q < PB; ++q)
    for (int b = 0; b < OB; ++b) acc[q][b] = vaddq_u32(acc[q][b], vpaddlq_u16(vpaddlq_u8(acc8[q][b])));
  for (int q = 0; q < PB; ++q)
    for (int b = 0; b < OB; ++b) vst1q_s32(pc + (x + q) * Opad + o0 + 4 * b, vreinterpretq_s32_u32(acc[q][b]));
}

}  // namespace

void conv_row_pc_neon(const ConvPlan& p, const RowSrc& src, int32_t* pc) {
  // Opad is a multiple of 16: blocks of 4 vectors (16 channels).
  for (int64_t o0 = 0; o0 < p.Opad; o0 += 16) {
    int64_t x = 0;
    for (; x + 4 <= p.OW; x += 4) block_neon<4, 4>(src, p.wt, p.Opad, x, o0, pc);
    for (; x < p.OW; ++x) block_neon<1, 4>(src, p.wt, p.Opad, x, o0, pc);
  }
}

void epilogue_row_neon(const ConvPlan& p, int64_t n, int64_t y, const int32_t* pc, float* fbuf) {
  if (p.bits && !p.small_dir) {
    epilogue_scalar(p, n, y, 0, p.OW, pc);
    return;
  }
  const int64_t nvec = p.Opad / 4, Opad = p.Opad;
  const int64_t r = p.rc[y];
  if (p.bits) {
    static const uint32_t kLane[4] = {1u, 2u, 4u, 8u};
    const uint32x4_t lane = vld1q_u32(kLane);
    uint32_t* out = static_cast<uint32_t*>(p.y) + ((n * p.OH + y) * p.OW) * p.Ow;
    for (int64_t x = 0; x < p.OW; ++x) {
      const int32_t* e = p.et + (r * p.NC + p.cc[x]) * Opad;
      const int32_t* c = pc + x * Opad;
      uint32_t* ow = out + x * p.Ow;
      for (int64_t j = 0; j < p.Ow; ++j) ow[j] = 0;
      for (int64_t v = 0; v < nvec; ++v) {
        const int32x4_t d = vsubq_s32(vld1q_s32(e + 4 * v), vshlq_n_s32(vld1q_s32(c + 4 * v), 1));
        const int32x4_t t = vmulq_s32(vld1q_s32(p.p0i + 4 * v), d);
        const uint32x4_t ge = vcgeq_s32(t, vld1q_s32(p.p1i + 4 * v));
        const uint32_t m = vaddvq_u32(vandq_u32(ge, lane));
        if (m) ow[v >> 3] |= m << (4 * (v & 7));
      }
    }
  } else {
    for (int64_t x = 0; x < p.OW; ++x) {
      const int32_t* e = p.et + (r * p.NC + p.cc[x]) * Opad;
      const int32_t* c = pc + x * Opad;
      float* f = fbuf + x * Opad;
      for (int64_t v = 0; v < nvec; ++v) {
        const int32x4_t d = vsubq_s32(vld1q_s32(e + 4 * v), vshlq_n_s32(vld1q_s32(c + 4 * v), 1));
        const float32x4_t prod = vmulq_f32(vcvtq_f32_s32(d), vld1q_f32(p.p0f + 4 * v));
        vst1q_f32(f + 4 * v, vaddq_f32(prod, vld1q_f32(p.p1f + 4 * v)));
      }
    }
    store_float_row(p, n, y, fbuf);
  }
}

}  // namespace bnnc
#endif  // __aarch64__
