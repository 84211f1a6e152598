// The refresh pass of GreedyFast (blend.h): scalar, plus an AVX-512 version picked at run time.
#include <cmath>
#include <cstdint>

#include "sampler/blend.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTMIX_X86_DISPATCH 1
// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own internals (_mm512_undefined_*).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#endif

namespace fastmix {
namespace {

double refresh_scalar(const double* w, const double* cf, int64_t k, double x0, double level,
                      double growth, double delta, int64_t* above, int32_t* cand, int64_t* num) {
  double top = -HUGE_VAL;
  int64_t n_above = 0, n_cand = 0;
  for (int64_t d = 0; d < k; ++d) {
    const double v = deficit(w[d], x0, cf[d]);
    top = v > top ? v : top;
    n_above += v >= level ? 1 : 0;
    cand[n_cand] = static_cast<int32_t>(d);
    n_cand += (v + w[d] * growth + delta >= level) ? 1 : 0;
  }
  *above = n_above;
  *num = n_cand;
  return top;
}

#if defined(FASTMIX_X86_DISPATCH)
__attribute__((target("avx512f,avx512vl,avx512dq"))) double refresh_avx512(
    const double* w, const double* cf, int64_t k, double x0, double level, double growth,
    double delta, int64_t* above, int32_t* cand, int64_t* num) {
  const __m512d xv = _mm512_set1_pd(x0);
  const __m512d lv = _mm512_set1_pd(level);
  const __m512d gv = _mm512_set1_pd(growth);
  const __m512d dv = _mm512_set1_pd(delta);
  __m512d topv = _mm512_set1_pd(-HUGE_VAL);
  __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i eight = _mm256_set1_epi32(8);
  int64_t n_above = 0, n_cand = 0;
  for (int64_t d = 0; d < k; d += 8) {
    const int64_t left = k - d;
    const __mmask8 live = left >= 8 ? static_cast<__mmask8>(0xFF)
                                    : static_cast<__mmask8>((1u << left) - 1u);
    const __m512d wv = _mm512_maskz_loadu_pd(live, w + d);
    const __m512d cv = _mm512_maskz_loadu_pd(live, cf + d);
    const __m512d v = _mm512_sub_pd(_mm512_mul_pd(wv, xv), cv);  // deficit(): mul then sub
    topv = _mm512_mask_max_pd(topv, live, topv, v);
    const __mmask8 is_above = _mm512_mask_cmp_pd_mask(live, v, lv, _CMP_GE_OQ);
    const __m512d reach = _mm512_add_pd(_mm512_add_pd(v, _mm512_mul_pd(wv, gv)), dv);
    const __mmask8 is_cand = _mm512_mask_cmp_pd_mask(live, reach, lv, _CMP_GE_OQ);
    n_above += __builtin_popcount(static_cast<unsigned>(is_above));
    // Compress in a register, then a plain 8-lane store (the caller's buffer has 8 spare slots):
    // a masked compress-store to memory is microcoded and ~10x slower on AMD Zen 4/5.
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(cand + n_cand),
                        _mm256_maskz_compress_epi32(is_cand, idx));
    n_cand += __builtin_popcount(static_cast<unsigned>(is_cand));
    idx = _mm256_add_epi32(idx, eight);
  }
  *above = n_above;
  *num = n_cand;
  return _mm512_reduce_max_pd(topv);
}

bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return has;
}
#endif

}  // namespace

double refresh_pass(const double* w, const double* cf, int64_t k, double x0, double level,
                    double growth, double delta, int64_t* above, int32_t* cand, int64_t* num) {
#if defined(FASTMIX_X86_DISPATCH)
  if (cpu_has_avx512()) return refresh_avx512(w, cf, k, x0, level, growth, delta, above, cand, num);
#endif
  return refresh_scalar(w, cf, k, x0, level, growth, delta, above, cand, num);
}

}  // namespace fastmix
