#include <pybind11/pybind11.h>
namespace py = pybind11;
namespace fastmix {
void bind_sampler(py::module_& m) { (void)m; }
}  // namespace fastmix
