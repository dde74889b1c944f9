// Write new keys and values into their paged-cache slots (16-byte copies).
// k, v: [tokens, kv_heads, head_dim]; caches: [blocks, block_size, kv_heads, head_dim];
// slot_mapping[t] = block * block_size + offset, or -1 for a token that is not cached.
#include "common.cuh"

namespace scalellm {

template <typename T>
__global__ void kv_write(const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ k_cache,
                         T* __restrict__ v_cache, const int64_t* __restrict__ slot_mapping, int row_elems) {
  const int64_t token = blockIdx.x;
  const int64_t slot = slot_mapping[token];
  if (slot < 0) return;
  constexpr int N = Vec16<T>::N;
  const int vecs = row_elems / N;  // row_elems = kv_heads * head_dim, a multiple of N
  const T* ks = k + token * row_elems;
  const T* vs = v + token * row_elems;
  T* kd = k_cache + slot * row_elems;
  T* vd = v_cache + slot * row_elems;
  for (int i = threadIdx.x; i < vecs; i += blockDim.x) {
    store16(kd + i * N, load16(ks + i * N));
    store16(vd + i * N, load16(vs + i * N));
  }
}

template __global__ void kv_write<float>(const float*, const float*, float*, float*, const int64_t*, int);
template __global__ void kv_write<__half>(const __half*, const __half*, __half*, __half*, const int64_t*, int);
template __global__ void kv_write<__nv_bfloat16>(const __nv_bfloat16*, const __nv_bfloat16*, __nv_bfloat16*,
                                                 __nv_bfloat16*, const int64_t*, int);

}  // namespace scalellm
