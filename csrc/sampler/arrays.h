// Small helpers for the numpy buffers the bindings receive.
#pragma once

#include <pybind11/numpy.h>

namespace fastmix {

// Whether two C-contiguous arrays' bytes intersect (an output that overlaps an input, or two
// outputs that overlap, would be read after it is written).
inline bool share_memory(const pybind11::array& a, const pybind11::array& b) {
  const char* a0 = static_cast<const char*>(a.data());
  const char* b0 = static_cast<const char*>(b.data());
  return a.nbytes() > 0 && b.nbytes() > 0 && a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
}

}  // namespace fastmix
