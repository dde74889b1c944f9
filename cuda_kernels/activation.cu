// SiLU-and-multiply: out[t, i] = silu(x[t, i]) * x[t, n + i] for x = [gate | up] of width 2n.
#include "common.cuh"

namespace scalellm {

template <typename T>
__global__ void silu_mul(T* __restrict__ out, const T* __restrict__ x, int64_t tokens, int n) {
  const int64_t total = tokens * n;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t t = i / n, c = i % n;
    const float g = to_float(x[t * 2 * n + c]);
    const float u = to_float(x[t * 2 * n + n + c]);
    // silu rounded to T before the product, as torch computes F.silu(gate) * up
    out[i] = from_float<T>(to_float(from_float<T>(g / (1.f + __expf(-g)))) * u);
  }
}

template __global__ void silu_mul<float>(float*, const float*, int64_t, int);
template __global__ void silu_mul<__half>(__half*, const __half*, int64_t, int);
template __global__ void silu_mul<__nv_bfloat16>(__nv_bfloat16*, const __nv_bfloat16*, int64_t, int);

}  // namespace scalellm
