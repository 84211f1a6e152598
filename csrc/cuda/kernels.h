// fastmix CUDA kernels: per-domain loss statistics and the DoReMi update.
//
// Host-side launchers only; the kernels live in kernels.cu.  Every launcher takes raw device
// pointers and a stream, returns the cudaError_t of the launch, and expects arguments that
// bindings.cu has already validated.
#pragma once

#ifndef FASTMIX_CUDA_EMULATION
#include <cuda_runtime.h>
#endif

#include <cstdint>

namespace fastmix_cuda {

// Loss dtypes (fastmix.ops.cuda mirrors these codes).
enum LossDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
// Domain-id dtypes.
enum IdDtype : int { kInt32 = 0, kInt64 = 1 };

// 8 warps per block: the warp-private accumulators take 8 x 3 x K floats of shared memory,
// 96 KiB at the K limit below (opt-in shared memory on sm_80/sm_90 goes to 163/227 KiB).
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxDomains = 1024;
// The grid depends on the token count only (never on the card), so deterministic results are
// the same bits on every GPU; 512 blocks x 256 threads fill an H100 (132 SMs x 2048 threads).
constexpr int kMaxBlocks = 512;
// Tokens a warp loads before reducing: 4 independent loads per array in flight per lane.
constexpr int kUnroll = 4;

struct Inputs {
  const void* loss;      // [n] float32 / bfloat16 / float16
  const void* ref_loss;  // [n] same dtype, or nullptr (excess = 0)
  const void* domain;    // [n / seq_len] int32 / int64
  const uint8_t* mask;   // [n] bool, or nullptr (every token counts)
  int64_t n;             // tokens
  int64_t seq_len;       // tokens per domain id (1: per-token ids)
  int num_domains;       // K
  int loss_dtype;        // LossDtype
  int id_dtype;          // IdDtype
};

struct Update {
  float* state;          // [3, K]: alpha, excess (lambda), average alpha   (read and written)
  long long* counters;   // [3]: updates, skipped, out-of-range ids          (read and written)
  float* objective;      // [] the proxy objective
  float* aux;            // [4, K]: count, loss sum, excess sum, alpha used
  float step_size;       // eta
  float one_minus_c;     // (float)(1 - c), c the smoothing, formed in double like the torch path
  float c_over_k;        // (float)(c / K)
  bool dro;              // true: sum_i a_i L_i / n_i; false: sum_i a_i L_i / sum_i a_i n_i
};

// Blocks the statistics kernel launches for n tokens (a function of n only).
int grid_blocks(int64_t n);
// Bytes of the self-cleaning workspace: block counter, out-of-range accumulator, the [3, K]
// float accumulator and kMaxBlocks x [3, K] deterministic partials.  It must be zeroed once
// when allocated; every launch leaves it zeroed again.
int64_t workspace_bytes(int num_domains);
// Dynamic shared memory the statistics kernel needs for K domains.
int64_t shared_bytes(int num_domains);

// Statistics only: writes out_stats [3, K] and out_oob (one int64).  One launch.
cudaError_t launch_stats(const Inputs& in, float* out_stats, long long* out_oob, void* workspace,
                         bool deterministic, cudaStream_t stream);

// Statistics + DoReMi update + objective in ONE launch (grid-wide reduction finished by the
// last block to arrive); out-of-range ids are added to counters[2].
cudaError_t launch_fused_step(const Inputs& in, const Update& up, void* workspace,
                              bool deterministic, cudaStream_t stream);

// The update alone from finished [3, K] statistics (after an all-reduce).  One block.
cudaError_t launch_update(const float* stats, int num_domains, const Update& up,
                          cudaStream_t stream);

}  // namespace fastmix_cuda
