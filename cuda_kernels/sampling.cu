// Fused sampling, one block per sequence: penalties, temperature, top-k, top-p, min-p, greedy or
// seeded sampling, and the logprobs of the chosen and top-N tokens (from the raw logits).
//
// Passes over the vocabulary: raw statistics (online max and sum), the penalized copy, the filtered
// statistics, a bisection per active filter (top-k, top-p: each pass counts or sums above a
// threshold), the draw, and one argmax per top-N logprob. The draw is the exponential race
// (argmax of p_i / E_i, E_i ~ Exp(1)) in log space, with E_i from a counter-based hash of
// (seed, sample index, output position, token): a sequence's tokens never depend on its batch mates.
#include "common.cuh"

namespace scalellm {

constexpr int kSampleThreads = 1024;
constexpr int kBisectSteps = 26;

__device__ __forceinline__ uint64_t mix64(uint64_t x) {
  x ^= x >> 31;
  x *= 0x7fb5d329728ea185ull;
  x ^= x >> 27;
  x *= 0x81dadef4bc2dd44dull;
  x ^= x >> 33;
  return x;
}

// A row's random stream: (request seed, sample index, output position) mixed on the device, as
// stream_keys in scalellm/ops/sampling_batch.py does (the CPU sampler's twin).
__device__ __forceinline__ uint64_t stream_key(uint64_t seed, uint64_t index, uint64_t position) {
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + index * 0xBF58476D1CE4E5B9ull + position * 0x94D049BB133111EBull;
  x ^= x >> 31;
  return x * 0xD6E8FEB86659FD93ull;
}

// Uniform in (0, 1] for one (stream, token).
__device__ __forceinline__ float uniform(uint64_t stream, int token) {
  const uint64_t h = mix64(stream ^ mix64((uint64_t)token + 0x9e3779b97f4a7c15ull));
  return ((float)(h >> 40) + 1.f) * (1.f / 16777216.f);
}

struct ArgMax {
  float value;
  int index;
};

__device__ __forceinline__ ArgMax better(ArgMax a, ArgMax b) {
  return (b.value > a.value || (b.value == a.value && b.index < a.index)) ? b : a;
}

__device__ ArgMax block_argmax(ArgMax x, float* values, int* indices) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    ArgMax other{__shfl_xor_sync(0xffffffffu, x.value, o), __shfl_xor_sync(0xffffffffu, x.index, o)};
    x = better(x, other);
  }
  __syncthreads();
  if (lane == 0) {
    values[warp] = x.value;
    indices[warp] = x.index;
  }
  __syncthreads();
  x = lane < (blockDim.x >> 5) ? ArgMax{values[lane], indices[lane]} : ArgMax{-INFINITY, 0x7fffffff};
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    ArgMax other{__shfl_xor_sync(0xffffffffu, x.value, o), __shfl_xor_sync(0xffffffffu, x.index, o)};
    x = better(x, other);
  }
  return x;
}

__global__ void __launch_bounds__(kSampleThreads) fused_sample(
    int64_t* __restrict__ out_tokens,       // [rows]
    float* __restrict__ out_logprob,        // [rows] logprob of the chosen token
    int64_t* __restrict__ top_ids,          // [rows, max_top]
    float* __restrict__ top_logprobs,       // [rows, max_top]
    float* __restrict__ work,               // [rows, vocab] scratch: the processed logits
    const float* __restrict__ logits,       // [rows, vocab]
    const float* __restrict__ temperature,  // [rows] 0: greedy
    const int* __restrict__ top_k,          // [rows] 0: off
    const float* __restrict__ top_p,        // [rows] 1: off
    const float* __restrict__ min_p,        // [rows] 0: off
    const float* __restrict__ presence, const float* __restrict__ frequency,
    const float* __restrict__ repetition,   // [rows] 1: off
    const int* __restrict__ pen_offsets,    // [rows + 1] CSR over (token, output count) pairs
    const int* __restrict__ pen_tokens, const int* __restrict__ pen_counts,
    const int* __restrict__ ban_offsets,    // [rows + 1] tokens masked out (stop tokens under min_tokens)
    const int* __restrict__ ban_tokens,
    const uint64_t* __restrict__ seeds,     // [rows] request seed
    const int64_t* __restrict__ indices,    // [rows] sample index within the request
    const int64_t* __restrict__ positions,  // [rows] output position of the token drawn
    const int* __restrict__ num_top,        // [rows] top-N logprobs wanted (-1: no logprobs)
    int vocab, int max_top) {
  __shared__ float scratch[32];
  __shared__ float arg_values[32];
  __shared__ int arg_indices[32];
  const int64_t row = blockIdx.x;
  const float* x = logits + row * vocab;
  float* w = work + row * vocab;

  // 1. raw log-normalizer, for logprobs
  float m = -INFINITY, s = 0.f;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float v = x[i];
    if (v > m) {
      s = s * __expf(m - v) + 1.f;
      m = v;
    } else {
      s += __expf(v - m);
    }
  }
  const float raw_max = block_max(m, scratch);
  const float raw_sum = block_sum(m == -INFINITY ? 0.f : s * __expf(m - raw_max), scratch);
  const float raw_log_z = raw_max + __logf(raw_sum);

  // 2. the processed copy: penalties and bans, then temperature
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) w[i] = x[i];
  __syncthreads();
  for (int j = pen_offsets[row] + threadIdx.x; j < pen_offsets[row + 1]; j += blockDim.x) {
    const int t = pen_tokens[j], c = pen_counts[j];
    float v = w[t];
    if (repetition[row] != 1.f) v = v > 0.f ? v / repetition[row] : v * repetition[row];
    if (c > 0) v -= frequency[row] * c + presence[row];
    w[t] = v;
  }
  __syncthreads();
  for (int j = ban_offsets[row] + threadIdx.x; j < ban_offsets[row + 1]; j += blockDim.x) w[ban_tokens[j]] = -INFINITY;
  __syncthreads();

  int chosen;
  const float temp = temperature[row];
  if (temp == 0.f) {
    ArgMax best{-INFINITY, 0x7fffffff};
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) best = better(best, ArgMax{w[i], i});
    chosen = block_argmax(best, arg_values, arg_indices).index;
  } else {
    const float inv_t = 1.f / temp;
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) mx = fmaxf(mx, w[i] * inv_t);
    mx = block_max(mx, scratch);
    // cut: the lowest scaled logit still allowed; min-p: p >= min_p * p_max  <=>  x >= max + log(min_p)
    float cut = min_p[row] > 0.f ? mx + __logf(min_p[row]) : -INFINITY;
    float lo = mx - 80.f;  // below this, e^(x - max) vanishes in float32
    if (top_k[row] > 0 && top_k[row] < vocab) {  // largest t with count(x >= t) >= k
      float a = lo, b = mx;
      for (int step = 0; step < kBisectSteps; ++step) {
        const float mid = 0.5f * (a + b);
        float c = 0.f;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) c += (w[i] * inv_t >= mid) ? 1.f : 0.f;
        if (block_sum(c, scratch) >= top_k[row]) a = mid; else b = mid;
      }
      cut = fmaxf(cut, a);
    }
    if (top_p[row] < 1.f) {  // largest t whose kept mass (above the cut so far) still reaches top_p
      float total = 0.f;
      for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = w[i] * inv_t;
        total += v >= cut ? __expf(v - mx) : 0.f;
      }
      total = block_sum(total, scratch);
      float a = fmaxf(cut, lo), b = mx;
      for (int step = 0; step < kBisectSteps; ++step) {
        const float mid = 0.5f * (a + b);
        float mass = 0.f;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
          const float v = w[i] * inv_t;
          mass += (v >= mid && v >= cut) ? __expf(v - mx) : 0.f;
        }
        if (block_sum(mass, scratch) >= top_p[row] * total) a = mid; else b = mid;
      }
      cut = fmaxf(cut, a);
    }
    // the draw: argmax over allowed tokens of log p_i - log E_i
    ArgMax best{-INFINITY, 0x7fffffff};
    const uint64_t stream = stream_key(seeds[row], (uint64_t)indices[row], (uint64_t)positions[row]);
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
      const float v = w[i] * inv_t;
      if (v >= cut && v > -INFINITY) {
        const float e = -__logf(uniform(stream, i));
        best = better(best, ArgMax{v - __logf(e), i});
      }
    }
    chosen = block_argmax(best, arg_values, arg_indices).index;
  }
  if (threadIdx.x == 0) {
    out_tokens[row] = chosen;
    out_logprob[row] = x[chosen] - raw_log_z;
  }

  // top-N logprobs from the raw logits, one argmax pass per rank
  const int n = min(num_top[row], max_top);
  float prev_value = INFINITY;
  int prev_index = -1;
  for (int r = 0; r < n; ++r) {
    ArgMax best{-INFINITY, 0x7fffffff};
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
      const float v = x[i];
      // strictly after the previous pick in (value desc, index asc) order
      if (v < prev_value || (v == prev_value && i > prev_index)) best = better(best, ArgMax{v, i});
    }
    best = block_argmax(best, arg_values, arg_indices);
    if (threadIdx.x == 0) {
      top_ids[row * max_top + r] = best.index;
      top_logprobs[row * max_top + r] = best.value - raw_log_z;
    }
    prev_value = best.value;
    prev_index = best.index;
  }
}

}  // namespace scalellm
