// Decode attention over the paged KV cache: one query token per sequence, GQA, split-K.
//
// Grid (sequences, kv_heads, partitions); each block scores the query heads of one KV group against
// up to kPartition cached tokens, then accumulates the values. Keys and values are read with 16-byte
// loads: kRowThreads threads share one cached row. With more than one partition, per-partition maxima,
// sums and normalized partial outputs go to workspace and paged_attention_reduce combines them.
#include "common.cuh"

namespace scalellm {

constexpr int kThreads = 128;
constexpr int kPartition = 512;
constexpr int kMaxGroup = 8;

template <typename T, int HEAD_DIM>
struct DecodeLayout {
  static constexpr int kVec = 16 / sizeof(T);
  static constexpr int kRowThreads = HEAD_DIM / kVec;  // threads sharing one K/V row
  static constexpr int kRowsPerPass = kThreads / kRowThreads;
  static_assert(kRowThreads <= 32 && (kRowThreads & (kRowThreads - 1)) == 0, "unsupported head_dim");
};

template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(kThreads) paged_attention_decode(
    T* __restrict__ out,                  // [seqs, heads, HEAD_DIM]
    float* __restrict__ part_out,         // [seqs, heads, partitions, HEAD_DIM]
    float* __restrict__ part_max,         // [seqs, heads, partitions]
    float* __restrict__ part_sum,         // [seqs, heads, partitions]
    const T* __restrict__ q,              // [seqs, heads, HEAD_DIM]
    const T* __restrict__ k_cache,        // [blocks, block_size, kv_heads, HEAD_DIM]
    const T* __restrict__ v_cache,
    const int* __restrict__ block_tables, // [seqs, max_blocks]
    const int* __restrict__ context_starts,
    const int* __restrict__ context_lens,
    int max_blocks, int block_size, int num_kv_heads, int group, float scale) {
  using L = DecodeLayout<T, HEAD_DIM>;
  constexpr int kVec = L::kVec, kRowThreads = L::kRowThreads, kRowsPerPass = L::kRowsPerPass;
  const int seq = blockIdx.x, kv_head = blockIdx.y, part = blockIdx.z, parts = gridDim.z;
  const int num_heads = num_kv_heads * group;
  const int begin = context_starts[seq] + part * kPartition;
  const int end = min(context_lens[seq], begin + kPartition);
  const int n = end - begin;
  if (n <= 0) {  // an empty partition: contributes nothing to the reduction
    if (parts > 1 && threadIdx.x < group) {
      const int64_t idx = ((int64_t)seq * num_heads + kv_head * group + threadIdx.x) * parts + part;
      part_max[idx] = -INFINITY;
      part_sum[idx] = 0.f;
    }
    return;
  }
  __shared__ float q_s[kMaxGroup][HEAD_DIM];
  __shared__ float logits[kMaxGroup][kPartition];
  __shared__ float scratch[32];
  __shared__ float red[kRowsPerPass][HEAD_DIM];

  for (int i = threadIdx.x; i < group * HEAD_DIM; i += kThreads) {
    const int g = i / HEAD_DIM, d = i % HEAD_DIM;
    q_s[g][d] = to_float(q[((int64_t)seq * num_heads + kv_head * group + g) * HEAD_DIM + d]) * scale;
  }
  __syncthreads();

  const int row = threadIdx.x / kRowThreads, lane = threadIdx.x % kRowThreads;
  const int* table = block_tables + (int64_t)seq * max_blocks;
  const int64_t row_stride = (int64_t)num_kv_heads * HEAD_DIM;

  // scores: each group of kRowThreads threads handles one cached token per pass
  // (every thread runs every pass, so the shuffles always see full warps)
  for (int base = 0; base < n; base += kRowsPerPass) {
    const int r = base + row;
    Vec16<T> kv = {};
    if (r < n) {
      const int pos = begin + r;
      const int64_t slot = (int64_t)table[pos / block_size] * block_size + pos % block_size;
      kv = load16(k_cache + slot * row_stride + kv_head * HEAD_DIM + lane * kVec);
    }
    for (int g = 0; g < group; ++g) {
      float s = 0.f;
#pragma unroll
      for (int j = 0; j < kVec; ++j) s += q_s[g][lane * kVec + j] * to_float(kv.v[j]);
#pragma unroll
      for (int o = kRowThreads / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o, kRowThreads);
      if (lane == 0 && r < n) logits[g][r] = s;
    }
  }
  __syncthreads();

  // softmax per head over this partition
  float maxes[kMaxGroup], sums[kMaxGroup];
  for (int g = 0; g < group; ++g) {
    float m = -INFINITY;
    for (int r = threadIdx.x; r < n; r += kThreads) m = fmaxf(m, logits[g][r]);
    m = block_max(m, scratch);
    float s = 0.f;
    for (int r = threadIdx.x; r < n; r += kThreads) {
      const float e = __expf(logits[g][r] - m);
      logits[g][r] = e;
      s += e;
    }
    s = block_sum(s, scratch);
    maxes[g] = m;
    sums[g] = s;
  }
  __syncthreads();

  // values: the same thread layout, kVec output elements per thread and head
  float acc[kMaxGroup][kVec];
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g)
#pragma unroll
    for (int j = 0; j < kVec; ++j) acc[g][j] = 0.f;
  for (int r = row; r < n; r += kRowsPerPass) {
    const int pos = begin + r;
    const int64_t slot = (int64_t)table[pos / block_size] * block_size + pos % block_size;
    const Vec16<T> vv = load16(v_cache + slot * row_stride + kv_head * HEAD_DIM + lane * kVec);
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) {
      if (g < group) {
        const float p = logits[g][r];
#pragma unroll
        for (int j = 0; j < kVec; ++j) acc[g][j] += p * to_float(vv.v[j]);
      }
    }
  }
  for (int g = 0; g < group; ++g) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) red[row][lane * kVec + j] = acc[g][j];
    __syncthreads();
    const int head = kv_head * group + g;
    for (int d = threadIdx.x; d < HEAD_DIM; d += kThreads) {
      float o = 0.f;
      for (int r = 0; r < kRowsPerPass; ++r) o += red[r][d];
      o /= sums[g];
      if (parts == 1) {
        out[((int64_t)seq * num_heads + head) * HEAD_DIM + d] = from_float<T>(o);
      } else {
        part_out[(((int64_t)seq * num_heads + head) * parts + part) * HEAD_DIM + d] = o;
      }
    }
    if (parts > 1 && threadIdx.x == 0) {
      const int64_t idx = ((int64_t)seq * num_heads + head) * parts + part;
      part_max[idx] = maxes[g];
      part_sum[idx] = sums[g];
    }
    __syncthreads();
  }
}

// Combine partitions: out = sum_p w_p o_p / sum_p w_p with w_p = sum_p * exp(max_p - max), over the
// partitions that held tokens.
template <typename T, int HEAD_DIM>
__global__ void paged_attention_reduce(T* __restrict__ out, const float* __restrict__ part_out,
                                       const float* __restrict__ part_max, const float* __restrict__ part_sum,
                                       int parts) {
  const int64_t sh = (int64_t)blockIdx.x * gridDim.y + blockIdx.y;  // (seq, head)
  const float* pm = part_max + sh * parts;
  const float* ps = part_sum + sh * parts;
  float m = -INFINITY;
  for (int p = 0; p < parts; ++p) m = fmaxf(m, pm[p]);
  float total = 0.f;
  for (int p = 0; p < parts; ++p) total += ps[p] * __expf(pm[p] - m);
  for (int d = threadIdx.x; d < HEAD_DIM; d += blockDim.x) {
    float o = 0.f;
    for (int p = 0; p < parts; ++p)  // an empty partition wrote no output: never read it (0 * NaN is NaN)
      if (ps[p] > 0.f) o += part_out[(sh * parts + p) * HEAD_DIM + d] * ps[p] * __expf(pm[p] - m);
    out[sh * HEAD_DIM + d] = from_float<T>(o / total);
  }
}

#define INSTANTIATE(T, D)                                                                               \
  template __global__ void paged_attention_decode<T, D>(T*, float*, float*, float*, const T*, const T*, \
                                                        const T*, const int*, const int*, const int*, int, \
                                                        int, int, int, float);                          \
  template __global__ void paged_attention_reduce<T, D>(T*, const float*, const float*, const float*, int);
INSTANTIATE(float, 64)
INSTANTIATE(float, 128)
INSTANTIATE(__half, 64)
INSTANTIATE(__half, 128)
INSTANTIATE(__nv_bfloat16, 64)
INSTANTIATE(__nv_bfloat16, 128)

}  // namespace scalellm
