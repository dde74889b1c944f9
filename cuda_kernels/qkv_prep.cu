// The attention inputs in one launch: from the fused qkv projection [tokens, (heads + 2 kv_heads) * HEAD_DIM]
// (rows qkv_stride apart), the optional per-head RMSNorm of q and k (Qwen3's q_norm / k_norm), rotary on q
// and k, q written to q_out [tokens, heads, HEAD_DIM] and k, v to the paged caches
// [blocks, block_size, kv_heads, HEAD_DIM] at slot_mapping[token] (-1: the token's k and v go nowhere, as
// for the padded rows of a CUDA-graph batch). The arithmetic is rms_norm.cu's then rotary.cu's, per head.
//
// One warp per head: grid (tokens, ceil(units / warps per block)) over the units q heads, k heads, v heads;
// each lane holds HEAD_DIM / 64 rotary pairs (d, d + HEAD_DIM / 2), so the norm's sum is one warp sum.
#include "common.cuh"

namespace scalellm {

template <typename T, int HEAD_DIM>
__global__ void qkv_prep(T* __restrict__ q_out, T* __restrict__ k_cache, T* __restrict__ v_cache,
                         const T* __restrict__ qkv, const int64_t* __restrict__ positions,
                         const T* __restrict__ cos_cache, const T* __restrict__ sin_cache,
                         const T* __restrict__ q_norm, const T* __restrict__ k_norm,
                         const int64_t* __restrict__ slot_mapping, int num_heads, int num_kv_heads,
                         int64_t qkv_stride, int use_norm, float eps) {
  constexpr int kHalf = HEAD_DIM / 2, kPairs = HEAD_DIM / 64;
  const int lane = threadIdx.x & 31;
  const int unit = blockIdx.y * (blockDim.x >> 5) + (threadIdx.x >> 5);  // the same for the whole warp
  if (unit >= num_heads + 2 * num_kv_heads) return;
  const int64_t token = blockIdx.x;
  const int64_t slot = slot_mapping[token];
  const bool is_q = unit < num_heads;
  if (!is_q && slot < 0) return;  // k and v of a token that is not cached: nothing to write
  const T* src = qkv + token * qkv_stride + (int64_t)unit * HEAD_DIM;
  if (unit >= num_heads + num_kv_heads) {  // a v head: copied as it is
    T* dst = v_cache + (slot * num_kv_heads + (unit - num_heads - num_kv_heads)) * HEAD_DIM;
    for (int i = lane; i < HEAD_DIM; i += 32) dst[i] = src[i];
    return;
  }
  float x1[kPairs], x2[kPairs];
#pragma unroll
  for (int j = 0; j < kPairs; ++j) {
    x1[j] = to_float(src[lane + 32 * j]);
    x2[j] = to_float(src[lane + 32 * j + kHalf]);
  }
  if (use_norm) {  // rms_norm.cu over one head: normalized, rounded, times the weight, rounded
    float sq = 0.f;
#pragma unroll
    for (int j = 0; j < kPairs; ++j) sq += x1[j] * x1[j] + x2[j] * x2[j];
    const float inv = rsqrtf(warp_sum(sq) / HEAD_DIM + eps);
    const T* w = is_q ? q_norm : k_norm;
#pragma unroll
    for (int j = 0; j < kPairs; ++j) {
      const int d = lane + 32 * j;
      x1[j] = to_float(from_float<T>(to_float(w[d]) * to_float(from_float<T>(x1[j] * inv))));
      x2[j] = to_float(from_float<T>(to_float(w[d + kHalf]) * to_float(from_float<T>(x2[j] * inv))));
    }
  }
  const T* cs = cos_cache + positions[token] * HEAD_DIM;
  const T* sn = sin_cache + positions[token] * HEAD_DIM;
  T* dst = is_q ? q_out + (token * num_heads + unit) * HEAD_DIM
                : k_cache + (slot * num_kv_heads + (unit - num_heads)) * HEAD_DIM;
#pragma unroll
  for (int j = 0; j < kPairs; ++j) {  // rotary.cu: out = x * cos + rotate_half(x) * sin
    const int d = lane + 32 * j;
    const float c1 = to_float(cs[d]), s1 = to_float(sn[d]);
    const float c2 = to_float(cs[d + kHalf]), s2 = to_float(sn[d + kHalf]);
    dst[d] = from_float<T>(x1[j] * c1 - x2[j] * s1);
    dst[d + kHalf] = from_float<T>(x2[j] * c2 + x1[j] * s2);
  }
}

#define INSTANTIATE(T, D)                                                                                   \
  template __global__ void qkv_prep<T, D>(T*, T*, T*, const T*, const int64_t*, const T*, const T*, const T*, \
                                          const T*, const int64_t*, int, int, int64_t, int, float);
INSTANTIATE(float, 64)
INSTANTIATE(float, 128)
INSTANTIATE(__half, 64)
INSTANTIATE(__half, 128)
INSTANTIATE(__nv_bfloat16, 64)
INSTANTIATE(__nv_bfloat16, 128)

}  // namespace scalellm
