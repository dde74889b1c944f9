// GGUF block-quantized weights (Q8_0 = 0, Q4_0 = 1, Q4_1 = 2), read as they are stored
// (scalellm/ops/quant/tensor.py): per row, each 32-element block's quantized bytes back to back in
// `qs` (Q8_0: 32 signed bytes; 4-bit: 16 bytes, low nibbles elements 0-15, high ones 16-31), its
// float16 scale in `d` and Q4_1's float16 minimum in `m`.
//   quant_gemm: out[:, col0 + n] = x @ W[n]^T (+ bias) (+ residual) for small batches. One warp per
//     weight row; lane j dequantizes element j of each block in registers and multiplies it into up
//     to kRows rows of x (float accumulation), then the warp sums.
//   quant_dequant_rows: rows ids[] of W in T (the embedding lookup, and the whole weight for large
//     batches, which then go through a dense GEMM).
#include "common.cuh"

namespace scalellm {

constexpr int kBlock = 32;
constexpr int kRows = 4;  // rows of x per pass over a weight row (grid.y covers the batch)

template <int F>
__device__ __forceinline__ float dequant(const uint8_t* __restrict__ qs, const __half* __restrict__ d,
                                         const __half* __restrict__ m, int64_t block, int j) {
  const float scale = __half2float(d[block]);
  if (F == 0) return scale * (float)((const int8_t*)qs)[block * 32 + j];
  const uint8_t byte = qs[block * 16 + (j & 15)];
  const int q = j < 16 ? (byte & 15) : (byte >> 4);
  if (F == 1) return scale * (float)(q - 8);
  return scale * (float)q + __half2float(m[block]);
}

template <int F, typename T>
__global__ void quant_gemm(T* __restrict__ out, const T* __restrict__ x, const uint8_t* __restrict__ qs,
                           const __half* __restrict__ d, const __half* __restrict__ m,
                           const T* __restrict__ bias, const T* __restrict__ residual, int has_bias,
                           int has_residual, int rows, int n_out, int k, int64_t out_stride, int col0) {
  const int lane = threadIdx.x & 31;
  const int n = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int r0 = blockIdx.y * kRows;
  if (n >= n_out) return;  // the whole warp leaves together
  const int nb = k / kBlock;
  float acc[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = 0.f;
  for (int b = 0; b < nb; ++b) {
    const float w = dequant<F>(qs, d, m, (int64_t)n * nb + b, lane);
#pragma unroll
    for (int r = 0; r < kRows; ++r)
      if (r0 + r < rows) acc[r] += w * to_float(x[(int64_t)(r0 + r) * k + b * kBlock + lane]);
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const float v = warp_sum(acc[r]);
    if (lane == 0 && r0 + r < rows) {
      const int64_t at = (int64_t)(r0 + r) * out_stride + col0 + n;
      float total = v;
      if (has_bias) total += to_float(bias[n]);
      if (has_residual) total += to_float(residual[at]);
      out[at] = from_float<T>(total);
    }
  }
}

template <int F, typename T>
__global__ void quant_dequant_rows(T* __restrict__ out, const uint8_t* __restrict__ qs, const __half* __restrict__ d,
                                   const __half* __restrict__ m, const int64_t* __restrict__ ids, int rows, int k) {
  const int64_t total = (int64_t)rows * k;
  const int nb = k / kBlock;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / k;
    const int c = (int)(i % k);
    out[i] = from_float<T>(dequant<F>(qs, d, m, ids[r] * nb + c / kBlock, c % kBlock));
  }
}

#define SCALELLM_QUANT(F, T)                                                                                  \
  template __global__ void quant_gemm<F, T>(T*, const T*, const uint8_t*, const __half*, const __half*,    \
                                            const T*, const T*, int, int, int, int, int, int64_t, int);     \
  template __global__ void quant_dequant_rows<F, T>(T*, const uint8_t*, const __half*, const __half*,      \
                                                    const int64_t*, int, int);
#define SCALELLM_QUANT_TYPES(F) \
  SCALELLM_QUANT(F, float)      \
  SCALELLM_QUANT(F, __half)     \
  SCALELLM_QUANT(F, __nv_bfloat16)
SCALELLM_QUANT_TYPES(0)
SCALELLM_QUANT_TYPES(1)
SCALELLM_QUANT_TYPES(2)

}  // namespace scalellm
