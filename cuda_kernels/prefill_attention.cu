// Attention for prefill and chunked prefill over the paged cache: many sequences of different
// lengths in one launch, causal, GQA. The chunk's own keys and values are written to the cache
// first (kv_write), so every query reads its whole context from the cache.
//
// One warp per (query token, head), online softmax over the token's causal context; each lane
// holds HEAD_DIM / 32 elements of the query and of the running output.
#include "common.cuh"

namespace scalellm {

template <typename T, int HEAD_DIM>
__global__ void prefill_attention(
    T* __restrict__ out,                  // [tokens, heads, HEAD_DIM]
    const T* __restrict__ q,              // [tokens, heads, HEAD_DIM]
    const T* __restrict__ k_cache,        // [blocks, block_size, kv_heads, HEAD_DIM]
    const T* __restrict__ v_cache,
    const int* __restrict__ token_seq,    // [tokens] which sequence each query token belongs to
    const int* __restrict__ token_pos,    // [tokens] absolute position of each query token
    const int* __restrict__ block_tables, // [seqs, max_blocks]
    int num_tokens, int max_blocks, int block_size, int num_heads, int num_kv_heads, int window,
    float scale) {
  constexpr int kPerLane = HEAD_DIM / 32;
  static_assert(HEAD_DIM % 32 == 0, "head_dim must be a multiple of 32");
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (warp >= num_tokens * num_heads) return;  // whole warps exit together
  const int token = warp / num_heads, head = warp % num_heads;
  const int kv_head = head / (num_heads / num_kv_heads);
  const int seq = token_seq[token], pos = token_pos[token];
  const int first = window > 0 ? max(0, pos - window + 1) : 0;
  const int* table = block_tables + (int64_t)seq * max_blocks;
  const int64_t row_stride = (int64_t)num_kv_heads * HEAD_DIM;

  float qv[kPerLane], acc[kPerLane];
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    qv[j] = to_float(q[((int64_t)token * num_heads + head) * HEAD_DIM + lane * kPerLane + j]) * scale;
    acc[j] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  for (int t = first; t <= pos; ++t) {
    const int64_t slot = (int64_t)table[t / block_size] * block_size + t % block_size;
    const T* kr = k_cache + slot * row_stride + kv_head * HEAD_DIM + lane * kPerLane;
    const T* vr = v_cache + slot * row_stride + kv_head * HEAD_DIM + lane * kPerLane;
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) s += qv[j] * to_float(kr[j]);
    s = warp_sum(s);
    const float m_new = fmaxf(m, s);
    const float correction = __expf(m - m_new), p = __expf(s - m_new);
    l = l * correction + p;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) acc[j] = acc[j] * correction + p * to_float(vr[j]);
    m = m_new;
  }
#pragma unroll
  for (int j = 0; j < kPerLane; ++j)
    out[((int64_t)token * num_heads + head) * HEAD_DIM + lane * kPerLane + j] = from_float<T>(acc[j] / l);
}

#define INSTANTIATE(T, D)                                                                                 \
  template __global__ void prefill_attention<T, D>(T*, const T*, const T*, const T*, const int*, const int*, \
                                                   const int*, int, int, int, int, int, int, float);
INSTANTIATE(float, 64)
INSTANTIATE(float, 128)
INSTANTIATE(__half, 64)
INSTANTIATE(__half, 128)
INSTANTIATE(__nv_bfloat16, 64)
INSTANTIATE(__nv_bfloat16, 128)

}  // namespace scalellm
