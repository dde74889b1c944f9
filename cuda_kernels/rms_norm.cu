// RMSNorm, optionally fused with the residual add: residual += x; out = norm(residual) * weight.
// One block per row; statistics in float32 (as transformers computes them), the sum rounded to T
// before normalizing so float32 runs match the reference bit for bit in structure.
#include "common.cuh"

namespace scalellm {

template <typename T, bool kResidual>
__device__ void rms_norm_row(T* __restrict__ out, T* __restrict__ residual, const T* __restrict__ x,
                             const T* __restrict__ weight, int hidden, float eps) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * hidden;
  T* rr = kResidual ? residual + row * hidden : nullptr;
  float sq = 0.f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    float v = to_float(xr[i]);
    if (kResidual) {
      T sum = from_float<T>(v + to_float(rr[i]));
      rr[i] = sum;
      v = to_float(sum);
    }
    sq += v * v;
  }
  const float inv = rsqrtf(block_sum(sq, scratch) / hidden + eps);
  const T* src = kResidual ? rr : xr;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    const T normed = from_float<T>(to_float(src[i]) * inv);
    out[row * hidden + i] = from_float<T>(to_float(weight[i]) * to_float(normed));
  }
}

template <typename T>
__global__ void rms_norm(T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ weight, int hidden,
                         float eps) {
  rms_norm_row<T, false>(out, nullptr, x, weight, hidden, eps);
}

template <typename T>
__global__ void add_rms_norm(T* __restrict__ out, T* __restrict__ residual, const T* __restrict__ x,
                             const T* __restrict__ weight, int hidden, float eps) {
  rms_norm_row<T, true>(out, residual, x, weight, hidden, eps);
}

#define INSTANTIATE(T)                                                                   \
  template __global__ void rms_norm<T>(T*, const T*, const T*, int, float);              \
  template __global__ void add_rms_norm<T>(T*, T*, const T*, const T*, int, float);
INSTANTIATE(float)
INSTANTIATE(__half)
INSTANTIATE(__nv_bfloat16)

}  // namespace scalellm
