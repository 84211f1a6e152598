// Runs the kernels of kernels.cu on the CPU under cuda_emulation.h (see that header).
//
//   harness INPUT OUTPUT
//
// INPUT (little-endian): int64 header[10] = {mode (0 statistics, 1 fused step, 2 update),
// n, seq_len, K, loss_dtype, id_dtype, has_ref, has_mask, deterministic, repeats}; float64
// {step_size, smoothing, dro}; then loss, ref_loss (if has_ref), domain ids, mask bytes (if
// has_mask), state [3, K] float32, counters [3] int64, stats [3, K] float32 (mode 2).
// OUTPUT, once per repeat: mode 0: stats [3, K] float32, out-of-range int64; modes 1 and 2:
// objective float32, aux [4, K] float32, state [3, K] float32, counters [3] int64.
// Repeats reuse the state and the workspace, which tests that each launch leaves it clean.
#include "cuda_emulation.h"

#include <cstdio>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>

#include "../kernels.cu"

using namespace fastmix_cuda;

namespace {

struct Reader {
  std::vector<char> bytes;
  size_t at = 0;
  template <typename T>
  std::vector<T> take(size_t count) {
    const size_t need = count * sizeof(T);
    if (at + need > bytes.size()) throw std::runtime_error("input file is too short");
    std::vector<T> out(count);
    std::memcpy(out.data(), bytes.data() + at, need);
    at += need;
    return out;
  }
};

template <typename T, typename I>
void run_stats(const Inputs& in, float* out, long long* oob, void* workspace, bool deterministic,
               bool do_update, const Update& up) {
  const int blocks = grid_blocks(in.n);
  const Workspace ws = carve(workspace, in.num_domains);
  const bool narrow = in.n <= static_cast<int64_t>(UINT32_MAX);
  emu::launch(blocks, kThreads, static_cast<size_t>(shared_bytes(in.num_domains)), [&] {
    stats_kernel<T, I>(in, out, oob, ws, deterministic, do_update, up, narrow);
  });
}

template <typename T>
void dispatch_ids(const Inputs& in, float* out, long long* oob, void* ws, bool det, bool upd,
                  const Update& up) {
  if (in.id_dtype == kInt32) {
    run_stats<T, int32_t>(in, out, oob, ws, det, upd, up);
  } else {
    run_stats<T, int64_t>(in, out, oob, ws, det, upd, up);
  }
}

void dispatch(const Inputs& in, float* out, long long* oob, void* ws, bool det, bool upd,
              const Update& up) {
  if (in.loss_dtype == kFloat32) {
    dispatch_ids<float>(in, out, oob, ws, det, upd, up);
  } else if (in.loss_dtype == kBFloat16) {
    dispatch_ids<__nv_bfloat16>(in, out, oob, ws, det, upd, up);
  } else {
    dispatch_ids<__half>(in, out, oob, ws, det, upd, up);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: harness INPUT OUTPUT\n");
    return 2;
  }
  std::ifstream file(argv[1], std::ios::binary);
  Reader r{std::vector<char>(std::istreambuf_iterator<char>(file), {})};
  const auto h = r.take<int64_t>(10);
  const auto params = r.take<double>(3);
  const int mode = static_cast<int>(h[0]);
  const int64_t n = h[1], seq_len = h[2];
  const int k = static_cast<int>(h[3]);
  const int loss_dtype = static_cast<int>(h[4]), id_dtype = static_cast<int>(h[5]);
  const bool has_ref = h[6] != 0, has_mask = h[7] != 0, deterministic = h[8] != 0;
  const int repeats = static_cast<int>(h[9]);
  const size_t item = loss_dtype == kFloat32 ? 4 : 2;
  const auto loss = r.take<char>(static_cast<size_t>(n) * item);
  const auto ref = r.take<char>(has_ref ? static_cast<size_t>(n) * item : 0);
  const auto domain = r.take<char>(static_cast<size_t>(n / seq_len) * (id_dtype == kInt32 ? 4 : 8));
  const auto mask = r.take<uint8_t>(has_mask ? static_cast<size_t>(n) : 0);
  auto state = r.take<float>(3 * static_cast<size_t>(k));
  auto counters = r.take<long long>(3);
  const auto stats = r.take<float>(mode == 2 ? 3 * static_cast<size_t>(k) : 0);

  Inputs in;
  in.loss = loss.data();
  in.ref_loss = has_ref ? ref.data() : nullptr;
  in.domain = domain.data();
  in.mask = has_mask ? mask.data() : nullptr;
  in.n = n;
  in.seq_len = seq_len;
  in.num_domains = k;
  in.loss_dtype = loss_dtype;
  in.id_dtype = id_dtype;

  float objective = 0.0f;
  std::vector<float> aux(4 * static_cast<size_t>(k));
  Update up;
  up.state = state.data();
  up.counters = counters.data();
  up.objective = &objective;
  up.aux = aux.data();
  up.step_size = static_cast<float>(params[0]);
  up.one_minus_c = static_cast<float>(1.0 - params[1]);
  up.c_over_k = static_cast<float>(params[1] / static_cast<double>(k));
  up.dro = params[2] != 0.0;

  std::vector<uint64_t> workspace(static_cast<size_t>(workspace_bytes(k)) / 8 + 1, 0);
  std::ofstream out(argv[2], std::ios::binary);
  for (int rep = 0; rep < repeats; ++rep) {
    if (mode == 0) {
      std::vector<float> result(3 * static_cast<size_t>(k), -1.0f);
      long long oob = -1;
      dispatch(in, result.data(), &oob, workspace.data(), deterministic, false, up);
      out.write(reinterpret_cast<const char*>(result.data()), result.size() * 4);
      out.write(reinterpret_cast<const char*>(&oob), 8);
    } else {
      if (mode == 1) {
        dispatch(in, nullptr, nullptr, workspace.data(), deterministic, true, up);
      } else {
        emu::launch(1, kThreads, 5 * static_cast<size_t>(k) * sizeof(float),
                    [&] { update_kernel(stats.data(), k, up); });
      }
      out.write(reinterpret_cast<const char*>(&objective), 4);
      out.write(reinterpret_cast<const char*>(aux.data()), aux.size() * 4);
      out.write(reinterpret_cast<const char*>(state.data()), state.size() * 4);
      out.write(reinterpret_cast<const char*>(counters.data()), 24);
    }
  }
  return 0;
}
