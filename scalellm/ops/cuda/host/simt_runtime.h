// The host build's runtime: fibers, the block scheduler, barriers, warp meeting points, shared
// memory and the launch. simt.h puts CUDA's names on top of it.
#pragma once

// The CUDA headers compile as host C++ (with their host conversions) when included first.
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace simt {

enum class State { kReady, kBarrier, kWarp, kDone };
enum class Op { kShfl, kShflXor, kShflUp, kShflDown, kBallot, kAny, kAll, kSync };

constexpr size_t kStackBytes = 128 << 10;
constexpr size_t kGuardBytes = 4096;
constexpr size_t kMaxSharedBytes = 48 << 10;  // what a block gets without opting in to more

struct Thread {
  uint3 idx;
  int linear = 0;
  State state = State::kReady;
  const char* file = nullptr;  // where the thread waits (barrier or warp intrinsic)
  int line = 0;
  bool started = false;
  // warp intrinsic exchange
  Op op = Op::kSync;
  unsigned mask = 0;
  uint64_t value = 0, result = 0;
  int arg = 0, width = 32;
  jmp_buf env;
  ucontext_t context;
  char* stack = nullptr;
};

struct Runtime {
  std::vector<Thread> threads;
  std::vector<char*> stacks;
  Thread* current = nullptr;
  jmp_buf scheduler;
  ucontext_t scheduler_context;
  std::function<void()> body;
  int live = 0, at_barrier = 0;
  std::string error;
  uint3 block_idx;
  dim3 block_dim, grid_dim;
  std::vector<char> shared;  // [dynamic | static slots], alignment 16
  size_t dynamic_bytes = 0, shared_used = 0;
  std::vector<std::pair<const void*, size_t>> slots;  // static __shared__ site -> offset
};

inline Runtime rt;

inline void fail(const std::string& message) {
  if (rt.error.empty()) rt.error = message;
}

inline std::string where(const Thread& t) {
  return std::string(t.file ? t.file : "?") + ":" + std::to_string(t.line);
}

// ---- fibers ---------------------------------------------------------------------------------------

inline void yield() {
  if (!_setjmp(rt.current->env)) _longjmp(rt.scheduler, 1);
}

inline void fiber_main() {
  rt.body();
  rt.current->state = State::kDone;
  --rt.live;
  _longjmp(rt.scheduler, 1);
}

inline void resume(Thread& t) {
  rt.current = &t;
  if (!_setjmp(rt.scheduler)) {
    if (!t.started) {
      t.started = true;
      getcontext(&t.context);
      t.context.uc_stack.ss_sp = t.stack;
      t.context.uc_stack.ss_size = kStackBytes;
      t.context.uc_link = nullptr;
      makecontext(&t.context, fiber_main, 0);
      swapcontext(&rt.scheduler_context, &t.context);
    } else {
      _longjmp(t.env, 1);
    }
  }
}

// ---- barriers and warp intrinsics -----------------------------------------------------------------

inline void release_barrier_if_complete() {
  if (rt.live == 0 || rt.at_barrier != rt.live) return;
  const Thread* first = nullptr;
  for (Thread& t : rt.threads) {
    if (t.state != State::kBarrier) continue;
    if (first && (t.line != first->line || std::strcmp(t.file, first->file) != 0))
      fail("__syncthreads: threads " + std::to_string(first->linear) + " and " + std::to_string(t.linear) +
           " wait at different barriers (" + where(*first) + " and " + where(t) + ")");
    first = first ? first : &t;
    t.state = State::kReady;
  }
  rt.at_barrier = 0;
}

inline void syncthreads(const char* file, int line) {
  Thread* t = rt.current;
  t->state = State::kBarrier;
  t->file = file;
  t->line = line;
  ++rt.at_barrier;
  release_barrier_if_complete();
  yield();
}

inline int lane_of(const Thread& t) { return t.linear & 31; }

inline uint64_t warp_result(const Thread& t, Thread* lanes[32]) {
  const int lane = lane_of(t), w = t.width, group = lane / w * w;
  int src = lane;
  switch (t.op) {
    case Op::kShfl: src = group + (t.arg % w + w) % w; break;
    case Op::kShflXor: src = lane ^ t.arg; if (src / w > lane / w) src = lane; break;
    case Op::kShflUp: src = lane - t.arg; if (src < group) src = lane; break;
    case Op::kShflDown: src = lane + t.arg; if (src >= group + w) src = lane; break;
    case Op::kBallot: case Op::kAny: case Op::kAll: case Op::kSync: {
      unsigned ballot = 0;
      for (int l = 0; l < 32; ++l)
        if (lanes[l] && (t.mask >> l & 1u) && lanes[l]->value) ballot |= 1u << l;
      if (t.op == Op::kBallot) return ballot;
      if (t.op == Op::kAny) return ballot != 0;
      if (t.op == Op::kAll) return ballot == (t.mask & [&] { unsigned m = 0; for (int l = 0; l < 32; ++l) if (lanes[l]) m |= 1u << l; return m; }());
      return 0;
    }
  }
  if (!lanes[src] || !(t.mask >> src & 1u)) {
    fail("warp shuffle at " + where(t) + ": lane " + std::to_string(lane) + " reads lane " + std::to_string(src) +
         ", which is not in the mask");
    return 0;
  }
  return lanes[src]->value;
}

// All lanes of the caller's warp named in its mask have arrived: compute every result, release them.
inline void complete_warp_if_ready(Thread* me) {
  Thread* lanes[32] = {};
  const int base = me->linear & ~31;
  for (int l = 0; l < 32 && base + l < (int)rt.threads.size(); ++l) lanes[l] = &rt.threads[base + l];
  for (int l = 0; l < 32; ++l) {
    if (!(me->mask >> l & 1u)) continue;
    if (!lanes[l]) {
      fail("warp intrinsic at " + where(*me) + ": mask names lane " + std::to_string(l) +
           ", which the block does not have");
      return;
    }
    if (lanes[l]->state == State::kDone) {
      fail("warp intrinsic at " + where(*me) + ": lane " + std::to_string(l) + " named in the mask has exited");
      return;
    }
    if (lanes[l]->state != State::kWarp) return;  // not everyone yet
  }
  for (int l = 0; l < 32; ++l) {
    if (!(me->mask >> l & 1u)) continue;
    Thread* o = lanes[l];
    if (o->line != me->line || o->op != me->op || o->mask != me->mask || std::strcmp(o->file, me->file) != 0) {
      fail("warp intrinsic: lanes " + std::to_string(lane_of(*me)) + " and " + std::to_string(l) +
           " meet at different intrinsics or masks (" + where(*me) + " and " + where(*o) + ")");
      return;
    }
  }
  for (int l = 0; l < 32; ++l)
    if (me->mask >> l & 1u) lanes[l]->result = warp_result(*lanes[l], lanes);
  for (int l = 0; l < 32; ++l)
    if (me->mask >> l & 1u) lanes[l]->state = State::kReady;
}

inline uint64_t warp_meet(const char* file, int line, Op op, unsigned mask, uint64_t value, int arg, int width) {
  Thread* t = rt.current;
  if (!(mask >> lane_of(*t) & 1u)) fail("warp intrinsic at " + std::string(file) + ":" + std::to_string(line) +
                                       ": the calling lane is not in the mask");
  if (width <= 0 || width > 32 || (width & (width - 1))) fail("warp shuffle width must be a power of 2 up to 32");
  t->state = State::kWarp;
  t->file = file;
  t->line = line;
  t->op = op;
  t->mask = mask;
  t->value = value;
  t->arg = arg;
  t->width = width;
  complete_warp_if_ready(t);
  yield();
  return t->result;
}

template <typename T>
inline uint64_t bits_of(T v) {
  static_assert(sizeof(T) <= 8, "warp shuffles move up to 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}

template <typename T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

template <typename T>
inline T shfl(const char* f, int l, Op op, unsigned mask, T var, int arg, int width) {
  return from_bits<T>(warp_meet(f, l, op, mask, bits_of(var), arg, width));
}

// ---- shared memory ---------------------------------------------------------------------------------

inline void* static_shared(const void* site, size_t bytes) {
  for (auto& [key, offset] : rt.slots)
    if (key == site) return rt.shared.data() + offset;
  const size_t offset = (rt.shared_used + 15) & ~size_t(15);
  if (offset + bytes > kMaxSharedBytes) {
    fail("shared memory: " + std::to_string(offset + bytes) + " bytes exceed the 48 KiB a block gets");
    static std::vector<char> overflow;
    overflow.assign(bytes, (char)0xFF);
    return overflow.data();
  }
  rt.shared_used = offset + bytes;
  rt.slots.emplace_back(site, offset);
  return rt.shared.data() + offset;
}

inline void* dynamic_shared() { return rt.shared.data(); }

// ---- the launch -------------------------------------------------------------------------------------

enum Order { kForward = 0, kReverse = 1, kRandom = 2 };

inline std::vector<int> ordering(int n, int order, std::mt19937_64& rng) {
  std::vector<int> v(n);
  for (int i = 0; i < n; ++i) v[i] = order == kReverse ? n - 1 - i : i;
  if (order == kRandom) std::shuffle(v.begin(), v.end(), rng);
  return v;
}

inline void run_block(int order, std::mt19937_64& rng) {
  const int n = rt.block_dim.x * rt.block_dim.y * rt.block_dim.z;
  rt.threads.assign(n, Thread());
  while ((int)rt.stacks.size() < n) {
    // a guard page below each stack: an overflow faults instead of corrupting the next fiber's stack
    void* p = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED || mprotect(p, kGuardBytes, PROT_NONE) != 0) {
      fail("cannot allocate fiber stacks");
      return;
    }
    rt.stacks.push_back(static_cast<char*>(p) + kGuardBytes);
  }
  for (int i = 0; i < n; ++i) {
    Thread& t = rt.threads[i];
    t.linear = i;
    t.idx = make_uint3(i % rt.block_dim.x, i / rt.block_dim.x % rt.block_dim.y, i / (rt.block_dim.x * rt.block_dim.y));
    t.stack = rt.stacks[i];
  }
  std::fill(rt.shared.begin(), rt.shared.end(), (char)0xFF);
  rt.slots.clear();
  rt.shared_used = rt.dynamic_bytes;
  rt.live = n;
  rt.at_barrier = 0;
  while (rt.live > 0 && rt.error.empty()) {
    bool ran = false;
    for (int i : ordering(n, order, rng)) {
      if (rt.threads[i].state != State::kReady) continue;
      resume(rt.threads[i]);
      ran = true;
      release_barrier_if_complete();  // an exit may complete a barrier
      if (!rt.error.empty()) return;
    }
    if (!ran && rt.live > 0) {
      std::string waits;
      for (const Thread& t : rt.threads)
        if (t.state == State::kBarrier || t.state == State::kWarp) {
          waits += " thread " + std::to_string(t.linear) + (t.state == State::kBarrier ? " at barrier " : " at warp intrinsic ") + where(t) + ";";
          if (waits.size() > 300) break;
        }
      fail("deadlock: no thread can run;" + waits);
    }
  }
}

struct Entry {
  int num_args;
  const size_t* arg_sizes;
  std::function<void(void**)> invoke;
};

template <typename... A, size_t... I>
inline void call(void (*f)(A...), void** args, std::index_sequence<I...>) {
  f(*static_cast<std::remove_cv_t<A>*>(args[I])...);
}

template <typename... A>
inline Entry entry(void (*f)(A...)) {
  static const size_t sizes[] = {sizeof(A)..., 0};
  return Entry{(int)sizeof...(A), sizes, [f](void** args) { call(f, args, std::index_sequence_for<A...>()); }};
}

inline int launch(const Entry& e, const unsigned* grid, const unsigned* block, size_t shared_bytes, void** args,
                  int num_args, const size_t* arg_sizes, int order, uint64_t seed, char* error, size_t error_len) {
  rt.error.clear();
  if (num_args != e.num_args) fail("kernel takes " + std::to_string(e.num_args) + " arguments, got " + std::to_string(num_args));
  for (int i = 0; rt.error.empty() && i < num_args; ++i)
    if (arg_sizes[i] != e.arg_sizes[i])
      fail("argument " + std::to_string(i) + ": the kernel expects " + std::to_string(e.arg_sizes[i]) +
           " bytes, got " + std::to_string(arg_sizes[i]));
  const unsigned threads = block[0] * block[1] * block[2];
  if (threads == 0 || threads > 1024) fail("block of " + std::to_string(threads) + " threads (1 to 1024)");
  if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0 || grid[1] > 65535 || grid[2] > 65535)
    fail("grid dimensions out of range");
  if (shared_bytes > kMaxSharedBytes) fail("dynamic shared memory above 48 KiB");
  if (rt.error.empty()) {
    rt.block_dim = dim3(block[0], block[1], block[2]);
    rt.grid_dim = dim3(grid[0], grid[1], grid[2]);
    rt.dynamic_bytes = (shared_bytes + 15) & ~size_t(15);
    rt.shared.assign(kMaxSharedBytes, (char)0xFF);
    rt.body = [&] { e.invoke(args); };
    std::mt19937_64 rng(seed);
    const long blocks = (long)grid[0] * grid[1] * grid[2];
    std::vector<long> block_order(blocks);
    for (long i = 0; i < blocks; ++i) block_order[i] = order == kReverse ? blocks - 1 - i : i;
    if (order == kRandom) std::shuffle(block_order.begin(), block_order.end(), rng);
    for (long b : block_order) {
      rt.block_idx = make_uint3(b % grid[0], b / grid[0] % grid[1], b / ((long)grid[0] * grid[1]));
      run_block(order, rng);
      if (!rt.error.empty()) break;
    }
  }
  if (rt.error.empty()) return 0;
  std::snprintf(error, error_len, "%s", rt.error.c_str());
  return 1;
}

}  // namespace simt

