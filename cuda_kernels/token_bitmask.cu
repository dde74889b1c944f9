// Grammar-constrained sampling: logits[rows[i], t] = -inf wherever bit t % 32 of bitmask[i, t / 32] is 0
// (least significant bit first, as llguidance writes the mask), in place.
// logits: rows of `vocab` elements, `row_stride` apart; rows: [masked rows] int32, distinct;
// bitmask: [masked rows, words] int32, words >= ceil(vocab / 32) (bits at or past vocab are ignored).
// One block per masked row, a thread per token: the 32 lanes of a warp share one mask word (a broadcast
// load), a word of all ones leaves its warp with nothing to write, and the stores are coalesced.
#include "common.cuh"

namespace scalellm {

template <typename T>
__global__ void apply_token_bitmask(T* __restrict__ logits, const int32_t* __restrict__ rows,
                                    const int32_t* __restrict__ bitmask, int vocab, int words, int64_t row_stride) {
  T* row = logits + (int64_t)rows[blockIdx.x] * row_stride;
  const int32_t* mask = bitmask + (int64_t)blockIdx.x * words;
  const T neg_inf = from_float<T>(-INFINITY);
  for (int t = threadIdx.x; t < vocab; t += blockDim.x) {
    const uint32_t bits = (uint32_t)mask[t >> 5];
    if (!((bits >> (t & 31)) & 1u)) row[t] = neg_inf;
  }
}

#define INSTANTIATE(T) \
  template __global__ void apply_token_bitmask<T>(T*, const int32_t*, const int32_t*, int, int, int64_t);
INSTANTIATE(float)
INSTANTIATE(__half)
INSTANTIATE(__nv_bfloat16)

}  // namespace scalellm
