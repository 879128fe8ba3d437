// Fused INT4 MoE for decode (issue 12): gate/up GEMV + SwiGLU in one kernel, down GEMV + the routing-weighted
// sum over the chosen experts in a second, for each token (row) of x.
//
// Weights are exactly what the exporter gives ONNX Runtime's QMoE (export/thinker_ort.py): omniedge's INT4
// layout (omniedge/int4.py: codes 0..15 along K, two per byte, low nibble first, symmetric, zero point 8,
// one float16 scale per group of `group` along K) for
//   fc1 [E, 2I, H/2] uint8, rows interleaved gate j, up j;  fc1_scales [E, 2I, H/group] float16
//   fc2 [E, H, I/2] uint8;                                   fc2_scales [E, H, I/group] float16
// and QMoE's routing: a token's top-k router logits, softmax over those k (= Qwen3's softmax -> top-k ->
// renormalise). Every warp routes on its own (rank_experts: E broadcasts, no block barrier), so its weight
// loads go out as soon as it knows its expert. Both kernels read only the chosen experts' bytes, each once, 16
// bytes a load, every load of a warp issued before its arithmetic. gate/up: each lane loads its 32-value chunks
// of the token's input straight from global memory into registers as float16 pairs, products in float16 over
// 4 codes, sums in float32; down: the SwiGLU output stays float32 (it can exceed float16), staged in shared
// memory once per block after the block's weight loads are issued.
//
// Tuning (compile-time; build.py --define): OMNIEDGE_MOE_WARPS / OMNIEDGE_MOE_PAIRS, warps per gate/up block and
// gate/up row pairs per warp; OMNIEDGE_MOE_DOWN_WARPS / OMNIEDGE_MOE_DOWN_ROWS, warps per down block and output
// rows per warp; OMNIEDGE_MOE_ROUTE_ONCE=1, the down kernel reads the routing gate/up wrote to scratch instead of
// ranking the logits in each of its warps (not yet measured: off).
//
// Shapes the launcher takes (it returns 1 for any other, launching nothing): H and I multiples of 32 with
// H <= 4096 and k * I <= 8192, group a multiple of 32 dividing H and I, E <= 256, 1 <= k <= min(E, 32).
#include <cuda_fp16.h>
#include <stdint.h>

#include "moe_int4_route.cuh"

#ifndef OMNIEDGE_MOE_WARPS
#define OMNIEDGE_MOE_WARPS 4
#endif
#ifndef OMNIEDGE_MOE_PAIRS
#define OMNIEDGE_MOE_PAIRS 4
#endif
#ifndef OMNIEDGE_MOE_DOWN_WARPS
#define OMNIEDGE_MOE_DOWN_WARPS 8
#endif
#ifndef OMNIEDGE_MOE_DIAG  // measurement only (moe_kernel_probe.py): 1 loads without arithmetic, 2 no routing
#define OMNIEDGE_MOE_DIAG 0
#endif
#ifndef OMNIEDGE_MOE_ROUTE_ONCE  // 1: gate/up's first block writes the routing, the down kernel reads it
#define OMNIEDGE_MOE_ROUTE_ONCE 0
#endif
#ifndef OMNIEDGE_MOE_DOWN_ROWS
#define OMNIEDGE_MOE_DOWN_ROWS 1
#endif

namespace {

constexpr int kWarpsPerBlock = OMNIEDGE_MOE_WARPS;
constexpr int kPairsPerWarp = OMNIEDGE_MOE_PAIRS;  // gate/up row pairs per warp (their loads in flight together)
// Pairs per warp for CPL chunks of H per lane: halved for H > 2048 so the loads stay in registers.
__host__ __device__ constexpr int pairs_for(int cpl) { return cpl >= 4 && kPairsPerWarp > 1 ? kPairsPerWarp / 2 : kPairsPerWarp; }
constexpr int kDownWarps = OMNIEDGE_MOE_DOWN_WARPS;
constexpr int kDownRows = OMNIEDGE_MOE_DOWN_ROWS;  // output rows per down warp
constexpr int kMaxDownLoads = 8;                   // uint4 loads per lane for one output row: k * I / 32 / 32
static_assert(32 % kPairsPerWarp == 0 && 32 % kDownRows == 0, "pairs and rows per warp must divide 32");
constexpr float kMagic = 8388608.f;                // 2^23: float bits 0x4B000000 | c are 2^23 + c for c < 2^23

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// x[32c .. 32c+31] (float16, 16-byte aligned: H is a multiple of 32) as the float16 pairs dot32_half2 multiplies:
// for word w, pair n = (x[8w+n], x[8w+4+n]), the two codes one mask of a word shifted by 4n picks (bits
// 4n..4n+3 and 16+4n..16+4n+3). Four 16-byte loads of the token's row.
__device__ __forceinline__ void load_pairs(const half* x, int c, half2* pairs) {
  const uint4* src = reinterpret_cast<const uint4*>(x) + 4 * c;
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    const uint4 v = __ldg(src + w);  // x[8w .. 8w+7]: (0,1) (2,3) (4,5) (6,7)
    const half2 a = as_half2(v.x), b = as_half2(v.y), c2 = as_half2(v.z), d = as_half2(v.w);
    pairs[w * 4 + 0] = __lows2half2(a, c2);
    pairs[w * 4 + 1] = __highs2half2(a, c2);
    pairs[w * 4 + 2] = __lows2half2(b, d);
    pairs[w * 4 + 3] = __highs2half2(b, d);
  }
}

// 32 codes (16 bytes) . 32 inputs given as load_pairs' pairs, times the group's scale.
__device__ __forceinline__ float dot32_half2(uint4 q, const half2* pairs, float scale) {
  const uint32_t words[4] = {q.x, q.y, q.z, q.w};
  float acc = 0.f;
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    half2 s = __float2half2_rn(0.f);
#pragma unroll
    for (int n = 0; n < 4; ++n) s = __hfma2(codes_minus_8(words[w], n), pairs[w * 4 + n], s);
    const float2 f = __half22float2(s);
    acc += f.x + f.y;
  }
  return acc * scale;
}

// 32 codes . 32 float32 inputs, times the group's scale.
__device__ __forceinline__ float dot32_float(uint4 q, const float* x, float scale) {
  const uint32_t words[4] = {q.x, q.y, q.z, q.w};
  float acc = 0.f;
#pragma unroll
  for (int w = 0; w < 4; ++w)
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      const float c = __uint_as_float(((words[w] >> (4 * n)) & 0xFu) | 0x4B000000u) - (kMagic + 8.f);
      acc = fmaf(c, x[8 * w + n], acc);
    }
  return acc * scale;
}

// grid (ceil(I / (kWarpsPerBlock * P)), k, M), P = pairs_for(CPL). Warp w of block b computes the gate and up
// rows of pairs j = (b * kWarpsPerBlock + w) * P + p of expert slot blockIdx.y for token m and writes
// h[m, slot, j] = silu(gate) * up (float32). CPL: 32-code chunks of H per lane (H <= CPL * 1024); EPL:
// logits per lane (E <= EPL * 32).
template <int CPL, int EPL>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock)
    gate_up_swiglu(const half* __restrict__ x, const half* __restrict__ logits, const uint8_t* __restrict__ fc1,
                   const half* __restrict__ fc1_scales, float* __restrict__ h, int* __restrict__ route_ids,
                   float* __restrict__ route_weights, int E, int k, int H, int I, int group) {
  const int m = blockIdx.z, slot = blockIdx.y;
  const int lane = threadIdx.x % kWarp;
  constexpr int P = pairs_for(CPL);
  const int j0 = (blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp) * P;
  if (j0 >= I) return;  // whole warps: nothing below synchronises the block
  const int chunks = H / 32, groups = H / group;
  half2 xp[CPL][16];  // the input's loads go out before the routing
#pragma unroll
  for (int t = 0; t < CPL; ++t) {
    const int c = lane + t * kWarp;
    if (c < chunks) load_pairs(x + size_t(m) * H, c, xp[t]);
  }
#if OMNIEDGE_MOE_DIAG == 2
  const size_t e = slot;
#else
  int ranks[EPL];
  float v[EPL], top, denom;  // top, denom: for OMNIEDGE_MOE_ROUTE_ONCE only (else the compiler drops them)
  rank_experts<EPL>(logits + size_t(m) * E, E, k, ranks, v, top, denom);
  const size_t e = expert_in_slot<EPL>(ranks, slot);
#if OMNIEDGE_MOE_ROUTE_ONCE
  if (blockIdx.x == 0 && slot == 0 && threadIdx.x < kWarp)
    write_route<EPL>(ranks, v, top, denom, k, route_ids + m * k, route_weights + m * k);
#endif
#endif
  uint4 q[P][2][CPL];  // the warp's weights and their scales, all loads issued before any arithmetic
  half sc[P][2][CPL];
#pragma unroll
  for (int p = 0; p < P; ++p)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const size_t row = e * 2 * I + 2 * (j0 + p) + r;  // j0 + p < I: P divides 32, 32 divides I
      const uint4* w = reinterpret_cast<const uint4*>(fc1 + row * (H / 2));
#pragma unroll
      for (int t = 0; t < CPL; ++t) {
        const int c = lane + t * kWarp;
        q[p][r][t] = c < chunks ? __ldg(w + c) : make_uint4(0, 0, 0, 0);
        sc[p][r][t] = c < chunks ? __ldg(fc1_scales + row * groups + c * 32 / group) : __float2half(0.f);
      }
    }
#if OMNIEDGE_MOE_DIAG == 1
  uint32_t bits = 0;
#pragma unroll
  for (int p = 0; p < P; ++p)
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int t = 0; t < CPL; ++t)
        bits ^= q[p][r][t].x ^ q[p][r][t].y ^ q[p][r][t].z ^ q[p][r][t].w ^ __half_as_ushort(sc[p][r][t]);
  if (bits == 0x9e3779b9u) h[(size_t(m) * k + slot) * I + j0] = 1.f;  // keeps the loads
  return;
#endif
#pragma unroll
  for (int p = 0; p < P; ++p) {
    float acc[2] = {0.f, 0.f};
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int t = 0; t < CPL; ++t)
        if (lane + t * kWarp < chunks) acc[r] += dot32_half2(q[p][r][t], xp[t], __half2float(sc[p][r][t]));
    const float g = warp_sum(acc[0]), u = warp_sum(acc[1]);
    if (lane == 0) h[(size_t(m) * k + slot) * I + j0 + p] = g / (1.f + __expf(-g)) * u;
  }
}

// grid (ceil(H / (kDownWarps * kDownRows)), 1, M). Warp w of block b computes output rows n = (b * kDownWarps +
// w) * kDownRows + r of token m: out[m, n] = sum over slots s of weight_s * (fc2[e_s, n, :] . h[m, s, :]). The
// SwiGLU outputs sit in shared memory chunk-major with a stride of 33 floats, so the 32 lanes reading 32
// chunks hit 32 banks; they are staged after the warp's weight loads are issued.
template <int EPL>
__global__ void __launch_bounds__(kWarp* kDownWarps)
    down_weighted_sum(const half* __restrict__ logits, const uint8_t* __restrict__ fc2,
                      const half* __restrict__ fc2_scales, const float* __restrict__ h,
                      const int* __restrict__ route_ids, const float* __restrict__ route_weights,
                      half* __restrict__ out, int E, int k, int H, int I, int group) {
  extern __shared__ float hs[];  // k * I / 32 chunks x 33 floats
  __shared__ int ids_all[kDownWarps][kMaxTopK];
  __shared__ float weights_all[kDownWarps][kMaxTopK];
  const int m = blockIdx.z, warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  int* ids = ids_all[warp];
  float* weights = weights_all[warp];
#if OMNIEDGE_MOE_DIAG == 2
  if (lane < k) ids[lane] = lane, weights[lane] = 1.f / k;
  __syncwarp();
#elif OMNIEDGE_MOE_ROUTE_ONCE
  if (lane < k) ids[lane] = route_ids[m * k + lane], weights[lane] = route_weights[m * k + lane];
  __syncwarp();
#else
  route_warp<EPL>(logits + size_t(m) * E, E, k, ids, weights);
#endif
  const int n0 = (blockIdx.x * kDownWarps + warp) * kDownRows;  // n0 < H: all kDownRows rows (it divides 32)
  const int chunks = I / 32, groups = I / group, total = k * chunks;
  uint4 q[kDownRows][kMaxDownLoads];  // weights and scales, issued before the SwiGLU outputs are staged
  half sc[kDownRows][kMaxDownLoads];
#pragma unroll
  for (int r = 0; r < kDownRows; ++r)
#pragma unroll
    for (int t = 0; t < kMaxDownLoads; ++t) {
      const int idx = lane + t * kWarp;
      if (idx < total && n0 < H) {
        const size_t row = size_t(ids[idx / chunks]) * H + n0 + r;
        q[r][t] = __ldg(reinterpret_cast<const uint4*>(fc2 + row * (I / 2)) + idx % chunks);
        sc[r][t] = __ldg(fc2_scales + row * groups + (idx % chunks) * 32 / group);
      }
    }
  // h[m] (k * I floats, a multiple of 128 bytes) into shared memory: every thread's 16-byte loads first
  constexpr int kStage = (kMaxDownLoads * kWarp * 32 / 4 + kWarp * kDownWarps - 1) / (kWarp * kDownWarps);
  const float4* src = reinterpret_cast<const float4*>(h + size_t(m) * k * I);
  const int n4 = k * I / 4;
  float4 staged[kStage];
#pragma unroll
  for (int u = 0; u < kStage; ++u) {
    const int i4 = threadIdx.x + u * kWarp * kDownWarps;
    if (i4 < n4) staged[u] = src[i4];
  }
#pragma unroll
  for (int u = 0; u < kStage; ++u) {
    const int i4 = threadIdx.x + u * kWarp * kDownWarps;
    if (i4 < n4) {
      float* d = hs + (i4 / 8) * 33 + (i4 % 8) * 4;  // float i = 4 * i4: chunk i / 32, lane i % 32
      d[0] = staged[u].x, d[1] = staged[u].y, d[2] = staged[u].z, d[3] = staged[u].w;
    }
  }
  __syncthreads();
  if (n0 >= H) return;
#if OMNIEDGE_MOE_DIAG == 1
  uint32_t bits = __float_as_uint(hs[lane]);
#pragma unroll
  for (int r = 0; r < kDownRows; ++r)
#pragma unroll
    for (int t = 0; t < kMaxDownLoads; ++t)
      if (lane + t * kWarp < total) bits ^= q[r][t].x ^ q[r][t].y ^ q[r][t].z ^ q[r][t].w ^ __half_as_ushort(sc[r][t]);
  if (bits == 0x9e3779b9u) out[size_t(m) * H + n0] = __float2half(1.f);  // keeps the loads
  return;
#endif
#pragma unroll
  for (int r = 0; r < kDownRows; ++r) {
    float acc = 0.f;
#pragma unroll
    for (int t = 0; t < kMaxDownLoads; ++t) {
      const int idx = lane + t * kWarp;
      if (idx < total) acc += weights[idx / chunks] * dot32_float(q[r][t], hs + idx * 33, __half2float(sc[r][t]));
    }
    acc = warp_sum(acc);
    if (lane == 0) out[size_t(m) * H + n0 + r] = __float2half(acc);
  }
}

template <int CPL, int EPL>
int launch(const half* x, const half* logits, const uint8_t* fc1, const half* fc1_scales, const uint8_t* fc2,
           const half* fc2_scales, half* out, float* h, int* ids, float* weights, int M, int E, int k, int H, int I,
           int group, cudaStream_t s) {
  const int rows_per_block = kWarpsPerBlock * pairs_for(CPL);
  gate_up_swiglu<CPL, EPL><<<dim3((I + rows_per_block - 1) / rows_per_block, k, M), kWarp * kWarpsPerBlock, 0, s>>>(
      x, logits, fc1, fc1_scales, h, ids, weights, E, k, H, I, group);
  const size_t smem = size_t(k) * I / 32 * 33 * sizeof(float);
  if (smem > 48 * 1024 &&
      cudaFuncSetAttribute(down_weighted_sum<EPL>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)))
    return int(cudaGetLastError());
  const int down_rows = kDownWarps * kDownRows;
  down_weighted_sum<EPL><<<dim3((H + down_rows - 1) / down_rows, 1, M), kWarp * kDownWarps, smem, s>>>(
      logits, fc2, fc2_scales, h, ids, weights, out, E, k, H, I, group);
  return int(cudaGetLastError());
}

template <int CPL>
int launch_by_experts(const half* x, const half* logits, const uint8_t* fc1, const half* fc1_scales,
                      const uint8_t* fc2, const half* fc2_scales, half* out, float* h, int* ids, float* weights, int M,
                      int E, int k, int H, int I, int group, cudaStream_t s) {
#define OMNIEDGE_MOE_ARGS x, logits, fc1, fc1_scales, fc2, fc2_scales, out, h, ids, weights, M, E, k, H, I, group, s
  if (E <= 32) return launch<CPL, 1>(OMNIEDGE_MOE_ARGS);
  if (E <= 64) return launch<CPL, 2>(OMNIEDGE_MOE_ARGS);
  if (E <= 128) return launch<CPL, 4>(OMNIEDGE_MOE_ARGS);
  return launch<CPL, 8>(OMNIEDGE_MOE_ARGS);
#undef OMNIEDGE_MOE_ARGS
}

size_t align256(size_t n) { return (n + 255) / 256 * 256; }

}  // namespace

extern "C" {

// Bytes of device scratch the launcher needs for M tokens: the SwiGLU outputs between the two kernels (float32
// [M, k, I]), then room for each token's k expert ids and routing weights (OMNIEDGE_MOE_ROUTE_ONCE).
size_t omniedge_moe_int4_scratch_bytes(int M, int k, int I) {
  return align256(size_t(M) * k * I * sizeof(float)) + align256(size_t(M) * k * sizeof(int)) +
         size_t(M) * k * sizeof(float);
}

// Queues both kernels on `stream` (a cudaStream_t; null: the default stream). Returns 0 when queued, 1 for
// shapes the kernels do not take (nothing launched), else the CUDA error of the launch. Pointers are device
// memory, x 16-byte aligned; scratch (256-byte aligned) holds omniedge_moe_int4_scratch_bytes(M, k, I).
int omniedge_moe_int4_decode(const void* x, const void* logits, const void* fc1, const void* fc1_scales,
                             const void* fc2, const void* fc2_scales, void* out, void* scratch, int M, int E,
                             int k, int H, int I, int group, void* stream) {
  if (M < 1 || M > 65535 || E < 1 || E > kMaxExperts || k < 1 || k > kMaxTopK || k > E || H % 32 || I % 32 ||
      H > 4096 || k * I > kMaxDownLoads * kWarp * 32 || group < 32 || group % 32 || H % group || I % group)
    return 1;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const half* xh = static_cast<const half*>(x);
  const half* lg = static_cast<const half*>(logits);
  const uint8_t* w1 = static_cast<const uint8_t*>(fc1);
  const half* s1 = static_cast<const half*>(fc1_scales);
  const uint8_t* w2 = static_cast<const uint8_t*>(fc2);
  const half* s2 = static_cast<const half*>(fc2_scales);
  half* o = static_cast<half*>(out);
  char* base = static_cast<char*>(scratch);  // 256-byte aligned
  float* h = reinterpret_cast<float*>(base);
  int* ids = reinterpret_cast<int*>(base + align256(size_t(M) * k * I * sizeof(float)));
  float* weights = reinterpret_cast<float*>(reinterpret_cast<char*>(ids) + align256(size_t(M) * k * sizeof(int)));
  if (H <= 1024) return launch_by_experts<1>(xh, lg, w1, s1, w2, s2, o, h, ids, weights, M, E, k, H, I, group, s);
  if (H <= 2048) return launch_by_experts<2>(xh, lg, w1, s1, w2, s2, o, h, ids, weights, M, E, k, H, I, group, s);
  return launch_by_experts<4>(xh, lg, w1, s1, w2, s2, o, h, ids, weights, M, E, k, H, I, group, s);
}

}  // extern "C"
