// Decode attention over the paged KV cache: one query token per sequence, GQA, flash-decoding.
//
// Grid (sequences, kv_heads, splits): each block takes one KV head's GROUP query heads (GROUP, the GQA
// group size, is a template parameter: every per-head value lives in registers at a compile-time index)
// and one split of kSplit cached tokens of the context (the split count comes from the longest context
// the launch allows, not from the data, so one CUDA graph serves every length; a split past a sequence's
// context is empty and exits at once).
//
// The split's cache slots are computed from the block table once, into shared memory, so the loads of the
// loop never wait on a table read. Within a split, the block walks the tokens in tiles. A row of K or V (HEAD_DIM elements) is read with
// 16-byte loads by kRowThreads threads, each holding kVec elements; each thread has kUnroll rows of K and
// of V in flight per tile. Every row group keeps its own ONLINE softmax per head (running max m, running
// sum l, an unnormalized output accumulator rescaled by exp(m_old - m_new) when the max grows), so no
// array of logits is kept and the loop has no barrier. At the end the row groups of a warp merge their
// (m, l, acc) with shuffles, the warps merge through shared memory, and the split's normalized output
// goes to `out` (one split) or, with its max and sum, to the workspace that paged_attention_reduce
// combines. Two barriers per block: after staging q and the split's cache slots, before the warp merge.
#include "common.cuh"

namespace scalellm {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kSplit = 256;  // tokens per split: PARTITION in scalellm/ops/cuda/backend.py (why 256: there)
constexpr int kMaxGroup = 8;
// at least 3 blocks (12 warps) per SM: at most 170 registers, which the largest group needs; the minimum
// also matters to ptxas 13, which spilled a few registers of the 56-128 it chose with kThreads alone
constexpr int kMinBlocks = 3;

template <typename T, int HEAD_DIM, int GROUP>
struct DecodeLayout {
  static constexpr int kVec = 16 / sizeof(T);              // elements per 16-byte load
  static constexpr int kRowThreads = HEAD_DIM / kVec;      // threads sharing one K/V row
  static constexpr int kRowsPerPass = kThreads / kRowThreads;
  static constexpr int kUnroll = GROUP * kVec <= 32 ? 4 : 2;  // rows in flight per thread (registers permitting)
  static constexpr int kTile = kRowsPerPass * kUnroll;      // tokens per iteration of the block
  static_assert(kRowThreads <= 32 && (kRowThreads & (kRowThreads - 1)) == 0, "unsupported head_dim");
  static_assert(GROUP >= 1 && GROUP <= kMaxGroup, "unsupported GQA group");
  static_assert(kSplit % kTile == 0, "a split is whole tiles");
};

// exp(m - m_max), 0 for a state that has seen no token (m = -inf), even when m_max is -inf too.
__device__ __forceinline__ float rescale(float m, float m_max) { return m == -INFINITY ? 0.f : __expf(m - m_max); }

template <typename T, int HEAD_DIM, int GROUP>
__global__ void __launch_bounds__(kThreads, kMinBlocks) paged_attention_decode(
    T* __restrict__ out,                  // [seqs, heads, HEAD_DIM]
    float* __restrict__ part_out,         // [seqs, heads, splits, HEAD_DIM]
    float* __restrict__ part_max,         // [seqs, heads, splits]
    float* __restrict__ part_sum,         // [seqs, heads, splits]
    const T* __restrict__ q,              // [seqs, heads, HEAD_DIM]
    const T* __restrict__ k_cache,        // [blocks, block_size, kv_heads, HEAD_DIM]
    const T* __restrict__ v_cache,
    const int* __restrict__ block_tables, // [seqs, max_blocks]
    const int* __restrict__ context_starts,
    const int* __restrict__ context_lens,
    int max_blocks, int block_size, int num_kv_heads, float scale) {
  using L = DecodeLayout<T, HEAD_DIM, GROUP>;
  constexpr int kVec = L::kVec, kRowThreads = L::kRowThreads, kRowsPerPass = L::kRowsPerPass;
  constexpr int kUnroll = L::kUnroll, kTile = L::kTile;
  const int seq = blockIdx.x, kv_head = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
  const int begin = context_starts[seq] + split * kSplit;
  const int n = min(context_lens[seq], begin + kSplit) - begin;
  const int64_t head0 = (int64_t)seq * num_kv_heads * GROUP + kv_head * GROUP;  // first query head of the group
  if (n <= 0) {  // an empty split: contributes nothing to the reduction (which never reads its output)
    if (splits > 1 && threadIdx.x < GROUP) {
      part_max[(head0 + threadIdx.x) * splits + split] = -INFINITY;
      part_sum[(head0 + threadIdx.x) * splits + split] = 0.f;
    }
    return;
  }
  __shared__ float q_s[GROUP][HEAD_DIM];
  __shared__ int slot_s[kSplit];
  __shared__ float acc_s[kWarps][GROUP][HEAD_DIM];
  __shared__ float m_s[kWarps][GROUP];
  __shared__ float l_s[kWarps][GROUP];

  for (int i = threadIdx.x; i < GROUP * HEAD_DIM; i += kThreads)
    q_s[i / HEAD_DIM][i % HEAD_DIM] = to_float(q[head0 * HEAD_DIM + i]) * scale;
  const int* table = block_tables + (int64_t)seq * max_blocks;
  for (int r = threadIdx.x; r < n; r += kThreads) {
    const int pos = begin + r;
    slot_s[r] = table[pos / block_size] * block_size + pos % block_size;
  }
  __syncthreads();

  const int rg = threadIdx.x / kRowThreads, lane = threadIdx.x % kRowThreads;
  const int64_t row_stride = (int64_t)num_kv_heads * HEAD_DIM;
  const T* k_base = k_cache + kv_head * HEAD_DIM + lane * kVec;
  const T* v_base = v_cache + kv_head * HEAD_DIM + lane * kVec;

  float m[GROUP], l[GROUP], acc[GROUP][kVec];
#pragma unroll
  for (int g = 0; g < GROUP; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int j = 0; j < kVec; ++j) acc[g][j] = 0.f;
  }

  // every thread runs every tile (rows past the split masked), so the shuffles always see full warps
  for (int base = 0; base < n; base += kTile) {
    Vec16<T> kr[kUnroll], vr[kUnroll];
    bool valid[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int r = base + u * kRowsPerPass + rg;
      valid[u] = r < n;
      if (valid[u]) {
        const int64_t off = (int64_t)slot_s[r] * row_stride;
        kr[u] = load16(k_base + off);
        vr[u] = load16(v_base + off);
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) kr[u].v[j] = vr[u].v[j] = from_float<T>(0.f);
      }
    }
    float s[kUnroll][GROUP];
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) s[u][g] = 0.f;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float qj = q_s[g][lane * kVec + j];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) s[u][g] += qj * to_float(kr[u].v[j]);
      }
    }
#pragma unroll
    for (int g = 0; g < GROUP; ++g)
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
#pragma unroll
        for (int o = kRowThreads / 2; o > 0; o >>= 1) s[u][g] += __shfl_xor_sync(0xffffffffu, s[u][g], o, kRowThreads);

#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
      float m_new = m[g];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) m_new = valid[u] ? fmaxf(m_new, s[u][g]) : m_new;
      const float c = rescale(m[g], m_new);  // the accumulator's rescale as the max grows
      float p[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) p[u] = valid[u] ? __expf(s[u][g] - m_new) : 0.f;
      float lg = l[g] * c;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) lg += p[u];
      l[g] = lg;
      m[g] = m_new;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        float a = acc[g][j] * c;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) a += p[u] * to_float(vr[u].v[j]);
        acc[g][j] = a;
      }
    }
  }

  // merge the row groups of each warp: (m, l, acc) pairs combined with shuffles
#pragma unroll
  for (int o = kRowThreads; o < 32; o <<= 1) {
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
      const float m_o = __shfl_xor_sync(0xffffffffu, m[g], o), l_o = __shfl_xor_sync(0xffffffffu, l[g], o);
      const float m_new = fmaxf(m[g], m_o);
      const float a = rescale(m[g], m_new), b = rescale(m_o, m_new);
      l[g] = l[g] * a + l_o * b;
#pragma unroll
      for (int j = 0; j < kVec; ++j) acc[g][j] = acc[g][j] * a + __shfl_xor_sync(0xffffffffu, acc[g][j], o) * b;
      m[g] = m_new;
    }
  }
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 < kRowThreads) {
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) acc_s[warp][g][lane * kVec + j] = acc[g][j];
      if (lane == 0) {
        m_s[warp][g] = m[g];
        l_s[warp][g] = l[g];
      }
    }
  }
  __syncthreads();

  // merge the warps: each thread finishes some (head, element) pairs
  for (int i = threadIdx.x; i < GROUP * HEAD_DIM; i += kThreads) {
    const int g = i / HEAD_DIM, d = i % HEAD_DIM;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, m_s[w][g]);
    float sum = 0.f, o = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float f = rescale(m_s[w][g], mx);
      sum += l_s[w][g] * f;
      o += acc_s[w][g][d] * f;
    }
    o = __fdividef(o, sum);  // sum is in [1, kSplit]: no slow-path division call (it made ptxas spill)
    const int64_t head = head0 + g;
    if (splits == 1) {
      out[head * HEAD_DIM + d] = from_float<T>(o);
    } else {
      part_out[(head * splits + split) * HEAD_DIM + d] = o;
      if (d == 0) {
        part_max[head * splits + split] = mx;
        part_sum[head * splits + split] = sum;
      }
    }
  }
}

// Combine splits: out = sum_p w_p o_p / sum_p w_p with w_p = sum_p * exp(max_p - max), over the splits
// that held tokens. Grid (seqs, heads), HEAD_DIM threads.
template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(HEAD_DIM) paged_attention_reduce(
    T* __restrict__ out, const float* __restrict__ part_out, const float* __restrict__ part_max,
    const float* __restrict__ part_sum, int splits) {
  const int64_t sh = (int64_t)blockIdx.x * gridDim.y + blockIdx.y;  // (seq, head)
  const float* pm = part_max + sh * splits;
  const float* ps = part_sum + sh * splits;
  float m = -INFINITY;
  for (int p = 0; p < splits; ++p) m = fmaxf(m, pm[p]);
  float total = 0.f;
  for (int p = 0; p < splits; ++p) total += ps[p] * rescale(pm[p], m);
  for (int d = threadIdx.x; d < HEAD_DIM; d += blockDim.x) {
    float o = 0.f;
    for (int p = 0; p < splits; ++p)  // an empty split wrote no output: never read it (0 * NaN is NaN)
      if (ps[p] > 0.f) o += part_out[(sh * splits + p) * HEAD_DIM + d] * ps[p] * __expf(pm[p] - m);
    out[sh * HEAD_DIM + d] = from_float<T>(o / total);
  }
}

#define INSTANTIATE_DECODE(T, D, G)                                                                           \
  template __global__ void paged_attention_decode<T, D, G>(T*, float*, float*, float*, const T*, const T*,    \
                                                           const T*, const int*, const int*, const int*, int, \
                                                           int, int, float);
#define INSTANTIATE(T, D)                                                                                      \
  INSTANTIATE_DECODE(T, D, 1) INSTANTIATE_DECODE(T, D, 2) INSTANTIATE_DECODE(T, D, 3)                          \
  INSTANTIATE_DECODE(T, D, 4) INSTANTIATE_DECODE(T, D, 5) INSTANTIATE_DECODE(T, D, 6)                          \
  INSTANTIATE_DECODE(T, D, 7) INSTANTIATE_DECODE(T, D, 8)                                                      \
  template __global__ void paged_attention_reduce<T, D>(T*, const float*, const float*, const float*, int);
INSTANTIATE(float, 64)
INSTANTIATE(float, 128)
INSTANTIATE(__half, 64)
INSTANTIATE(__half, 128)
INSTANTIATE(__nv_bfloat16, 64)
INSTANTIATE(__nv_bfloat16, 128)

}  // namespace scalellm
