// Attention for prefill and chunked prefill over the paged cache: many sequences of different
// lengths in one launch, causal, GQA. The chunk's own keys and values are written to the cache
// first (kv_write), so every query reads its whole context from the cache.
//
// Tiled: grid (tiles, kv_heads). A tile is up to kTileQ consecutive query tokens of one chunk (the host
// builds the list, kernel_arrays in scalellm/ops/attention_metadata.py: chunk, first token among the step's
// prefill tokens, token count, position of the first token); a block takes one tile for one KV head and all
// GROUP query heads of that KV head (GROUP, the GQA group size, is a template parameter). The block streams
// the tile's context [first key any of its queries sees, last query's position] once, kTileK keys at a time,
// through shared memory (16-byte loads, cache slots from the chunk's block table); every query of the tile
// and every head of the group reads the same K/V from there, where the untiled kernel re-read the context
// from the cache once per (query, head).
//
// One warp per query head of the group; within it two lanes per query token (lane = 2 * token + half),
// each holding half of the head's query and of its running output in registers (HEAD_DIM / 2 floats
// each, at compile-time indices), so a score is one shuffle away. Each (query, head) keeps an ONLINE
// softmax (running max m, running sum l, unnormalized output rescaled by exp(m_old - m_new)), updated
// every kSub keys; causal masking (and the sliding window: `window` > 0 limits a query to its last
// `window` positions) per query and key. Two barriers per pass of kTileK keys: after the loads, and
// before the next pass overwrites them.
//
// Why kTileQ = 16: 32 lanes per head make 16 tokens of two lanes; the block is then 32 * GROUP threads
// (32..256), and the K/V of the context is read from the cache once per 16 queries and GROUP heads instead
// of once per (query, head). A 32-token tile would need 64 threads per head (512 for a group of 8), and
// the per-thread state (up to 128 floats of query and output for HEAD_DIM 128) would not fit 512 threads'
// registers without spilling (at 16, float at HEAD_DIM 128 already takes ~210 registers: one 256-thread
// block per SM for a group of 8); and a longer tile leaves more lanes idle at short chunks' ends.
#include "common.cuh"

namespace scalellm {

constexpr int kTileQ = 16;  // query tokens per tile: PREFILL_TILE in scalellm/ops/attention_metadata.py
constexpr int kTileK = 32;  // keys per pass through shared memory (float, HEAD_DIM 128: 2 x 16 KiB)
constexpr int kSub = 8;     // keys per online-softmax update (the output's rescale amortized over them)
constexpr int kMaxGroup = 8;
// Blocks per SM promised to ptxas: as many as leave each thread the full 255 registers (65536 per SM). With
// the block size alone, ptxas 13 picked 128 registers for some groups and spilled (float, HEAD_DIM 64:
// groups 3, 5, 7; float, HEAD_DIM 128, group 2); the state is 2 * HEAD_DIM / 2 floats per thread plus
// kSub scores, and ptxas uses up to about 210 for float at HEAD_DIM 128.
template <int GROUP>
struct PrefillMinBlocks {
  static constexpr int kValue = 65536 / 256 / (32 * GROUP) > 0 ? 65536 / 256 / (32 * GROUP) : 1;
};

// exp(m - m_max), 0 for a state that has seen no key (m = -inf), even when m_max is -inf too.
__device__ __forceinline__ float prefill_rescale(float m, float m_max) {
  return m == -INFINITY ? 0.f : __expf(m - m_max);
}

template <typename T, int HEAD_DIM, int GROUP>
__global__ void __launch_bounds__(32 * GROUP, PrefillMinBlocks<GROUP>::kValue) prefill_attention(
    T* __restrict__ out,                  // [tokens, heads, HEAD_DIM]
    const T* __restrict__ q,              // [tokens, heads, HEAD_DIM]
    const T* __restrict__ k_cache,        // [blocks, block_size, kv_heads, HEAD_DIM]
    const T* __restrict__ v_cache,
    const int* __restrict__ tiles,        // [tiles, 4]: chunk, first token, tokens (1..kTileQ), first position
    const int* __restrict__ block_tables, // [chunks, max_blocks]
    int max_blocks, int block_size, int num_kv_heads, int window, float scale) {
  constexpr int kThreads = 32 * GROUP;
  constexpr int kVec = 16 / sizeof(T);             // elements per 16-byte load
  constexpr int kRowVecs = HEAD_DIM / kVec;        // 16-byte vectors per K/V row
  constexpr int kHalf = HEAD_DIM / 2;              // elements of a head per lane
  constexpr int kHalfVecs = kHalf / kVec;
  static_assert(kHalf % kVec == 0, "unsupported head_dim");
  static_assert(GROUP >= 1 && GROUP <= kMaxGroup, "unsupported GQA group");
  static_assert(kTileK % kSub == 0, "a pass is whole updates");
  static_assert(2 * kTileQ == 32, "a warp is a tile's tokens, two lanes each");

  __shared__ Vec16<T> k_s[kTileK][kRowVecs];
  __shared__ Vec16<T> v_s[kTileK][kRowVecs];

  const int* tile = tiles + (int64_t)blockIdx.x * 4;
  const int chunk = tile[0], token0 = tile[1], count = tile[2], pos0 = tile[3];
  const int kv_head = blockIdx.y;
  const int g = threadIdx.x / 32, lane = threadIdx.x % 32, i = lane / 2, half = lane % 2;
  // lanes past the tile's last token mirror its last query (same mask, zero query) and write nothing
  const bool active = i < count;
  const int pos = pos0 + min(i, count - 1);
  const int first = window > 0 ? max(0, pos - window + 1) : 0;        // this query's first key
  const int begin = window > 0 ? max(0, pos0 - window + 1) : 0;       // the tile's first key
  const int end = pos0 + count;                                       // one past the tile's last key
  const int64_t head = (int64_t)kv_head * GROUP + g;
  const int64_t row = ((int64_t)(token0 + i) * num_kv_heads * GROUP + head) * HEAD_DIM + half * kHalf;

  float qv[kHalf], acc[kHalf];
#pragma unroll
  for (int c = 0; c < kHalfVecs; ++c) {
    Vec16<T> v;
    if (active) {
      v = load16(q + row + c * kVec);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) v.v[e] = from_float<T>(0.f);
    }
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      qv[c * kVec + e] = to_float(v.v[e]) * scale;
      acc[c * kVec + e] = 0.f;
    }
  }
  float m = -INFINITY, l = 0.f;

  const int* table = block_tables + (int64_t)chunk * max_blocks;
  const int64_t row_stride = (int64_t)num_kv_heads * HEAD_DIM;
  const T* k_base = k_cache + kv_head * HEAD_DIM;
  const T* v_base = v_cache + kv_head * HEAD_DIM;

  for (int base = begin; base < end; base += kTileK) {
    // K/V of keys [base, base + kTileK): keys past the tile's last query are zeros (never NaN from an
    // unwritten slot: a masked key's probability is 0, and 0 * NaN is NaN)
    for (int idx = threadIdx.x; idx < kTileK * kRowVecs; idx += kThreads) {
      const int r = idx / kRowVecs, c = idx % kRowVecs, t = base + r;
      if (t < end) {
        const int64_t off = ((int64_t)table[t / block_size] * block_size + t % block_size) * row_stride + c * kVec;
        k_s[r][c] = load16(k_base + off);
        v_s[r][c] = load16(v_base + off);
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) k_s[r][c].v[e] = v_s[r][c].v[e] = from_float<T>(0.f);
      }
    }
    __syncthreads();

    const int keys = min(kTileK, end - base);  // the same for the whole block: no divergence at the shuffles
#pragma unroll 1
    for (int j0 = 0; j0 < keys; j0 += kSub) {
      float s[kSub];
#pragma unroll
      for (int u = 0; u < kSub; ++u) s[u] = 0.f;
#pragma unroll
      for (int c = 0; c < kHalfVecs; ++c) {
#pragma unroll
        for (int u = 0; u < kSub; ++u) {
          const Vec16<T> kk = k_s[j0 + u][half * kHalfVecs + c];
#pragma unroll
          for (int e = 0; e < kVec; ++e) s[u] += qv[c * kVec + e] * to_float(kk.v[e]);
        }
      }
#pragma unroll
      for (int u = 0; u < kSub; ++u) s[u] += __shfl_xor_sync(0xffffffffu, s[u], 1);  // the other half

      bool valid[kSub];
      float m_new = m;
#pragma unroll
      for (int u = 0; u < kSub; ++u) {
        const int t = base + j0 + u;
        valid[u] = t >= first && t <= pos;  // causal, and the window
        m_new = valid[u] ? fmaxf(m_new, s[u]) : m_new;
      }
      const float corr = prefill_rescale(m, m_new);
      float p[kSub], lsum = l * corr;
#pragma unroll
      for (int u = 0; u < kSub; ++u) {
        p[u] = valid[u] ? __expf(s[u] - m_new) : 0.f;
        lsum += p[u];
      }
      l = lsum;
      m = m_new;
#pragma unroll
      for (int c = 0; c < kHalfVecs; ++c) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[c * kVec + e] *= corr;
#pragma unroll
        for (int u = 0; u < kSub; ++u) {
          const Vec16<T> vv = v_s[j0 + u][half * kHalfVecs + c];
#pragma unroll
          for (int e = 0; e < kVec; ++e) acc[c * kVec + e] += p[u] * to_float(vv.v[e]);
        }
      }
    }
    __syncthreads();  // every warp is done with this pass's K/V before the next one overwrites them
  }

  if (active) {
    const float inv = __fdividef(1.f, l);  // l >= 1 (the query's own key): no slow-path division
#pragma unroll
    for (int c = 0; c < kHalfVecs; ++c) {
      Vec16<T> o;
#pragma unroll
      for (int e = 0; e < kVec; ++e) o.v[e] = from_float<T>(acc[c * kVec + e] * inv);
      store16(out + row + c * kVec, o);
    }
  }
}

#define INSTANTIATE_PREFILL(T, D, G)                                                                         \
  template __global__ void prefill_attention<T, D, G>(T*, const T*, const T*, const T*, const int*, const int*, \
                                                      int, int, int, int, float);
#define INSTANTIATE(T, D)                                                                                    \
  INSTANTIATE_PREFILL(T, D, 1) INSTANTIATE_PREFILL(T, D, 2) INSTANTIATE_PREFILL(T, D, 3)                     \
  INSTANTIATE_PREFILL(T, D, 4) INSTANTIATE_PREFILL(T, D, 5) INSTANTIATE_PREFILL(T, D, 6)                     \
  INSTANTIATE_PREFILL(T, D, 7) INSTANTIATE_PREFILL(T, D, 8)
INSTANTIATE(float, 64)
INSTANTIATE(float, 128)
INSTANTIATE(__half, 64)
INSTANTIATE(__half, 128)
INSTANTIATE(__nv_bfloat16, 64)
INSTANTIATE(__nv_bfloat16, 128)

}  // namespace scalellm
