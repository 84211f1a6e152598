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

#include "sampler/simd.h"
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

// GCC's first instruction-scheduling pass (off by default on x86) with its register-pressure
// model, for the AVX2 loops below only: they are long chains of ~70 vector instructions per
// eight draws, and GCC's own order leaves Zen 3's scheduler short of ready work.  On Zen 3, 10M
// draws into a reused buffer, builds alternated: 0.96 against 1.09 ns per draw at K = 22, 1.16
// against 1.23 at K = 256.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("schedule-insns", "sched-pressure")
#endif

// Eight consecutive draws with AVX2, which has no 64-bit multiply: each one is rebuilt from 32-bit
// multiplies (same integers as the scalar loop).  Register `even` holds draws j,
// j + 2, j + 4, j + 6 and `odd` the others, so that one 32-bit blend puts a 32-bit result of each
// draw in draw order.  Only the column and the top 32 bits of the fraction are formed: with
// a = hi32(r) * K and b = lo32(r) * K (r * K = a * 2^32 + b), t = a + (b >> 32) < 2^63 holds the
// column in its high half and the fraction's top 32 bits in its low half.
struct Avx2Draws {
  __m256i weyl_even, weyl_odd, golden_step, mul1_lo, mul1_swapped, mul2_lo, mul2_swapped, keyv, kv;

  Avx2Draws() = default;

  // Draws start, start + 1, ..., start + 7 at the first call of next(), then `stride` further on
  // at every call.
  __attribute__((target("avx2"))) Avx2Draws(uint64_t key, uint64_t start, int64_t k,
                                            uint64_t stride)
      : golden_step(_mm256_set1_epi64x(static_cast<long long>(kGolden * stride))),
        mul1_lo(_mm256_set1_epi64x(0x1CE4E5B9LL)),
        mul1_swapped(_mm256_set1_epi64x(0x1CE4E5B9BF58476DLL)),
        mul2_lo(_mm256_set1_epi64x(0x133111EBLL)),
        mul2_swapped(_mm256_set1_epi64x(0x133111EB94D049BBLL)),
        keyv(_mm256_set1_epi64x(static_cast<long long>(key))),
        kv(_mm256_set1_epi64x(k)) {
    long long weyl[8];  // (counter + 1) * kGolden, modulo 2^64 as in random_u64
    for (int i = 0; i < 8; ++i) {
      weyl[i] = static_cast<long long>((start + 1 + static_cast<uint64_t>(i)) * kGolden);
    }
    weyl_even = _mm256_setr_epi64x(weyl[0], weyl[2], weyl[4], weyl[6]);
    weyl_odd = _mm256_setr_epi64x(weyl[1], weyl[3], weyl[5], weyl[7]);
  }

  // z * m modulo 2^64, m = hi * 2^32 + lo and swapped = lo * 2^32 + hi: the low product in 64
  // bits, and the two cross products, which only matter modulo 2^32, from one 32-bit multiply
  // (z_lo * hi and z_hi * lo side by side).  On Zen 3, 4-5% fewer ns per draw than three 64-bit
  // products (1.62-1.64 against 1.70-1.71 at K = 22, alternating in one process).  The cross
  // products reach the high half by a mask and one shift rather than two shifts: shifts have
  // two of Zen 3's four vector pipes, and-masks all four (~2.5% fewer ns per draw).
  __attribute__((target("avx2"))) static inline __m256i mullo(__m256i z, __m256i lo,
                                                              __m256i swapped) {
    const __m256i products = _mm256_mullo_epi32(z, swapped);
    const __m256i high = _mm256_set1_epi64x(static_cast<long long>(0xFFFFFFFF00000000ULL));
    const __m256i cross =
        _mm256_add_epi64(_mm256_and_si256(products, high), _mm256_slli_epi64(products, 32));
    return _mm256_add_epi64(_mm256_mul_epu32(z, lo), cross);
  }

  __attribute__((target("avx2"))) inline __m256i column_and_top(__m256i weyl) const {
    __m256i z = _mm256_xor_si256(keyv, weyl);
    z = mullo(_mm256_xor_si256(z, _mm256_srli_epi64(z, 30)), mul1_lo, mul1_swapped);
    z = mullo(_mm256_xor_si256(z, _mm256_srli_epi64(z, 27)), mul2_lo, mul2_swapped);
    const __m256i r = _mm256_xor_si256(z, _mm256_srli_epi64(z, 31));
    const __m256i a = _mm256_mul_epu32(_mm256_srli_epi64(r, 32), kv);
    const __m256i b = _mm256_mul_epu32(r, kv);
    return _mm256_add_epi64(a, _mm256_srli_epi64(b, 32));
  }

  // The next eight draws' columns and fraction tops, as 32-bit lanes in draw order.
  __attribute__((target("avx2"))) inline void next(__m256i& column, __m256i& top) {
    const __m256i even = column_and_top(weyl_even);
    const __m256i odd = column_and_top(weyl_odd);
    column = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
    top = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
    weyl_even = _mm256_add_epi64(weyl_even, golden_step);
    weyl_odd = _mm256_add_epi64(weyl_odd, golden_step);
  }
};

// The eight domains for packed entries looked up by column (AliasTable::packed): keep the column
// where the fraction's top bits lie below the threshold's, else take the alias.  Returns false
// when a draw's top bits equal its threshold's (the scalar loop must decide it).
__attribute__((target("avx2"))) inline bool select_avx2(__m256i entry, __m256i column, __m256i top,
                                                        __m256i alias_mask, int32_t* out) {
  const __m256i sign = _mm256_set1_epi32(INT32_MIN);
  const __m256i threshold_key = _mm256_or_si256(entry, alias_mask);
  const __m256i draw_key = _mm256_xor_si256(_mm256_or_si256(top, alias_mask), sign);
  const __m256i keep = _mm256_cmpgt_epi32(threshold_key, draw_key);
  const __m256i tie = _mm256_cmpeq_epi32(threshold_key, draw_key);
  const __m256i chosen = _mm256_blendv_epi8(_mm256_and_si256(entry, alias_mask), column, keep);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), chosen);
  return _mm256_testz_si256(tie, tie) != 0;
}

// The AVX2 draw loop over the packed table; lookup(column) gives the eight columns' entries.
// Each pass does kStreams independent groups of eight draws, interleaved in program order: one
// group's chain (two 64-bit multiplies rebuilt from 32-bit ones, the lookup, the select) is ~45
// dependent instructions, and with one group per pass the scheduler does not see far enough ahead
// to overlap the groups.  On Zen 3, 8192 draws in cache: 1.27 / 1.10 / 1.05 / 1.05 ns per draw
// for 1 / 2 / 3 / 4 groups at K = 22, 1.37 / 1.25 / 1.17 / 1.16 at K = 256.
template <class Lookup>
__attribute__((target("avx2"))) void fill_avx2(const AliasTable& table, const Lookup& lookup,
                                               uint64_t key, uint64_t start, int64_t n,
                                               int32_t* out) {
  constexpr int kStreams = 4;
  constexpr int64_t kPass = 8 * kStreams;
  const __m256i alias_mask = _mm256_set1_epi32((1 << table.packed_bits) - 1);
  Avx2Draws draws[kStreams];
  for (int g = 0; g < kStreams; ++g) {
    draws[g] = Avx2Draws(key, start + 8 * static_cast<uint64_t>(g), table.k, kPass);
  }
  int64_t j = 0;
  for (; j + kPass <= n; j += kPass) {
    __m256i column[kStreams], top[kStreams];
    for (int g = 0; g < kStreams; ++g) draws[g].next(column[g], top[g]);
    bool decided = true;
    for (int g = 0; g < kStreams; ++g) {
      decided &= select_avx2(lookup(column[g]), column[g], top[g], alias_mask, out + j + 8 * g);
    }
    if (!decided) table.fill_scalar(key, start + static_cast<uint64_t>(j), kPass, out + j);
  }
  table.fill_scalar(key, start + static_cast<uint64_t>(j), n - j, out + j);
}

// K <= 8 * NV <= 32: the packed table lives in NV registers and lookups are 32-bit permutes
// (lookup_avx2).
template <int NV>
struct RegisterLookup {
  __m256i e[NV];

  __attribute__((target("avx2"))) explicit RegisterLookup(const AliasTable& table) {
    alignas(32) uint32_t packed[8 * NV] = {0};
    for (int64_t c = 0; c < table.k; ++c) packed[c] = table.packed[c];
    for (int i = 0; i < NV; ++i) {
      e[i] = _mm256_load_si256(reinterpret_cast<const __m256i*>(packed + 8 * i));
    }
  }

  // The register is picked by comparisons (any vector pipe) rather than shifts of the column to
  // the sign bits (two pipes, shared with the draws' shifts); with four registers the third and
  // fourth are told apart by bit 3 itself.
  __attribute__((target("avx2"))) inline __m256i operator()(__m256i column) const {
    const __m256i bit3 = NV == 4 ? _mm256_slli_epi32(column, 28)
                                 : _mm256_cmpgt_epi32(column, _mm256_set1_epi32(7));
    return lookup_avx2<NV>(e, column, bit3, _mm256_cmpgt_epi32(column, _mm256_set1_epi32(15)));
  }
};

// 32 < K <= kPackedMax: one 32-bit gather of the packed entries per eight draws.
struct GatherLookup {
  const int* packed;

  __attribute__((target("avx2"))) inline __m256i operator()(__m256i column) const {
    return _mm256_i32gather_epi32(packed, column, 4);
  }
};

template <int NV>
__attribute__((target("avx2"))) void fill_avx2_small(const AliasTable& table, uint64_t key,
                                                     uint64_t start, int64_t n, int32_t* out) {
  fill_avx2(table, RegisterLookup<NV>(table), key, start, n, out);
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

}  // namespace
#endif

void AliasTable::fill(uint64_t key, uint64_t start, int64_t n, int32_t* out, Isa isa) const {
#if defined(FASTMIX_X86_DISPATCH)
  if (n >= 64) {
    switch (usable_isa(isa)) {
      case Isa::kAvx512:
        if (k <= 32) {
          fill_avx512_small(*this, key, start, n, out);
        } else {
          fill_avx512(*this, key, start, n, out);
        }
        return;
      case Isa::kAvx2:
        if (packed.empty()) break;
        switch ((k + 7) / 8) {
          case 1: fill_avx2_small<1>(*this, key, start, n, out); break;
          case 2: fill_avx2_small<2>(*this, key, start, n, out); break;
          case 3: fill_avx2_small<3>(*this, key, start, n, out); break;
          case 4: fill_avx2_small<4>(*this, key, start, n, out); break;
          default:
            fill_avx2(*this, GatherLookup{reinterpret_cast<const int*>(packed.data())}, key,
                      start, n, out);
        }
        return;
      case Isa::kScalar:
        break;
    }
  }
#else
  (void)isa;
#endif
  fill_scalar(key, start, n, out);
}

}  // namespace fastmix
