// Host build of CUDA kernels: the CUDA C++ the kernels in cuda_kernels/ use, implemented for one
// CPU thread so the unchanged sources compile with g++ and run on host memory.
//
// Every CUDA thread of a block is a fiber (its own stack); blocks run one at a time. A fiber runs
// until it reaches a barrier, a warp intrinsic or its end, then hands control back to the scheduler,
// which resumes ready fibers in the launch's thread order (forward, reverse or random), so a missing
// barrier shows up as a wrong result in at least one order. __syncthreads() releases once every
// live thread of the block has arrived (exited threads count as arrived); threads waiting at
// different barriers are reported. Warp intrinsics are meeting points of the lanes in the mask: the
// last lane to arrive computes every lane's result before any lane resumes. Shared memory is one
// buffer per block, filled with 0xFF bytes (NaN in every float type) before each block. A block in
// which no fiber can run any more is reported as a deadlock instead of hanging.
#pragma once

#include "simt_runtime.h"

// ---- the CUDA names the kernels use -------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __restrict__ __restrict
#define __launch_bounds__(...)

#define threadIdx (::simt::rt.current->idx)
#define blockIdx (::simt::rt.block_idx)
#define blockDim (::simt::rt.block_dim)
#define gridDim (::simt::rt.grid_dim)
constexpr int warpSize = 32;

#define __syncthreads() ::simt::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::simt::warp_meet(__FILE__, __LINE__, ::simt::Op::kSync, (__VA_ARGS__ + 0) ? (__VA_ARGS__ + 0u) : 0xffffffffu, 0, 0, 32)
#define __shfl_sync(mask, var, ...) ::simt::shfl_call(__FILE__, __LINE__, ::simt::Op::kShfl, mask, var, __VA_ARGS__)
#define __shfl_xor_sync(mask, var, ...) ::simt::shfl_call(__FILE__, __LINE__, ::simt::Op::kShflXor, mask, var, __VA_ARGS__)
#define __shfl_up_sync(mask, var, ...) ::simt::shfl_call(__FILE__, __LINE__, ::simt::Op::kShflUp, mask, var, __VA_ARGS__)
#define __shfl_down_sync(mask, var, ...) ::simt::shfl_call(__FILE__, __LINE__, ::simt::Op::kShflDown, mask, var, __VA_ARGS__)
#define __ballot_sync(mask, pred) ((unsigned)::simt::warp_meet(__FILE__, __LINE__, ::simt::Op::kBallot, mask, (pred) != 0, 0, 32))
#define __any_sync(mask, pred) ((int)::simt::warp_meet(__FILE__, __LINE__, ::simt::Op::kAny, mask, (pred) != 0, 0, 32))
#define __all_sync(mask, pred) ((int)::simt::warp_meet(__FILE__, __LINE__, ::simt::Op::kAll, mask, (pred) != 0, 0, 32))
#define __activemask() 0xffffffffu

namespace simt {
template <typename T>
inline T shfl_call(const char* f, int l, Op op, unsigned mask, T var, int arg, int width = 32) {
  return shfl(f, l, op, mask, var, arg, width);
}
}  // namespace simt

// __shared__ T name[dims]; is rewritten by the launcher to SIMT_SHARED(T, name, [dims]): every thread
// of the block gets the same per-block storage. extern __shared__ becomes SIMT_EXTERN_SHARED.
#define SIMT_SHARED(T, name, dims)   \
  static const char simt_site_##name = 0; \
  T(&name) dims = *reinterpret_cast<T(*) dims>(::simt::static_shared(&simt_site_##name, sizeof(T dims)))
#define __shared__ static  // only in headers the launcher does not rewrite: shared, but not reset per block
#define SIMT_EXTERN_SHARED(T, name) T* name = reinterpret_cast<T*>(::simt::dynamic_shared())

// One CPU thread runs every CUDA thread: read-modify-writes cannot interleave.
template <typename T> inline T atomicAdd(T* p, T v) { T old = *p; *p = old + v; return old; }
template <typename T> inline T atomicSub(T* p, T v) { T old = *p; *p = old - v; return old; }
template <typename T> inline T atomicExch(T* p, T v) { T old = *p; *p = v; return old; }
template <typename T> inline T atomicMax(T* p, T v) { T old = *p; *p = old > v ? old : v; return old; }
template <typename T> inline T atomicMin(T* p, T v) { T old = *p; *p = old < v ? old : v; return old; }
template <typename T> inline T atomicOr(T* p, T v) { T old = *p; *p = old | v; return old; }
template <typename T> inline T atomicAnd(T* p, T v) { T old = *p; *p = old & v; return old; }
template <typename T> inline T atomicCAS(T* p, T cmp, T v) { T old = *p; if (old == cmp) *p = v; return old; }
inline void __threadfence() {}
inline void __threadfence_block() {}
template <typename T> inline T __ldg(const T* p) { return *p; }

// Device math: the fast-math intrinsics as their accurate host functions.
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.f / x; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
inline unsigned __float_as_uint(float x) { unsigned i; std::memcpy(&i, &x, 4); return i; }
inline float __int_as_float(int i) { float x; std::memcpy(&x, &i, 4); return x; }
inline float __uint_as_float(unsigned i) { float x; std::memcpy(&x, &i, 4); return x; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }
template <typename A, typename B> inline std::common_type_t<A, B> min(A a, B b) { return b < a ? b : a; }
template <typename A, typename B> inline std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }
