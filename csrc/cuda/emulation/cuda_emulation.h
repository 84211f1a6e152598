// A small CPU emulation of the CUDA features kernels.cu uses, so its kernels can be checked on a
// machine without a GPU (tests/test_ops_cuda_emulated.py).  Each CUDA thread of a block is an
// OS thread; blocks run one after another (a valid schedule: blocks only meet through global
// memory and atomics).  Warp shuffles and ballots exchange values through per-warp slots between
// two warp barriers, so a warp primitive reached by only part of a warp deadlocks (the test has a
// timeout) instead of silently passing.
#pragma once

#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#define FASTMIX_CUDA_EMULATION 1

typedef int cudaError_t;
typedef void* cudaStream_t;
constexpr int cudaSuccess = 0;

struct EmuDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local EmuDim3 threadIdx;
inline thread_local EmuDim3 blockIdx;
inline EmuDim3 gridDim;
inline EmuDim3 blockDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __restrict__ __restrict
// Blocks run one at a time, so a function-level static is exactly one block's shared memory.
#define __shared__ static

namespace emu {

class Barrier {
 public:
  void reset(int count) {
    count_ = count;
    waiting_ = 0;
    generation_ = 0;
  }
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const unsigned long generation = generation_;
    if (++waiting_ == count_) {
      waiting_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    cv_.wait(lock, [&] { return generation_ != generation; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int count_ = 0;
  int waiting_ = 0;
  unsigned long generation_ = 0;
};

constexpr int kMaxThreads = 1024;
inline Barrier block_barrier;
inline Barrier warp_barrier[kMaxThreads / 32];
inline uint64_t warp_slots[kMaxThreads / 32][32];
inline std::atomic<int> block_or{0};
inline std::mutex atomic_mutex;
inline float* dynamic_shared = nullptr;

inline int lane() { return static_cast<int>(threadIdx.x % 32); }
inline int warp() { return static_cast<int>(threadIdx.x / 32); }

template <typename T>
T exchange(T value, int source) {
  static_assert(sizeof(T) <= 8, "exchange of a value wider than 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  warp_slots[warp()][lane()] = bits;
  warp_barrier[warp()].wait();
  uint64_t got = warp_slots[warp()][source];
  warp_barrier[warp()].wait();  // nobody overwrites a slot before every lane has read
  T out;
  std::memcpy(&out, &got, sizeof(T));
  return out;
}

// Runs body() as grid x block threads; blocks in order.
inline void launch(unsigned grid, unsigned block, size_t shared_bytes,
                   const std::function<void()>& body) {
  gridDim.x = grid;
  blockDim.x = block;
  std::vector<float> shared(shared_bytes / sizeof(float) + 1);
  dynamic_shared = shared.data();
  for (unsigned b = 0; b < grid; ++b) {
    block_barrier.reset(static_cast<int>(block));
    for (unsigned w = 0; w < (block + 31) / 32; ++w) warp_barrier[w].reset(32);
    std::vector<std::thread> threads;
    threads.reserve(block);
    for (unsigned t = 0; t < block; ++t) {
      threads.emplace_back([b, t, &body] {
        blockIdx.x = b;
        threadIdx.x = t;
        body();
      });
    }
    for (auto& thread : threads) thread.join();
  }
}

}  // namespace emu

#define FASTMIX_DYNAMIC_SHARED(name) float* name = emu::dynamic_shared

inline void __syncthreads() { emu::block_barrier.wait(); }
inline int __syncthreads_or(int predicate) {
  emu::block_barrier.wait();
  if (predicate) emu::block_or.store(1);
  emu::block_barrier.wait();
  const int result = emu::block_or.load();
  emu::block_barrier.wait();
  if (threadIdx.x == 0) emu::block_or.store(0);
  emu::block_barrier.wait();
  return result;
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T>
T __shfl_sync(unsigned, T value, int source) {
  return emu::exchange(value, source);
}
template <typename T>
T __shfl_xor_sync(unsigned, T value, int mask) {
  return emu::exchange(value, emu::lane() ^ mask);
}
inline unsigned __ballot_sync(unsigned, int predicate) {
  const int w = emu::warp(), l = emu::lane();
  emu::warp_slots[w][l] = predicate ? 1u : 0u;
  emu::warp_barrier[w].wait();
  unsigned bits = 0;
  for (int src = 0; src < 32; ++src) bits |= static_cast<unsigned>(emu::warp_slots[w][src]) << src;
  emu::warp_barrier[w].wait();
  return bits;
}
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }

inline float atomicAdd(float* address, float value) {
  std::lock_guard<std::mutex> lock(emu::atomic_mutex);
  const float old = *address;
  *address = old + value;
  return old;
}
inline unsigned atomicAdd(unsigned* address, unsigned value) {
  std::lock_guard<std::mutex> lock(emu::atomic_mutex);
  const unsigned old = *address;
  *address = old + value;
  return old;
}
inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
  std::lock_guard<std::mutex> lock(emu::atomic_mutex);
  const unsigned long long old = *address;
  *address = old + value;
  return old;
}
inline unsigned long long atomicExch(unsigned long long* address, unsigned long long value) {
  std::lock_guard<std::mutex> lock(emu::atomic_mutex);
  const unsigned long long old = *address;
  *address = value;
  return old;
}
inline float __ldcg(const float* address) {
  std::lock_guard<std::mutex> lock(emu::atomic_mutex);
  return *address;
}

using std::isfinite;  // expf, logf, fmaxf come from the C math library in the global namespace

// 16-bit float types: storage plus the conversions the kernels use.
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.bits) << 16;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}
inline float __half2float(__half x) {
  const uint32_t sign = (x.bits & 0x8000u) << 16;
  const uint32_t exponent = (x.bits >> 10) & 0x1fu;
  const uint32_t mantissa = x.bits & 0x3ffu;
  float out;
  if (exponent == 0x1fu) {
    const uint32_t bits = sign | 0x7f800000u | (mantissa << 13);
    std::memcpy(&out, &bits, 4);
  } else if (exponent == 0) {
    out = std::ldexp(static_cast<float>(mantissa), -24);
    if (sign) out = -out;
  } else {
    const uint32_t bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    std::memcpy(&out, &bits, 4);
  }
  return out;
}
