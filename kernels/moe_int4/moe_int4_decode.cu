// Fused INT4 MoE for decode (issue 12): routing + gate/up GEMV + SwiGLU in one kernel, down GEMV + the
// routing-weighted sum over the chosen experts in a second, for each token (row) of x.
//
// Weights are exactly what the exporter gives ONNX Runtime's QMoE (export/thinker_ort.py): omniedge's INT4
// layout (omniedge/int4.py: codes 0..15 along K, two per byte, low nibble first, symmetric, zero point 8,
// one float16 scale per group of `group` along K) for
//   fc1 [E, 2I, H/2] uint8, rows interleaved gate j, up j;  fc1_scales [E, 2I, H/group] float16
//   fc2 [E, H, I/2] uint8;                                   fc2_scales [E, H, I/group] float16
// and QMoE's routing: a token's top-k router logits, softmax over those k (= Qwen3's softmax -> top-k ->
// renormalise), computed once by the first kernel and read from scratch by the second. Both kernels read only
// the chosen experts' bytes, each once, 16 bytes a load, every load of a warp issued before its arithmetic.
// gate/up: each lane loads its 32-value chunks of the token's input straight from global memory into
// registers as float16 pairs (no shared memory, no bank conflicts), products in float16 over 4 codes, sums in
// float32; down: the SwiGLU output stays float32 (it can exceed float16).
//
// Shapes the launcher takes (it returns 1 for any other, launching nothing): H and I multiples of 32 with
// H <= 4096 and k * I <= 8192, group a multiple of 32 dividing H and I, E <= 256, 1 <= k <= min(E, 32).
#include <cuda_fp16.h>
#include <stdint.h>

#include "moe_int4_route.cuh"

namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kPairsPerWarp = 2;       // gate/up row pairs per warp (their loads in flight together)
constexpr int kMaxDownLoads = 8;       // uint4 loads per lane for one output row: k * I / 32 / 32
constexpr float kMagic = 8388608.f;    // 2^23: float bits 0x4B000000 | c are 2^23 + c for c < 2^23

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// x[32c .. 32c+31] (float16, 16-byte aligned: H is a multiple of 32) as the float16 pairs dot32_half2 multiplies:
// for word w, pair n = (x[8w+n], x[8w+4+n]), the two codes one mask of a word shifted by 4n picks (bits
// 4n..4n+3 and 16+4n..16+4n+3). Four 16-byte loads of the token's row, no shared memory.
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

// grid (ceil(I / (kWarpsPerBlock * kPairsPerWarp)), k, M). Warp w of block b computes the gate and up rows
// of pairs j = (b * kWarpsPerBlock + w) * kPairsPerWarp + p of the block's expert slot for token m and
// writes h[m, slot, j] = silu(gate) * up (float32); block (0, 0, m) also writes token m's routing for
// down_weighted_sum. CPL: 32-code chunks of H per lane (H <= CPL * 1024).
template <int CPL>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock)
    gate_up_swiglu(const half* __restrict__ x, const half* __restrict__ logits, const uint8_t* __restrict__ fc1,
                   const half* __restrict__ fc1_scales, float* __restrict__ h, int* __restrict__ route_ids,
                   float* __restrict__ route_weights, int E, int k, int H, int I, int group) {
  __shared__ int ids[kMaxTopK];
  __shared__ float weights[kMaxTopK];
  const int m = blockIdx.z, slot = blockIdx.y;
  const int lane = threadIdx.x % kWarp;
  const int chunks = H / 32, groups = H / group;
  half2 xp[CPL][16];  // the input's loads go out while warp 0 routes
#pragma unroll
  for (int t = 0; t < CPL; ++t) {
    const int c = lane + t * kWarp;
    if (c < chunks) load_pairs(x + size_t(m) * H, c, xp[t]);
  }
  route(logits + size_t(m) * E, E, k, ids, weights);
  __syncthreads();
  if (blockIdx.x == 0 && slot == 0 && threadIdx.x < k) {
    route_ids[m * k + threadIdx.x] = ids[threadIdx.x];
    route_weights[m * k + threadIdx.x] = weights[threadIdx.x];
  }
  const int j0 = (blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp) * kPairsPerWarp;
  if (j0 >= I) return;
  const size_t e = ids[slot];
  uint4 q[kPairsPerWarp][2][CPL];
#pragma unroll
  for (int p = 0; p < kPairsPerWarp; ++p)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const uint4* row = reinterpret_cast<const uint4*>(fc1 + (e * 2 * I + 2 * (j0 + p) + r) * (H / 2));
#pragma unroll
      for (int t = 0; t < CPL; ++t) {
        const int c = lane + t * kWarp;
        q[p][r][t] = (j0 + p < I && c < chunks) ? __ldg(row + c) : make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
  for (int p = 0; p < kPairsPerWarp; ++p) {
    const int j = j0 + p;
    if (j >= I) break;
    float acc[2] = {0.f, 0.f};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const half* scales = fc1_scales + (e * 2 * I + 2 * j + r) * groups;
#pragma unroll
      for (int t = 0; t < CPL; ++t) {
        const int c = lane + t * kWarp;
        if (c < chunks) acc[r] += dot32_half2(q[p][r][t], xp[t], __half2float(scales[c * 32 / group]));
      }
    }
    const float g = warp_sum(acc[0]), u = warp_sum(acc[1]);
    if (lane == 0) h[(size_t(m) * k + slot) * I + j] = g / (1.f + __expf(-g)) * u;
  }
}

// grid (ceil(H / kWarpsPerBlock), 1, M). Warp w of block b computes output row n = b * kWarpsPerBlock + w of
// token m: out[m, n] = sum over slots s of weight_s * (fc2[e_s, n, :] . h[m, s, :]), with gate_up_swiglu's
// routing. The SwiGLU outputs sit in shared memory chunk-major with a stride of 33 floats, so the 32 lanes
// reading 32 chunks hit 32 banks.
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock)
    down_weighted_sum(const int* __restrict__ route_ids, const float* __restrict__ route_weights,
                      const uint8_t* __restrict__ fc2, const half* __restrict__ fc2_scales,
                      const float* __restrict__ h, half* __restrict__ out, int k, int H, int I, int group) {
  extern __shared__ float hs[];  // k * I / 32 chunks x 33 floats
  __shared__ int ids[kMaxTopK];
  __shared__ float weights[kMaxTopK];
  const int m = blockIdx.z;
  if (threadIdx.x < k) {
    ids[threadIdx.x] = route_ids[m * k + threadIdx.x];
    weights[threadIdx.x] = route_weights[m * k + threadIdx.x];
  }
  for (int i = threadIdx.x; i < k * I; i += blockDim.x) hs[(i / 32) * 33 + i % 32] = h[size_t(m) * k * I + i];
  __syncthreads();
  const int lane = threadIdx.x % kWarp;
  const int n = blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp;
  if (n >= H) return;
  const int chunks = I / 32, groups = I / group, total = k * chunks;
  uint4 q[kMaxDownLoads];
#pragma unroll
  for (int t = 0; t < kMaxDownLoads; ++t) {
    const int idx = lane + t * kWarp;
    if (idx < total) {
      const size_t row = size_t(ids[idx / chunks]) * H + n;
      q[t] = __ldg(reinterpret_cast<const uint4*>(fc2 + row * (I / 2)) + idx % chunks);
    }
  }
  float acc = 0.f;
#pragma unroll
  for (int t = 0; t < kMaxDownLoads; ++t) {
    const int idx = lane + t * kWarp;
    if (idx < total) {
      const int s = idx / chunks, c = idx % chunks;
      const size_t row = size_t(ids[s]) * H + n;
      const float scale = __half2float(fc2_scales[row * groups + c * 32 / group]);
      acc += weights[s] * dot32_float(q[t], hs + idx * 33, scale);
    }
  }
  acc = warp_sum(acc);
  if (lane == 0) out[size_t(m) * H + n] = __float2half(acc);
}

template <int CPL>
int launch_gate_up(const half* x, const half* logits, const uint8_t* fc1, const half* fc1_scales, float* h, int* ids,
                   float* weights, int M, int E, int k, int H, int I, int group, cudaStream_t s) {
  const int rows_per_block = kWarpsPerBlock * kPairsPerWarp;
  gate_up_swiglu<CPL><<<dim3((I + rows_per_block - 1) / rows_per_block, k, M), kWarp * kWarpsPerBlock, 0, s>>>(
      x, logits, fc1, fc1_scales, h, ids, weights, E, k, H, I, group);
  return 0;
}

size_t align256(size_t n) { return (n + 255) / 256 * 256; }

}  // namespace

extern "C" {

// Bytes of device scratch the launcher needs for M tokens: the SwiGLU outputs between the two kernels (float32
// [M, k, I]), then each token's k expert ids (int32) and routing weights (float32).
size_t omniedge_moe_int4_scratch_bytes(int M, int k, int I) {
  return align256(size_t(M) * k * I * sizeof(float)) + align256(size_t(M) * k * sizeof(int)) +
         size_t(M) * k * sizeof(float);
}

// Queues both kernels on `stream` (a cudaStream_t; null: the default stream). Returns 0 when queued, 1 for
// shapes the kernels do not take (nothing launched), else the CUDA error of the launch. Pointers are device
// memory, x 16-byte aligned; scratch holds omniedge_moe_int4_scratch_bytes(M, k, I), 256-byte aligned.
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
  char* base = static_cast<char*>(scratch);
  float* h = reinterpret_cast<float*>(base);
  int* ids = reinterpret_cast<int*>(base + align256(size_t(M) * k * I * sizeof(float)));
  float* weights = reinterpret_cast<float*>(reinterpret_cast<char*>(ids) + align256(size_t(M) * k * sizeof(int)));
  int rc = H <= 1024   ? launch_gate_up<1>(xh, lg, w1, s1, h, ids, weights, M, E, k, H, I, group, s)
           : H <= 2048 ? launch_gate_up<2>(xh, lg, w1, s1, h, ids, weights, M, E, k, H, I, group, s)
                       : launch_gate_up<4>(xh, lg, w1, s1, h, ids, weights, M, E, k, H, I, group, s);
  if (rc) return rc;
  const size_t smem = size_t(k) * I / 32 * 33 * sizeof(float);
  if (smem > 48 * 1024 &&
      cudaFuncSetAttribute(down_weighted_sum, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)))
    return int(cudaGetLastError());
  down_weighted_sum<<<dim3((H + kWarpsPerBlock - 1) / kWarpsPerBlock, 1, M), kWarp * kWarpsPerBlock, smem, s>>>(
      ids, weights, static_cast<const uint8_t*>(fc2), static_cast<const half*>(fc2_scales), h,
      static_cast<half*>(out), k, H, I, group);
  return int(cudaGetLastError());
}

}  // extern "C"
