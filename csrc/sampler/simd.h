// AVX2 helpers shared by the CPU kernels (x86 with GCC or Clang only; each is compiled for AVX2
// through its attribute and must only run where the CPU has it, see isa.h).
#pragma once

#include <immintrin.h>

namespace fastmix {

// b where mask's 32-bit lane has its sign bit set, else a.
__attribute__((target("avx2"))) inline __m256i pick_avx2(__m256i a, __m256i b, __m256i mask) {
  return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(a), _mm256_castsi256_ps(b),
                                              _mm256_castsi256_ps(mask)));
}

// Entry d of a table held in NV registers (d < 8 NV <= 32), for eight d at once: a permute picks
// within each register (d's low three bits), blends on the sign bits of bit3 (set where d's bit 3
// is; for NV <= 3, d >= 8 will do) and bit4 (set where d >= 16) pick the register.  The permutes
// are most of the cost, so a table takes only the registers its K needs.
template <int NV>
__attribute__((target("avx2"))) inline __m256i lookup_avx2(const __m256i* table, __m256i d,
                                                            __m256i bit3, __m256i bit4) {
  static_assert(NV >= 1 && NV <= 4, "up to 32 entries");
  const __m256i first = _mm256_permutevar8x32_epi32(table[0], d);
  if constexpr (NV == 1) return first;
  const __m256i low = pick_avx2(first, _mm256_permutevar8x32_epi32(table[1], d), bit3);
  if constexpr (NV == 2) return low;
  const __m256i third = _mm256_permutevar8x32_epi32(table[2], d);
  const __m256i high =
      NV == 4 ? pick_avx2(third, _mm256_permutevar8x32_epi32(table[NV - 1], d), bit3) : third;
  return pick_avx2(low, high, bit4);
}

}  // namespace fastmix
