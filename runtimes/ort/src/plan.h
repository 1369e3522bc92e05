// Preparation of a ConvPlan (transposed weights and border table, padded epilogue vectors), shared by
// the ORT kernel and the native self-test. Not included by the ISA-specific files.
#pragma once
#include <vector>

#include "kernels.h"

namespace bnnc {

struct ConvStorage {
  std::vector<uint32_t> wt;
  std::vector<int32_t> et, p0i, p1i;
  std::vector<float> p0f, p1f;
};

// Expects p.{x, N, H, W, Cw, O, KH, KW, sh, sw, pt, pl, dh, dw, OH, OW, w, rc, cc, bits, y} set; fills the
// rest. `e` is [O, NR, NC]; p0/p1 are int32 (bits) or float (float output), O elements each.
void prepare_plan(ConvPlan& p, ConvStorage& st, const int32_t* e, int64_t NR, int64_t NC, const void* p0,
                  const void* p1);

// Whole convolution on the calling thread (self-test; the ORT kernel parallelizes over rows).
void run_conv_serial(const ConvPlan& p, ConvRowPcFn conv, EpilogueRowFn epi);

}  // namespace bnnc
