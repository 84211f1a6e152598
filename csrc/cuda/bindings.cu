// fastmix._cuda: pybind11 bindings of the domain-statistics and DoReMi kernels.
//
// Every function takes device pointers as integers (tensor.data_ptr()), sizes, and the CUDA stream
// as an integer (torch.cuda.current_stream().cuda_stream), so the module never links libtorch.
// Arguments are validated here again (std::invalid_argument -> ValueError) before any memory is
// touched; launch errors raise RuntimeError with the CUDA error string.  Importing the module
// makes no CUDA call, so it imports on a machine without a GPU; status() says why it cannot run.

#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels.h"

namespace py = pybind11;
using fastmix_cuda::Inputs;
using fastmix_cuda::Update;

namespace {

void require(bool condition, const std::string& message) {
  if (!condition) throw std::invalid_argument(message);
}

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error state so the next call starts clean
    throw std::runtime_error(std::string(what) + " failed: " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

void check_pointer(uintptr_t ptr, uintptr_t alignment, const char* name) {
  require(ptr != 0, std::string(name) + " is a null pointer");
  require(ptr % alignment == 0,
          std::string(name) + " is not aligned to " + std::to_string(alignment) + " bytes");
}

int loss_itemsize(int dtype) { return dtype == fastmix_cuda::kFloat32 ? 4 : 2; }

Inputs make_inputs(uintptr_t loss, int loss_dtype, uintptr_t ref_loss, uintptr_t domain,
                   int id_dtype, uintptr_t mask, int64_t n, int64_t seq_len, int num_domains) {
  require(num_domains >= 1 && num_domains <= fastmix_cuda::kMaxDomains,
          "num_domains must be in [1, " + std::to_string(fastmix_cuda::kMaxDomains) + "], got " +
              std::to_string(num_domains));
  require(loss_dtype == fastmix_cuda::kFloat32 || loss_dtype == fastmix_cuda::kBFloat16 ||
              loss_dtype == fastmix_cuda::kFloat16,
          "loss_dtype must be 0 (float32), 1 (bfloat16) or 2 (float16), got " +
              std::to_string(loss_dtype));
  require(id_dtype == fastmix_cuda::kInt32 || id_dtype == fastmix_cuda::kInt64,
          "id_dtype must be 0 (int32) or 1 (int64), got " + std::to_string(id_dtype));
  require(n >= 0, "n must be >= 0, got " + std::to_string(n));
  require(seq_len >= 1, "seq_len must be >= 1, got " + std::to_string(seq_len));
  require(n % seq_len == 0, "n (" + std::to_string(n) + ") must be a multiple of seq_len (" +
                                std::to_string(seq_len) + ")");
  const uintptr_t item = static_cast<uintptr_t>(loss_itemsize(loss_dtype));
  if (n > 0) {
    check_pointer(loss, item, "loss");
    check_pointer(domain, id_dtype == fastmix_cuda::kInt32 ? 4 : 8, "domain");
    if (ref_loss != 0) check_pointer(ref_loss, item, "ref_loss");
  }
  Inputs in;
  in.loss = reinterpret_cast<const void*>(loss);
  in.ref_loss = reinterpret_cast<const void*>(ref_loss);
  in.domain = reinterpret_cast<const void*>(domain);
  in.mask = reinterpret_cast<const uint8_t*>(mask);
  in.n = n;
  in.seq_len = seq_len;
  in.num_domains = num_domains;
  in.loss_dtype = loss_dtype;
  in.id_dtype = id_dtype;
  return in;
}

void check_workspace(uintptr_t workspace, int64_t workspace_nbytes, int num_domains) {
  check_pointer(workspace, 16, "workspace");
  const int64_t need = fastmix_cuda::workspace_bytes(num_domains);
  require(workspace_nbytes >= need, "workspace has " + std::to_string(workspace_nbytes) +
                                        " bytes, needs " + std::to_string(need));
}

Update make_update(uintptr_t state, uintptr_t counters, uintptr_t objective, uintptr_t aux,
                   int num_domains, double step_size, double smoothing, bool dro) {
  require(std::isfinite(step_size) && step_size >= 0.0,
          "step_size must be finite and >= 0, got " + std::to_string(step_size));
  require(std::isfinite(smoothing) && smoothing >= 0.0 && smoothing <= 1.0,
          "smoothing must be in [0, 1], got " + std::to_string(smoothing));
  check_pointer(state, 4, "state");
  check_pointer(counters, 8, "counters");
  check_pointer(objective, 4, "objective");
  check_pointer(aux, 4, "aux");
  Update up;
  up.state = reinterpret_cast<float*>(state);
  up.counters = reinterpret_cast<long long*>(counters);
  up.objective = reinterpret_cast<float*>(objective);
  up.aux = reinterpret_cast<float*>(aux);
  up.step_size = static_cast<float>(step_size);
  up.one_minus_c = static_cast<float>(1.0 - smoothing);
  up.c_over_k = static_cast<float>(smoothing / static_cast<double>(num_domains));
  up.dro = dro;
  return up;
}

cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

std::string status() {
  int runtime = 0, driver = 0, count = 0;
  cudaRuntimeGetVersion(&runtime);
  const cudaError_t derr = cudaDriverGetVersion(&driver);
  const cudaError_t err = cudaGetDeviceCount(&count);
  const std::string versions = "CUDA runtime " + std::to_string(runtime) + ", driver " +
                               (derr == cudaSuccess ? std::to_string(driver) : "unknown");
  if (err != cudaSuccess) {
    cudaGetLastError();
    return std::string("unavailable: ") + cudaGetErrorName(err) + ": " + cudaGetErrorString(err) +
           " (" + versions + ")";
  }
  if (count == 0) return "unavailable: no CUDA device (" + versions + ")";
  return "ok: " + std::to_string(count) + " device(s) (" + versions + ")";
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "fastmix CUDA kernels: per-domain loss statistics and the fused DoReMi step";
  m.attr("MAX_DOMAINS") = fastmix_cuda::kMaxDomains;
  m.attr("MAX_BLOCKS") = fastmix_cuda::kMaxBlocks;
  m.attr("THREADS") = fastmix_cuda::kThreads;

  m.def("status", &status, "'ok: ...' or why CUDA cannot run here (the CUDA error string)");
  m.def(
      "device_count",
      []() {
        int count = 0;
        if (cudaGetDeviceCount(&count) != cudaSuccess) {
          cudaGetLastError();
          return 0;
        }
        return count;
      },
      "Number of CUDA devices (0 when CUDA cannot run; status() says why)");
  m.def(
      "workspace_bytes",
      [](int num_domains) {
        require(num_domains >= 1 && num_domains <= fastmix_cuda::kMaxDomains,
                "num_domains must be in [1, " + std::to_string(fastmix_cuda::kMaxDomains) +
                    "], got " + std::to_string(num_domains));
        return fastmix_cuda::workspace_bytes(num_domains);
      },
      py::arg("num_domains"), "Bytes of the zero-initialised, self-cleaning workspace");
  m.def(
      "grid_blocks", [](int64_t n) {
        require(n >= 0, "n must be >= 0, got " + std::to_string(n));
        return fastmix_cuda::grid_blocks(n);
      },
      py::arg("n"), "Blocks launched for n tokens (depends on n only)");

  m.def(
      "domain_stats",
      [](uintptr_t loss, int loss_dtype, uintptr_t ref_loss, uintptr_t domain, int id_dtype,
         uintptr_t mask, int64_t n, int64_t seq_len, int num_domains, uintptr_t out_stats,
         uintptr_t out_oob, uintptr_t workspace, int64_t workspace_nbytes, bool deterministic,
         uintptr_t stream) {
        const Inputs in = make_inputs(loss, loss_dtype, ref_loss, domain, id_dtype, mask, n,
                                      seq_len, num_domains);
        check_pointer(out_stats, 4, "out_stats");
        check_pointer(out_oob, 8, "out_oob");
        check_workspace(workspace, workspace_nbytes, num_domains);
        check_cuda(fastmix_cuda::launch_stats(in, reinterpret_cast<float*>(out_stats),
                                              reinterpret_cast<long long*>(out_oob),
                                              reinterpret_cast<void*>(workspace), deterministic,
                                              as_stream(stream)),
                   "domain_stats launch");
      },
      py::arg("loss"), py::arg("loss_dtype"), py::arg("ref_loss"), py::arg("domain"),
      py::arg("id_dtype"), py::arg("mask"), py::arg("n"), py::arg("seq_len"),
      py::arg("num_domains"), py::arg("out_stats"), py::arg("out_oob"), py::arg("workspace"),
      py::arg("workspace_nbytes"), py::arg("deterministic"), py::arg("stream"),
      "[3, K] statistics and the out-of-range count, one launch");

  m.def(
      "fused_step",
      [](uintptr_t loss, int loss_dtype, uintptr_t ref_loss, uintptr_t domain, int id_dtype,
         uintptr_t mask, int64_t n, int64_t seq_len, int num_domains, uintptr_t state,
         uintptr_t counters, uintptr_t objective, uintptr_t aux, uintptr_t workspace,
         int64_t workspace_nbytes, double step_size, double smoothing, bool dro,
         bool deterministic, uintptr_t stream) {
        const Inputs in = make_inputs(loss, loss_dtype, ref_loss, domain, id_dtype, mask, n,
                                      seq_len, num_domains);
        require(ref_loss != 0 || n == 0, "ref_loss is a null pointer");
        const Update up = make_update(state, counters, objective, aux, num_domains, step_size,
                                      smoothing, dro);
        check_workspace(workspace, workspace_nbytes, num_domains);
        check_cuda(fastmix_cuda::launch_fused_step(in, up, reinterpret_cast<void*>(workspace),
                                                   deterministic, as_stream(stream)),
                   "fused_step launch");
      },
      py::arg("loss"), py::arg("loss_dtype"), py::arg("ref_loss"), py::arg("domain"),
      py::arg("id_dtype"), py::arg("mask"), py::arg("n"), py::arg("seq_len"),
      py::arg("num_domains"), py::arg("state"), py::arg("counters"), py::arg("objective"),
      py::arg("aux"), py::arg("workspace"), py::arg("workspace_nbytes"), py::arg("step_size"),
      py::arg("smoothing"), py::arg("dro"), py::arg("deterministic"), py::arg("stream"),
      "Statistics + DoReMi update + objective in one launch");

  m.def(
      "update",
      [](uintptr_t stats, int num_domains, uintptr_t state, uintptr_t counters,
         uintptr_t objective, uintptr_t aux, double step_size, double smoothing, bool dro,
         uintptr_t stream) {
        require(num_domains >= 1 && num_domains <= fastmix_cuda::kMaxDomains,
                "num_domains must be in [1, " + std::to_string(fastmix_cuda::kMaxDomains) +
                    "], got " + std::to_string(num_domains));
        check_pointer(stats, 4, "stats");
        const Update up = make_update(state, counters, objective, aux, num_domains, step_size,
                                      smoothing, dro);
        check_cuda(fastmix_cuda::launch_update(reinterpret_cast<const float*>(stats),
                                               num_domains, up, as_stream(stream)),
                   "update launch");
      },
      py::arg("stats"), py::arg("num_domains"), py::arg("state"), py::arg("counters"),
      py::arg("objective"), py::arg("aux"), py::arg("step_size"), py::arg("smoothing"),
      py::arg("dro"), py::arg("stream"), "DoReMi update from finished [3, K] statistics");
}
