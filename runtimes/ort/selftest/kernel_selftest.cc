// Native self-test of the XOR-popcount kernels without ONNX Runtime: every ISA this CPU/build has vs a
// direct-loop reference of BinaryConv2dPacked (bnnc/ops/deploy.py), on random shapes. Built by
// `python -m bnnc.runtimes.ort.build --selftest [--cross aarch64]`; the aarch64 binary is static and
// runs under qemu-aarch64-static. Prints one line per ISA; exit status 0 iff all agree bit for bit.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "kernels.h"
#include "plan.h"

using namespace bnnc;

namespace {

int64_t out_size(int64_t size, int64_t k, int64_t s, int64_t pb, int64_t pe, int64_t d) {
  return (size + pb + pe - d * (k - 1) - 1) / s + 1;
}

struct Case {
  int64_t N, H, W, C, O, k, s, p, d;
  bool bits, wide;
};

// Direct reference: pc over all taps (padding = zero words), D = E[o, rc, cc] - 2 pc, then the epilogue.
void reference(const Case& c, const std::vector<uint32_t>& x, const std::vector<uint32_t>& w,
               const std::vector<int32_t>& e, int64_t NR, int64_t NC, const std::vector<int32_t>& rc,
               const std::vector<int32_t>& cc, const std::vector<int32_t>& p0i, const std::vector<int32_t>& p1i,
               const std::vector<float>& p0f, const std::vector<float>& p1f, int64_t OH, int64_t OW,
               std::vector<uint32_t>& ybits, std::vector<float>& yf) {
  const int64_t Cw = (c.C + 31) / 32, Ow = (c.O + 31) / 32;
  for (int64_t n = 0; n < c.N; ++n)
    for (int64_t oy = 0; oy < OH; ++oy)
      for (int64_t ox = 0; ox < OW; ++ox)
        for (int64_t o = 0; o < c.O; ++o) {
          int64_t pc = 0;
          for (int64_t i = 0; i < c.k; ++i)
            for (int64_t j = 0; j < c.k; ++j) {
              const int64_t yy = oy * c.s - c.p + i * c.d, xx = ox * c.s - c.p + j * c.d;
              const bool ok = yy >= 0 && yy < c.H && xx >= 0 && xx < c.W;
              for (int64_t q = 0; q < Cw; ++q) {
                const uint32_t a = ok ? x[((n * c.H + yy) * c.W + xx) * Cw + q] : 0u;
                pc += __builtin_popcount(a ^ w[((o * c.k + i) * c.k + j) * Cw + q]);
              }
            }
          const int64_t d = e[(o * NR + rc[oy]) * NC + cc[ox]] - 2 * pc;
          if (c.bits) {
            if (static_cast<int64_t>(p0i[o]) * d >= p1i[o]) ybits[((n * OH + oy) * OW + ox) * Ow + o / 32] |= 1u << (o % 32);
          } else {
            float v = static_cast<float>(d) * p0f[o];
            v = v + p1f[o];
            yf[((n * c.O + o) * OH + oy) * OW + ox] = v;
          }
        }
}

// AMX: drop the pre-expanded int8 weights (small layers), so that the bits → int8 expansion path runs too
bool g_amx_bits_only = false;
// AVX-512 float output: 0 = row by row (run_conv_serial); > 0 = conv_band_float_avx512 in bands of that many
// rows; -1 = bands of the driver's height (float_band_rows_avx512)
int64_t g_band = 0;
// AVX-512 bits output (P0 in {-1, 0, 1}): decided in the GEMM's register blocks (conv_row_bits_avx512)
bool g_bits_fused = false;

#if defined(__x86_64__)
void run_bands_avx512(const ConvPlan& p, int64_t band) {
  if (band < 0) band = float_band_rows_avx512(p);
  std::vector<uint32_t> patch(static_cast<size_t>(row_buf_words(p)) + 1);
  std::vector<int32_t> pc(static_cast<size_t>(float_band_slots_avx512(p, band) * p.OW * p.Opad) + 1);
  for (int64_t n = 0; n < p.N; ++n)
    for (int64_t y0 = 0; y0 < p.OH; y0 += band)
      conv_band_float_avx512(p, n, y0, y0 + band < p.OH ? y0 + band : p.OH, patch.data(), pc.data());
}

void run_bits_fused_avx512(const ConvPlan& p) {
  std::vector<uint32_t> patch(static_cast<size_t>(row_buf_words(p)) + 1);
  for (int64_t n = 0; n < p.N; ++n)
    for (int64_t y = 0; y < p.OH; ++y) conv_row_bits_avx512(p, n, y, gather_row(p, n, y, patch.data()));
}
#endif

// conv == nullptr: the AMX whole-image kernels
bool run_case(const Case& c, std::mt19937& rng, ConvRowPcFn conv, EpilogueRowFn epi) {
  const int64_t Cw = (c.C + 31) / 32, Ow = (c.O + 31) / 32;
  const int64_t OH = out_size(c.H, c.k, c.s, c.p, c.p, c.d), OW = out_size(c.W, c.k, c.s, c.p, c.p, c.d);
  auto bitsv = [&](int64_t pos, int64_t ch) {
    std::vector<uint32_t> v(static_cast<size_t>(pos * ((ch + 31) / 32)));
    for (auto& u : v) u = rng();
    if (ch % 32)
      for (int64_t i = (ch + 31) / 32 - 1; i < static_cast<int64_t>(v.size()); i += (ch + 31) / 32)
        v[i] &= (1u << (ch % 32)) - 1u;
    return v;
  };
  auto x = bitsv(c.N * c.H * c.W, c.C);
  auto w = bitsv(c.O * c.k * c.k, c.C);
  const int64_t NR = 3, NC = 4, kk = c.k * c.k * c.C;
  std::uniform_int_distribution<int32_t> ed(-static_cast<int32_t>(kk), static_cast<int32_t>(kk));
  std::vector<int32_t> e(static_cast<size_t>(c.O * NR * NC)), rc(OH), cc(OW);
  for (auto& v : e) v = ed(rng);
  for (auto& v : rc) v = static_cast<int32_t>(rng() % NR);
  for (auto& v : cc) v = static_cast<int32_t>(rng() % NC);
  std::vector<int32_t> p0i(c.O), p1i(c.O);
  std::vector<float> p0f(c.O), p1f(c.O);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int64_t o = 0; o < c.O; ++o) {
    p0i[o] = c.wide ? static_cast<int32_t>(rng() % 7) - 3 : static_cast<int32_t>(rng() % 3) - 1;
    p1i[o] = ed(rng) / 2;
    p0f[o] = nd(rng);
    p1f[o] = 3.f * nd(rng);
  }
  std::vector<uint32_t> rb(static_cast<size_t>(c.N * OH * OW * Ow), 0u), gb(rb.size(), 0xdeadbeefu);
  std::vector<float> rf(static_cast<size_t>(c.N * c.O * OH * OW), 0.f), gf(rf.size(), -7.f);
  reference(c, x, w, e, NR, NC, rc, cc, p0i, p1i, p0f, p1f, OH, OW, rb, rf);
  // float output: every other case runs a fused element-wise chain (residual Add, per-channel Add, PRelu,
  // per-channel Mul, Clip), applied here to the reference as separate float32 passes
  const bool chained = !c.bits && (rng() & 1u);
  const int32_t chain[5] = {kChainAddResidual, kChainAddChannel, kChainPRelu, kChainMulChannel, kChainClip};
  std::vector<float> res(rf.size()), cst(static_cast<size_t>(5 * c.O));
  if (chained) {
    for (auto& v : res) v = 2.f * nd(rng);
    for (auto& v : cst) v = nd(rng);
    for (int64_t i = 0; i < 3 * c.O; i += 5) cst[i] = 0.f;  // zero slopes/offsets now and then
    for (int64_t o = 0; o < c.O; ++o) {  // clip bounds lo <= hi, sometimes equal
      cst[3 * c.O + o] = -std::fabs(cst[3 * c.O + o]);
      cst[4 * c.O + o] = o % 7 == 0 ? cst[3 * c.O + o] : std::fabs(cst[4 * c.O + o]);
    }
    const int64_t plane = OH * OW;
    for (size_t i = 0; i < rf.size(); ++i) {
      const int64_t o = static_cast<int64_t>(i / plane) % c.O;
      float v = rf[i] + res[i];
      v = v + cst[o];
      v = v < 0.f ? v * cst[c.O + o] : v;
      v = v * cst[2 * c.O + o];
      v = v < cst[3 * c.O + o] ? cst[3 * c.O + o] : v;
      v = v > cst[4 * c.O + o] ? cst[4 * c.O + o] : v;
      rf[i] = v;
    }
  }
  ConvPlan p{};
  p.x = x.data(); p.N = c.N; p.H = c.H; p.W = c.W; p.Cw = Cw;
  p.O = c.O; p.KH = c.k; p.KW = c.k; p.sh = c.s; p.sw = c.s; p.pt = c.p; p.pl = c.p; p.dh = c.d; p.dw = c.d;
  p.OH = OH; p.OW = OW; p.w = w.data(); p.rc = rc.data(); p.cc = cc.data(); p.bits = c.bits;
  p.y = c.bits ? static_cast<void*>(gb.data()) : static_cast<void*>(gf.data());
  // float output: a fused PackSign of the final rows, with thresholds (some hit exactly) or without
  const bool packed = !c.bits && (rng() & 1u);
  std::vector<float> tp(static_cast<size_t>(c.O));
  const bool with_t = rng() & 1u;
  std::vector<uint32_t> pb(static_cast<size_t>(c.N * OH * OW * Ow), 0u), gpb(pb.size(), 0xdeadbeefu);
  if (packed) {
    const int64_t plane = OH * OW;
    for (int64_t o = 0; o < c.O; ++o)  // every other threshold an exact output value: ties
      tp[o] = (o & 1) && plane ? rf[o * plane + o % plane] : nd(rng);
    for (int64_t n = 0; n < c.N; ++n)
      for (int64_t o = 0; o < c.O; ++o)
        for (int64_t q = 0; q < plane; ++q)
          if (rf[(n * c.O + o) * plane + q] >= (with_t ? tp[o] : 0.f)) pb[(n * plane + q) * Ow + o / 32] |= 1u << (o % 32);
    p.ybits = gpb.data();
    p.tpack = with_t ? tp.data() : nullptr;
  }
  if (chained) {
    p.nchain = 5;
    p.chain = chain;
    p.chainc = cst.data();
    p.res = res.data();
  }
  ConvStorage st;
  prepare_plan(p, st, e.data(), NR, NC, c.bits ? static_cast<const void*>(p0i.data()) : p0f.data(),
               c.bits ? static_cast<const void*>(p1i.data()) : p1f.data(), conv == nullptr);
#if defined(__x86_64__)
  if (conv == nullptr && g_amx_bits_only) p.wamx8 = nullptr;
  if (conv == nullptr) run_conv_serial_amx(p);
  else if (g_band != 0 && !c.bits) run_bands_avx512(p, g_band);
  else if (g_bits_fused) {
    if (p.tpc == nullptr) return false;  // every P0 in {-1, 0, 1} here: prepare_plan must give the table
    run_bits_fused_avx512(p);
  } else
#endif
    run_conv_serial(p, conv, epi);
  if (packed && gpb != pb) return false;
  return c.bits ? gb == rb : std::memcmp(gf.data(), rf.data(), rf.size() * sizeof(float)) == 0;
}

int test_isa(const char* name, ConvRowPcFn conv, EpilogueRowFn epi) {
  std::mt19937 rng(1234);
  int n = 0, bad = 0;
  for (int64_t C : {1, 31, 33, 64, 70, 130})
    for (int64_t O : {1, 31, 33, 64, 70})
      for (auto g : {std::vector<int64_t>{1, 1, 0, 1}, {1, 2, 0, 1}, {3, 1, 1, 1}, {3, 2, 1, 1}, {3, 2, 0, 1},
                     {3, 1, 2, 2}, {3, 2, 2, 2}, {5, 3, 2, 1}})
        for (bool bits : {true, false})
          for (bool wide : {false, true}) {
            if ((wide && !bits) || (g_band != 0 && bits) || (g_bits_fused && (!bits || wide))) continue;
            // odd sizes; a taller image now and then so that row blocks and tiles crossing rows occur
            const int64_t H = (C == 64 || O == 64) ? 23 : 7;
            Case c{2, H, H == 7 ? 9 : 37, C, O, g[0], g[1], g[2], g[3], bits, wide};
            ++n;
            if (!run_case(c, rng, conv, epi)) {
              if (++bad <= 5)
                std::printf("MISMATCH %s C=%lld O=%lld k=%lld s=%lld p=%lld d=%lld %s%s\n", name, (long long)C,
                            (long long)O, (long long)g[0], (long long)g[1], (long long)g[2], (long long)g[3],
                            bits ? "bits" : "float", wide ? " wide" : "");
            }
          }
  std::printf("%s %s: %d/%d cases bit-exact\n", bad ? "FAIL" : "OK", name, n - bad, n);
  return bad ? 1 : 0;
}

}  // namespace

int main() {
  int rc = test_isa("portable", conv_row_pc_portable, epilogue_row_portable);
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2")) rc |= test_isa("avx2", conv_row_pc_avx2, epilogue_row_avx2);
  else std::printf("SKIP avx2: not supported by this CPU\n");
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq")) {
    rc |= test_isa("avx512", conv_row_pc_avx512, epilogue_row_avx512);
    for (int64_t band : {-1, 1, 3, 1000}) {  // float output in bands: the driver's height, 1 row, 3 rows, whole images
      g_band = band;
      char name[64];
      if (band < 0) std::snprintf(name, sizeof name, "avx512 float, bands of the driver's height");
      else std::snprintf(name, sizeof name, "avx512 float, bands of %lld rows", static_cast<long long>(band));
      rc |= test_isa(name, conv_row_pc_avx512, epilogue_row_avx512);
    }
    g_band = 0;
    g_bits_fused = true;
    rc |= test_isa("avx512 bits decided in the register blocks", conv_row_pc_avx512, epilogue_row_avx512);
    g_bits_fused = false;
  } else {
    std::printf("SKIP avx512: not supported by this CPU\n");
  }
#endif
#if defined(__x86_64__)
  if (amx_available()) {
    rc |= test_isa("amx", nullptr, nullptr);
    g_amx_bits_only = true;
    rc |= test_isa("amx (weights expanded per block)", nullptr, nullptr);
    g_amx_bits_only = false;
  } else {
    std::printf("SKIP amx: not supported by this CPU/OS\n");
  }
#endif
#if defined(__aarch64__)
  rc |= test_isa("neon", conv_row_pc_neon, epilogue_row_neon);
#endif
  return rc;
}
