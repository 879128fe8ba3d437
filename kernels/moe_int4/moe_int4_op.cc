// ONNX Runtime custom-op library: `ai.omniedge::MoEInt4`, one MoE layer of INT4 experts, a drop-in for the
// exporter's QMoE node (the same inputs without QMoE's empty bias slot, the same routing and layout):
//   inputs  x [T, H], router_logits [T, E], fc1 uint8 [E, 2I, H/2], fc1_scales [E, 2I, H/group],
//           fc2 uint8 [E, H, I/2], fc2_scales [E, H, I/group]
//   output  y [T, H]
//   attributes k (experts per token), group (INT4 group size along K)
// fc1 rows interleaved gate j, up j; codes of omniedge/int4.py (low nibble first, symmetric, zero point 8);
// routing = the top-k logits, softmax over those k; SwiGLU experts; y = the routing-weighted sum.
//
// Kernels: on CUDAExecutionProvider (float16 x, logits and scales) the fused kernels of moe_int4_forward.cu
// (decode or prefill by token count) on ONNX Runtime's compute stream (built with -DOMNIEDGE_WITH_CUDA); on
// CPUExecutionProvider (float32) a plain reference loop, the specification the CUDA kernels are checked
// against. Written against ONNX Runtime's C API version 12 (ORT 1.12), which every later runtime serves; its
// header is a build dependency (build.py).
#include <onnxruntime_c_api.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef OMNIEDGE_WITH_CUDA
#include <cuda_runtime.h>
extern "C" size_t omniedge_moe_int4_forward_scratch_bytes(int M, int E, int k, int H, int I, int group);
extern "C" int omniedge_moe_int4_prefill_from();
extern "C" int omniedge_moe_int4_forward(const void* x, const void* logits, const void* fc1, const void* fc1_scales,
                                         const void* fc2, const void* fc2_scales, void* out, void* scratch, int M,
                                         int E, int k, int H, int I, int group, void* stream);
#endif

namespace {

constexpr uint32_t kApiVersion = 12;
const OrtApi* g_api = nullptr;

void check(OrtStatus* status) {
  if (status == nullptr) return;
  std::string message = g_api->GetErrorMessage(status);
  g_api->ReleaseStatus(status);
  throw std::runtime_error("MoEInt4: " + message);
}

std::vector<int64_t> shape_of(const OrtValue* value, ONNXTensorElementDataType* type) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  check(g_api->GetTensorTypeAndShape(value, &info));
  size_t n = 0;
  check(g_api->GetDimensionsCount(info, &n));
  std::vector<int64_t> dims(n);
  check(g_api->GetDimensions(info, dims.data(), n));
  check(g_api->GetTensorElementType(info, type));
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  return dims;
}

struct Shapes {
  int64_t T, H, E, I;
};

// The inputs' shapes against each other and the attributes; a mismatch is an error naming both.
Shapes check_inputs(OrtKernelContext* ctx, int64_t k, int64_t group, ONNXTensorElementDataType float_type) {
  const OrtValue* v[6];
  std::vector<int64_t> d[6];
  ONNXTensorElementDataType t[6];
  for (size_t i = 0; i < 6; ++i) {
    check(g_api->KernelContext_GetInput(ctx, i, &v[i]));
    d[i] = shape_of(v[i], &t[i]);
  }
  auto fail = [](const std::string& what) { throw std::runtime_error("MoEInt4: " + what); };
  if (d[0].size() != 2 || d[1].size() != 2 || d[2].size() != 3 || d[3].size() != 3 || d[4].size() != 3 ||
      d[5].size() != 3)
    fail("expects x [T, H], router_logits [T, E] and 3-D expert tensors");
  const Shapes s{d[0][0], d[0][1], d[2][0], d[2][1] / 2};
  if (d[1][0] != s.T || d[1][1] != s.E) fail("router_logits must be [T, E] for x [T, H] and E experts");
  if (d[2][2] * 2 != s.H || d[4][0] != s.E || d[4][1] != s.H || d[4][2] * 2 != s.I || d[2][1] != 2 * s.I)
    fail("fc1 must be [E, 2I, H/2] and fc2 [E, H, I/2]");
  if (group <= 0 || s.H % group || s.I % group || d[3][0] != s.E || d[3][1] != 2 * s.I || d[3][2] != s.H / group ||
      d[5][0] != s.E || d[5][1] != s.H || d[5][2] != s.I / group)
    fail("scales must be [E, 2I, H/group] and [E, H, I/group] for group " + std::to_string(group));
  if (k < 1 || k > s.E) fail("k must be in 1..E");
  if (t[2] != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 || t[4] != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8)
    fail("fc1 and fc2 must be uint8");
  if (t[0] != float_type || t[1] != float_type || t[3] != float_type || t[5] != float_type)
    fail("x, router_logits and the scales must share this provider's float type");
  return s;
}

void* mutable_data(const OrtValue* v) {
  void* p = nullptr;
  check(g_api->GetTensorMutableData(const_cast<OrtValue*>(v), &p));
  return p;
}

const void* input(OrtKernelContext* ctx, size_t i) {
  const OrtValue* v = nullptr;
  check(g_api->KernelContext_GetInput(ctx, i, &v));
  return mutable_data(v);
}

void* output(OrtKernelContext* ctx, const Shapes& s) {
  const int64_t dims[2] = {s.T, s.H};
  OrtValue* v = nullptr;
  check(g_api->KernelContext_GetOutput(ctx, 0, dims, 2, &v));
  return mutable_data(v);
}

struct Kernel {
  int64_t k = 0, group = 0;
  bool cuda = false;
};

// The reference: float32, one token at a time, every step as the CUDA kernels define it.
void compute_cpu(Kernel& kn, OrtKernelContext* ctx) {
  const Shapes s = check_inputs(ctx, kn.k, kn.group, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  const float* x = static_cast<const float*>(input(ctx, 0));
  const float* logits = static_cast<const float*>(input(ctx, 1));
  const uint8_t* fc1 = static_cast<const uint8_t*>(input(ctx, 2));
  const float* s1 = static_cast<const float*>(input(ctx, 3));
  const uint8_t* fc2 = static_cast<const uint8_t*>(input(ctx, 4));
  const float* s2 = static_cast<const float*>(input(ctx, 5));
  float* y = static_cast<float*>(output(ctx, s));
  const int64_t g = kn.group;
  auto dot = [g](const uint8_t* row, const float* scales, const float* v, int64_t K) {
    double acc = 0;
    for (int64_t j = 0; j < K; ++j) {
      const int code = (row[j / 2] >> (4 * (j % 2))) & 0xF;
      acc += double(code - 8) * scales[j / g] * v[j];
    }
    return acc;
  };
  std::vector<float> h(s.I);
  for (int64_t t = 0; t < s.T; ++t) {
    const float* lg = logits + t * s.E;
    // top-k, ties to the lower index, a NaN ranked as -inf (as the CUDA kernels' route)
    auto value = [lg](int64_t e) { return std::isnan(lg[e]) ? -INFINITY : lg[e]; };
    std::vector<int64_t> ids;
    std::vector<char> taken(s.E, 0);
    for (int64_t r = 0; r < kn.k; ++r) {
      int64_t best = -1;
      for (int64_t e = 0; e < s.E; ++e)
        if (!taken[e] && (best < 0 || value(e) > value(best))) best = e;
      taken[best] = 1;
      ids.push_back(best);
    }
    double denom = 0;
    std::vector<double> w(kn.k);
    const double top = value(ids[0]);
    for (int64_t r = 0; r < kn.k; ++r) {
      const double v = value(ids[r]);
      denom += (w[r] = v == top ? 1.0 : std::exp(v - top));
    }
    std::vector<double> acc(s.H, 0.0);
    for (int64_t r = 0; r < kn.k; ++r) {
      const int64_t e = ids[r];
      for (int64_t j = 0; j < s.I; ++j) {
        const int64_t gate_row = e * 2 * s.I + 2 * j;
        const double gt = dot(fc1 + gate_row * (s.H / 2), s1 + gate_row * (s.H / g), x + t * s.H, s.H);
        const double up = dot(fc1 + (gate_row + 1) * (s.H / 2), s1 + (gate_row + 1) * (s.H / g), x + t * s.H, s.H);
        h[j] = float(gt / (1.0 + std::exp(-gt)) * up);
      }
      for (int64_t n = 0; n < s.H; ++n) {
        const int64_t row = e * s.H + n;
        acc[n] += w[r] / denom * dot(fc2 + row * (s.I / 2), s2 + row * (s.I / g), h.data(), s.I);
      }
    }
    for (int64_t n = 0; n < s.H; ++n) y[t * s.H + n] = float(acc[n]);
  }
}

#ifdef OMNIEDGE_WITH_CUDA
// Device scratch of the kernels (the SwiGLU outputs and routing between them), per device and ONNX Runtime
// stream, so concurrent runs never share it; layers run one after another on a stream and share it.
// - Decode sizes (below the prefill kernels' 16 tokens): one buffer per size, kept for the life of the
//   process, because a captured CUDA graph holds its address. Each size is first asked for in a run ONNX
//   Runtime does not capture (it captures after regular runs).
// - Prefill sizes: one buffer that grows to the longest prompt piece seen (the stream is synchronised before
//   the old one is freed): ~78 KB a token at the thinker's shape, outside ONNX Runtime's arena.
struct ScratchKey {
  int device;
  void* stream;
  size_t bytes;  // 0: the stream's prefill buffer
  bool operator<(const ScratchKey& o) const {
    return device != o.device ? device < o.device : stream != o.stream ? stream < o.stream : bytes < o.bytes;
  }
};

struct Scratch {
  void* ptr = nullptr;
  size_t bytes = 0;
};

void cuda_check(cudaError_t rc, const char* what) {
  if (rc != cudaSuccess) throw std::runtime_error(std::string("MoEInt4: ") + what + ": " + cudaGetErrorString(rc));
}

void* cuda_scratch(size_t bytes, bool prefill, void* stream) {
  static std::mutex mu;
  static std::map<ScratchKey, Scratch> buffers;
  int device = 0;
  cuda_check(cudaGetDevice(&device), "cudaGetDevice");
  std::lock_guard<std::mutex> lock(mu);
  const ScratchKey key{device, stream, prefill ? 0 : bytes};
  auto found = buffers.find(key);
  if (found != buffers.end() && found->second.bytes >= bytes) return found->second.ptr;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  cuda_check(cudaStreamIsCapturing(static_cast<cudaStream_t>(stream), &capture), "cudaStreamIsCapturing");
  if (capture != cudaStreamCaptureStatusNone) {
    // No allocation inside a capture: a decode size seen before on another stream of this device serves.
    for (const auto& [k, b] : buffers)
      if (k.device == device && k.bytes == bytes && bytes != 0) return b.ptr;
    throw std::runtime_error("MoEInt4: a CUDA graph is being captured before a regular run of this token count");
  }
  Scratch& b = buffers[key];
  if (b.ptr != nullptr) {
    cuda_check(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)), "cudaStreamSynchronize");
    cuda_check(cudaFree(b.ptr), "cudaFree");
    b = Scratch{};
  }
  cuda_check(cudaMalloc(&b.ptr, bytes), "cudaMalloc");
  b.bytes = bytes;
  return b.ptr;
}

void compute_cuda(Kernel& kn, OrtKernelContext* ctx) {
  const Shapes s = check_inputs(ctx, kn.k, kn.group, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16);
  void* stream = nullptr;
  check(g_api->KernelContext_GetGPUComputeStream(ctx, &stream));
  const int T = int(s.T), E = int(s.E), k = int(kn.k), H = int(s.H), I = int(s.I), g = int(kn.group);
  const size_t bytes = omniedge_moe_int4_forward_scratch_bytes(T, E, k, H, I, g);
  void* scratch = cuda_scratch(bytes, T >= omniedge_moe_int4_prefill_from(), stream);
  const int rc = omniedge_moe_int4_forward(input(ctx, 0), input(ctx, 1), input(ctx, 2), input(ctx, 3), input(ctx, 4),
                                           input(ctx, 5), output(ctx, s), scratch, T, E, k, H, I, g, stream);
  if (rc == 1)
    throw std::runtime_error("MoEInt4: shapes the CUDA kernels do not take (H and I multiples of 32, H <= 4096, "
                             "k * I <= 8192, group a multiple of 32 dividing H and I, E <= 256, k <= 32)");
  if (rc) throw std::runtime_error(std::string("MoEInt4: CUDA launch: ") + cudaGetErrorString(cudaError_t(rc)));
}
#endif

struct Op : OrtCustomOp {
  bool cuda;
  explicit Op(bool on_cuda) : OrtCustomOp{}, cuda(on_cuda) {
    version = kApiVersion;
    CreateKernel = [](const OrtCustomOp* op, const OrtApi*, const OrtKernelInfo* info) -> void* {
      auto* kn = new Kernel;
      kn->cuda = static_cast<const Op*>(op)->cuda;
      check(g_api->KernelInfoGetAttribute_int64(info, "k", &kn->k));
      check(g_api->KernelInfoGetAttribute_int64(info, "group", &kn->group));
      return kn;
    };
    GetName = [](const OrtCustomOp*) { return "MoEInt4"; };
    GetExecutionProviderType = [](const OrtCustomOp* op) -> const char* {
      return static_cast<const Op*>(op)->cuda ? "CUDAExecutionProvider" : "CPUExecutionProvider";
    };
    GetInputType = [](const OrtCustomOp* op, size_t i) {
      if (i == 2 || i == 4) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
      return static_cast<const Op*>(op)->cuda ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    };
    GetInputTypeCount = [](const OrtCustomOp*) -> size_t { return 6; };
    GetOutputType = [](const OrtCustomOp* op, size_t) {
      return static_cast<const Op*>(op)->cuda ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    };
    GetOutputTypeCount = [](const OrtCustomOp*) -> size_t { return 1; };
    KernelCompute = [](void* k, OrtKernelContext* ctx) {
      auto& kn = *static_cast<Kernel*>(k);
#ifdef OMNIEDGE_WITH_CUDA
      if (kn.cuda) return compute_cuda(kn, ctx);
#endif
      compute_cpu(kn, ctx);
    };
    KernelDestroy = [](void* k) { delete static_cast<Kernel*>(k); };
    GetInputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
    GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
  }
};

Op g_cpu_op(false);
#ifdef OMNIEDGE_WITH_CUDA
Op g_cuda_op(true);
#endif

}  // namespace

extern "C" OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  g_api = api_base->GetApi(kApiVersion);
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* st = g_api->CreateCustomOpDomain("ai.omniedge", &domain)) return st;
  if (OrtStatus* st = g_api->CustomOpDomain_Add(domain, &g_cpu_op)) return st;
#ifdef OMNIEDGE_WITH_CUDA
  if (OrtStatus* st = g_api->CustomOpDomain_Add(domain, &g_cuda_op)) return st;
#endif
  return g_api->AddCustomOpDomain(options, domain);
}
