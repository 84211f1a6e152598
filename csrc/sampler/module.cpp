// fastmix._C: the CPU sampler and the window mapping.  Each part binds itself in its own file.
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace fastmix {
void bind_sampler(py::module_& m);  // sampler_bindings.cpp
void bind_windows(py::module_& m);  // windows_bindings.cpp
}  // namespace fastmix

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastmix compiled CPU core: alias/stratified/greedy samplers, Megatron blending, keyed window permutation";
  fastmix::bind_sampler(m);
  fastmix::bind_windows(m);
}
