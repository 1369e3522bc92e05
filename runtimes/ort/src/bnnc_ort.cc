// bnnc ONNX Runtime custom-op library: the deploy-form ops of the `ai.bnnc` domain
// (PackSign, UnpackSign, BinaryConv2dPacked, MaxPoolBits), bit-exact with bnnc/ops/deploy.py.
//
// Load it with SessionOptions.register_custom_ops_library(path). The XOR-popcount kernel is picked at
// session creation from the CPU's features (AMX-INT8 > AVX-512 VPOPCNTDQ > AVX2 > portable on x86-64,
// NEON on aarch64); the environment variable BNNC_ORT_ISA=auto|amx|avx512|avx2|neon|portable forces one.
// Weights, border tables and epilogue constants that are initializers are prepared once per session.
//
// Domain `ai.bnnc.ort` (this library only, written by bnnc.runtimes.ort.fuse): BinaryConv2dPackedChain =
// BinaryConv2dPacked(output="float") followed by an element-wise chain (residual Add, per-channel Add / Mul,
// PRelu, Clip) and optionally a PackSign of the result (second output), applied to each output row while it is
// in cache, instead of one full pass per ONNX node. Inputs: X W E RC CC P0 P1 [R] [C] [T]; attribute
// `chain` (ints, ChainStep codes); outputs: Y (float) [, Ybits = PackSign(Y, T)]. WinogradConvMaxPool (x86-64,
// AVX-512) = MaxPool(Conv(X)) of the float stem, the stride-2 conv by 1-D Winograd along the rows (below).
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels.h"
#include "plan.h"

#define BNNC_STR2(x) #x
#define BNNC_STR(x) BNNC_STR2(x)

namespace bnnc {
namespace {

constexpr const char* kDomain = "ai.bnnc";
constexpr const char* kPrivateDomain = "ai.bnnc.ort";

struct OpError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <typename... Args>
[[noreturn]] void fail(const char* op, Args&&... args) {
  std::ostringstream s;
  s << "bnnc " << op << ": ";
  (s << ... << args);
  throw OpError(s.str());
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << "]";
  return o.str();
}

int64_t num_words(int64_t c) { return (c + 31) / 32; }

int64_t out_size(int64_t size, int64_t k, int64_t s, int64_t pb, int64_t pe, int64_t d) {
  const int64_t span = size + pb + pe - d * (k - 1) - 1;
  // floor division, as Python's //
  return (span >= 0 ? span / s : -((-span + s - 1) / s)) + 1;
}

// ------------------------------------------------------------------------------------------------
// ISA selection

struct IsaImpl {
  Isa isa;
  const char* name;
  ConvRowPcFn conv;
  EpilogueRowFn epi;
  PackSignFn pack;
  bool amx;  // whole-image AMX conv for large layers (conv/epi: the AVX-512 row kernels, used for the others)
  bool forced = false;  // requested by name (BNNC_ORT_ISA): AMX then runs every layer
};

// The AVX-512 row kernels run (ISA avx512, or amx for the layers AMX does not take): their float epilogue is
// alias-safe and in bands of rows, their bits output decided in the GEMM register blocks.
bool avx512_rows(const IsaImpl& impl) { return impl.isa == Isa::Avx512 || impl.isa == Isa::Amx; }

// AMX pays a per-image cost (unpacking the image to bytes, expanding the weight tiles) and wastes half of
// every 64-byte chunk when 32·Cw is odd: below ~16 M bit-MACs per image (CIFAR ResNet-20: 32×32×16 → 16,
// 8×8×64 → 64, measured 1.3-2.4× slower than AVX-512), with ≤ 32 input channels or < 32 outputs the
// AVX-512 row kernels win. ResNet-18 layers at 224×224 input are ≥ 115 M. (BNNC_ORT_ISA=amx: AMX always.)
constexpr int64_t kAmxMinBitMacs = int64_t{16} << 20;

bool cpu_has(Isa isa) {
  switch (isa) {
    case Isa::Portable:
      return true;
#if defined(__x86_64__) || defined(__i386__)
    case Isa::Avx2:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2");
    case Isa::Avx512:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq");
#endif
#if defined(__x86_64__)
    case Isa::Amx:
      return cpu_has(Isa::Avx512) && amx_available();
#endif
#if defined(__aarch64__)
    case Isa::Neon:
      return true;  // Advanced SIMD is mandatory on AArch64
#endif
    default:
      return false;
  }
}

IsaImpl impl_of(Isa isa) {
  switch (isa) {
#if defined(__x86_64__) || defined(__i386__)
#if defined(__x86_64__)
    case Isa::Amx:
      return {isa, "amx", conv_row_pc_avx512, epilogue_row_avx512, pack_sign_avx512, true};
#endif
    case Isa::Avx512:
      return {isa, "avx512", conv_row_pc_avx512, epilogue_row_avx512, pack_sign_avx512, false};
    case Isa::Avx2:
      return {isa, "avx2", conv_row_pc_avx2, epilogue_row_avx2, pack_sign_portable, false};
#endif
#if defined(__aarch64__)
    case Isa::Neon:
      return {isa, "neon", conv_row_pc_neon, epilogue_row_neon, pack_sign_portable, false};
#endif
    default:
      return {Isa::Portable, "portable", conv_row_pc_portable, epilogue_row_portable, pack_sign_portable, false};
  }
}

// Resolve a request ("auto"/empty = best available). Throws OpError on an unknown or unsupported one.
IsaImpl resolve_isa(const char* request) {
  std::string req = request ? request : "";
  for (auto& ch : req) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  if (req.empty() || req == "auto") {
    for (Isa isa : {Isa::Amx, Isa::Avx512, Isa::Avx2, Isa::Neon})
      if (cpu_has(isa)) return impl_of(isa);
    return impl_of(Isa::Portable);
  }
  Isa isa;
  if (req == "amx") isa = Isa::Amx;
  else if (req == "avx512") isa = Isa::Avx512;
  else if (req == "avx2") isa = Isa::Avx2;
  else if (req == "neon") isa = Isa::Neon;
  else if (req == "portable") isa = Isa::Portable;
  else fail("BNNC_ORT_ISA", "unknown value '", req, "' (use auto, amx, avx512, avx2, neon or portable)");
  if (!cpu_has(isa))
    fail("BNNC_ORT_ISA", "'", req, "' requested, but this CPU or this build does not support it");
  IsaImpl impl = impl_of(isa);
  impl.forced = true;
  return impl;
}

IsaImpl isa_from_env() { return resolve_isa(std::getenv("BNNC_ORT_ISA")); }

// ------------------------------------------------------------------------------------------------
// Attribute helpers

int64_t attr_int(const OrtKernelInfo* info, const char* name, const char* op) {
  try {
    return Ort::ConstKernelInfo(info).GetAttribute<int64_t>(name);
  } catch (const Ort::Exception&) {
    fail(op, "missing int attribute '", name, "'");
  }
}

std::vector<int64_t> attr_ints(const OrtKernelInfo* info, const char* name, const char* op,
                               const std::vector<int64_t>* dflt) {
  try {
    return Ort::ConstKernelInfo(info).GetAttributes<int64_t>(name);
  } catch (const Ort::Exception&) {
    if (dflt) return *dflt;
    fail(op, "missing ints attribute '", name, "'");
  }
}

std::string attr_str(const OrtKernelInfo* info, const char* name, const char* op) {
  try {
    return Ort::ConstKernelInfo(info).GetAttribute<std::string>(name);
  } catch (const Ort::Exception&) {
    fail(op, "missing string attribute '", name, "'");
  }
}

template <typename T>
struct In {
  const T* data;
  std::vector<int64_t> shape;
  int64_t size;
};

template <typename T>
In<T> input(const Ort::KernelContext& ctx, size_t i) {
  Ort::ConstValue v = ctx.GetInput(i);
  auto info = v.GetTensorTypeAndShapeInfo();
  In<T> r{v.GetTensorData<T>(), info.GetShape(), static_cast<int64_t>(info.GetElementCount())};
  return r;
}

void parallel_for(const Ort::KernelContext& ctx, size_t total, void (*fn)(void*, size_t), void* data) {
  if (total == 0) return;
  if (total == 1) {
    fn(data, 0);
    return;
  }
  ctx.ParallelFor(fn, total, 0, data);
}

// Exceptions → OrtStatus, for the V2 (status-returning) custom-op entry points.
template <typename F>
OrtStatusPtr guarded(F&& f) {
  try {
    f();
    return nullptr;
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
  } catch (...) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, "bnnc: unknown error");
  }
}

// ------------------------------------------------------------------------------------------------
// PackSign

struct PackSignKernel {
  PackSignFn pack;
  explicit PackSignKernel(const OrtKernelInfo*) : pack(isa_from_env().pack) {}
  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded([&] {
      Ort::KernelContext ctx(context);
      auto x = input<float>(ctx, 0);
      if (x.shape.size() < 2) fail("PackSign", "X must be [N, C, ...], got ", shape_str(x.shape));
      const int64_t N = x.shape[0], C = x.shape[1];
      int64_t S = 1;
      for (size_t i = 2; i < x.shape.size(); ++i) S *= x.shape[i];
      const float* t = nullptr;
      if (ctx.GetInputCount() > 1) {
        Ort::ConstValue tv = ctx.GetInput(1);
        if (tv != nullptr) {
          auto ti = input<float>(ctx, 1);
          if (ti.size != C) fail("PackSign", "threshold T has ", ti.size, " elements, X has ", C, " channels");
          t = ti.data;
        }
      }
      const int64_t Cw = num_words(C);
      std::vector<int64_t> oshape{N};
      for (size_t i = 2; i < x.shape.size(); ++i) oshape.push_back(x.shape[i]);
      oshape.push_back(Cw);
      uint32_t* y = ctx.GetOutput(0, oshape).GetTensorMutableData<uint32_t>();
      if (N * S * Cw > 0) pack(x.data, t, N, C, S, y);
    });
  }
};

struct PackSignOp : Ort::CustomOpBase<PackSignOp, PackSignKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** k) const {
    return guarded([&] { *k = new PackSignKernel(info); });
  }
  const char* GetName() const { return "PackSign"; }
  size_t GetInputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i == 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32; }
};

// ------------------------------------------------------------------------------------------------
// UnpackSign

struct UnpackSignKernel {
  int64_t channels;
  explicit UnpackSignKernel(const OrtKernelInfo* info) : channels(attr_int(info, "channels", "UnpackSign")) {
    if (channels < 1) fail("UnpackSign", "channels must be >= 1, got ", channels);
  }
  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded([&] {
      Ort::KernelContext ctx(context);
      auto x = input<uint32_t>(ctx, 0);
      if (x.shape.size() < 2) fail("UnpackSign", "X must be packed [N, ..., Cw], got ", shape_str(x.shape));
      const int64_t N = x.shape[0], Cw = x.shape.back(), C = channels;
      if (Cw != num_words(C))
        fail("UnpackSign", "X has ", Cw, " words per position, channels=", C, " needs ", num_words(C));
      int64_t S = 1;
      std::vector<int64_t> oshape{N, C};
      for (size_t i = 1; i + 1 < x.shape.size(); ++i) {
        S *= x.shape[i];
        oshape.push_back(x.shape[i]);
      }
      float* y = ctx.GetOutput(0, oshape).GetTensorMutableData<float>();
      for (int64_t n = 0; n < N; ++n)
        for (int64_t c = 0; c < C; ++c) {
          const uint32_t* xs = x.data + n * S * Cw + (c >> 5);
          const unsigned b = static_cast<unsigned>(c & 31);
          float* yo = y + (n * C + c) * S;
          for (int64_t s = 0; s < S; ++s) yo[s] = ((xs[s * Cw] >> b) & 1u) ? 1.0f : -1.0f;
        }
    });
  }
};

struct UnpackSignOp : Ort::CustomOpBase<UnpackSignOp, UnpackSignKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** k) const {
    return guarded([&] { *k = new UnpackSignKernel(info); });
  }
  const char* GetName() const { return "UnpackSign"; }
  size_t GetInputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

// ------------------------------------------------------------------------------------------------
// MaxPoolBits

struct MaxPoolBitsKernel {
  int64_t channels;
  std::vector<int64_t> kernel, strides, pads;
  bool is_or;
  explicit MaxPoolBitsKernel(const OrtKernelInfo* info) {
    const char* op = "MaxPoolBits";
    channels = attr_int(info, "channels", op);
    kernel = attr_ints(info, "kernel_shape", op, nullptr);
    const std::vector<int64_t> ones{1, 1}, zeros{0, 0, 0, 0};
    strides = attr_ints(info, "strides", op, &ones);
    pads = attr_ints(info, "pads", op, &zeros);
    const std::string mode = attr_str(info, "mode", op);
    if (mode != "or" && mode != "and") fail(op, "mode must be 'or' or 'and', got '", mode, "'");
    is_or = mode == "or";
    if (kernel.size() != 2 || strides.size() != 2 || pads.size() != 4)
      fail(op, "kernel_shape/strides need 2 values and pads 4");
    if (kernel[0] < 1 || kernel[1] < 1 || strides[0] < 1 || strides[1] < 1)
      fail(op, "kernel_shape and strides must be >= 1");
    for (auto p : pads)
      if (p < 0) fail(op, "pads must be >= 0");
  }
  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded([&] {
      const char* op = "MaxPoolBits";
      Ort::KernelContext ctx(context);
      auto x = input<uint32_t>(ctx, 0);
      if (x.shape.size() != 4) fail(op, "X must be [N, H, W, Cw], got ", shape_str(x.shape));
      const int64_t N = x.shape[0], H = x.shape[1], W = x.shape[2], Cw = x.shape[3];
      if (Cw != num_words(channels))
        fail(op, "X has ", Cw, " words per position, channels=", channels, " needs ", num_words(channels));
      const int64_t kh = kernel[0], kw = kernel[1], sh = strides[0], sw = strides[1];
      const int64_t pt = pads[0], pl = pads[1];
      const int64_t OH = out_size(H, kh, sh, pt, pads[2], 1), OW = out_size(W, kw, sw, pl, pads[3], 1);
      if (OH < 0 || OW < 0) fail(op, "window larger than the padded input ", shape_str(x.shape));
      uint32_t* y = ctx.GetOutput(0, std::vector<int64_t>{N, OH, OW, Cw}).GetTensorMutableData<uint32_t>();
      std::vector<uint32_t> full(static_cast<size_t>(Cw), 0xffffffffu);
      if (channels % 32) full[Cw - 1] = (1u << (channels % 32)) - 1u;
      for (int64_t n = 0; n < N; ++n)
        for (int64_t oy = 0; oy < OH; ++oy)
          for (int64_t ox = 0; ox < OW; ++ox) {
            uint32_t* acc = y + ((n * OH + oy) * OW + ox) * Cw;
            for (int64_t j = 0; j < Cw; ++j) acc[j] = is_or ? 0u : full[j];
            for (int64_t i = 0; i < kh; ++i) {
              const int64_t yy = oy * sh - pt + i;
              if (yy < 0 || yy >= H) continue;
              for (int64_t jx = 0; jx < kw; ++jx) {
                const int64_t xx = ox * sw - pl + jx;
                if (xx < 0 || xx >= W) continue;
                const uint32_t* src = x.data + ((n * H + yy) * W + xx) * Cw;
                if (is_or)
                  for (int64_t j = 0; j < Cw; ++j) acc[j] |= src[j];
                else
                  for (int64_t j = 0; j < Cw; ++j) acc[j] &= src[j];
              }
            }
          }
    });
  }
};

struct MaxPoolBitsOp : Ort::CustomOpBase<MaxPoolBitsOp, MaxPoolBitsKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** k) const {
    return guarded([&] { *k = new MaxPoolBitsKernel(info); });
  }
  const char* GetName() const { return "MaxPoolBits"; }
  size_t GetInputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32; }
};

// ------------------------------------------------------------------------------------------------
// BinaryConv2dPacked. Registered twice under one name: P0/P1 float32 → float output, P0/P1 int32 →
// packed bits output (ORT picks the kernel, and the output type, from the P0 type).

struct ConvTask {
  const ConvPlan* plan;
  IsaImpl impl;
  const int8_t* amx_img;  // AMX: the unpacked images, amx_img_bytes apart
  int64_t amx_img_bytes, amx_nblk;
  int64_t band = 0, nband = 0;  // AVX-512 float output: rows per task, tasks per image
};

thread_local std::vector<uint32_t> t_patch;
thread_local std::vector<int32_t> t_pc;
thread_local std::vector<float> t_fbuf;
thread_local std::vector<int32_t> t_dot;

#if defined(__x86_64__)
void amx_block_task(void* data, size_t idx) {
  const ConvTask& task = *static_cast<const ConvTask*>(data);
  const ConvPlan& p = *task.plan;
  const int64_t n = static_cast<int64_t>(idx) / task.amx_nblk, b = static_cast<int64_t>(idx) % task.amx_nblk;
  const size_t nd = static_cast<size_t>(amx_scratch_words(p)), nf = static_cast<size_t>(p.OW * p.Opad);
  if (t_dot.size() < nd) t_dot.resize(nd);
  if (!p.bits && t_fbuf.size() < nf) t_fbuf.resize(nf);
  amx_conv_block(p, task.amx_img + n * task.amx_img_bytes, n, b, t_dot.data(), p.bits ? nullptr : t_fbuf.data());
}

void amx_unpack_task(void* data, size_t n) {
  const ConvTask& task = *static_cast<const ConvTask*>(data);
  amx_unpack_image(*task.plan, static_cast<int64_t>(n),
                   const_cast<int8_t*>(task.amx_img) + static_cast<int64_t>(n) * task.amx_img_bytes);
}
#endif

void conv_row_task(void* data, size_t idx) {
  const ConvTask& task = *static_cast<const ConvTask*>(data);
  const ConvPlan& p = *task.plan;
  const int64_t n = static_cast<int64_t>(idx) / p.OH, y = static_cast<int64_t>(idx) % p.OH;
  const size_t np = static_cast<size_t>(row_buf_words(p)), nc = static_cast<size_t>(p.OW * p.Opad);
  if (t_patch.size() < np) t_patch.resize(np);
#if defined(__x86_64__) || defined(__i386__)
  if (p.bits && p.tpc && avx512_rows(task.impl)) {  // no count rows
    conv_row_bits_avx512(p, n, y, gather_row(p, n, y, t_patch.data()));
    return;
  }
#endif
  if (t_pc.size() < nc) t_pc.resize(nc);
  if (!p.bits && t_fbuf.size() < nc) t_fbuf.resize(nc);
  task.impl.conv(p, gather_row(p, n, y, t_patch.data()), t_pc.data());
  task.impl.epi(p, n, y, t_pc.data(), p.bits ? nullptr : t_fbuf.data());
}

#if defined(__x86_64__) || defined(__i386__)
void conv_band_task(void* data, size_t idx) {
  const ConvTask& task = *static_cast<const ConvTask*>(data);
  const ConvPlan& p = *task.plan;
  const int64_t n = static_cast<int64_t>(idx) / task.nband, b = static_cast<int64_t>(idx) % task.nband;
  const int64_t y0 = b * task.band, y1 = std::min(p.OH, y0 + task.band);
  const size_t np = static_cast<size_t>(row_buf_words(p));
  const size_t nc = static_cast<size_t>(float_band_slots_avx512(p, y1 - y0) * p.OW * p.Opad);
  if (t_patch.size() < np) t_patch.resize(np);
  if (t_pc.size() < nc) t_pc.resize(nc);
  conv_band_float_avx512(p, n, y0, y1, t_patch.data(), t_pc.data());
}
#endif

struct ConvKernel {
  const char* op = "BinaryConv2dPacked";
  bool bits_type;  // the registered P0/P1 type: int32 (bits) or float32 (float)
  int64_t in_channels, out_channels;
  std::vector<int64_t> kernel, strides, pads, dilations;
  IsaImpl impl;
  // W, E, P0, P1 as initializers: prepared once here (`cached`), else per call
  bool cached = false;
  ConvPlan prepared{};
  ConvStorage storage;
  std::vector<int8_t> amx_img;  // unpacked input images (AMX), reused between calls
  std::mutex amx_mutex;

  // BinaryConv2dPackedChain: the chain steps (attribute `chain`), inputs 7 (R) and 8 (C) optional
  bool chain_op = false;
  std::vector<int32_t> chain;
  int64_t chain_consts = 0;
  bool chain_res = false;

  ConvKernel(const OrtKernelInfo* info, bool bits, bool is_chain = false) : bits_type(bits), chain_op(is_chain) {
    if (chain_op) {
      op = "BinaryConv2dPackedChain";
      for (int64_t c : attr_ints(info, "chain", op, nullptr)) {
        if (c < kChainAddResidual || c > kChainClip)
          fail(op, "unknown chain step ", c,
               " (1 = add residual, 2 = add per-channel, 3 = mul per-channel, 4 = PRelu, 5 = Clip)");
        if (c == kChainAddResidual) {
          if (chain_res) fail(op, "chain has more than one residual Add");
          chain_res = true;
        } else {
          chain_consts += c == kChainClip ? 2 : 1;
        }
        chain.push_back(static_cast<int32_t>(c));
      }
    }
    in_channels = attr_int(info, "in_channels", op);
    out_channels = attr_int(info, "out_channels", op);
    const std::vector<int64_t> ones{1, 1}, zeros{0, 0, 0, 0}, none{};
    kernel = attr_ints(info, "kernel_shape", op, &none);
    strides = attr_ints(info, "strides", op, &ones);
    pads = attr_ints(info, "pads", op, &zeros);
    dilations = attr_ints(info, "dilations", op, &ones);
    const std::string mode = attr_str(info, "output", op);
    if (mode != "float" && mode != "bits") fail(op, "output must be 'float' or 'bits', got '", mode, "'");
    if (chain_op && mode != "float") fail(op, "a chain needs output='float', got '", mode, "'");
    if ((mode == "bits") != bits)
      fail(op, "output='", mode, "' needs P0/P1 of type ", mode == "bits" ? "int32" : "float32", ", got ",
           bits ? "int32" : "float32");
    if (strides.size() != 2 || pads.size() != 4 || dilations.size() != 2 || !(kernel.empty() || kernel.size() == 2))
      fail(op, "expects 2-D strides/dilations/kernel_shape and 4 pads");
    if (strides[0] < 1 || strides[1] < 1 || dilations[0] < 1 || dilations[1] < 1)
      fail(op, "strides and dilations must be >= 1");
    for (auto p : pads)
      if (p < 0) fail(op, "pads must be >= 0");
    impl = isa_from_env();
    prepare_constants(info);
  }

  // With constant W, E, P0 and P1, transpose / pack them once (the plan depends on nothing else).
  void prepare_constants(const OrtKernelInfo* info) {
    Ort::ConstKernelInfo ki(info);
    Ort::ConstValue v[4];
    const size_t idx[4] = {1, 2, 5, 6};
    try {
      for (int i = 0; i < 4; ++i) {
        int is_const = 0;
        v[i] = ki.GetTensorConstantInput(idx[i], &is_const);
        if (!is_const || v[i] == nullptr) return;
      }
    } catch (const Ort::Exception&) {
      return;  // an ORT without constant-input access: prepare per call
    }
    const auto ws = v[0].GetTensorTypeAndShapeInfo().GetShape(), es = v[1].GetTensorTypeAndShapeInfo().GetShape();
    const size_t n0 = v[2].GetTensorTypeAndShapeInfo().GetElementCount(),
                 n1 = v[3].GetTensorTypeAndShapeInfo().GetElementCount();
    // shapes are validated per call; anything unexpected here just disables the cache
    if (ws.size() != 4 || es.size() != 3 || es[0] != ws[0] || static_cast<int64_t>(n0) != ws[0] ||
        static_cast<int64_t>(n1) != ws[0])
      return;
    ConvPlan& p = prepared;
    p.O = ws[0]; p.KH = ws[1]; p.KW = ws[2]; p.Cw = ws[3];
    p.w = v[0].GetTensorData<uint32_t>();
    p.bits = bits_type;
    const void* p0 = bits_type ? static_cast<const void*>(v[2].GetTensorData<int32_t>()) : v[2].GetTensorData<float>();
    const void* p1 = bits_type ? static_cast<const void*>(v[3].GetTensorData<int32_t>()) : v[3].GetTensorData<float>();
    prepare_plan(p, storage, v[1].GetTensorData<int32_t>(), es[1], es[2], p0, p1, impl.amx);
    cached = true;
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded([&] { compute(context); });
  }

  void compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    auto x = input<uint32_t>(ctx, 0);
    auto w = input<uint32_t>(ctx, 1);
    auto e = input<int32_t>(ctx, 2);
    auto rc = input<int32_t>(ctx, 3);
    auto cc = input<int32_t>(ctx, 4);
    if (x.shape.size() != 4) fail(op, "X must be [N, H, W, Cw], got ", shape_str(x.shape));
    if (w.shape.size() != 4) fail(op, "W must be [O, KH, KW, Cw], got ", shape_str(w.shape));
    ConvPlan p{};
    p.N = x.shape[0]; p.H = x.shape[1]; p.W = x.shape[2]; p.Cw = x.shape[3];
    p.O = w.shape[0]; p.KH = w.shape[1]; p.KW = w.shape[2];
    if (w.shape[3] != p.Cw) fail(op, "W has ", w.shape[3], " words per tap, X has ", p.Cw);
    if (num_words(in_channels) != p.Cw) fail(op, "in_channels=", in_channels, " needs ", num_words(in_channels), " words, X has ", p.Cw);
    if (out_channels != p.O) fail(op, "out_channels=", out_channels, " but W has ", p.O, " filters");
    if (!kernel.empty() && (kernel[0] != p.KH || kernel[1] != p.KW))
      fail(op, "kernel_shape ", shape_str(kernel), " does not match W ", shape_str(w.shape));
    p.sh = strides[0]; p.sw = strides[1]; p.pt = pads[0]; p.pl = pads[1]; p.dh = dilations[0]; p.dw = dilations[1];
    p.OH = out_size(p.H, p.KH, p.sh, p.pt, pads[2], p.dh);
    p.OW = out_size(p.W, p.KW, p.sw, p.pl, pads[3], p.dw);
    if (p.OH < 0 || p.OW < 0) fail(op, "kernel larger than the padded input ", shape_str(x.shape));
    if (e.shape.size() != 3 || e.shape[0] != p.O)
      fail(op, "E must be [O, NR, NC] with O=", p.O, ", got ", shape_str(e.shape));
    const int64_t NR = e.shape[1], NC = e.shape[2];
    if (rc.size != p.OH) fail(op, "RowClass has ", rc.size, " entries, output has ", p.OH, " rows");
    if (cc.size != p.OW) fail(op, "ColClass has ", cc.size, " entries, output has ", p.OW, " columns");
    for (int64_t i = 0; i < rc.size; ++i)
      if (rc.data[i] < 0 || rc.data[i] >= NR) fail(op, "RowClass[", i, "]=", rc.data[i], " out of range [0, ", NR, ")");
    for (int64_t i = 0; i < cc.size; ++i)
      if (cc.data[i] < 0 || cc.data[i] >= NC) fail(op, "ColClass[", i, "]=", cc.data[i], " out of range [0, ", NC, ")");
    p.x = x.data;
    p.w = w.data;
    p.rc = rc.data;
    p.cc = cc.data;
    p.bits = bits_type;
    const int64_t O = p.O;
    ConvStorage st;
    const void *p0 = nullptr, *p1 = nullptr;
    if (bits_type) {
      auto a = input<int32_t>(ctx, 5), b = input<int32_t>(ctx, 6);
      if (a.size != O || b.size != O) fail(op, "P0/P1 must have O=", O, " elements, got ", a.size, "/", b.size);
      p0 = a.data;
      p1 = b.data;
      p.y = ctx.GetOutput(0, std::vector<int64_t>{p.N, p.OH, p.OW, num_words(O)}).GetTensorMutableData<uint32_t>();
    } else {
      auto a = input<float>(ctx, 5), b = input<float>(ctx, 6);
      if (a.size != O || b.size != O) fail(op, "P0/P1 must have O=", O, " elements, got ", a.size, "/", b.size);
      p0 = a.data;
      p1 = b.data;
      p.y = ctx.GetOutput(0, std::vector<int64_t>{p.N, O, p.OH, p.OW}).GetTensorMutableData<float>();
    }
    std::vector<float> res_copy;  // the residual, when it aliases Y and the ISA's epilogue is not alias-safe
    if (chain_op && !chain.empty()) {
      const std::vector<int64_t> yshape{p.N, O, p.OH, p.OW};
      if (chain_res) {
        if (ctx.GetInputCount() < 8 || ctx.GetInput(7) == nullptr) fail(op, "the chain adds a residual but R is missing");
        auto r = input<float>(ctx, 7);
        if (r.shape != yshape) fail(op, "residual R must have the output's shape ", shape_str(yshape), ", got ", shape_str(r.shape));
        p.res = r.data;
        // Y in R's buffer (GetMayInplace): only the AVX-512 epilogue (AVX-512 and AMX kernels) reads each
        // residual element before writing it; the row kernels of the other ISAs store the row first.
        if (static_cast<const void*>(p.res) == p.y && !avx512_rows(impl)) {
          res_copy.assign(r.data, r.data + r.size);
          p.res = res_copy.data();
        }
      }
      if (chain_consts) {
        if (ctx.GetInputCount() < 9 || ctx.GetInput(8) == nullptr) fail(op, "the chain needs per-channel constants C");
        auto c = input<float>(ctx, 8);
        if (c.shape != std::vector<int64_t>{chain_consts, O})
          fail(op, "C must be [", chain_consts, ", ", O, "] (one row per constant step), got ", shape_str(c.shape));
        p.chainc = c.data;
      }
      p.nchain = static_cast<int64_t>(chain.size());
      p.chain = chain.data();
    }
    if (chain_op && ctx.GetOutputCount() > 1) {  // fused PackSign of the final rows
      auto yb = ctx.GetOutput(1, std::vector<int64_t>{p.N, p.OH, p.OW, num_words(O)});
      if (yb != nullptr) {
        p.ybits = yb.GetTensorMutableData<uint32_t>();
        if (ctx.GetInputCount() > 9 && ctx.GetInput(9) != nullptr) {
          auto t = input<float>(ctx, 9);
          if (t.size != O) fail(op, "PackSign threshold T has ", t.size, " elements, the output has ", O, " channels");
          p.tpack = t.data;
        }
      }
    }
    if (cached && prepared.O == p.O && prepared.KH == p.KH && prepared.KW == p.KW && prepared.Cw == p.Cw &&
        prepared.NC == NC) {
      attach_plan(p, prepared);
    } else {
      prepare_plan(p, st, e.data, NR, NC, p0, p1, impl.amx);
    }
    if (p.N == 0 || p.OH == 0 || p.OW == 0 || O == 0) return;
    ConvTask task{&p, impl, nullptr, 0, 0};
#if defined(__x86_64__)
    const bool amx =
        impl.amx && (impl.forced || (p.Cw >= 2 && p.O >= 32 && p.OH * p.OW * p.O * p.K * 32 >= kAmxMinBitMacs));
    if (amx) {
      std::lock_guard<std::mutex> lock(amx_mutex);  // amx_img is per kernel: one call at a time
      task.amx_img_bytes = (amx_image_bytes(p) + 63) / 64 * 64;
      task.amx_nblk = amx_blocks(p);
      const size_t need = static_cast<size_t>(p.N * task.amx_img_bytes) + 64;
      if (amx_img.size() < need) amx_img.resize(need);
      task.amx_img = amx_img.data() + (64 - reinterpret_cast<uintptr_t>(amx_img.data()) % 64) % 64;
      parallel_for(ctx, static_cast<size_t>(p.N), amx_unpack_task, &task);
      parallel_for(ctx, static_cast<size_t>(p.N * task.amx_nblk), amx_block_task, &task);
      return;
    }
#endif
#if defined(__x86_64__) || defined(__i386__)
    if (!p.bits && avx512_rows(impl)) {  // float output in bands of rows
      task.band = float_band_rows_avx512(p);
      task.nband = (p.OH + task.band - 1) / task.band;
      parallel_for(ctx, static_cast<size_t>(p.N * task.nband), conv_band_task, &task);
      return;
    }
#endif
    parallel_for(ctx, static_cast<size_t>(p.N * p.OH), conv_row_task, &task);
  }
};

struct ConvChainOp : Ort::CustomOpBase<ConvChainOp, ConvKernel, true> {
  // The output Y may take the residual R's buffer (ORT decides: when R has no later consumer). The AVX-512
  // epilogue reads every residual element before it writes the same element of Y; the other ISAs copy R
  // first when it aliases Y (ConvKernel::compute). In place, the residual stream of a ResNet stays one
  // buffer instead of two (half the cache footprint of the float epilogue).
  ConvChainOp() {
    OrtCustomOp::GetMayInplace = [](int** in, int** out) -> size_t {
      *in = new int[1]{7};
      *out = new int[1]{0};
      return 1;
    };
    OrtCustomOp::ReleaseMayInplace = [](int* in, int* out) {
      delete[] in;
      delete[] out;
    };
  }
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** k) const {
    return guarded([&] { *k = new ConvKernel(info, false, true); });
  }
  const char* GetName() const { return "BinaryConv2dPackedChain"; }
  size_t GetInputTypeCount() const { return 10; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    if (i <= 1) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32;
    if (i <= 4) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i <= 6 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetOutputType(size_t i) const {
    return i == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32;
  }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t i) const {
    return i == 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
};

template <bool Bits>
struct ConvOp : Ort::CustomOpBase<ConvOp<Bits>, ConvKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** k) const {
    return guarded([&] { *k = new ConvKernel(info, Bits); });
  }
  const char* GetName() const { return "BinaryConv2dPacked"; }
  size_t GetInputTypeCount() const { return 7; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    if (i <= 1) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32;
    if (i <= 4) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
    return Bits ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const {
    return Bits ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
};

#if defined(__x86_64__)
// ------------------------------------------------------------------------------------------------
// WinogradConvMaxPool (ai.bnnc.ort; bnnc.runtimes.ort.fuse): MaxPool(Conv(X)) of the float stem, the conv
// by 1-D Winograd along the rows (kernels_wino.cc; plan and transformed weights from bnnc.runtimes.winograd).
// Inputs X [N, C, H, W], U [O/8, C, KH, 2, slots, 8] (G · taps), B [O]; attributes kernel_shape [KH, KW],
// pads [t, l, b, r] (conv, strides 2), pool [kh, kw, sh, 2, t, l, b, r], parts (m, n, column, slot, tiles per
// vector of 16 tiles), at / bt (each part's Aᵀ m×n and Bᵀ n×n, row-major, concatenated).

struct WinoRowsTask {
  const WinoPlan* plan;
  const float* x;
  float* v;
  int64_t rows, chunk;
};

void wino_rows_task(void* d, size_t i) {
  auto* t = static_cast<WinoRowsTask*>(d);
  const int64_t r0 = static_cast<int64_t>(i) * t->chunk, r1 = std::min(t->rows, r0 + t->chunk);
  wino_input_rows_avx512(*t->plan, t->x, r0, r1, t->v);
}

thread_local std::vector<float> t_wino_v;
thread_local std::vector<float> t_wino_scratch;

struct WinoBandTask {
  const WinoPlan* plan;
  const float* v;
  float* y;
};

void wino_band_task(void* d, size_t i) {
  auto* t = static_cast<WinoBandTask*>(d);
  const size_t need = static_cast<size_t>(wino_task_floats(*t->plan));
  if (t_wino_scratch.size() < need) t_wino_scratch.resize(need);
  wino_band_avx512(*t->plan, t->v, static_cast<int64_t>(i), t->y, t_wino_scratch.data());
}

struct WinoKernel {
  int64_t O, KH, KW;
  std::vector<int64_t> pads, pool, parts;
  std::vector<float> at, bt;
  explicit WinoKernel(const OrtKernelInfo* info) {
    const char* op = "WinogradConvMaxPool";
    if (!cpu_has(Isa::Avx512))
      fail(op, "needs AVX-512 (bnnc.runtimes.ort.fuse writes it only where the library runs its AVX-512 kernels)");
    O = attr_int(info, "channels", op);
    auto ks = attr_ints(info, "kernel_shape", op, nullptr);
    pads = attr_ints(info, "pads", op, nullptr);
    pool = attr_ints(info, "pool", op, nullptr);
    parts = attr_ints(info, "parts", op, nullptr);
    try {
      at = Ort::ConstKernelInfo(info).GetAttributes<float>("at");
      bt = Ort::ConstKernelInfo(info).GetAttributes<float>("bt");
    } catch (const Ort::Exception&) {
      fail(op, "missing floats attributes 'at' / 'bt'");
    }
    if (ks.size() != 2 || pads.size() != 4 || pool.size() != 8) fail(op, "kernel_shape needs 2 values, pads 4, pool 8");
    KH = ks[0];
    KW = ks[1];
    if (O < 1 || O % kWinoOcTile) fail(op, "channels must be a positive multiple of ", kWinoOcTile, ", got ", O);
    if (KW < 5 || KW > 8 || KH < 1) fail(op, "kernel_shape ", shape_str(ks), " unsupported (width 5 to 8)");
    if (pool[3] != 2 || pool[0] < pool[2] || pool[2] < 1 || pool[1] < 1 || pool[0] < 1)
      fail(op, "pool ", shape_str(pool), " unsupported (column stride 2, kernel >= stride)");
    if (pool[4] >= pool[0] || pool[6] >= pool[0] || pool[5] >= pool[1] || pool[7] >= pool[1])
      fail(op, "pool pads must be smaller than the pool window");
    if (parts.empty() || parts.size() % 5 || static_cast<int64_t>(parts.size() / 5) > kWinoMaxParts)
      fail(op, "parts must hold 5 values per vector of tiles, at most ", kWinoMaxParts, " vectors");
  }
  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded([&] {
      const char* op = "WinogradConvMaxPool";
      Ort::KernelContext ctx(context);
      auto x = input<float>(ctx, 0);
      auto u = input<float>(ctx, 1);
      auto b = input<float>(ctx, 2);
      if (x.shape.size() != 4) fail(op, "X must be [N, C, H, W], got ", shape_str(x.shape));
      WinoPlan p{};
      const int64_t N = x.shape[0];
      p.C = x.shape[1];
      p.H = x.shape[2];
      p.W = x.shape[3];
      p.O = O;
      p.KH = KH;
      p.pt = pads[0];
      p.pl = pads[1];
      p.OH = out_size(p.H, KH, 2, pads[0], pads[2], 1);
      p.OW = out_size(p.W, KW, 2, pads[1], pads[3], 1);
      if (p.OH < 1 || p.OW < 1) fail(op, "the ", KH, "x", KW, " kernel does not fit the padded input ", shape_str(x.shape));
      p.HP = (p.OH - 1) * 2 + KH;
      p.nparts = static_cast<int64_t>(parts.size() / 5);
      size_t ai = 0, bi = 0;
      int64_t cover = 0;
      for (int64_t k = 0; k < p.nparts; ++k) {
        WinoPart& pt = p.parts[k];
        pt.m = parts[5 * k];
        pt.npt = parts[5 * k + 1];
        pt.col = parts[5 * k + 2];
        pt.slot = parts[5 * k + 3];
        pt.ntile = parts[5 * k + 4];
        if (pt.m < 1 || pt.m > 4 || pt.npt < pt.m || pt.npt > 8 || pt.col != cover || pt.col % 16)
          fail(op, "part ", k, " (m ", pt.m, ", points ", pt.npt, ", column ", pt.col, ") is not a valid plan");
        if (ai + pt.m * pt.npt > at.size() || bi + pt.npt * pt.npt > bt.size()) fail(op, "at / bt too short for parts");
        for (int64_t j = 0; j < pt.m; ++j)
          for (int64_t e = 0; e < pt.npt; ++e) pt.at[j][e] = at[ai++];
        for (int64_t j = 0; j < pt.npt; ++j)
          for (int64_t e = 0; e < pt.npt; ++e) pt.bt[j][e] = bt[bi++];
        cover += 16 * pt.m;
        p.nslot = pt.slot + pt.npt;
      }
      if (cover < p.OW) fail(op, "parts cover ", cover, " output columns, the conv has ", p.OW);
      const std::vector<int64_t> ushape{O / kWinoOcTile, p.C, KH, 2, p.nslot, kWinoOcTile};
      if (u.shape != ushape) fail(op, "U must be ", shape_str(ushape), ", got ", shape_str(u.shape));
      if (b.size != O) fail(op, "B must have ", O, " elements, got ", b.size);
      p.pkh = pool[0];
      p.pkw = pool[1];
      p.psh = pool[2];
      p.ppt = pool[4];
      p.ppl = pool[5];
      p.POH = out_size(p.OH, p.pkh, p.psh, pool[4], pool[6], 1);
      p.POW = out_size(p.OW, p.pkw, 2, pool[5], pool[7], 1);
      if (p.POH < 1 || p.POW < 1) fail(op, "the pool window does not fit the conv output");
      p.band = std::min<int64_t>(16, (p.POH + 1) / 2);
      p.U = u.data;
      p.B = b.data;
      wino_finish_plan(p);
      if (p.nq * 16 > (kWinoMaxParts + 2) * 64 + 64) fail(op, "output rows too wide (", p.OW, " columns)");
      float* y = ctx.GetOutput(0, std::vector<int64_t>{N, O, p.POH, p.POW}).GetTensorMutableData<float>();
      const size_t vsz = static_cast<size_t>(wino_v_floats(p));
      if (t_wino_v.size() < vsz) t_wino_v.resize(vsz);
      const int64_t rows = p.C * p.HP, chunk = 16, nband = (p.POH + p.band - 1) / p.band;
      for (int64_t n = 0; n < N; ++n) {
        WinoRowsTask rt{&p, x.data + n * p.C * p.H * p.W, t_wino_v.data(), rows, chunk};
        parallel_for(ctx, static_cast<size_t>((rows + chunk - 1) / chunk), wino_rows_task, &rt);
        WinoBandTask bt_{&p, t_wino_v.data(), y + n * O * p.POH * p.POW};
        parallel_for(ctx, static_cast<size_t>(nband * (O / kWinoOcTile)), wino_band_task, &bt_);
      }
    });
  }
};

struct WinoOp : Ort::CustomOpBase<WinoOp, WinoKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** k) const {
    return guarded([&] { *k = new WinoKernel(info); });
  }
  const char* GetName() const { return "WinogradConvMaxPool"; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};
#endif  // __x86_64__

// ------------------------------------------------------------------------------------------------
// Registration

const PackSignOp c_pack;
const UnpackSignOp c_unpack;
const MaxPoolBitsOp c_pool;
const ConvOp<false> c_conv_float;
const ConvOp<true> c_conv_bits;
const ConvChainOp c_conv_chain;
#if defined(__x86_64__)
const WinoOp c_wino;
#endif

std::mutex g_domains_mutex;
std::vector<Ort::CustomOpDomain>& domains() {
  static std::vector<Ort::CustomOpDomain>* d = new std::vector<Ort::CustomOpDomain>();  // never destroyed
  return *d;
}

}  // namespace
}  // namespace bnnc

extern "C" {

__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                   const OrtApiBase* api_base) {
  const OrtApi* api = nullptr;
  for (uint32_t v = ORT_API_VERSION; v >= 16 && api == nullptr; --v) api = api_base->GetApi(v);
  if (api == nullptr) return nullptr;  // cannot even report: this ORT is older than API 16
  Ort::InitApi(api);
  return bnnc::guarded([&] {
    bnnc::resolve_isa(std::getenv("BNNC_ORT_ISA"));  // fail early on a bad BNNC_ORT_ISA
    Ort::CustomOpDomain domain{bnnc::kDomain};
    domain.Add(&bnnc::c_pack);
    domain.Add(&bnnc::c_unpack);
    domain.Add(&bnnc::c_pool);
    domain.Add(&bnnc::c_conv_float);
    domain.Add(&bnnc::c_conv_bits);
    Ort::CustomOpDomain priv{bnnc::kPrivateDomain};
    priv.Add(&bnnc::c_conv_chain);
#if defined(__x86_64__)
    priv.Add(&bnnc::c_wino);
#endif
    Ort::UnownedSessionOptions(options).Add(domain);
    Ort::UnownedSessionOptions(options).Add(priv);
    std::lock_guard<std::mutex> lock(bnnc::g_domains_mutex);
    bnnc::domains().push_back(std::move(domain));
    bnnc::domains().push_back(std::move(priv));
  });
}

// For Python (ctypes): the kernel a request would select ("" or "auto": the best available), or
// "error: ..." when it is unknown or unsupported here.
__attribute__((visibility("default"))) const char* bnnc_ort_resolve_isa(const char* request) {
  static thread_local std::string out;
  try {
    out = bnnc::resolve_isa(request).name;
  } catch (const std::exception& e) {
    out = std::string("error: ") + e.what();
  }
  return out.c_str();
}

__attribute__((visibility("default"))) const char* bnnc_ort_build_info() {
  return "bnnc_ort 1 (ORT_API_VERSION " BNNC_STR(ORT_API_VERSION) ")";
}

}  // extern "C"
