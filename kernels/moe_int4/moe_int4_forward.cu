// The entry point the ONNX Runtime op and the probe call: a few tokens (a decode step) go through the decode
// kernels, each token reading its experts' weights; from kPrefillFrom tokens on, the prefill kernels, each
// expert's weights read once per 64 of its tokens (shapes they do not take fall back to the decode kernels).
#include <stddef.h>

extern "C" {
size_t omniedge_moe_int4_scratch_bytes(int M, int k, int I);
int omniedge_moe_int4_decode(const void* x, const void* logits, const void* fc1, const void* fc1_scales,
                             const void* fc2, const void* fc2_scales, void* out, void* scratch, int M, int E, int k,
                             int H, int I, int group, void* stream);
int omniedge_moe_int4_prefill_supported(int E, int k, int H, int I, int group);
size_t omniedge_moe_int4_prefill_scratch_bytes(int M, int E, int k, int H, int I);
int omniedge_moe_int4_prefill(const void* x, const void* logits, const void* fc1, const void* fc1_scales,
                              const void* fc2, const void* fc2_scales, void* out, void* scratch, int M, int E, int k,
                              int H, int I, int group, void* stream);

static const int kPrefillFrom = 16;  // tokens

static int use_prefill(int M, int E, int k, int H, int I, int group) {
  return M >= kPrefillFrom && omniedge_moe_int4_prefill_supported(E, k, H, I, group);
}

// Tokens from which the prefill kernels may run (the op keeps decode-size scratch apart from prefill's).
int omniedge_moe_int4_prefill_from() { return kPrefillFrom; }

// Device scratch bytes omniedge_moe_int4_forward needs for these shapes.
size_t omniedge_moe_int4_forward_scratch_bytes(int M, int E, int k, int H, int I, int group) {
  return use_prefill(M, E, k, H, I, group) ? omniedge_moe_int4_prefill_scratch_bytes(M, E, k, H, I)
                                           : omniedge_moe_int4_scratch_bytes(M, k, I);
}

// 0 when queued on `stream`, 1 for shapes no kernel takes, else the CUDA error code.
int omniedge_moe_int4_forward(const void* x, const void* logits, const void* fc1, const void* fc1_scales,
                              const void* fc2, const void* fc2_scales, void* out, void* scratch, int M, int E, int k,
                              int H, int I, int group, void* stream) {
  if (use_prefill(M, E, k, H, I, group))
    return omniedge_moe_int4_prefill(x, logits, fc1, fc1_scales, fc2, fc2_scales, out, scratch, M, E, k, H, I, group,
                                     stream);
  return omniedge_moe_int4_decode(x, logits, fc1, fc1_scales, fc2, fc2_scales, out, scratch, M, E, k, H, I, group,
                                  stream);
}
}
