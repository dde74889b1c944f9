// Mixture-of-experts routing and token permutation, around one GEMM per active expert (done by torch):
//   moe_route     softmax over the router logits (float32), top-k, optional renormalization; counts
//                 of (token, expert) pairs per expert
//   moe_offsets   exclusive prefix sum of the counts: where each expert's rows start
//   moe_permute   a row slot for every (token, expert) pair, grouped by expert
//   moe_gather    the tokens' activations into those rows
//   moe_combine   each token's output: its experts' rows weighted by its routing weights, summed in
//                 ascending expert order and rounded to T at each step, as transformers adds them
//                 (Qwen also rounds the weight to T first; Mixtral keeps it in float32)
// Slots within an expert depend on the order threads run; every result does not.
#include "common.cuh"

namespace scalellm {

constexpr int kMaxTopK = 8;

// One thread per token.
template <typename T>
__global__ void moe_route(float* __restrict__ weights, int* __restrict__ experts, int* __restrict__ counts,
                          const T* __restrict__ logits, int tokens, int num_experts, int top_k, int renormalize) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= tokens) return;
  const T* row = logits + (int64_t)t * num_experts;
  float m = -INFINITY;
  for (int e = 0; e < num_experts; ++e) m = fmaxf(m, to_float(row[e]));
  float z = 0.f;
  for (int e = 0; e < num_experts; ++e) z += __expf(to_float(row[e]) - m);
  int chosen[kMaxTopK];
  float p[kMaxTopK];
  float total = 0.f;
  for (int j = 0; j < top_k; ++j) {  // the j-th largest; ties go to the lower expert id
    int best = -1;
    float best_v = -INFINITY;
    for (int e = 0; e < num_experts; ++e) {
      bool taken = false;
      for (int i = 0; i < j; ++i) taken |= chosen[i] == e;
      const float v = to_float(row[e]);
      if (!taken && (best < 0 || v > best_v)) {
        best = e;
        best_v = v;
      }
    }
    chosen[j] = best;
    p[j] = __expf(best_v - m) / z;
    total += p[j];
  }
  for (int j = 0; j < top_k; ++j) {
    experts[(int64_t)t * top_k + j] = chosen[j];
    weights[(int64_t)t * top_k + j] = renormalize ? p[j] / total : p[j];
    atomicAdd(counts + chosen[j], 1);
  }
}

// One thread: experts are few.
__global__ void moe_offsets(int* __restrict__ offsets, int* __restrict__ cursor, const int* __restrict__ counts,
                            int num_experts) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  int sum = 0;
  for (int e = 0; e < num_experts; ++e) {
    offsets[e] = sum;
    cursor[e] = sum;
    sum += counts[e];
  }
  offsets[num_experts] = sum;
}

// One thread per (token, expert) pair.
__global__ void moe_permute(int* __restrict__ slot_of_pair, int* __restrict__ token_of_slot, int* __restrict__ cursor,
                            const int* __restrict__ experts, int pairs, int top_k) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= pairs) return;
  const int slot = atomicAdd(cursor + experts[i], 1);
  slot_of_pair[i] = slot;
  token_of_slot[slot] = i / top_k;
}

// One block per row slot.
template <typename T>
__global__ void moe_gather(T* __restrict__ rows, const T* __restrict__ x, const int* __restrict__ token_of_slot,
                           int hidden) {
  const int64_t slot = blockIdx.x;
  const T* src = x + (int64_t)token_of_slot[slot] * hidden;
  for (int h = threadIdx.x; h < hidden; h += blockDim.x) rows[slot * hidden + h] = src[h];
}

// One block per token.
template <typename T>
__global__ void moe_combine(T* __restrict__ out, const T* __restrict__ rows, const int* __restrict__ slot_of_pair,
                            const int* __restrict__ experts, const float* __restrict__ weights, int top_k,
                            int hidden, int weights_in_dtype) {
  const int64_t t = blockIdx.x;
  int order[kMaxTopK];
  for (int j = 0; j < top_k; ++j) order[j] = j;
  for (int a = 1; a < top_k; ++a)  // by ascending expert id
    for (int b = a; b > 0 && experts[t * top_k + order[b]] < experts[t * top_k + order[b - 1]]; --b) {
      const int tmp = order[b];
      order[b] = order[b - 1];
      order[b - 1] = tmp;
    }
  for (int h = threadIdx.x; h < hidden; h += blockDim.x) {
    T acc = from_float<T>(0.f);
    for (int j = 0; j < top_k; ++j) {
      const int pair = t * top_k + order[j];
      const float w = weights_in_dtype ? to_float(from_float<T>(weights[pair])) : weights[pair];
      const T term = from_float<T>(w * to_float(rows[(int64_t)slot_of_pair[pair] * hidden + h]));
      acc = from_float<T>(to_float(acc) + to_float(term));
    }
    out[t * hidden + h] = acc;
  }
}

#define INSTANTIATE(T)                                                                                      \
  template __global__ void moe_route<T>(float*, int*, int*, const T*, int, int, int, int);                  \
  template __global__ void moe_gather<T>(T*, const T*, const int*, int);                                    \
  template __global__ void moe_combine<T>(T*, const T*, const int*, const int*, const float*, int, int, int);
INSTANTIATE(float)
INSTANTIATE(__half)
INSTANTIATE(__nv_bfloat16)

}  // namespace scalellm
