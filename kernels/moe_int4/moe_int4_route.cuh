// Routing shared by the decode and prefill kernels: a token's top-k router logits and the softmax over them
// (QMoE's routing, = Qwen3's softmax -> top-k -> renormalise).
#pragma once
#include <cuda_fp16.h>

namespace {

constexpr int kWarp = 32;
constexpr int kMaxExperts = 256;
constexpr int kMaxTopK = 32;

// Top-k of one token's E logits, softmax over those k, computed by warp 0 of the block into shared
// memory. Ties go to the lower expert index. The caller's __syncthreads publishes them.
__device__ void route(const half* logits, int E, int k, int* ids, float* weights) {
  if (threadIdx.x >= kWarp) return;
  const int lane = threadIdx.x;
  float v[kMaxExperts / kWarp];
#pragma unroll
  for (int j = 0; j < kMaxExperts / kWarp; ++j) {
    const int e = lane + j * kWarp;
    v[j] = e < E ? __half2float(logits[e]) : -INFINITY;
  }
  float top = 0.f, denom = 0.f;
  for (int t = 0; t < k; ++t) {
    float best = -INFINITY;
    int best_e = 0x7fffffff;
#pragma unroll
    for (int j = 0; j < kMaxExperts / kWarp; ++j) {
      const int e = lane + j * kWarp;
      if (e < E && (v[j] > best || (v[j] == best && e < best_e))) best = v[j], best_e = e;
    }
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) {  // every lane ends with the same (best, best_e)
      const float ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int oe = __shfl_xor_sync(0xffffffffu, best_e, o);
      if (ob > best || (ob == best && oe < best_e)) best = ob, best_e = oe;
    }
    if (t == 0) top = best;
    const float w = __expf(best - top);
    denom += w;
    if (lane == 0) ids[t] = best_e, weights[t] = w;
#pragma unroll
    for (int j = 0; j < kMaxExperts / kWarp; ++j)
      if (lane + j * kWarp == best_e) v[j] = -INFINITY;  // taken
  }
  __syncwarp();
  if (lane < k) weights[lane] /= denom;
}

}  // namespace
