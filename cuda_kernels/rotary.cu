// Rotary position embedding in the rotate-half layout, applied in place to q and k.
// cos/sin come from the model's cache ([max_positions, head_dim], already carrying any rope scaling,
// Llama 3's included), indexed by each token's position. One block per token. q and k may be views
// into the fused qkv projection: a token's heads are contiguous, tokens are q_stride / k_stride apart.
#include "common.cuh"

namespace scalellm {

template <typename T>
__global__ void rotary(T* __restrict__ q, T* __restrict__ k, const int64_t* __restrict__ positions,
                       const T* __restrict__ cos_cache, const T* __restrict__ sin_cache, int num_heads,
                       int num_kv_heads, int head_dim, int64_t q_stride, int64_t k_stride) {
  const int64_t token = blockIdx.x;
  const int half = head_dim / 2;
  const T* cs = cos_cache + positions[token] * head_dim;
  const T* sn = sin_cache + positions[token] * head_dim;
  const int pairs = (num_heads + num_kv_heads) * half;
  for (int i = threadIdx.x; i < pairs; i += blockDim.x) {
    const int head = i / half, d = i % half;
    T* base = head < num_heads ? q + token * q_stride + head * head_dim
                               : k + token * k_stride + (head - num_heads) * head_dim;
    const float x1 = to_float(base[d]), x2 = to_float(base[d + half]);
    // out = x * cos + rotate_half(x) * sin, each product rounded like the reference
    const float c1 = to_float(cs[d]), s1 = to_float(sn[d]);
    const float c2 = to_float(cs[d + half]), s2 = to_float(sn[d + half]);
    base[d] = from_float<T>(x1 * c1 - x2 * s1);
    base[d + half] = from_float<T>(x2 * c2 + x1 * s2);
  }
}

template __global__ void rotary<float>(float*, float*, const int64_t*, const float*, const float*, int, int, int, int64_t,
                                      int64_t);
template __global__ void rotary<__half>(__half*, __half*, const int64_t*, const __half*, const __half*, int, int,
                                        int, int64_t, int64_t);
template __global__ void rotary<__nv_bfloat16>(__nv_bfloat16*, __nv_bfloat16*, const int64_t*,
                                               const __nv_bfloat16*, const __nv_bfloat16*, int, int, int,
                                               int64_t, int64_t);

}  // namespace scalellm
