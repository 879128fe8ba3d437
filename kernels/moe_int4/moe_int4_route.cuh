// What the decode and prefill kernels share: a token's top-k router logits and the softmax over them (QMoE's
// routing, = Qwen3's softmax -> top-k -> renormalise; ties to the lower index, NaN as -inf), one warp a token,
// and the INT4 codes of a 32-bit word as float16.
#pragma once
#include <cuda_fp16.h>
#include <stdint.h>

namespace {

constexpr int kWarp = 32;
constexpr int kMaxExperts = 256;
constexpr int kMaxTopK = 32;

// A 32-bit word's two float16 halves (low half first), without type punning.
__device__ __forceinline__ half2 as_half2(uint32_t bits) {
  return __halves2half2(__ushort_as_half(static_cast<unsigned short>(bits & 0xFFFFu)),
                        __ushort_as_half(static_cast<unsigned short>(bits >> 16)));
}

// A token's routing, computed by one warp with no block-wide barrier: each lane holds EPL logits (experts lane, lane + 32, ...; E <= 32 * EPL), counts how many of the E logits beat
// each of them (larger, or equal at a lower index: ties to the lower index, NaN as -inf) from E broadcasts
// (independent shuffles, not k dependent reductions), and the experts ranked below k are the top-k, slot =
// rank. Returns, per lane, the slot of each of its experts (k or more: not chosen); `top` gets the largest
// logit, `denom` the softmax denominator over the chosen (exp(v - top), 1 where v == top).
template <int EPL>
__device__ __forceinline__ void rank_experts(const half* logits, int E, int k, int (&slot)[EPL], float (&v)[EPL],
                                             float& top, float& denom) {
  const int lane = threadIdx.x % kWarp;
#pragma unroll
  for (int j = 0; j < EPL; ++j) {
    const int e = lane + j * kWarp;
    const float f = e < E ? __half2float(logits[e]) : -INFINITY;
    v[j] = f == f ? f : -INFINITY;
    slot[j] = 0;
  }
#pragma unroll
  for (int jj = 0; jj < EPL; ++jj) {
    if (jj * kWarp >= E) break;
#pragma unroll
    for (int src = 0; src < kWarp; ++src) {  // unrolled: the broadcasts are independent and overlap
      const int i = jj * kWarp + src;
      const float vi = __shfl_sync(0xffffffffu, v[jj], src);
#pragma unroll
      for (int j = 0; j < EPL; ++j) slot[j] += i < E && (vi > v[j] || (vi == v[j] && i < lane + j * kWarp));
    }
  }
  float mx = -INFINITY;
#pragma unroll
  for (int j = 0; j < EPL; ++j) mx = fmaxf(mx, v[j]);
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  top = mx;
  float d = 0.f;
#pragma unroll
  for (int j = 0; j < EPL; ++j)
    if (slot[j] < k) d += v[j] == top ? 1.f : __expf(v[j] - top);
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
  denom = d;
}

// The expert in slot `want` of rank_experts' result, the same in every lane of the warp.
template <int EPL>
__device__ __forceinline__ int expert_in_slot(const int (&slot)[EPL], int want) {
  int e = 0;
#pragma unroll
  for (int j = 0; j < EPL; ++j) {
    const unsigned hit = __ballot_sync(0xffffffffu, slot[j] == want);
    if (hit) e = j * kWarp + __ffs(hit) - 1;
  }
  return e;
}

// rank_experts' result as the token's top-k expert ids and softmax weights (ids[slot], weights[slot], slot 0
// the largest logit), written by the warp's lanes into `ids` / `weights` (shared or global memory).
template <int EPL>
__device__ __forceinline__ void write_route(const int (&ranks)[EPL], const float (&v)[EPL], float top, float denom,
                                            int k, int* ids, float* weights) {
  const int lane = threadIdx.x % kWarp;
#pragma unroll
  for (int j = 0; j < EPL; ++j)
    if (ranks[j] < k) {
      ids[ranks[j]] = lane + j * kWarp;
      weights[ranks[j]] = (v[j] == top ? 1.f : __expf(v[j] - top)) / denom;
    }
}

// A token's routing by the calling warp into `ids` / `weights`, published to the warp (__syncwarp).
template <int EPL>
__device__ __forceinline__ void route_warp(const half* logits, int E, int k, int* ids, float* weights) {
  int ranks[EPL];
  float v[EPL], top, denom;
  rank_experts<EPL>(logits, E, k, ranks, v, top, denom);
  write_route<EPL>(ranks, v, top, denom, k, ids, weights);
  __syncwarp();
}

// Codes n and 4 + n of a word of 8 (bits 4n.. and 16 + 4n..; omniedge/int4.py: low nibble first, zero point 8)
// as float16 code - 8: each code OR-ed into the mantissa of 1024 (0x6400), then 1032 subtracted, exactly.
__device__ __forceinline__ half2 codes_minus_8(uint32_t word, int n) {
  const uint32_t bits = ((word >> (4 * n)) & 0x000F000Fu) | 0x64006400u;
  const half2 bias = __halves2half2(__ushort_as_half(0x6408), __ushort_as_half(0x6408));  // 1032
  return __hsub2(as_half2(bits), bias);
}

}  // namespace
