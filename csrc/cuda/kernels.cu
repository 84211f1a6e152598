// Per-domain loss statistics and the DoReMi update (see kernels.h for the contract).
//
// Statistics: each warp reads 32 consecutive tokens at a time and reduces them per domain with a
// fixed shuffle tree (one round per distinct domain among the 32 lanes: usually one, since ids
// come per sequence), into warp-private shared accumulators.  Every sum is formed in an order
// fixed by the token layout alone.  A block then sums its 8 warps in order and either stores a
// partial (deterministic) or adds it to a global accumulator with float atomics (fast).
//
// The last block to finish (a device-wide ticket after __threadfence) reduces the partials or
// reads the accumulator, re-zeroes the workspace for the next launch (so it works under CUDA-graph
// replay), and, for the fused step, applies the DoReMi update: one kernel launch in all.

#ifndef FASTMIX_CUDA_EMULATION  // tests/ compiles the kernels on the CPU with an emulation header
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include <cmath>

#include "kernels.h"

#ifndef FASTMIX_DYNAMIC_SHARED
#define FASTMIX_DYNAMIC_SHARED(name) extern __shared__ float name[]
#endif

namespace fastmix_cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;

struct Workspace {
  unsigned* ticket;              // blocks finished in this launch
  unsigned long long* oob;       // out-of-range ids seen in this launch
  float* acc;                    // [3, K] float-atomic accumulator
  float* partials;               // [kMaxBlocks, 3, K] deterministic partials
};

int64_t align16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

Workspace carve(void* base, int num_domains) {
  char* p = static_cast<char*>(base);
  Workspace ws;
  ws.ticket = reinterpret_cast<unsigned*>(p);
  ws.oob = reinterpret_cast<unsigned long long*>(p + 8);
  ws.acc = reinterpret_cast<float*>(p + 16);
  ws.partials = reinterpret_cast<float*>(p + align16(16 + 12LL * num_domains));
  return ws;
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// Adds each lane's (1, loss, excess) to its domain's warp-private accumulator.  Lanes with
// domain < 0 (masked or out of range) add nothing.  One round per distinct domain present;
// within a round, a fixed xor-shuffle tree, so the result does not depend on scheduling.
__device__ __forceinline__ void warp_aggregate(float* wacc, int num_domains, int domain,
                                               float loss, float excess, int lane) {
  unsigned pending = __ballot_sync(kFullMask, domain >= 0);
  while (pending != 0u) {  // warp-uniform: every lane sees the same `pending`
    const int leader = __ffs(pending) - 1;
    const int target = __shfl_sync(kFullMask, domain, leader);
    const bool mine = domain == target;
    const unsigned members = __ballot_sync(kFullMask, mine);
    float c = mine ? 1.0f : 0.0f;
    float s = mine ? loss : 0.0f;  // select, not multiply: a NaN elsewhere stays elsewhere
    float x = mine ? excess : 0.0f;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      c += __shfl_xor_sync(kFullMask, c, offset);
      s += __shfl_xor_sync(kFullMask, s, offset);
      x += __shfl_xor_sync(kFullMask, x, offset);
    }
    if (lane == 0) {
      wacc[target] += c;
      wacc[num_domains + target] += s;
      wacc[2 * num_domains + target] += x;
    }
    pending &= ~members;
  }
}

// Block-wide sum/max, identical bits on every thread: xor tree per warp, then warps in order.
__device__ float block_sum(float v, float* s_red) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  __syncthreads();  // s_red may still be read by a previous reduction
  if ((threadIdx.x & 31) == 0) s_red[threadIdx.x >> 5] = v;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += s_red[w];
  return total;
}

__device__ float block_max(float v, float* s_red) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  __syncthreads();
  if ((threadIdx.x & 31) == 0) s_red[threadIdx.x >> 5] = v;
  __syncthreads();
  float total = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total = fmaxf(total, s_red[w]);
  return total;
}

// The DoReMi update by one block of kThreads threads, from [3, K] statistics in shared memory.
// Predicated on every statistic and every new weight being finite: otherwise nothing changes but
// counters[1] (skipped).  s_scratch holds 2K floats.
__device__ void update_phase(const float* s_stats, float* s_scratch, float* s_red, int num_domains,
                             const Update& up, unsigned long long oob_add) {
  const int k_count = num_domains;
  const float* count = s_stats;
  const float* loss_sum = s_stats + k_count;
  const float* excess_sum = s_stats + 2 * k_count;
  float* s_excess = s_scratch;
  float* s_value = s_scratch + k_count;  // logits, then the new weights
  float* alpha = up.state;
  float* excess = up.state + k_count;
  float* average = up.state + 2 * k_count;

  int bad = 0;
  float local_max = -INFINITY;
  for (int k = threadIdx.x; k < k_count; k += kThreads) {
    const float n = count[k], l = loss_sum[k], e = excess_sum[k];
    if (!isfinite(n) || !isfinite(l) || !isfinite(e)) bad = 1;
    // a domain absent from the batch keeps its previous excess
    const float lambda = n > 0.0f ? e / n : excess[k];
    const float logit = logf(alpha[k]) + up.step_size * lambda;  // softmax in log space
    s_excess[k] = lambda;
    s_value[k] = logit;
    local_max = fmaxf(local_max, logit);
  }
  const float shift = block_max(local_max, s_red);
  float local_sum = 0.0f;
  for (int k = threadIdx.x; k < k_count; k += kThreads) local_sum += expf(s_value[k] - shift);
  const float total = block_sum(local_sum, s_red);
  for (int k = threadIdx.x; k < k_count; k += kThreads) {
    const float weight = up.one_minus_c * (expf(s_value[k] - shift) / total) + up.c_over_k;
    if (!isfinite(weight)) bad = 1;
    s_value[k] = weight;
  }
  const bool ok = __syncthreads_or(bad) == 0;
  const long long updates = up.counters[0];  // read by all before thread 0 writes (syncs below)
  const float denom = static_cast<float>(updates + 1);
  float numer_local = 0.0f, weight_count_local = 0.0f;
  for (int k = threadIdx.x; k < k_count; k += kThreads) {
    const float used = ok ? s_value[k] : alpha[k];
    if (ok) {
      const float avg = average[k];
      alpha[k] = used;
      excess[k] = s_excess[k];
      average[k] = avg + (used - avg) / denom;  // mean over updates, initial alpha excluded
    }
    up.aux[k] = count[k];
    up.aux[k_count + k] = loss_sum[k];
    up.aux[2 * k_count + k] = excess_sum[k];
    up.aux[3 * k_count + k] = used;
    if (up.dro) {
      numer_local += count[k] > 0.0f ? used * loss_sum[k] / count[k] : 0.0f;
    } else {
      numer_local += used * loss_sum[k];
      weight_count_local += used * count[k];
    }
  }
  const float numer = block_sum(numer_local, s_red);
  const float weight_count = block_sum(weight_count_local, s_red);
  if (threadIdx.x == 0) {
    up.counters[0] = updates + (ok ? 1 : 0);
    up.counters[1] += ok ? 0 : 1;
    up.counters[2] += static_cast<long long>(oob_add);
    *up.objective = up.dro ? numer : numer / (weight_count > 0.0f ? weight_count : 1.0f);
  }
}

template <typename T, typename I>
__global__ void __launch_bounds__(kThreads)
    stats_kernel(Inputs in, float* out_stats, long long* out_oob, Workspace ws,
                 bool deterministic, bool do_update, Update up, bool narrow_index) {
  FASTMIX_DYNAMIC_SHARED(smem);
  __shared__ float s_red[kWarps];
  __shared__ bool s_last;
  const T* __restrict__ loss = static_cast<const T*>(in.loss);
  const T* __restrict__ ref = static_cast<const T*>(in.ref_loss);
  const I* __restrict__ domain = static_cast<const I*>(in.domain);
  const uint8_t* __restrict__ mask = in.mask;
  const int k_count = in.num_domains;
  const int acc_size = 3 * k_count;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;

  for (int i = threadIdx.x; i < kWarps * acc_size; i += kThreads) smem[i] = 0.0f;
  __syncthreads();
  float* wacc = smem + warp * acc_size;

  unsigned oob = 0;
  const int64_t span = 32 * kUnroll;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps * span;
  for (int64_t base = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * span; base < in.n;
       base += stride) {
    int ids[kUnroll];
    float losses[kUnroll], excesses[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t t = base + u * 32 + lane;
      ids[u] = -1;
      losses[u] = 0.0f;
      excesses[u] = 0.0f;
      if (t < in.n) {
        // issue every load before deciding, so they are in flight together
        const float x = to_float(loss[t]);
        const float r = ref != nullptr ? to_float(ref[t]) : x;
        const bool valid = mask == nullptr || mask[t] != 0;
        int64_t row = t;
        if (in.seq_len != 1) {
          row = narrow_index ? static_cast<int64_t>(static_cast<uint32_t>(t) /
                                                    static_cast<uint32_t>(in.seq_len))
                             : t / in.seq_len;
        }
        const int64_t id = static_cast<int64_t>(domain[row]);
        const bool in_range = id >= 0 && id < k_count;
        if (valid && !in_range) ++oob;  // counted, never written
        if (valid && in_range) {
          const float diff = x - r;
          ids[u] = static_cast<int>(id);
          losses[u] = x;
          // without ref_loss the excess is 0 (x - x would turn an inf loss into NaN);
          // `diff < 0` (not `diff > 0`) keeps a NaN difference NaN for the finite check
          excesses[u] = ref == nullptr ? 0.0f : (diff < 0.0f ? 0.0f : diff);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      warp_aggregate(wacc, k_count, ids[u], losses[u], excesses[u], lane);
  }

#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) oob += __shfl_xor_sync(kFullMask, oob, offset);
  if (lane == 0 && oob != 0u) atomicAdd(ws.oob, static_cast<unsigned long long>(oob));
  __syncthreads();

  // this block's [3, K]: its warps summed in order
  for (int i = threadIdx.x; i < acc_size; i += kThreads) {
    float v = 0.0f;
    for (int w = 0; w < kWarps; ++w) v += smem[w * acc_size + i];
    if (deterministic) {
      ws.partials[static_cast<int64_t>(blockIdx.x) * acc_size + i] = v;
    } else if (v != 0.0f) {  // absent domains cost no atomic; NaN != 0 still goes through
      atomicAdd(ws.acc + i, v);
    }
  }

  // Last block to arrive finishes.  Every thread fences its own writes, the barrier orders them
  // before thread 0, and thread 0 fences again (cumulative) before taking its ticket.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    s_last = atomicAdd(ws.ticket, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!s_last) return;
  __threadfence();

  float* s_stats = smem;  // the warp accumulators are no longer needed
  for (int i = threadIdx.x; i < acc_size; i += kThreads) {
    float v = 0.0f;
    if (deterministic) {
#pragma unroll 8
      for (int b = 0; b < static_cast<int>(gridDim.x); ++b)
        v += __ldcg(ws.partials + static_cast<int64_t>(b) * acc_size + i);
    } else {
      v = __ldcg(ws.acc + i);
      ws.acc[i] = 0.0f;  // ready for the next launch (and for CUDA-graph replay)
    }
    s_stats[i] = v;
    if (!do_update) out_stats[i] = v;
  }
  __shared__ unsigned long long s_oob;
  if (threadIdx.x == 0) {
    s_oob = atomicExch(ws.oob, 0ull);
    *ws.ticket = 0u;
    if (!do_update) *out_oob = static_cast<long long>(s_oob);
  }
  __syncthreads();
  if (do_update)
    update_phase(s_stats, smem + acc_size, s_red, k_count, up, s_oob);
}

__global__ void __launch_bounds__(kThreads)
    update_kernel(const float* stats, int num_domains, Update up) {
  FASTMIX_DYNAMIC_SHARED(smem);
  __shared__ float s_red[kWarps];
  for (int i = threadIdx.x; i < 3 * num_domains; i += kThreads) smem[i] = stats[i];
  __syncthreads();
  update_phase(smem, smem + 3 * num_domains, s_red, num_domains, up, 0ull);
}

#ifndef FASTMIX_CUDA_EMULATION
template <typename T, typename I>
cudaError_t launch_typed(const Inputs& in, float* out_stats, long long* out_oob, void* workspace,
                         bool deterministic, bool do_update, const Update& up,
                         cudaStream_t stream) {
  const int blocks = grid_blocks(in.n);
  const size_t smem = static_cast<size_t>(shared_bytes(in.num_domains));
  auto kernel = stats_kernel<T, I>;
  // The kernel's static shared memory (s_red, s_last, s_oob: 48 bytes) counts against the default
  // 48 KiB too: the default dynamic limit is 48 KiB minus it, so K = 512 (exactly 48 KiB of
  // dynamic memory) needs the opt-in as well.  Compare with the function's actual limit on this
  // device, and raise it to what the largest K needs: a fixed value, so a concurrent launch with
  // a smaller K never lowers the limit another launch relies on.
  cudaFuncAttributes attr;
  cudaError_t err = cudaFuncGetAttributes(&attr, kernel);
  if (err != cudaSuccess) return err;
  // (Until raised, the static part is also checked against 48 KiB directly: the launch fits
  // whichever way a driver reports the default dynamic limit, with or without it deducted.)
  const int64_t limit = attr.maxDynamicSharedSizeBytes;
  const int64_t dynamic = static_cast<int64_t>(smem);
  const bool fits = dynamic <= limit &&
                    (limit > 48 * 1024 ||
                     dynamic + static_cast<int64_t>(attr.sharedSizeBytes) <= 48 * 1024);
  if (!fits) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(shared_bytes(kMaxDomains)));
    if (err != cudaSuccess) return err;
  }
  const bool narrow = in.n <= static_cast<int64_t>(UINT32_MAX);
  kernel<<<blocks, kThreads, smem, stream>>>(in, out_stats, out_oob,
                                             carve(workspace, in.num_domains), deterministic,
                                             do_update, up, narrow);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_ids(const Inputs& in, float* out_stats, long long* out_oob, void* workspace,
                       bool deterministic, bool do_update, const Update& up,
                       cudaStream_t stream) {
  if (in.id_dtype == kInt32)
    return launch_typed<T, int32_t>(in, out_stats, out_oob, workspace, deterministic, do_update,
                                    up, stream);
  return launch_typed<T, int64_t>(in, out_stats, out_oob, workspace, deterministic, do_update, up,
                                  stream);
}

cudaError_t launch_any(const Inputs& in, float* out_stats, long long* out_oob, void* workspace,
                       bool deterministic, bool do_update, const Update& up,
                       cudaStream_t stream) {
  switch (in.loss_dtype) {
    case kFloat32:
      return launch_ids<float>(in, out_stats, out_oob, workspace, deterministic, do_update, up,
                               stream);
    case kBFloat16:
      return launch_ids<__nv_bfloat16>(in, out_stats, out_oob, workspace, deterministic,
                                       do_update, up, stream);
    default:
      return launch_ids<__half>(in, out_stats, out_oob, workspace, deterministic, do_update, up,
                                stream);
  }
}

#endif  // FASTMIX_CUDA_EMULATION

}  // namespace

int grid_blocks(int64_t n) {
  // at least 8 tokens per thread (2 rounds of kUnroll), so small batches use few blocks
  const int64_t per_block = static_cast<int64_t>(kThreads) * kUnroll * 2;
  const int64_t blocks = (n + per_block - 1) / per_block;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks));
}

int64_t workspace_bytes(int num_domains) {
  return align16(16 + 12LL * num_domains) + 12LL * num_domains * kMaxBlocks;
}

int64_t shared_bytes(int num_domains) {
  return static_cast<int64_t>(kWarps) * 3 * num_domains * static_cast<int64_t>(sizeof(float));
}

#ifndef FASTMIX_CUDA_EMULATION
cudaError_t launch_stats(const Inputs& in, float* out_stats, long long* out_oob, void* workspace,
                         bool deterministic, cudaStream_t stream) {
  Update none{};
  return launch_any(in, out_stats, out_oob, workspace, deterministic, false, none, stream);
}

cudaError_t launch_fused_step(const Inputs& in, const Update& up, void* workspace,
                              bool deterministic, cudaStream_t stream) {
  return launch_any(in, nullptr, nullptr, workspace, deterministic, true, up, stream);
}

cudaError_t launch_update(const float* stats, int num_domains, const Update& up,
                          cudaStream_t stream) {
  const size_t smem = 5 * static_cast<size_t>(num_domains) * sizeof(float);  // 20 KiB at K=1024
  update_kernel<<<1, kThreads, smem, stream>>>(stats, num_domains, up);
  return cudaGetLastError();
}
#endif  // FASTMIX_CUDA_EMULATION

}  // namespace fastmix_cuda
