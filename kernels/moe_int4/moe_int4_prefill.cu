// Fused INT4 MoE for many tokens at once (a prefill): the same contract as moe_int4_decode.cu (layout, routing,
// SwiGLU; see there), computed expert by expert so each expert's INT4 weights are read once per 64 of its
// tokens instead of once per token, on tensor cores (wmma, float16 in, float32 accumulate).
//
//   1. route_count: each token's top-k and softmax weights; tokens per expert.
//   2. plan: offsets of each expert's rows in expert-sorted order, and the list of 64-row tiles.
//   3. scatter: each (token, slot) gets its row in sorted order.
//   4. gate_up_gemm: per tile x 64 gate/up columns, the gathered inputs times dequantized fc1, SwiGLU -> h
//      (float16, sorted order).
//      The SwiGLU outputs are float16 here (as in ONNX Runtime's QMoE) where the decode kernels keep float32.
//   5. down_gemm: per tile x 64 output columns, h times dequantized fc2, times the routing weight, into the
//      (token, slot) row of a float32 buffer.
//   6. finalize: each token's k rows summed in slot order (deterministic), float16 out.
//
// Shapes: H and I multiples of 64, group a multiple of 32 dividing H and I, E <= 256, k <= 32.
#include <cuda_fp16.h>
#include <mma.h>
#include <stdint.h>

#include "moe_int4_route.cuh"

namespace {

using namespace nvcuda;

constexpr int kTile = 64;      // rows (tokens) and columns of a block's output tile, and its K step
constexpr int kPad = 8;        // float16 padding of shared-memory rows (bank spread, 16-byte aligned rows)
constexpr int kThreads = 128;  // 4 warps, each a 32 x 32 piece of the tile

struct Plan {
  int* ids;         // [M * k] chosen experts
  float* weights;   // [M * k] their routing weights
  int* counts;      // [E] rows per expert
  int* offsets;     // [E + 1] first sorted row of each expert
  int* cursor;      // [E] next free sorted row (scatter)
  int* perm;        // [M * k] sorted row -> token * k + slot
  int* tile_expert; // [max_tiles]
  int* tile_row0;   // [max_tiles]
  int* num_tiles;   // [1]
  half* h;          // [M * k, I] SwiGLU outputs, sorted order
  float* partial;   // [M * k, H] weighted expert outputs, (token, slot) order
};

__host__ __device__ inline size_t align256(size_t n) { return (n + 255) / 256 * 256; }

__host__ __device__ inline int max_tiles(int M, int E, int k) { return (M * k + kTile - 1) / kTile + E; }

// Byte offsets of Plan's arrays in the scratch buffer, in field order; [11] is the total.
struct Layout {
  size_t at[12];
};

__host__ __device__ inline Layout layout(int M, int E, int k, int H, int I) {
  const size_t mk = size_t(M) * k, mt = max_tiles(M, E, k), i4 = sizeof(int);
  const size_t sizes[11] = {mk * i4, mk * sizeof(float), E * i4, (E + 1) * i4, E * i4, mk * i4, mt * i4, mt * i4, i4,
                            mk * I * sizeof(half), mk * H * sizeof(float)};
  Layout l;
  l.at[0] = 0;
  for (int i = 0; i < 11; ++i) l.at[i + 1] = l.at[i] + align256(sizes[i]);
  return l;
}

inline Plan carve(void* scratch, int M, int E, int k, int H, int I) {
  char* p = static_cast<char*>(scratch);
  const Layout l = layout(M, E, k, H, I);
  Plan s;
  s.ids = reinterpret_cast<int*>(p + l.at[0]);
  s.weights = reinterpret_cast<float*>(p + l.at[1]);
  s.counts = reinterpret_cast<int*>(p + l.at[2]);
  s.offsets = reinterpret_cast<int*>(p + l.at[3]);
  s.cursor = reinterpret_cast<int*>(p + l.at[4]);
  s.perm = reinterpret_cast<int*>(p + l.at[5]);
  s.tile_expert = reinterpret_cast<int*>(p + l.at[6]);
  s.tile_row0 = reinterpret_cast<int*>(p + l.at[7]);
  s.num_tiles = reinterpret_cast<int*>(p + l.at[8]);
  s.h = reinterpret_cast<half*>(p + l.at[9]);
  s.partial = reinterpret_cast<float*>(p + l.at[10]);
  return s;
}

// One warp a token: its routing into the plan, and its experts' row counts.
template <int EPL>
__global__ void route_count(const half* logits, Plan s, int E, int k) {
  const int m = blockIdx.x;
  route_warp<EPL>(logits + size_t(m) * E, E, k, s.ids + m * k, s.weights + m * k);
  if (threadIdx.x < k) atomicAdd(s.counts + s.ids[m * k + threadIdx.x], 1);
}

void launch_route_count(const half* logits, const Plan& s, int M, int E, int k, cudaStream_t st) {
  if (E <= 32) route_count<1><<<M, kWarp, 0, st>>>(logits, s, E, k);
  else if (E <= 64) route_count<2><<<M, kWarp, 0, st>>>(logits, s, E, k);
  else if (E <= 128) route_count<4><<<M, kWarp, 0, st>>>(logits, s, E, k);
  else route_count<8><<<M, kWarp, 0, st>>>(logits, s, E, k);
}

__global__ void plan_tiles(Plan s, int E) {
  if (threadIdx.x != 0) return;  // E <= 256 experts: one thread is quick enough, and exact
  int row = 0, tiles = 0;
  for (int e = 0; e < E; ++e) {
    s.offsets[e] = s.cursor[e] = row;
    for (int r = 0; r < s.counts[e]; r += kTile) s.tile_expert[tiles] = e, s.tile_row0[tiles++] = row + r;
    row += s.counts[e];
  }
  s.offsets[E] = row;
  *s.num_tiles = tiles;
}

__global__ void scatter(Plan s, int mk) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < mk) s.perm[atomicAdd(s.cursor + s.ids[i], 1)] = i;
}

// 64 rows x 64 codes of an expert's weight rows (row-major [N, K/2] bytes) at column k0, dequantized into
// shared memory Bs[n][k] (float16). Each thread turns 32 codes (16 bytes) into 32 values.
__device__ inline void load_weights(half (*Bs)[kTile + kPad], const uint8_t* w, const half* scales, int K, int group,
                                    int n0, int k0) {
  const int r = threadIdx.x / 2, part = threadIdx.x % 2;
  const int col = k0 + part * 32;
  const uint4 q = __ldg(reinterpret_cast<const uint4*>(w + size_t(n0 + r) * (K / 2) + col / 2));
  const half2 scale = __half2half2(scales[size_t(n0 + r) * (K / group) + col / group]);
  const uint32_t words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
  for (int wd = 0; wd < 4; ++wd)
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      const half2 v = __hmul2(codes_minus_8(words[wd], n), scale);
      Bs[r][part * 32 + wd * 8 + n] = __low2half(v);
      Bs[r][part * 32 + wd * 8 + 4 + n] = __high2half(v);
    }
}

// C[64 x 64] (float32, shared memory) = A[rows of the tile] x W[n0 .. n0+63]^T over K, A's row r read by
// `a_row(r)` (a float16 row of K values, or nullptr past the tile's rows).
template <typename ARow>
__device__ void tile_gemm(float (*Cs)[kTile + 4], half (*As)[kTile + kPad], half (*Bs)[kTile + kPad], ARow a_row,
                          const uint8_t* w, const half* scales, int K, int group, int n0) {
  const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  for (int k0 = 0; k0 < K; k0 += kTile) {
    for (int idx = threadIdx.x; idx < kTile * kTile / 8; idx += kThreads) {  // A: 8 values a load
      const int r = idx / (kTile / 8), c = (idx % (kTile / 8)) * 8;
      const half* src = a_row(r);
      *reinterpret_cast<uint4*>(&As[r][c]) =
          src ? *reinterpret_cast<const uint4*>(src + k0 + c) : make_uint4(0, 0, 0, 0);
    }
    load_weights(Bs, w, scales, K, group, n0, k0);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTile; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::col_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], &As[wm * 32 + i * 16][kk], kTile + kPad);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], &Bs[wn * 32 + j * 16][kk], kTile + kPad);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&Cs[wm * 32 + i * 16][wn * 32 + j * 16], acc[i][j], kTile + 4, wmma::mem_row_major);
  __syncthreads();
}

struct alignas(32) Smem {  // wmma loads and stores need 32-byte aligned rows
  half As[kTile][kTile + kPad];
  half Bs[kTile][kTile + kPad];
  float Cs[kTile][kTile + 4];
};

// grid (max_tiles, 2I / 64): fc1 columns n0.. = 32 (gate, up) pairs -> h columns n0/2 .. n0/2 + 31.
__global__ void __launch_bounds__(kThreads)
    gate_up_gemm(const half* __restrict__ x, const uint8_t* __restrict__ fc1, const half* __restrict__ fc1_scales,
                 Plan s, int k, int H, int I, int group) {
  if (blockIdx.x >= *s.num_tiles) return;
  __shared__ Smem sm;
  const int e = s.tile_expert[blockIdx.x], row0 = s.tile_row0[blockIdx.x];
  const int rows = min(kTile, s.offsets[e + 1] - row0), n0 = blockIdx.y * kTile;
  auto a_row = [&](int r) -> const half* {
    return r < rows ? x + size_t(s.perm[row0 + r] / k) * H : nullptr;
  };
  tile_gemm(sm.Cs, sm.As, sm.Bs, a_row, fc1 + size_t(e) * 2 * I * (H / 2), fc1_scales + size_t(e) * 2 * I * (H / group),
            H, group, n0);
  for (int idx = threadIdx.x; idx < rows * (kTile / 2); idx += kThreads) {
    const int r = idx / (kTile / 2), j = idx % (kTile / 2);
    const float g = sm.Cs[r][2 * j], u = sm.Cs[r][2 * j + 1];
    s.h[size_t(row0 + r) * I + n0 / 2 + j] = __float2half(g / (1.f + __expf(-g)) * u);
  }
}

// grid (max_tiles, H / 64): output columns n0 .. n0 + 63 of the tile's rows, times their routing weights.
__global__ void __launch_bounds__(kThreads)
    down_gemm(const uint8_t* __restrict__ fc2, const half* __restrict__ fc2_scales, Plan s, int H, int I, int group) {
  if (blockIdx.x >= *s.num_tiles) return;
  __shared__ Smem sm;
  const int e = s.tile_expert[blockIdx.x], row0 = s.tile_row0[blockIdx.x];
  const int rows = min(kTile, s.offsets[e + 1] - row0), n0 = blockIdx.y * kTile;
  auto a_row = [&](int r) -> const half* { return r < rows ? s.h + size_t(row0 + r) * I : nullptr; };
  tile_gemm(sm.Cs, sm.As, sm.Bs, a_row, fc2 + size_t(e) * H * (I / 2), fc2_scales + size_t(e) * H * (I / group), I,
            group, n0);
  for (int idx = threadIdx.x; idx < rows * kTile; idx += kThreads) {
    const int r = idx / kTile, c = idx % kTile;
    const int dst = s.perm[row0 + r];
    s.partial[size_t(dst) * H + n0 + c] = s.weights[dst] * sm.Cs[r][c];
  }
}

__global__ void finalize(const Plan s, half* out, int k, int H) {
  const int m = blockIdx.x;
  for (int n = threadIdx.x; n < H; n += blockDim.x) {
    float acc = 0.f;
    for (int slot = 0; slot < k; ++slot) acc += s.partial[(size_t(m) * k + slot) * H + n];
    out[size_t(m) * H + n] = __float2half(acc);
  }
}

}  // namespace

extern "C" {

// Whether the prefill kernels take these shapes (else the decode kernels run token by token).
int omniedge_moe_int4_prefill_supported(int E, int k, int H, int I, int group) {
  return E >= 1 && E <= kMaxExperts && k >= 1 && k <= kMaxTopK && k <= E && H % kTile == 0 && I % kTile == 0 &&
         group >= 32 && group % 32 == 0 && H % group == 0 && I % group == 0;
}

size_t omniedge_moe_int4_prefill_scratch_bytes(int M, int E, int k, int H, int I) {
  return layout(M, E, k, H, I).at[11];
}

// Queues the six kernels on `stream`. Returns 0, 1 for shapes they do not take, or the CUDA error code.
int omniedge_moe_int4_prefill(const void* x, const void* logits, const void* fc1, const void* fc1_scales,
                              const void* fc2, const void* fc2_scales, void* out, void* scratch, int M, int E, int k,
                              int H, int I, int group, void* stream) {
  if (M < 1 || !omniedge_moe_int4_prefill_supported(E, k, H, I, group)) return 1;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const Plan s = carve(scratch, M, E, k, H, I);
  const int mk = M * k, mt = max_tiles(M, E, k);
  if (const cudaError_t rc = cudaMemsetAsync(s.counts, 0, E * sizeof(int), st)) return int(rc);
  launch_route_count(static_cast<const half*>(logits), s, M, E, k, st);
  plan_tiles<<<1, 32, 0, st>>>(s, E);
  scatter<<<(mk + 255) / 256, 256, 0, st>>>(s, mk);
  gate_up_gemm<<<dim3(mt, 2 * I / kTile), kThreads, 0, st>>>(
      static_cast<const half*>(x), static_cast<const uint8_t*>(fc1), static_cast<const half*>(fc1_scales), s, k, H, I,
      group);
  down_gemm<<<dim3(mt, H / kTile), kThreads, 0, st>>>(static_cast<const uint8_t*>(fc2),
                                                      static_cast<const half*>(fc2_scales), s, H, I, group);
  finalize<<<M, 256, 0, st>>>(s, static_cast<half*>(out), k, H);
  return int(cudaGetLastError());
}

}  // extern "C"
