// bnnc ONNX Runtime custom ops: kernel interface shared by the ISA-specific files.
// Everything here is plain C++ on raw pointers: ISA files must not instantiate std templates inside
// target-specific regions (an inline instantiation compiled for AVX-512 could be picked by the linker
// for generic callers).
#pragma once
#include <cstddef>
#include <cstdint>

namespace bnnc {

enum class Isa : int { Portable = 0, Avx2 = 1, Avx512 = 2, Neon = 3, Amx = 4 };

// One BinaryConv2dPacked call, prepared by the generic driver (bnnc_ort.cc).
struct ConvPlan {
  // input X [N, H, W, Cw] (uint32 words)
  const uint32_t* x;
  int64_t N, H, W, Cw;
  // geometry
  int64_t O, KH, KW, sh, sw, pt, pl, dh, dw, OH, OW;
  int64_t K;     // KH * KW * Cw: words per patch
  int64_t Opad;  // O rounded up to a multiple of 16
  // weights, transposed: wt[k * Opad + o] (o >= O: 0); original layout w[o * K + k]
  const uint32_t* wt;
  const uint32_t* w;
  // AMX only: weights as bit masks of the B-tile layout (kernels_amx.cc), else null
  const uint64_t* wamx;
  // AMX only, small weights: the same tiles expanded once to ±1 int8 (64-byte aligned), else null
  const int8_t* wamx8;
  // border table, transposed: et[(r * NC + c) * Opad + o]; classes per output row / column
  const int32_t* et;
  // AMX only: et - KH·KW·32·Cw - amx_pad_dot (D = that + the ±1 dot product), else null
  const int32_t* etamx;
  // AMX, bits output, every P0 in {-1, 0, +1}: the output bit P0·D >= P1 as one compare of the dot product,
  // (dot >= tamx[class · Opad + o]) XOR bit o % 16 of namx[o / 16] (prepare_plan), else null
  const int32_t* tamx;
  const uint16_t* namx;
  // popcount kernels, bits output, every P0 in {-1, 0, +1}: the output bit as one compare of the popcount,
  // (pc <= tpc[class · Opad + o]) XOR bit o % 16 of namx[o / 16] (prepare_plan), else null
  const int32_t* tpc;
  int64_t NC;
  const int32_t* rc;
  const int32_t* cc;
  // epilogue (padded to Opad): bits: p0i/p1i (pads 0 / 1, i.e. bit 0); float: p0f/p1f
  bool bits;
  bool small_dir;  // bits mode and every P0 in {-1, 0, +1}: int32 products are exact
  const int32_t* p0i;
  const int32_t* p1i;
  const float* p0f;
  const float* p1f;
  // output: bits [N, OH, OW, Ow] uint32 or float [N, O, OH, OW]
  void* y;
  int64_t Ow;
  // float output only: an element-wise chain applied to every output row right after the epilogue
  // (BinaryConv2dPackedChain, fused by bnnc.runtimes.ort.fuse): nchain steps `chain[i]` (ChainStep),
  // the per-channel constants of the steps that take one as consecutive rows of `chainc` (O floats each),
  // the residual `res` laid out as y. nchain = 0: none.
  int64_t nchain;
  const int32_t* chain;
  const float* chainc;
  const float* res;
  // float output only: also PackSign the final float rows (after the chain) into ybits [N, OH, OW, Ow]
  // with per-channel thresholds tpack (null: 0); ybits null: not asked for
  uint32_t* ybits;
  const float* tpack;
};

// Element-wise steps of a fused chain; every step rounds to float32 as the separate ONNX op would.
enum ChainStep : int32_t {
  kChainAddResidual = 1,  // v = v + R[n, o, y, x]
  kChainAddChannel = 2,   // v = v + c[o]
  kChainMulChannel = 3,   // v = v * c[o]
  kChainPRelu = 4,        // v = v < 0 ? v * c[o] : v   (ONNX PRelu, as ONNX Runtime computes it)
  kChainClip = 5,         // v = v < lo[o] ? lo[o] : v; v = v > hi[o] ? hi[o] : v   (two rows: lo, hi; ONNX Clip,
                          // as ONNX Runtime's std::max / std::min order computes it)
};

// Apply p's chain in place to output row y of image n (float output; no-op when p.nchain == 0). Every
// float epilogue applies the chain itself (the AVX-512 one in registers, the others through this).
void apply_chain_row(const ConvPlan& p, int64_t n, int64_t y);
// The chain, then the fused PackSign of the row (when p.ybits): what float epilogues call after storing
// row y (portable packing; the AVX-512 epilogue uses pack_row_avx512).
void finish_float_row(const ConvPlan& p, int64_t n, int64_t y);

// The input words of one output row, as `nrows` runs of `row_len` words: the word of patch index
// k = r * row_len + t for output column x is base[r * row_stride + x * x_step + t]. For dilation 1 the
// runs are the KH zero-padded input rows (row_len = KW * Cw, x_step = stride * Cw), so no im2col copy is
// needed; otherwise a full im2col (nrows = 1, row_len = x_step = K).
struct RowSrc {
  const uint32_t* base;
  int64_t nrows, row_stride, x_step, row_len;
};

// Per-row kernels. `pc` receives OW * Opad popcounts, `fbuf` is OW * Opad floats of scratch for the
// float epilogue.
using ConvRowPcFn = void (*)(const ConvPlan& p, const RowSrc& src, int32_t* pc);
using EpilogueRowFn = void (*)(const ConvPlan& p, int64_t n, int64_t y, const int32_t* pc, float* fbuf);

void conv_row_pc_portable(const ConvPlan& p, const RowSrc& src, int32_t* pc);
void epilogue_row_portable(const ConvPlan& p, int64_t n, int64_t y, const int32_t* pc, float* fbuf);

#if defined(__x86_64__) || defined(__i386__)
void conv_row_pc_avx2(const ConvPlan& p, const RowSrc& src, int32_t* pc);
void epilogue_row_avx2(const ConvPlan& p, int64_t n, int64_t y, const int32_t* pc, float* fbuf);
void conv_row_pc_avx512(const ConvPlan& p, const RowSrc& src, int32_t* pc);
void epilogue_row_avx512(const ConvPlan& p, int64_t n, int64_t y, const int32_t* pc, float* fbuf);
// The same from AMX dot products (D = etamx + dot) for output rows [y0, y1), row y at dot + (y - y0)·dot_row·Opad;
// bits output needs p.small_dir.
void epilogue_dot_rows_avx512(const ConvPlan& p, int64_t n, int64_t y0, int64_t y1, const int32_t* dot,
                              int64_t dot_row);
// Bits output with p.tpc (every P0 in {-1, 0, 1}): output row y of image n decided in the register blocks
// of the popcount GEMM, no counts stored (replaces conv_row_pc_avx512 + epilogue_row_avx512).
void conv_row_bits_avx512(const ConvPlan& p, int64_t n, int64_t y, const RowSrc& src);
// Float output (popcount kernels) of output rows [y0, y1) of image n as one band: each row's counts into a
// ring of float_band_slots_avx512(p, y1 - y0) rows of `pc` (OW·Opad int32 each), the epilogue on whole
// 16-pixel vectors across row ends (the band's last one partial). `patch`: row_buf_words(p) words.
// float_band_rows_avx512: the band height the driver uses.
int64_t float_band_rows_avx512(const ConvPlan& p);
int64_t float_band_slots_avx512(const ConvPlan& p, int64_t band);
void conv_band_float_avx512(const ConvPlan& p, int64_t n, int64_t y0, int64_t y1, uint32_t* patch, int32_t* pc);
#endif
#if defined(__aarch64__)
void conv_row_pc_neon(const ConvPlan& p, const RowSrc& src, int32_t* pc);
void epilogue_row_neon(const ConvPlan& p, int64_t n, int64_t y, const int32_t* pc, float* fbuf);
#endif

#if defined(__x86_64__)
// AMX-INT8 (kernels_amx.cc): whole-image int8 GEMM on ±1 values, in blocks of output rows.
bool amx_available();  // CPU has AMX-TILE/INT8 + AVX-512BW and the OS granted the tile state
int64_t amx_weight_bytes(const ConvPlan& p);
void amx_pack_weights(const ConvPlan& p, uint64_t* dst);  // needs p.{w, O, Opad, K, KH, KW, Cw}
// Bytes of the pre-expanded int8 B tiles (8 × amx_weight_bytes) when they are worth keeping, else 0.
int64_t amx_int8_weight_bytes(const ConvPlan& p);
void amx_expand_weights(const ConvPlan& p, int8_t* dst);  // p.wamx → int8 tiles; dst 64-byte aligned
int64_t amx_pad_dot(const ConvPlan& p);                   // constant the missing input bits add to every dot
int64_t amx_image_bytes(const ConvPlan& p);               // unpacked image, per image
void amx_unpack_image(const ConvPlan& p, int64_t n, int8_t* dst);
int64_t amx_blocks(const ConvPlan& p);                    // row blocks per image
int64_t amx_scratch_words(const ConvPlan& p);             // int32 scratch of amx_conv_block
void amx_conv_block(const ConvPlan& p, const int8_t* img, int64_t n, int64_t blk, int32_t* dot, float* fbuf);
#endif

// PackSign: X [N, C, S] float → Y [N, S, Cw] words (bit c%32 of word c/32: x >= t[c], t = null: 0).
using PackSignFn = void (*)(const float* x, const float* t, int64_t N, int64_t C, int64_t S, uint32_t* y);
void pack_sign_portable(const float* x, const float* t, int64_t N, int64_t C, int64_t S, uint32_t* y);
// The same for C channels of S positions each, channel c at x + c * cstride (one image).
void pack_sign_strided_portable(const float* x, int64_t cstride, const float* t, int64_t C, int64_t S, uint32_t* y);
#if defined(__x86_64__) || defined(__i386__)
void pack_sign_avx512(const float* x, const float* t, int64_t N, int64_t C, int64_t S, uint32_t* y);
void pack_sign_strided_avx512(const float* x, int64_t cstride, const float* t, int64_t C, int64_t S, uint32_t* y);
#endif

// Scalar epilogue of one output pixel range [x0, x1) of row y (shared by all ISAs for tails and
// the general-direction bits case). Writes the output directly.
void epilogue_scalar(const ConvPlan& p, int64_t n, int64_t y, int64_t x0, int64_t x1, const int32_t* pc);

// The input of output row y of image n as a RowSrc, written into `buf` (row_buf_words(p) words).
int64_t row_buf_words(const ConvPlan& p);
RowSrc gather_row(const ConvPlan& p, int64_t n, int64_t y, uint32_t* buf);

// Float rows are produced as fbuf[x * Opad + o]; this writes them into NCHW.
void store_float_row(const ConvPlan& p, int64_t n, int64_t y, const float* fbuf);

// ------------------------------------------------------------------------------------------------
// WinogradConvMaxPool (ai.bnnc.ort, written by bnnc.runtimes.ort.fuse): MaxPool(Conv(x)) for the float stem,
// the conv (stride 2, 5..8 wide kernel) by 1-D Winograd along the rows as bnnc.runtimes.winograd plans it;
// AVX-512 only (the rewrite is made only where the library runs its AVX-512 or AMX kernels).
constexpr int kWinoMaxParts = 16;
constexpr int kWinoOcTile = 8;  // output channels per register tile (and per U block)

struct WinoPart {
  int64_t m, npt, col, slot, ntile;
  float at[4][8];  // Aᵀ [m][npt]
  float bt[8][8];  // Bᵀ [npt][npt]
  // column vector q of the part = permutes of the m transformed vectors: perm[q][0] for permutexvar of
  // column 0's vector, perm[q][j] (j ≥ 1) for permutex2var(previous, perm, column j's vector)
  int32_t perm[4][4][16];
  // m <= 3: phase row [col + m·l + s] for l < 16 spans 3 vectors from the part's column: lanes from
  // permutex2var(v0, gidx[s][0], v1), those with gmask[s] set from permutex2var(v2, gidx[s][1], v3)
  int32_t gidx[8][2][16];
  uint32_t gmask[8];
};


struct WinoPlan {
  int64_t C, H, W, O, KH, pt, pl, OH, OW;
  int64_t HP;    // padded input rows read: (OH - 1) * 2 + KH
  int64_t nq;    // 16-wide vectors of a phase row
  int64_t nslot;  // points over all parts
  int64_t nparts;
  WinoPart parts[kWinoMaxParts];
  int64_t pkh, pkw, psh, ppt, ppl, POH, POW;  // max pool (column stride 2)
  int64_t band;  // pool rows per task
  const float* U;  // [O / 8, C, KH, 2, nslot, 8]
  const float* B;  // [O]
};

// Fills the parts' perm tables and nq from the parts (driver, once per plan).
void wino_finish_plan(WinoPlan& p);
int64_t wino_v_floats(const WinoPlan& p);       // transformed input of one image
int64_t wino_task_floats(const WinoPlan& p);    // per-task scratch
// transformed input rows `r` (= channel · HP + padded row) of image x [C, H, W] into v
void wino_input_rows_avx512(const WinoPlan& p, const float* x, int64_t r0, int64_t r1, float* v);
// task = band · (O / 8) + channel block: that band of pooled rows of those 8 channels into y [O, POH, POW]
void wino_band_avx512(const WinoPlan& p, const float* v, int64_t task, float* y, float* scratch);

}  // namespace bnnc
