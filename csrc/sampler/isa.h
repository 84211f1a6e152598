// The x86 instruction sets of fastmix's CPU kernels, and what this CPU has.  Every kernel exists
// in a scalar version; the vector ones compute the same bits and are picked at run time (no -march
// flag: each is compiled for its target through a function attribute).
#pragma once

namespace fastmix {

// Ordered: each level includes the ones below it.  best_isa() is what this CPU runs; kernels can
// be told to use less (tests check every path on any machine that has it), and a request above
// what the CPU has falls back to the best it has.
enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
Isa best_isa();

// avx2; avx512f + avx512vl + avx512dq.  Always false off x86.
bool cpu_has_avx2();
bool cpu_has_avx512();

// The instruction set a kernel may use when the caller allows at most `isa`.
inline Isa usable_isa(Isa isa) {
  if (isa == Isa::kAvx512 && cpu_has_avx512()) return Isa::kAvx512;
  if (isa >= Isa::kAvx2 && cpu_has_avx2()) return Isa::kAvx2;
  return Isa::kScalar;
}

}  // namespace fastmix
