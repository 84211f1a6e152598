// AliasTable::fill: the draw loop, with an AVX-512 version picked at run time.
//
// Both versions compute exactly the same integers (64-bit products are exact modulo 2^64, and the
// 64x64 -> 128 multiply-high is rebuilt from 32x32 -> 64 products), so the stream does not depend on
// the CPU; only the speed does.  No -march flag is needed: the AVX-512 code is compiled for that
// target through a function attribute and only called when the CPU reports avx512f + avx512dq.
#include <cstdint>

#include "sampler/alias.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTMIX_X86_DISPATCH 1
// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own internals (_mm512_undefined_*).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#endif

namespace fastmix {

#if defined(FASTMIX_X86_DISPATCH)
namespace {

// Eight consecutive draws' (column, fraction): the vector form of fill_scalar's
// random_u64(key, counter) split by a multiply-high, shared by both AVX-512 fills below.
struct Avx512Draws {
  __m512i weyl, golden_step, mul1, mul2, keyv, kv;

  __attribute__((target("avx512f,avx512dq"))) Avx512Draws(uint64_t key, uint64_t start, int64_t k)
      : golden_step(_mm512_set1_epi64(static_cast<long long>(kGolden * 8))),
        mul1(_mm512_set1_epi64(static_cast<long long>(0xBF58476D1CE4E5B9ULL))),
        mul2(_mm512_set1_epi64(static_cast<long long>(0x94D049BB133111EBULL))),
        keyv(_mm512_set1_epi64(static_cast<long long>(key))),
        kv(_mm512_set1_epi64(k)) {
    // weyl = (counter + 1) * kGolden for the 8 lanes, advanced by 8 * kGolden per call of next().
    weyl = _mm512_mullo_epi64(
        _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(start + 1)),
                         _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7)),
        _mm512_set1_epi64(static_cast<long long>(kGolden)));
  }

  __attribute__((target("avx512f,avx512dq"))) inline void next(__m512i& column,
                                                                __m512i& fraction) {
    __m512i z = _mm512_xor_si512(keyv, weyl);  // mix64(key ^ (counter + 1) * golden)
    z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 30)), mul1);
    z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 27)), mul2);
    const __m512i r = _mm512_xor_si512(z, _mm512_srli_epi64(z, 31));
    // r * K = A * 2^32 + B with A = hi32(r) * K, B = lo32(r) * K (K < 2^31: no overflow).
    const __m512i a = _mm512_mul_epu32(_mm512_srli_epi64(r, 32), kv);
    const __m512i b = _mm512_mul_epu32(r, kv);
    column = _mm512_srli_epi64(_mm512_add_epi64(a, _mm512_srli_epi64(b, 32)), 32);
    fraction = _mm512_add_epi64(_mm512_slli_epi64(a, 32), b);
    weyl = _mm512_add_epi64(weyl, golden_step);
  }
};

__attribute__((target("avx512f,avx512dq"))) void fill_avx512(const AliasTable& table, uint64_t key,
                                                             uint64_t start, int64_t n,
                                                             int32_t* out) {
  Avx512Draws draws(key, start, table.k);
  const __m512i low32 = _mm512_set1_epi64(0xFFFFFFFFLL);
  const long long* thresholds = reinterpret_cast<const long long*>(table.thresholds.data());
  const long long* pairs = reinterpret_cast<const long long*>(table.pairs.data());
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m512i column, fraction;
    draws.next(column, fraction);
    const __m512i threshold = _mm512_i64gather_epi64(column, thresholds, 8);
    const __m512i pair = _mm512_i64gather_epi64(column, pairs, 8);
    const __mmask8 keep = _mm512_cmplt_epu64_mask(fraction, threshold);
    const __m512i chosen = _mm512_mask_blend_epi64(keep, _mm512_srli_epi64(pair, 32),
                                                   _mm512_and_si512(pair, low32));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), _mm512_cvtepi64_epi32(chosen));
  }
  table.fill_scalar(key, start + static_cast<uint64_t>(j), n - j, out + j);
}

// K <= 32: the whole table lives in eight registers and lookups are two-source permutes (1 uop)
// instead of gathers (~8 cycles each on AMD Zen 4/5).  A column's own domain is the column index.
__attribute__((target("avx512f,avx512dq"))) void fill_avx512_small(const AliasTable& table,
                                                                   uint64_t key, uint64_t start,
                                                                   int64_t n, int32_t* out) {
  alignas(64) uint64_t thr[32] = {0};
  alignas(64) uint64_t alias[32] = {0};
  for (int64_t c = 0; c < table.k; ++c) {
    thr[c] = table.thresholds[c];
    alias[c] = table.pairs[c] >> 32;
  }
  __m512i t[4], a[4];
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_load_si512(thr + 8 * i);
    a[i] = _mm512_load_si512(alias + 8 * i);
  }
  Avx512Draws draws(key, start, table.k);
  const __m512i sixteen = _mm512_set1_epi64(16);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m512i column, fraction;
    draws.next(column, fraction);
    const __mmask8 upper = _mm512_cmpge_epu64_mask(column, sixteen);
    const __m512i threshold = _mm512_mask_blend_epi64(
        upper, _mm512_permutex2var_epi64(t[0], column, t[1]),
        _mm512_permutex2var_epi64(t[2], column, t[3]));
    const __m512i other = _mm512_mask_blend_epi64(
        upper, _mm512_permutex2var_epi64(a[0], column, a[1]),
        _mm512_permutex2var_epi64(a[2], column, a[3]));
    const __mmask8 keep = _mm512_cmplt_epu64_mask(fraction, threshold);
    const __m512i chosen = _mm512_mask_blend_epi64(keep, other, column);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), _mm512_cvtepi64_epi32(chosen));
  }
  table.fill_scalar(key, start + static_cast<uint64_t>(j), n - j, out + j);
}

bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
  return has;
}

}  // namespace
#endif

void AliasTable::fill(uint64_t key, uint64_t start, int64_t n, int32_t* out) const {
#if defined(FASTMIX_X86_DISPATCH)
  if (n >= 64 && cpu_has_avx512()) {
    if (k <= 32) {
      fill_avx512_small(*this, key, start, n, out);
    } else {
      fill_avx512(*this, key, start, n, out);
    }
    return;
  }
#endif
  fill_scalar(key, start, n, out);
}

}  // namespace fastmix
