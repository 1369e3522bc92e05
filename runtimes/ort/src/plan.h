// Preparation of a ConvPlan (transposed weights and border table, padded epilogue vectors), shared by
// the ORT kernel and the native self-test. Not included by the ISA-specific files.
#pragma once
#include <vector>

#include "kernels.h"

namespace bnnc {

struct ConvStorage {
  std::vector<uint32_t> wt;
  std::vector<int32_t> et, etamx, p0i, p1i;
  std::vector<float> p0f, p1f;
  std::vector<uint64_t> wamx;  // AMX B tiles as bit masks
  std::vector<int8_t> wamx8;   // small weights: the B tiles as ±1 int8 (+ 64 bytes for alignment)
  std::vector<int32_t> tamx;   // AMX bits output: thresholds on the dot product per class and channel
  std::vector<uint16_t> namx;  // and the channels whose bit is the compare's complement (both tables)
  std::vector<int32_t> tpc;    // popcount kernels, bits output: thresholds on the popcount
};

// Expects p.{Cw, O, KH, KW, w, bits} set (the rest of p is not read); fills K, Opad, NC, wt, et, tpc + namx (bits, small P0), wamx + etamx
// (when `amx`), small_dir, p0i/p1i or p0f/p1f, Ow. `e` is [O, NR, NC]; p0/p1 are int32 (bits) or float
// (float output), O elements each. Depends only on the weights and constants: can be done once per model.
void prepare_plan(ConvPlan& p, ConvStorage& st, const int32_t* e, int64_t NR, int64_t NC, const void* p0,
                  const void* p1, bool amx = false);

// Copy the fields prepare_plan fills from `prepared` into `p`.
void attach_plan(ConvPlan& p, const ConvPlan& prepared);

#if defined(__x86_64__)
// Whole convolution with the AMX kernels on the calling thread (self-test).
void run_conv_serial_amx(const ConvPlan& p);
#endif

// Whole convolution on the calling thread (self-test; the ORT kernel parallelizes over rows).
void run_conv_serial(const ConvPlan& p, ConvRowPcFn conv, EpilogueRowFn epi);

}  // namespace bnnc
