// GreedyFast's kernels (blend.h): the refresh pass and the register argmax, scalar, AVX2 and
// AVX-512, each picked at run time; the screened lanes' fixed-point kernel (AVX-512).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>

#include "sampler/blend.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTMIX_X86_DISPATCH 1
// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own internals (_mm512_undefined_*).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include "sampler/simd.h"
#endif

namespace fastmix {
namespace {

double refresh_scalar(const double* w, const double* cf, int64_t k, double x0, double level,
                      double growth, double delta, int64_t* above, int32_t* cand, int64_t* num,
                      double* cw, double* cc) {
  double top = -HUGE_VAL;
  int64_t n_above = 0, n_cand = 0;
  for (int64_t d = 0; d < k; ++d) {
    const double v = deficit(w[d], x0, cf[d]);
    top = v > top ? v : top;
    n_above += v >= level ? 1 : 0;
    cand[n_cand] = static_cast<int32_t>(d);
    if (cw != nullptr) {
      cw[n_cand] = w[d];
      cc[n_cand] = cf[d];
    }
    n_cand += (v + w[d] * growth + delta >= level) ? 1 : 0;
  }
  *above = n_above;
  *num = n_cand;
  return top;
}

#if defined(FASTMIX_X86_DISPATCH)
__attribute__((target("avx512f,avx512vl,avx512dq"))) double refresh_avx512(
    const double* w, const double* cf, int64_t k, double x0, double level, double growth,
    double delta, int64_t* above, int32_t* cand, int64_t* num, double* cw, double* cc) {
  const __m512d xv = _mm512_set1_pd(x0);
  const __m512d lv = _mm512_set1_pd(level);
  const __m512d gv = _mm512_set1_pd(growth);
  const __m512d ldv = _mm512_set1_pd(level - delta);
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
    // v + w * growth >= level - delta: one add fewer than adding delta per lane; the roundings
    // differ by ~2^-53 (growth + 2), far inside delta's margin (see blend.h).
    const __m512d reach = _mm512_add_pd(v, _mm512_mul_pd(wv, gv));
    const __mmask8 is_cand = _mm512_mask_cmp_pd_mask(live, reach, ldv, _CMP_GE_OQ);
    n_above += __builtin_popcount(static_cast<unsigned>(is_above));
    // Compress in a register, then a plain 8-lane store (the caller's buffer has 8 spare slots):
    // a masked compress-store to memory is microcoded and ~10x slower on AMD Zen 4/5.
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(cand + n_cand),
                        _mm256_maskz_compress_epi32(is_cand, idx));
    n_cand += __builtin_popcount(static_cast<unsigned>(is_cand));
    idx = _mm256_add_epi32(idx, eight);
  }
  // The candidates' weights and counts, gathered by id after the pass rather than compressed
  // beside the ids in it: K = 256 with 42 candidates, 71-83 against 105-114 ns per pass on
  // Zen 4 (two more 512-bit compresses and stores for each 8 domains cost more than 42 scalar
  // copies).
  if (cw != nullptr) {
    for (int64_t j = 0; j < n_cand; ++j) {
      cw[j] = w[cand[j]];
      cc[j] = cf[cand[j]];
    }
  }
  *above = n_above;
  *num = n_cand;
  return _mm512_reduce_max_pd(topv);
}

// The refresh pass with AVX2 (CPUs without AVX-512): four domains per register; AVX2 has no
// compress, so the candidate lanes are packed with a permutation looked up by their 4-bit mask.
// The candidate test is the AVX-512 version's (v + w * growth >= level - delta).
struct CompressTable {
  int32_t ids[16][4];     // the set lanes of each mask, in order (ids)
  int32_t halves[16][8];  // the same for doubles, as pairs of 32-bit halves
  CompressTable() : ids(), halves() {
    for (int mask = 0; mask < 16; ++mask) {
      int out = 0;
      for (int lane = 0; lane < 4; ++lane) {
        if (((mask >> lane) & 1) == 0) continue;
        ids[mask][out] = lane;
        halves[mask][2 * out] = 2 * lane;
        halves[mask][2 * out + 1] = 2 * lane + 1;
        ++out;
      }
    }
  }
};

__attribute__((target("avx2,popcnt"))) double refresh_avx2(
    const double* w, const double* cf, int64_t k, double x0, double level, double growth,
    double delta, int64_t* above, int32_t* cand, int64_t* num, double* cw, double* cc) {
  static const CompressTable table;
  const __m256d xv = _mm256_set1_pd(x0);
  const __m256d lv = _mm256_set1_pd(level);
  const __m256d gv = _mm256_set1_pd(growth);
  const __m256d ldv = _mm256_set1_pd(level - delta);
  __m256d topv = _mm256_set1_pd(-HUGE_VAL);
  int64_t n_above = 0, n_cand = 0, d = 0;
  for (; d + 4 <= k; d += 4) {
    const __m256d wv = _mm256_loadu_pd(w + d);
    const __m256d cv = _mm256_loadu_pd(cf + d);
    const __m256d v = _mm256_sub_pd(_mm256_mul_pd(wv, xv), cv);  // deficit(): mul then sub
    topv = _mm256_max_pd(topv, v);
    n_above += __builtin_popcount(
        static_cast<unsigned>(_mm256_movemask_pd(_mm256_cmp_pd(v, lv, _CMP_GE_OQ))));
    const __m256d reach = _mm256_add_pd(v, _mm256_mul_pd(wv, gv));
    const int is_cand = _mm256_movemask_pd(_mm256_cmp_pd(reach, ldv, _CMP_GE_OQ));
    // Plain 4- and 8-lane stores: the caller's buffers have 8 spare slots.
    const __m128i lanes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(table.ids[is_cand]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(cand + n_cand),
                     _mm_add_epi32(lanes, _mm_set1_epi32(static_cast<int32_t>(d))));
    if (cw != nullptr) {
      const __m256i perm =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(table.halves[is_cand]));
      _mm256_storeu_pd(cw + n_cand, _mm256_castps_pd(_mm256_permutevar8x32_ps(
                                        _mm256_castpd_ps(wv), perm)));
      _mm256_storeu_pd(cc + n_cand, _mm256_castps_pd(_mm256_permutevar8x32_ps(
                                        _mm256_castpd_ps(cv), perm)));
    }
    n_cand += __builtin_popcount(static_cast<unsigned>(is_cand));
  }
  alignas(32) double tops[4];
  _mm256_store_pd(tops, topv);
  double top = std::max(std::max(tops[0], tops[1]), std::max(tops[2], tops[3]));
  for (; d < k; ++d) {  // the last k % 4 domains
    const double v = deficit(w[d], x0, cf[d]);
    top = v > top ? v : top;
    n_above += v >= level ? 1 : 0;
    if (v + w[d] * growth >= level - delta) {
      cand[n_cand] = static_cast<int32_t>(d);
      if (cw != nullptr) {
        cw[n_cand] = w[d];
        cc[n_cand] = cf[d];
      }
      ++n_cand;
    }
  }
  *above = n_above;
  *num = n_cand;
  return top;
}

// Mask of the real lanes of register i when n lanes are used.
inline __mmask8 live_lanes(int64_t n, int i) {
  const int64_t left = n - 8 * i;
  return left >= 8 ? static_cast<__mmask8>(0xFF)
         : left <= 0 ? static_cast<__mmask8>(0)
                     : static_cast<__mmask8>((1u << left) - 1u);
}

// The NV 8-lane masks as one word (lane 8 i + b at bit 8 i + b).  Up to 4 registers the masks are
// joined inside the mask unit, then moved once (K = 22: 3.65 against 3.9 ns per step with a move,
// shift and or per register); beyond, the joins measured slower (K = 64: 10.9 against 8.4 ns).
template <int NV>
__attribute__((target("avx512f,avx512vl,avx512dq,avx512bw"))) inline uint64_t join_masks(
    const __mmask8* eq) {
  if constexpr (NV == 1) {
    return _cvtmask8_u32(eq[0]);
  } else if constexpr (NV == 2) {
    return _cvtmask16_u32(_mm512_kunpackb(eq[1], eq[0]));
  } else if constexpr (NV <= 4) {
    const __mmask16 low = _mm512_kunpackb(eq[1], eq[0]);
    const __mmask16 high = NV == 4 ? _mm512_kunpackb(eq[NV - 1], eq[2]) : eq[2];
    return _cvtmask32_u32(_mm512_kunpackw(high, low));
  } else {
    uint64_t bits = 0;
#pragma GCC unroll 8
    for (int i = 0; i < NV; ++i) bits |= static_cast<uint64_t>(eq[i]) << (8 * i);
    return bits;
  }
}

// join_masks entirely inside the mask unit, for any NV <= 8 (the windowed kernel's choice).
template <int NV>
__attribute__((target("avx512f,avx512vl,avx512dq,avx512bw"))) inline uint64_t join_masks_wide(
    const __mmask8* eq) {
  if constexpr (NV <= 4) {
    return join_masks<NV>(eq);
  } else {
    const __mmask16 m01 = _mm512_kunpackb(eq[1], eq[0]);
    const __mmask16 m23 = _mm512_kunpackb(eq[3], eq[2]);
    const __mmask16 m45 = NV >= 6 ? _mm512_kunpackb(eq[NV >= 6 ? 5 : 4], eq[4]) : eq[4];
    const __mmask16 m67 =
        NV == 8 ? _mm512_kunpackb(eq[NV == 8 ? 7 : 4], eq[NV >= 7 ? 6 : 4])
                : (NV == 7 ? static_cast<__mmask16>(eq[NV >= 7 ? 6 : 4]) : static_cast<__mmask16>(0));
    const __mmask32 low = _mm512_kunpackw(m23, m01);
    const __mmask32 high = _mm512_kunpackw(m67, m45);
    return _cvtmask64_u64(_mm512_kunpackd(high, low));
  }
}

// Where chain j's choices go: the candidate positions pos[j], or (fused) straight into the caller's
// output arrays, index[t] = the candidate and sample[t] = its count before the step.  Shared by the
// register kernels of every instruction set; plain scalar code beside their vector chains.
template <int S, bool kFused>
struct ChainSink {
  int32_t* out[S];
  int16_t* index[S];
  int64_t* sample[S];
  int64_t* counts[S];
  ChainSink(int32_t* const* pos, const ChainOutput* fused) {
    for (int j = 0; j < S; ++j) {
      if constexpr (kFused) {
        index[j] = fused[j].index;
        sample[j] = fused[j].sample;
        counts[j] = fused[j].counts;
      } else {
        out[j] = pos[j];
      }
    }
  }
  void put(int j, int64_t t, int chosen) {
    if constexpr (kFused) {
      index[j][t] = static_cast<int16_t>(chosen);
      sample[j][t] = counts[j][chosen]++;
    } else {
      out[j][t] = static_cast<int32_t>(chosen);
    }
  }
};

// The rule over n <= 64 candidates held in registers: weights and counts in NV = ceil(n / 8) zmm
// registers, one exact vector argmax per step.  The loop-carried chain is counts -> values -> max ->
// equality mask -> counts; the one-hot mask is the equality mask itself whenever the maximum is
// unique (the usual case), so no mask leaves the vector unit on the chain.  Padding lanes have
// weight 0 and count +inf: their value is -inf, never the maximum (real values are finite). S
// independent chains (segments, see register_argmax_chains in blend.h) advance in the same loop, so
// their latency chains overlap.  Chain j runs m steps from step s[j] and counts cc[j], writes
// pos[j], and stores its counts (all 8 NV lanes) after every q steps to snap[j] (when q > 0).
// Measured on Zen 5 (one thread, ns per step, S = 1): NV = 1: 6.5, 3: 7.7, 4: 8.1, 8: 11.7; the
// loops are unrolled explicitly because GCC 12 otherwise keeps the NV >= 4 reduction tree in stack
// memory (19 ns at NV = 4).
template <int NV, int S, bool kFused = false>
__attribute__((target("avx512f,avx512vl,avx512dq,avx512bw"))) void argmax_steps_avx512(
    const double* cw, int64_t n, double* const* cc, const int64_t* s, int64_t m,
    int32_t* const* pos, double* const* snap, int64_t q, const ChainOutput* fused = nullptr) {
  __m512d wv[NV], cv[S][NV];
#pragma GCC unroll 8
  for (int i = 0; i < NV; ++i) {
    wv[i] = _mm512_maskz_loadu_pd(live_lanes(n, i), cw + 8 * i);
#pragma GCC unroll 4
    for (int j = 0; j < S; ++j) {
      cv[j][i] = _mm512_mask_loadu_pd(_mm512_set1_pd(HUGE_VAL), live_lanes(n, i), cc[j] + 8 * i);
    }
  }
  const __m512d one = _mm512_set1_pd(1.0);
  // Lane rotations by 1..7: the maximum of all eight rotated copies, taken as a tree, is the
  // register's maximum in every lane; the rotations run in parallel, so this is ~1.2 ns shorter
  // than a three-level shuffle butterfly.
  const __m512i rot1 = _mm512_setr_epi64(1, 2, 3, 4, 5, 6, 7, 0);
  const __m512i rot2 = _mm512_setr_epi64(2, 3, 4, 5, 6, 7, 0, 1);
  const __m512i rot3 = _mm512_setr_epi64(3, 4, 5, 6, 7, 0, 1, 2);
  const __m512i rot4 = _mm512_setr_epi64(4, 5, 6, 7, 0, 1, 2, 3);
  const __m512i rot5 = _mm512_setr_epi64(5, 6, 7, 0, 1, 2, 3, 4);
  const __m512i rot6 = _mm512_setr_epi64(6, 7, 0, 1, 2, 3, 4, 5);
  const __m512i rot7 = _mm512_setr_epi64(7, 0, 1, 2, 3, 4, 5, 6);
  // Steps as vectors (exact: s < 2^52): step_x = max(s, 1) is one vector max, no scalar-to-vector
  // broadcast per step.
  __m512d xs[S];
#pragma GCC unroll 4
  for (int j = 0; j < S; ++j) xs[j] = _mm512_set1_pd(static_cast<double>(s[j]));
  ChainSink<S, kFused> sink(pos, fused);
  int64_t until_snapshot = q > 0 ? q : -1;
  for (int64_t t = 0; t < m; ++t) {
#pragma GCC unroll 4
    for (int j = 0; j < S; ++j) {
      const __m512d x = _mm512_max_pd(xs[j], one);  // step_x
      xs[j] = _mm512_add_pd(xs[j], one);
      __m512d v[NV], mx[NV];
#pragma GCC unroll 8
      for (int i = 0; i < NV; ++i) {
        // deficit(): multiply, then subtract
        v[i] = _mm512_sub_pd(_mm512_mul_pd(wv[i], x), cv[j][i]);
        mx[i] = v[i];
      }
#pragma GCC unroll 8
      for (int width = 1; width < NV; width *= 2) {
#pragma GCC unroll 8
        for (int i = 0; i + width < NV; i += 2 * width) mx[i] = _mm512_max_pd(mx[i], mx[i + width]);
      }
      // The register's maximum in every lane.  One chain (S = 1) is latency-bound: take the
      // maximum of the eight lane rotations, which run in parallel (~1.2 ns per step shorter than
      // a butterfly).  Several chains are throughput-bound, and 7 permutes per step saturate the
      // shuffle unit: a three-level butterfly (3 shuffles) measured 4.0 ns per step at K = 22 with
      // S = 4, against 4.5 ns with the rotations.
      const __m512d r0 = mx[0];
      __m512d top;
      if (S >= 2) {
        top = _mm512_max_pd(r0, _mm512_shuffle_f64x2(r0, r0, _MM_SHUFFLE(1, 0, 3, 2)));
        top = _mm512_max_pd(top, _mm512_shuffle_f64x2(top, top, _MM_SHUFFLE(2, 3, 0, 1)));
        top = _mm512_max_pd(top, _mm512_permute_pd(top, 0x55));
      } else {
        top = _mm512_max_pd(
          _mm512_max_pd(_mm512_max_pd(r0, _mm512_permutexvar_pd(rot1, r0)),
                        _mm512_max_pd(_mm512_permutexvar_pd(rot2, r0),
                                      _mm512_permutexvar_pd(rot3, r0))),
          _mm512_max_pd(_mm512_max_pd(_mm512_permutexvar_pd(rot4, r0),
                                      _mm512_permutexvar_pd(rot5, r0)),
                        _mm512_max_pd(_mm512_permutexvar_pd(rot6, r0),
                                      _mm512_permutexvar_pd(rot7, r0))));
      }
      __mmask8 eq[NV];
#pragma GCC unroll 8
      for (int i = 0; i < NV; ++i) eq[i] = _mm512_cmp_pd_mask(v[i], top, _CMP_EQ_OQ);
      const uint64_t bits = join_masks<NV>(eq);
      if (__builtin_expect((bits & (bits - 1)) != 0, 0)) {  // a tie: the lowest index wins
        const uint64_t first = bits & (0 - bits);
#pragma GCC unroll 8
        for (int i = 0; i < NV; ++i) {
          cv[j][i] =
              _mm512_mask_add_pd(cv[j][i], static_cast<__mmask8>(first >> (8 * i)), cv[j][i], one);
        }
      } else {
#pragma GCC unroll 8
        for (int i = 0; i < NV; ++i) cv[j][i] = _mm512_mask_add_pd(cv[j][i], eq[i], cv[j][i], one);
      }
      // The output written here, beside the vector chain, runs on other execution units (fused,
      // K = 22: 3.0 against 3.6 ns per step with a separate output pass).
      sink.put(j, t, __builtin_ctzll(bits));
    }
    if (--until_snapshot == 0) {
      until_snapshot = q;
      const int64_t k = (t + 1) / q - 1;
#pragma GCC unroll 4
      for (int j = 0; j < S; ++j) {
#pragma GCC unroll 8
        for (int i = 0; i < NV; ++i) _mm512_storeu_pd(snap[j] + (k * NV + i) * 8, cv[j][i]);
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < NV; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < S; ++j) {
      _mm512_mask_storeu_pd(cc[j] + 8 * i, live_lanes(n, i), cv[j][i]);
    }
  }
}

// S chains over different candidate sets (weights cw[j], counts cc[j], n[j] <= 8 NV candidates
// each), m steps in lockstep: what the windowed path (K > 64) runs for its speculative segments.
// The same exact step as argmax_steps_avx512; every chain has its own weight registers.
template <int NV, int S>
__attribute__((target("avx512f,avx512vl,avx512dq,avx512bw"))) void argmax_multi_avx512(
    const double* const* cw, double* const* cc, const int64_t* n, const int64_t* s, int64_t m,
    int32_t* const* pos) {
  __m512d wv[S][NV], cv[S][NV], xs[S];
#pragma GCC unroll 4
  for (int j = 0; j < S; ++j) {
#pragma GCC unroll 8
    for (int i = 0; i < NV; ++i) {
      wv[j][i] = _mm512_maskz_loadu_pd(live_lanes(n[j], i), cw[j] + 8 * i);
      cv[j][i] =
          _mm512_mask_loadu_pd(_mm512_set1_pd(HUGE_VAL), live_lanes(n[j], i), cc[j] + 8 * i);
    }
    xs[j] = _mm512_set1_pd(static_cast<double>(s[j]));
  }
  const __m512d one = _mm512_set1_pd(1.0);
  for (int64_t t = 0; t < m; ++t) {
#pragma GCC unroll 4
    for (int j = 0; j < S; ++j) {
      const __m512d x = _mm512_max_pd(xs[j], one);  // step_x
      xs[j] = _mm512_add_pd(xs[j], one);
      __m512d v[NV], mx[NV];
#pragma GCC unroll 8
      for (int i = 0; i < NV; ++i) {
        v[i] = _mm512_sub_pd(_mm512_mul_pd(wv[j][i], x), cv[j][i]);  // deficit()
        mx[i] = v[i];
      }
#pragma GCC unroll 8
      for (int width = 1; width < NV; width *= 2) {
#pragma GCC unroll 8
        for (int i = 0; i + width < NV; i += 2 * width) mx[i] = _mm512_max_pd(mx[i], mx[i + width]);
      }
      // Throughput-bound with two chains: the three-shuffle butterfly (the rotations of
      // argmax_steps_avx512 measured no better here).
      __m512d top =
          _mm512_max_pd(mx[0], _mm512_shuffle_f64x2(mx[0], mx[0], _MM_SHUFFLE(1, 0, 3, 2)));
      top = _mm512_max_pd(top, _mm512_shuffle_f64x2(top, top, _MM_SHUFFLE(2, 3, 0, 1)));
      top = _mm512_max_pd(top, _mm512_permute_pd(top, 0x55));
      __mmask8 eq[NV];
#pragma GCC unroll 8
      for (int i = 0; i < NV; ++i) eq[i] = _mm512_cmp_pd_mask(v[i], top, _CMP_EQ_OQ);
      const uint64_t bits = join_masks_wide<NV>(eq);
      if (__builtin_expect((bits & (bits - 1)) != 0, 0)) {  // a tie: the lowest index wins
        const uint64_t first = bits & (0 - bits);
#pragma GCC unroll 8
        for (int i = 0; i < NV; ++i) {
          cv[j][i] =
              _mm512_mask_add_pd(cv[j][i], static_cast<__mmask8>(first >> (8 * i)), cv[j][i], one);
        }
      } else {
#pragma GCC unroll 8
        for (int i = 0; i < NV; ++i) cv[j][i] = _mm512_mask_add_pd(cv[j][i], eq[i], cv[j][i], one);
      }
      pos[j][t] = static_cast<int32_t>(__builtin_ctzll(bits));
    }
  }
#pragma GCC unroll 4
  for (int j = 0; j < S; ++j) {
#pragma GCC unroll 8
    for (int i = 0; i < NV; ++i) {
      _mm512_mask_storeu_pd(cc[j] + 8 * i, live_lanes(n[j], i), cv[j][i]);
    }
  }
}

// The same exact step with AVX2 (4 lanes per register, no mask registers), for CPUs without
// AVX-512: up to kAvx2RegisterMax candidates in NV = ceil(n / 4) registers, S chains in one loop.
// An equality compare gives an all-ones lane, so "count += 1 where the value is the maximum" is an
// and with 1.0 and an add; movemask brings the lanes to a word for the position and the tie test.
template <int NV, int S, bool kFused = false>
__attribute__((target("avx2"))) void argmax_steps_avx2(
    const double* cw, int64_t n, double* const* cc, const int64_t* s, int64_t m,
    int32_t* const* pos, double* const* snap, int64_t q, const ChainOutput* fused = nullptr) {
  constexpr int kLanes = 4 * NV;
  // Only the counts stay in registers: with 16 ymm registers, weights and values held as well
  // spill from NV = 5 on (K = 22: 11 ns per step).  The weights are read from memory and each
  // value is computed twice, for the maximum and for the equality test (the same two roundings,
  // so the same value).
  alignas(32) double wbuf[kLanes];
  alignas(32) double buffer[kLanes];
  __m256d cv[S][NV];
  for (int l = 0; l < kLanes; ++l) wbuf[l] = l < n ? cw[l] : 0.0;  // padding: weight 0 ...
#pragma GCC unroll 4
  for (int j = 0; j < S; ++j) {
    for (int l = 0; l < kLanes; ++l) buffer[l] = l < n ? cc[j][l] : HUGE_VAL;  // ... count +inf
#pragma GCC unroll 8
    for (int i = 0; i < NV; ++i) cv[j][i] = _mm256_load_pd(buffer + 4 * i);
  }
  const __m256d one = _mm256_set1_pd(1.0);
  const int64_t stride = (n + 7) / 8 * 8;  // snapshot spacing, as for the AVX-512 kernel
  __m256d xs[S];
#pragma GCC unroll 4
  for (int j = 0; j < S; ++j) xs[j] = _mm256_set1_pd(static_cast<double>(s[j]));
  ChainSink<S, kFused> sink(pos, fused);
  int64_t until_snapshot = q > 0 ? q : -1;
  for (int64_t t = 0; t < m; ++t) {
#pragma GCC unroll 4
    for (int j = 0; j < S; ++j) {
      const __m256d x = _mm256_max_pd(xs[j], one);  // step_x
      xs[j] = _mm256_add_pd(xs[j], one);
      // deficit(): multiply, then subtract
      __m256d top = _mm256_sub_pd(_mm256_mul_pd(_mm256_load_pd(wbuf), x), cv[j][0]);
      if constexpr (NV > 1) {
        __m256d other = _mm256_sub_pd(_mm256_mul_pd(_mm256_load_pd(wbuf + 4), x), cv[j][1]);
#pragma GCC unroll 8
        for (int i = 2; i < NV; i += 2) {
          top = _mm256_max_pd(
              top, _mm256_sub_pd(_mm256_mul_pd(_mm256_load_pd(wbuf + 4 * i), x), cv[j][i]));
          if (i + 1 < NV) {
            other = _mm256_max_pd(
                other,
                _mm256_sub_pd(_mm256_mul_pd(_mm256_load_pd(wbuf + 4 * i + 4), x), cv[j][i + 1]));
          }
        }
        top = _mm256_max_pd(top, other);
      }
      top = _mm256_max_pd(top, _mm256_permute2f128_pd(top, top, 1));
      top = _mm256_max_pd(top, _mm256_permute_pd(top, 5));  // the maximum in every lane
      __m256d eq[NV];
      uint64_t bits = 0;
#pragma GCC unroll 8
      for (int i = 0; i < NV; ++i) {
        const __m256d v = _mm256_sub_pd(_mm256_mul_pd(_mm256_load_pd(wbuf + 4 * i), x), cv[j][i]);
        eq[i] = _mm256_cmp_pd(v, top, _CMP_EQ_OQ);
        bits |= static_cast<uint64_t>(_mm256_movemask_pd(eq[i])) << (4 * i);
      }
      const int chosen = __builtin_ctzll(bits);
      if (__builtin_expect((bits & (bits - 1)) != 0, 0)) {  // a tie: the lowest index wins
        alignas(32) double add[kLanes] = {};
        add[chosen] = 1.0;
#pragma GCC unroll 8
        for (int i = 0; i < NV; ++i) {
          cv[j][i] = _mm256_add_pd(cv[j][i], _mm256_load_pd(add + 4 * i));
        }
      } else {
#pragma GCC unroll 8
        for (int i = 0; i < NV; ++i) cv[j][i] = _mm256_add_pd(cv[j][i], _mm256_and_pd(eq[i], one));
      }
      sink.put(j, t, chosen);
    }
    if (--until_snapshot == 0) {
      until_snapshot = q;
      const int64_t k = (t + 1) / q - 1;
#pragma GCC unroll 4
      for (int j = 0; j < S; ++j) {
#pragma GCC unroll 8
        for (int i = 0; i < NV; ++i) _mm256_storeu_pd(snap[j] + k * stride + 4 * i, cv[j][i]);
      }
    }
  }
#pragma GCC unroll 4
  for (int j = 0; j < S; ++j) {
#pragma GCC unroll 8
    for (int i = 0; i < NV; ++i) _mm256_store_pd(buffer + 4 * i, cv[j][i]);
    for (int64_t l = 0; l < n; ++l) cc[j][l] = buffer[l];
  }
}

// ---- Screened lanes (blend.h): the fixed-point kernel and its anchoring, AVX-512 ----

// The range a lane's largest row must stay in through a window so that no row overflows (see
// blend.h): up to `high` every row can take one more step (rows grow by at most the largest
// step_add), and from `low` up the chosen rows (within `margin` of the largest) can drop by one
// (`one`: kScreenOne for the screened lanes, kChainOne for the fixed-point chain).
struct ScreenRange {
  int32_t high, low;
};
template <int R, int32_t kOne = kScreenOne>
ScreenRange screen_range(const int32_t* step_add, int32_t margin) {
  int32_t add_max = 0;
  for (int d = 0; d < R; ++d) add_max = std::max(add_max, step_add[d]);
  return {INT32_MAX - add_max - 64, INT32_MIN + kOne + margin + 64};
}

// The rows' total change over m steps in which every step dropped exactly one row by kOne
// (each step drops at least its top; more than one is a near tie).  Compared in 64 bits, where
// nothing wraps while the range above holds.
template <int R, int32_t kOne = kScreenOne>
int64_t screen_change(const int32_t* step_add, int64_t m) {
  int64_t sum = 0;
  for (int d = 0; d < R; ++d) sum += step_add[d];
  return m * (sum - kOne);
}

// Rows of 16 lanes, row d of lane j at rows[16 * d + j]; R rows in registers (K rounded up to
// even; the padding rows hold INT32_MIN, which never comes near a lane's maximum).  Runs m steps:
// tops[16 t + j] = lane j's maximum at step t (its low bits name the row).  Returns the lanes
// that are uncertain: a step with more than one row within `margin` of the maximum, or a maximum
// outside the range in which no row can overflow (see blend.h).
template <int R>
__attribute__((target("avx512f,avx512vl,avx512dq"))) uint32_t screen_steps_avx512(
    const int32_t* step_add, int32_t* rows, int64_t m, int32_t margin, int32_t* tops) {
  __m512i row[R];
#pragma GCC unroll 32
  for (int d = 0; d < R; ++d) row[d] = _mm512_loadu_si512(rows + 16 * d);
  const __m512i one = _mm512_set1_epi32(kScreenOne);
  __m512i high = _mm512_set1_epi32(INT32_MIN), low = _mm512_set1_epi32(INT32_MAX);
  for (int64_t t = 0; t < m; ++t) {
    // The maximum in four independent chains (integer max: 1 cycle, the rows' updates overlap).
    __m512i a = row[0], b = row[1], c = R > 2 ? row[2] : row[0], e = R > 3 ? row[3] : row[1];
#pragma GCC unroll 32
    for (int d = 4; d < R; d += 4) {
      a = _mm512_max_epi32(a, row[d]);
      if (d + 1 < R) b = _mm512_max_epi32(b, row[d + 1]);
      if (d + 2 < R) c = _mm512_max_epi32(c, row[d + 2]);
      if (d + 3 < R) e = _mm512_max_epi32(e, row[d + 3]);
    }
    const __m512i top = _mm512_max_epi32(_mm512_max_epi32(a, b), _mm512_max_epi32(c, e));
    _mm512_storeu_si512(tops + 16 * t, top);
    high = _mm512_max_epi32(high, top);
    low = _mm512_min_epi32(low, top);
    const __m512i floor = _mm512_sub_epi32(top, _mm512_set1_epi32(margin));
#pragma GCC unroll 32
    for (int d = 0; d < R; ++d) {
      // Every row near the top drops by one: exactly the chosen one on a certain step.  Whether
      // more than one did is read from the rows' sum at the end (four operations per row and
      // step; counting them here was a fifth).
      const __mmask16 chosen = _mm512_cmpge_epi32_mask(row[d], floor);
      row[d] = _mm512_add_epi32(row[d], _mm512_set1_epi32(step_add[d]));
      row[d] = _mm512_mask_sub_epi32(row[d], chosen, row[d], one);
    }
  }
  // More than one row dropped at some step: the rows' total change tells (screen_change).
  __m512i change[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
#pragma GCC unroll 32
  for (int d = 0; d < R; ++d) {
    const __m512i before = _mm512_loadu_si512(rows + 16 * d);
    for (int h = 0; h < 2; ++h) {
      const __m512i after64 = _mm512_cvtepi32_epi64(
          h == 0 ? _mm512_castsi512_si256(row[d]) : _mm512_extracti64x4_epi64(row[d], 1));
      const __m512i before64 = _mm512_cvtepi32_epi64(
          h == 0 ? _mm512_castsi512_si256(before) : _mm512_extracti64x4_epi64(before, 1));
      change[h] = _mm512_add_epi64(change[h], _mm512_sub_epi64(after64, before64));
    }
    _mm512_storeu_si512(rows + 16 * d, row[d]);
  }
  const __m512i expected = _mm512_set1_epi64(screen_change<R>(step_add, m));
  const __mmask16 ties = static_cast<__mmask16>(
      _mm512_cmpneq_epi64_mask(change[0], expected) |
      (_mm512_cmpneq_epi64_mask(change[1], expected) << 8));
  // Rows only grow by step_add and only the chosen (near the top) drop by one: bounding the tops
  // bounds every row.
  const ScreenRange range = screen_range<R>(step_add, margin);
  const __mmask16 too_high = _mm512_cmpgt_epi32_mask(high, _mm512_set1_epi32(range.high));
  const __mmask16 too_low = _mm512_cmplt_epi32_mask(low, _mm512_set1_epi32(range.low));
  return static_cast<uint32_t>(ties | too_high | too_low);
}

// In-register transposes for screen_write: r[i] holds row i on entry, column i on return.
__attribute__((target("avx512f"))) inline void transpose16_epi32(__m512i* r) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 16; i += 8) {
    for (int q = 0; q < 4; ++q) {
      t[i + q] = _mm512_shuffle_i32x4(u[i + q], u[i + q + 4], 0x88);
      t[i + q + 4] = _mm512_shuffle_i32x4(u[i + q], u[i + q + 4], 0xdd);
    }
  }
  for (int q = 0; q < 8; ++q) {
    r[q] = _mm512_shuffle_i32x4(t[q], t[q + 8], 0x88);
    r[q + 8] = _mm512_shuffle_i32x4(t[q], t[q + 8], 0xdd);
  }
}

__attribute__((target("avx512f"))) inline void transpose8_epi64(__m512i* r) {
  __m512i t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm512_unpacklo_epi64(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi64(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm512_shuffle_i64x2(t[i], t[i + 2], 0x88);
    u[i + 1] = _mm512_shuffle_i64x2(t[i + 1], t[i + 3], 0x88);
    u[i + 2] = _mm512_shuffle_i64x2(t[i], t[i + 2], 0xdd);
    u[i + 3] = _mm512_shuffle_i64x2(t[i + 1], t[i + 3], 0xdd);
  }
  for (int q = 0; q < 4; ++q) {
    r[q] = _mm512_shuffle_i64x2(u[q], u[q + 4], 0x88);
    r[q + 4] = _mm512_shuffle_i64x2(u[q], u[q + 4], 0xdd);
  }
}

// The certain lanes' window (see screen_write in blend.h), AVX-512.  On such a lane exactly the
// chosen row dropped at each step, so with V = row >> 5 (the fixed-point value), V[d] at step t
// is V0[d] + t Om[d] - 2^F n, n = the times d was chosen before t in the window; the step's top
// is the chosen row, so n = (V0[d] + t Om[d] - Vtop) >> F, and the sample is counts[d] + n.  All
// of it fits 32 bits (|V| < 2^26, t Om <= 2^30).  The rows, tops and counts are held lane-minor
// ([d or t][16 lanes]); each lane's are transposed once, then 16 steps at a time are looked up
// with in-register permutes: no count is incremented in memory, and the outputs are written in
// whole vectors.
__attribute__((target("avx512f,avx512vl,avx512dq"))) void screen_write_avx512(
    int64_t k, const int32_t* step_add, const int32_t* rows0, const int32_t* rows,
    const int32_t* tops, int64_t* counts, uint32_t lanes, const ScreenLaneOut* out, int64_t at) {
  constexpr int S = kScreenLanes;
  constexpr int W = static_cast<int>(kScreenWindow);
  static_assert(S == 16 && W % 16 == 0 && kScreenMax <= 32, "screen_write's layout");
  const int64_t r = screen_rows(k);
  alignas(64) int32_t om[32] = {};
  for (int64_t d = 0; d < r; ++d) om[d] = step_add[d] >> kScreenIndexBits;
  const bool any_output = [&] {
    for (int j = 0; j < S; ++j) {
      if (((lanes >> j) & 1u) && (out[j].index != nullptr || out[j].pos != nullptr)) return true;
    }
    return false;
  }();
  if (any_output) {
    alignas(64) int32_t tt[S][W];   // tops, lane-major
    alignas(64) int32_t v0[S][32];  // V0, lane-major
    alignas(64) int64_t c0[S][32];  // counts at the window's start, lane-major
    __m512i v[16];
    for (int b = 0; b < W / 16; ++b) {
      for (int i = 0; i < 16; ++i) v[i] = _mm512_loadu_si512(tops + S * (16 * b + i));
      transpose16_epi32(v);
      for (int j = 0; j < S; ++j) _mm512_store_si512(&tt[j][16 * b], v[j]);
    }
    for (int b = 0; 16 * b < r; ++b) {
      for (int i = 0; i < 16; ++i) {
        const int64_t d = 16 * b + i;
        v[i] = d < r ? _mm512_srai_epi32(_mm512_loadu_si512(rows0 + S * d), kScreenIndexBits)
                     : _mm512_setzero_si512();
      }
      transpose16_epi32(v);
      for (int j = 0; j < S; ++j) _mm512_store_si512(&v0[j][16 * b], v[j]);
    }
    for (int b = 0; 8 * b < k; ++b) {
      for (int h = 0; h < 2; ++h) {
        for (int i = 0; i < 8; ++i) {
          const int64_t d = 8 * b + i;
          v[i] = d < k ? _mm512_loadu_si512(counts + S * d + 8 * h) : _mm512_setzero_si512();
        }
        transpose8_epi64(v);
        for (int i = 0; i < 8; ++i) _mm512_store_si512(&c0[8 * h + i][8 * b], v[i]);
      }
    }
    const __m512i om_lo = _mm512_load_si512(om), om_hi = _mm512_load_si512(om + 16);
    const __m512i mask = _mm512_set1_epi32((1 << kScreenIndexBits) - 1);
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int j = 0; j < S; ++j) {
      if (!((lanes >> j) & 1u)) continue;
      const ScreenLaneOut& o = out[j];
      if (o.index == nullptr && o.pos == nullptr) continue;
      if (o.index != nullptr) {  // this lane's next window, for write (K = 22: 2.8 against 2.9 ns)
        for (int q = 0; q < W * 8; q += 64) {
          __builtin_prefetch(reinterpret_cast<const char*>(o.sample + at + W) + q, 1, 3);
        }
        for (int q = 0; q < W * 2; q += 64) {
          __builtin_prefetch(reinterpret_cast<const char*>(o.index + at + W) + q, 1, 3);
        }
      }
      const __m512i v_lo = _mm512_load_si512(v0[j]);
      const __m512i v_hi = r > 16 ? _mm512_load_si512(v0[j] + 16) : v_lo;  // only d < r looked up
      __m512i c[4];
      for (int q = 0; q < 4; ++q) c[q] = 8 * q < k ? _mm512_load_si512(c0[j] + 8 * q) : c[0];
      for (int b = 0; b < W / 16; ++b) {
        const __m512i top = _mm512_load_si512(&tt[j][16 * b]);
        const __m512i d = _mm512_and_si512(top, mask);
        if (o.index == nullptr) {
          _mm512_storeu_si512(o.pos + at + 16 * b, d);
          continue;
        }
        const __m512i t = _mm512_add_epi32(iota, _mm512_set1_epi32(16 * b));
        const __m512i om_d = _mm512_permutex2var_epi32(om_lo, d, om_hi);
        const __m512i value =
            _mm512_add_epi32(_mm512_permutex2var_epi32(v_lo, d, v_hi), _mm512_mullo_epi32(om_d, t));
        const __m512i n = _mm512_srai_epi32(
            _mm512_sub_epi32(value, _mm512_srai_epi32(top, kScreenIndexBits)), kScreenFraction);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o.index + at + 16 * b),
                            _mm512_cvtepi32_epi16(d));
        for (int h = 0; h < 2; ++h) {
          const __m512i d64 = _mm512_cvtepi32_epi64(h == 0 ? _mm512_castsi512_si256(d)
                                                           : _mm512_extracti64x4_epi64(d, 1));
          const __m512i n64 = _mm512_cvtepi32_epi64(h == 0 ? _mm512_castsi512_si256(n)
                                                           : _mm512_extracti64x4_epi64(n, 1));
          __m512i base = _mm512_permutex2var_epi64(c[0], d64, c[1]);
          if (k > 16) {
            const __mmask8 upper = _mm512_test_epi64_mask(d64, _mm512_set1_epi64(16));
            base = _mm512_mask_blend_epi64(upper, base, _mm512_permutex2var_epi64(c[2], d64, c[3]));
          }
          _mm512_storeu_si512(o.sample + at + 16 * b + 8 * h, _mm512_add_epi64(base, n64));
        }
      }
    }
  }
  // The certain lanes' counts at the window's end: n over the whole window, from the last rows.
  const __mmask8 keep[2] = {static_cast<__mmask8>(lanes), static_cast<__mmask8>(lanes >> 8)};
  for (int64_t d = 0; d < k; ++d) {
    const __m512i n = _mm512_srai_epi32(
        _mm512_sub_epi32(
            _mm512_add_epi32(_mm512_srai_epi32(_mm512_loadu_si512(rows0 + S * d), kScreenIndexBits),
                             _mm512_set1_epi32(W * om[d])),
            _mm512_srai_epi32(_mm512_loadu_si512(rows + S * d), kScreenIndexBits)),
        kScreenFraction);
    for (int h = 0; h < 2; ++h) {
      int64_t* p = counts + S * d + 8 * h;
      const __m512i n64 = _mm512_cvtepi32_epi64(h == 0 ? _mm512_castsi512_si256(n)
                                                       : _mm512_extracti64x4_epi64(n, 1));
      const __m512i before = _mm512_loadu_si512(p);
      _mm512_storeu_si512(p, _mm512_mask_add_epi64(before, keep[h], before, n64));
    }
  }
}

// rows = the packed fixed-point deficits of k domains (R rows) for the 16 lanes at steps step[j]
// >= 1 with counts[16 d + j]; returns the lanes with a deficit outside [-kScreenRange, 2] (not
// screened: 32-bit rows could overflow), *x_max = the largest step.
__attribute__((target("avx512f,avx512vl,avx512dq"))) uint32_t screen_anchor_avx512(
    const double* w, int64_t k, int64_t r, const int64_t* counts, const int64_t* step,
    int32_t* rows, double* x_max) {
  const __m512d xa = _mm512_cvtepi64_pd(_mm512_loadu_si512(step));
  const __m512d xb = _mm512_cvtepi64_pd(_mm512_loadu_si512(step + 8));
  *x_max = _mm512_reduce_max_pd(_mm512_max_pd(xa, xb));
  const __m512d scale = _mm512_set1_pd(std::ldexp(1.0, kScreenFraction));
  const __m512d lo = _mm512_set1_pd(-kScreenRange), hi = _mm512_set1_pd(2.0);
  __mmask8 in_a = 0xFF, in_b = 0xFF;
  for (int64_t d = 0; d < k; ++d) {
    const __m512d wv = _mm512_set1_pd(w[d]);
    // deficit(): one multiply, one subtract, as the rule computes it.
    __m512d va = _mm512_sub_pd(_mm512_mul_pd(wv, xa),
                               _mm512_cvtepi64_pd(_mm512_loadu_si512(counts + 16 * d)));
    __m512d vb = _mm512_sub_pd(_mm512_mul_pd(wv, xb),
                               _mm512_cvtepi64_pd(_mm512_loadu_si512(counts + 16 * d + 8)));
    in_a &= _mm512_cmp_pd_mask(va, lo, _CMP_GE_OQ) & _mm512_cmp_pd_mask(va, hi, _CMP_LE_OQ);
    in_b &= _mm512_cmp_pd_mask(vb, lo, _CMP_GE_OQ) & _mm512_cmp_pd_mask(vb, hi, _CMP_LE_OQ);
    va = _mm512_min_pd(_mm512_max_pd(va, lo), hi);  // the lane is not screened; keep it finite
    vb = _mm512_min_pd(_mm512_max_pd(vb, lo), hi);
    const __m256i ia = _mm512_cvt_roundpd_epi32(_mm512_mul_pd(va, scale),
                                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i ib = _mm512_cvt_roundpd_epi32(_mm512_mul_pd(vb, scale),
                                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i a = _mm512_inserti64x4(_mm512_castsi256_si512(ia), ib, 1);
    const __m512i packed = _mm512_or_si512(_mm512_slli_epi32(a, kScreenIndexBits),
                                           _mm512_set1_epi32(static_cast<int32_t>(d)));
    _mm512_storeu_si512(rows + 16 * d, packed);
  }
  for (int64_t d = k; d < r; ++d) _mm512_storeu_si512(rows + 16 * d, _mm512_set1_epi32(INT32_MIN));
  return static_cast<uint32_t>(static_cast<uint16_t>(~(in_a | (in_b << 8))));
}

// The AVX2 lane kernels' shared steps (screen_steps_avx2, wide_steps_avx2): a half's (lanes
// 8h..8h+7) largest of r rows, and a step's start: its tops stored, the range tracked, the floor
// above which rows drop, the running maxima reset.
__attribute__((target("avx2"))) inline __m256i lanes_top_avx2(const int32_t* rows, int64_t r,
                                                              int h) {
  __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows + 8 * h));
  for (int64_t i = 1; i < r; ++i) {
    a = _mm256_max_epi32(
        a, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows + 16 * i + 8 * h)));
  }
  return a;
}

__attribute__((target("avx2"))) inline void lanes_step_begin_avx2(
    const __m256i* top, __m256i marginv, int32_t* tops_t, __m256i* high, __m256i* low,
    __m256i* floor, __m256i (*acc)[4]) {
  for (int h = 0; h < 2; ++h) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(tops_t + 8 * h), top[h]);
    high[h] = _mm256_max_epi32(high[h], top[h]);
    low[h] = _mm256_min_epi32(low[h], top[h]);
    floor[h] = _mm256_sub_epi32(top[h], marginv);
    for (int q = 0; q < 4; ++q) acc[h][q] = _mm256_set1_epi32(INT32_MIN);
  }
}

// One row of one half at one step: dropped by one where it is within the margin (above floor),
// its step added, stored, and folded into a running maximum.
__attribute__((target("avx2"), always_inline)) inline void lanes_row_avx2(__m256i* p, __m256i floor,
                                                                         __m256i add, __m256i one,
                                                                         __m256i* acc) {
  __m256i row = _mm256_loadu_si256(p);
  const __m256i chosen = _mm256_cmpgt_epi32(row, floor);  // all ones where chosen
  row = _mm256_add_epi32(row, add);
  row = _mm256_sub_epi32(row, _mm256_and_si256(chosen, one));
  _mm256_storeu_si256(p, row);
  *acc = _mm256_max_epi32(*acc, row);
}

// sums[q] = lanes 4q..4q+3's sums of their R rows, in 64 bits (the AVX2 kernel's tie check).
template <int R>
__attribute__((target("avx2"))) void screen_sums_avx2(const int32_t* rows, __m256i* sums) {
  for (int q = 0; q < 4; ++q) sums[q] = _mm256_setzero_si256();
  for (int d = 0; d < R; ++d) {
    for (int q = 0; q < 4; ++q) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows + 16 * d + 4 * q));
      sums[q] = _mm256_add_epi64(sums[q], _mm256_cvtepi32_epi64(v));
    }
  }
}

// The same two for CPUs with AVX2 but no AVX-512: a row of 16 lanes is two 8-lane registers, the
// rows live in memory (16 registers hold few of them), and each step's maximum is accumulated
// while the previous step's rows are updated (one pass over the rows per step).
template <int R>
__attribute__((target("avx2"))) uint32_t screen_steps_avx2(const int32_t* step_add, int32_t* rows,
                                                          int64_t m, int32_t margin,
                                                          int32_t* tops) {
  const __m256i one = _mm256_set1_epi32(kScreenOne);
  // r >= top - margin <=> r > top - margin - 1
  const __m256i marginv = _mm256_set1_epi32(margin + 1);
  __m256i before[4];
  screen_sums_avx2<R>(rows, before);
  __m256i high[2] = {_mm256_set1_epi32(INT32_MIN), _mm256_set1_epi32(INT32_MIN)};
  __m256i low[2] = {_mm256_set1_epi32(INT32_MAX), _mm256_set1_epi32(INT32_MAX)};
  // The first step's maximum.
  __m256i top[2] = {lanes_top_avx2(rows, R, 0), lanes_top_avx2(rows, R, 1)};
  for (int64_t t = 0; t < m; ++t) {
    __m256i floor[2], acc[2][4];
    lanes_step_begin_avx2(top, marginv, tops + 16 * t, high, low, floor, acc);
    // Both halves of a row side by side, and four running maxima per half: the two halves' chains
    // (load, compare, update, store, max) interleave in program order, where one half's 22 rows
    // and then the other's left the scheduler little to overlap.  Zen 3, K = 22, blend_indices
    // 4.21-4.25 against 4.84-4.91 ns per step (builds alternated, three runs each).
#pragma GCC unroll 32
    for (int d = 0; d < R; ++d) {
      const __m256i add = _mm256_set1_epi32(step_add[d]);
      for (int h = 0; h < 2; ++h) {
        lanes_row_avx2(reinterpret_cast<__m256i*>(rows + 16 * d + 8 * h), floor[h], add, one,
                       &acc[h][d % 4]);
      }
    }
    for (int h = 0; h < 2; ++h) {  // the next step's
      top[h] = _mm256_max_epi32(_mm256_max_epi32(acc[h][0], acc[h][1]),
                                _mm256_max_epi32(acc[h][2], acc[h][3]));
    }
  }
  // More than one row dropped at some step: see screen_steps_avx512.
  __m256i after[4];
  screen_sums_avx2<R>(rows, after);
  const __m256i expected = _mm256_set1_epi64x(screen_change<R>(step_add, m));
  uint32_t ties = 0;
  for (int q = 0; q < 4; ++q) {
    const __m256i right = _mm256_cmpeq_epi64(_mm256_sub_epi64(after[q], before[q]), expected);
    ties |= (~static_cast<uint32_t>(_mm256_movemask_pd(_mm256_castsi256_pd(right))) & 0xFu)
            << (4 * q);
  }
  const ScreenRange range = screen_range<R>(step_add, margin);
  uint32_t unsure = ties;
  for (int h = 0; h < 2; ++h) {
    const __m256i too_high = _mm256_cmpgt_epi32(high[h], _mm256_set1_epi32(range.high));
    const __m256i too_low = _mm256_cmpgt_epi32(_mm256_set1_epi32(range.low), low[h]);
    const __m256i bad = _mm256_or_si256(too_high, too_low);
    unsure |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(bad))) << (8 * h);
  }
  return unsure;
}

// out[j] = lane j's sum of its r rows, in 64 bits (the wide kernel's tie check).
__attribute__((target("avx2"))) void wide_sums_avx2(const int32_t* rows, int64_t r, int64_t* out) {
  __m256i acc[4];
  for (int q = 0; q < 4; ++q) acc[q] = _mm256_setzero_si256();
  for (int64_t i = 0; i < r; ++i) {
    for (int q = 0; q < 4; ++q) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows + 16 * i + 4 * q));
      acc[q] = _mm256_add_epi64(acc[q], _mm256_cvtepi32_epi64(v));
    }
  }
  for (int q = 0; q < 4; ++q) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 4 * q), acc[q]);
}

// Wide screened lanes (blend.h): the AVX2 step kernel of screen_steps_avx2 with r slots whose
// step differs per lane (step_add[16 i + j]: each lane's slots hold its own candidates), so the
// add reads memory where the narrow kernel broadcasts, and each lane's total change is its own
// (expected[j]).  r is a multiple of 4; padding slots hold INT32_MIN and step 0.
__attribute__((target("avx2"))) uint32_t wide_steps_avx2(const int32_t* step_add, int64_t r,
                                                        int32_t* rows, int64_t m, int32_t margin,
                                                        const int64_t* expected, int32_t* tops) {
  const __m256i one = _mm256_set1_epi32(kWideOne);
  // r >= top - margin <=> r > top - margin - 1
  const __m256i marginv = _mm256_set1_epi32(margin + 1);
  int64_t before[16], after[16];
  wide_sums_avx2(rows, r, before);
  __m256i high[2] = {_mm256_set1_epi32(INT32_MIN), _mm256_set1_epi32(INT32_MIN)};
  __m256i low[2] = {_mm256_set1_epi32(INT32_MAX), _mm256_set1_epi32(INT32_MAX)};
  // The first step's maximum.
  __m256i top[2] = {lanes_top_avx2(rows, r, 0), lanes_top_avx2(rows, r, 1)};
  for (int64_t t = 0; t < m; ++t) {
    __m256i floor[2], acc[2][4];
    lanes_step_begin_avx2(top, marginv, tops + 16 * t, high, low, floor, acc);
    for (int64_t i = 0; i < r; i += 4) {
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) {
        for (int h = 0; h < 2; ++h) {
          const int64_t at = 16 * (i + u) + 8 * h;
          lanes_row_avx2(reinterpret_cast<__m256i*>(rows + at), floor[h],
                         _mm256_loadu_si256(reinterpret_cast<const __m256i*>(step_add + at)), one,
                         &acc[h][u]);
        }
      }
    }
    for (int h = 0; h < 2; ++h) {  // the next step's
      top[h] = _mm256_max_epi32(_mm256_max_epi32(acc[h][0], acc[h][1]),
                                _mm256_max_epi32(acc[h][2], acc[h][3]));
    }
  }
  wide_sums_avx2(rows, r, after);
  int32_t add_max = 0;
  for (int64_t i = 0; i < 16 * r; ++i) add_max = std::max(add_max, step_add[i]);
  const int32_t range_high = INT32_MAX - add_max - 256;
  const int32_t range_low = INT32_MIN + kWideOne + margin + 256;
  alignas(32) int32_t hi[16], lo[16];
  for (int h = 0; h < 2; ++h) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(hi + 8 * h), high[h]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(lo + 8 * h), low[h]);
  }
  uint32_t unsure = 0;
  for (int j = 0; j < 16; ++j) {
    const bool bad = after[j] - before[j] != expected[j] || hi[j] > range_high || lo[j] < range_low;
    unsure |= static_cast<uint32_t>(bad) << j;
  }
  return unsure;
}

// In-register transpose for screen_write_avx2: r[i] holds row i on entry, column i on return.
__attribute__((target("avx2"))) inline void transpose8_epi32(__m256i* r) {
  __m256i t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int q = 0; q < 4; ++q) {
    r[q] = _mm256_permute2x128_si256(u[q], u[q + 4], 0x20);
    r[q + 4] = _mm256_permute2x128_si256(u[q], u[q + 4], 0x31);
  }
}

// screen_write_avx512's computation with AVX2 (same integers, same output), for K <= 8 NV: the
// tops and the window's first rows transposed to lane-major in 8 x 8 blocks, then eight steps of a
// lane at a time, the per-domain values (V0, Om, and the start counts as two 32-bit halves) looked
// up by permutes, the counts joined from their halves for a 64-bit add.  Thread CPU time of
// blend_indices on Zen 3 (AMD EPYC family 25 model 1), 10M steps into fresh arrays, medians of 11
// runs alternating with write_lane's scalar counting in one process: K = 22 7.4 and 8.3 ns per
// step against 8.4 and 8.9 (two such runs), K = 5 3.6 against 5.0, K = 31 7.9 against 8.1.  (A
// scalar pass computing each sample from the rows, as here but one step at a time, was slower
// than write_lane: 9.5 against 9.2.)
template <int NV>
__attribute__((target("avx2"))) void screen_write_avx2(int64_t k, const int32_t* step_add,
                                                       const int32_t* rows0, const int32_t* rows,
                                                       const int32_t* tops, int64_t* counts,
                                                       uint32_t lanes, const ScreenLaneOut* out,
                                                       int64_t at, bool wide_samples) {
  constexpr int S = kScreenLanes;
  constexpr int W = static_cast<int>(kScreenWindow);
  constexpr int D = 8 * NV;  // table entries
  static_assert(S == 16 && W % 8 == 0 && D <= 32, "screen_write's layout");
  const int64_t r = screen_rows(k);  // <= D
  alignas(32) int32_t om[D];
  for (int d = 0; d < D; ++d) om[d] = d < r ? step_add[d] >> kScreenIndexBits : 0;
  const bool any_output = [&] {
    for (int j = 0; j < S; ++j) {
      if (((lanes >> j) & 1u) && (out[j].index != nullptr || out[j].pos != nullptr)) return true;
    }
    return false;
  }();
  if (any_output) {
    alignas(32) int32_t tt[S][W];     // tops, lane-major
    alignas(32) int32_t v0[S][D];     // V0, lane-major
    alignas(32) uint32_t c_lo[S][D];  // counts at the window's start, low and high halves
    alignas(32) uint32_t c_hi[S][D];
    __m256i v[8];
    for (int b = 0; b < W / 8; ++b) {
      for (int h = 0; h < 2; ++h) {
        for (int i = 0; i < 8; ++i) {
          v[i] = _mm256_loadu_si256(
              reinterpret_cast<const __m256i*>(tops + S * (8 * b + i) + 8 * h));
        }
        transpose8_epi32(v);
        for (int i = 0; i < 8; ++i) {
          _mm256_store_si256(reinterpret_cast<__m256i*>(&tt[8 * h + i][8 * b]), v[i]);
        }
      }
    }
    for (int b = 0; b < NV; ++b) {
      for (int h = 0; h < 2; ++h) {
        for (int i = 0; i < 8; ++i) {
          const int64_t d = 8 * b + i;
          v[i] = d < r ? _mm256_srai_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                                               rows0 + S * d + 8 * h)),
                                           kScreenIndexBits)
                       : _mm256_setzero_si256();
        }
        transpose8_epi32(v);
        for (int i = 0; i < 8; ++i) {
          _mm256_store_si256(reinterpret_cast<__m256i*>(&v0[8 * h + i][8 * b]), v[i]);
        }
      }
    }
    uint64_t largest = 0;
    for (int d = 0; d < D; ++d) {  // entries past K are never looked up; zero, not indeterminate
      for (int j = 0; j < S; ++j) {
        const auto c = d < k ? static_cast<uint64_t>(counts[S * d + j]) : uint64_t{0};
        c_lo[j][d] = static_cast<uint32_t>(c);
        c_hi[j][d] = static_cast<uint32_t>(c >> 32);
        largest = c > largest ? c : largest;
      }
    }
    // Every count + n (n <= W) fits in 32 bits: the samples are 32-bit sums, zero-extended, and
    // the counts' high halves need no lookup (a quarter of the permutes).
    const bool narrow = largest + W < (uint64_t{1} << 32) && !wide_samples;
    __m256i om_v[NV];
    for (int q = 0; q < NV; ++q) {
      om_v[q] = _mm256_load_si256(reinterpret_cast<const __m256i*>(om + 8 * q));
    }
    const __m256i mask = _mm256_set1_epi32((1 << kScreenIndexBits) - 1);
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int j = 0; j < S; ++j) {
      if (!((lanes >> j) & 1u)) continue;
      const ScreenLaneOut& o = out[j];
      if (o.index == nullptr && o.pos == nullptr) continue;
      if (o.index != nullptr) {  // this lane's next window, for write (as screen_write_avx512)
        for (int q = 0; q < W * 8; q += 64) {
          __builtin_prefetch(reinterpret_cast<const char*>(o.sample + at + W) + q, 1, 3);
        }
        for (int q = 0; q < W * 2; q += 64) {
          __builtin_prefetch(reinterpret_cast<const char*>(o.index + at + W) + q, 1, 3);
        }
      }
      __m256i v0_v[NV], lo_v[NV], hi_v[NV];
      for (int q = 0; q < NV; ++q) {
        v0_v[q] = _mm256_load_si256(reinterpret_cast<const __m256i*>(v0[j] + 8 * q));
        lo_v[q] = _mm256_load_si256(reinterpret_cast<const __m256i*>(c_lo[j] + 8 * q));
        hi_v[q] = _mm256_load_si256(reinterpret_cast<const __m256i*>(c_hi[j] + 8 * q));
      }
      for (int b = 0; b < W / 8; ++b) {
        const __m256i top = _mm256_load_si256(reinterpret_cast<const __m256i*>(&tt[j][8 * b]));
        const __m256i d = _mm256_and_si256(top, mask);
        if (o.index == nullptr) {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o.pos + at + 8 * b), d);
          continue;
        }
        const __m256i bit3 = _mm256_slli_epi32(d, 28), bit4 = _mm256_slli_epi32(d, 27);
        const __m256i t = _mm256_add_epi32(iota, _mm256_set1_epi32(8 * b));
        const __m256i value =
            _mm256_add_epi32(lookup_avx2<NV>(v0_v, d, bit3, bit4),
                             _mm256_mullo_epi32(lookup_avx2<NV>(om_v, d, bit3, bit4), t));
        const __m256i n = _mm256_srai_epi32(
            _mm256_sub_epi32(value, _mm256_srai_epi32(top, kScreenIndexBits)), kScreenFraction);
        const __m256i d16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(d, d), 0x08);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(o.index + at + 8 * b),
                         _mm256_castsi256_si128(d16));
        const __m256i lo = lookup_avx2<NV>(lo_v, d, bit3, bit4);
        if (narrow) {
          const __m256i sample = _mm256_add_epi32(lo, n);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o.sample + at + 8 * b),
                              _mm256_cvtepu32_epi64(_mm256_castsi256_si128(sample)));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o.sample + at + 8 * b + 4),
                              _mm256_cvtepu32_epi64(_mm256_extracti128_si256(sample, 1)));
          continue;
        }
        // sample = count + n: the count's halves joined into 64 bits, then a 64-bit add.
        const __m256i hi = lookup_avx2<NV>(hi_v, d, bit3, bit4);
        const __m256i c01 = _mm256_unpacklo_epi32(lo, hi);  // counts 0 1 | 4 5
        const __m256i c23 = _mm256_unpackhi_epi32(lo, hi);  // counts 2 3 | 6 7
        _mm256_storeu_si256(
            reinterpret_cast<__m256i*>(o.sample + at + 8 * b),
            _mm256_add_epi64(_mm256_permute2x128_si256(c01, c23, 0x20),
                             _mm256_cvtepi32_epi64(_mm256_castsi256_si128(n))));
        _mm256_storeu_si256(
            reinterpret_cast<__m256i*>(o.sample + at + 8 * b + 4),
            _mm256_add_epi64(_mm256_permute2x128_si256(c01, c23, 0x31),
                             _mm256_cvtepi32_epi64(_mm256_extracti128_si256(n, 1))));
      }
    }
  }
  // The certain lanes' counts at the window's end: n over the whole window, from the last rows.
  __m256i keep[4];
  for (int q = 0; q < 4; ++q) {
    const __m256i bits = _mm256_setr_epi64x(1LL << (4 * q), 2LL << (4 * q), 4LL << (4 * q),
                                            8LL << (4 * q));
    keep[q] = _mm256_cmpeq_epi64(_mm256_and_si256(_mm256_set1_epi64x(lanes), bits), bits);
  }
  for (int64_t d = 0; d < k; ++d) {
    for (int h = 0; h < 2; ++h) {
      const __m256i first = _mm256_srai_epi32(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows0 + S * d + 8 * h)),
          kScreenIndexBits);
      const __m256i last = _mm256_srai_epi32(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows + S * d + 8 * h)),
          kScreenIndexBits);
      const __m256i n = _mm256_srai_epi32(
          _mm256_sub_epi32(_mm256_add_epi32(first, _mm256_set1_epi32(W * om[d])), last),
          kScreenFraction);
      for (int half = 0; half < 2; ++half) {
        __m256i* p = reinterpret_cast<__m256i*>(counts + S * d + 8 * h + 4 * half);
        const __m256i n64 = _mm256_cvtepi32_epi64(half == 0 ? _mm256_castsi256_si128(n)
                                                            : _mm256_extracti128_si256(n, 1));
        _mm256_storeu_si256(p, _mm256_add_epi64(_mm256_loadu_si256(p),
                                                _mm256_and_si256(n64, keep[2 * h + half])));
      }
    }
  }
}

// int64 -> double, exact for 0 <= v < 2^52 (counts and steps here): v's bits under 2^52's.
__attribute__((target("avx2"))) inline __m256d small_int64_to_double(__m256i v) {
  const __m256d magic = _mm256_set1_pd(0x1p52);
  return _mm256_sub_pd(_mm256_castsi256_pd(_mm256_or_si256(v, _mm256_castpd_si256(magic))), magic);
}

// Four deficits as fixed point: round(v * scale) after clamping v into [-kScreenRange, 2];
// *inside = the lanes (bits 0-3) whose v lay in that range.  (The screened lanes' and the
// fixed-point chain's anchors.)
__attribute__((target("avx2"))) inline __m128i fixed_deficits_avx2(__m256d v, __m256d scale,
                                                                   int* inside) {
  const __m256d lo = _mm256_set1_pd(-kScreenRange), hi = _mm256_set1_pd(2.0);
  *inside = _mm256_movemask_pd(
      _mm256_and_pd(_mm256_cmp_pd(v, lo, _CMP_GE_OQ), _mm256_cmp_pd(v, hi, _CMP_LE_OQ)));
  v = _mm256_min_pd(_mm256_max_pd(v, lo), hi);
  return _mm256_cvttpd_epi32(
      _mm256_round_pd(_mm256_mul_pd(v, scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// Wide lanes: a lane's counts as doubles (exact below 2^52: counts <= steps <= 2^43 there).
__attribute__((target("avx2"))) void wide_counts_avx2(const int64_t* c, int64_t k, double* out) {
  int64_t d = 0;
  for (; d + 4 <= k; d += 4) {
    _mm256_storeu_pd(out + d, small_int64_to_double(
                                  _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + d))));
  }
  for (; d < k; ++d) out[d] = static_cast<double>(c[d]);
}

// Wide lanes: candidate i's row, rows[16 i] = round(v 2^F) * 128 + i for its deficit v at x
// (clamped into [-kScreenRange, 2]); false if some v lay outside.  cw and cc have room for n + 3.
__attribute__((target("avx2"))) bool wide_pack_avx2(const double* w, const double* cf,
                                                    const int32_t* step_add, const int32_t* cand,
                                                    int64_t n, double x, int32_t* rows,
                                                    int32_t* add, int64_t* add_sum) {
  const __m256d xv = _mm256_set1_pd(x);
  const __m256d scale = _mm256_set1_pd(std::ldexp(1.0, kWideFraction));
  int outside = 0;
  int64_t sum = 0;
  for (int64_t i = 0; i < n; i += 4) {
    const int64_t live = std::min<int64_t>(4, n - i);
    int32_t d[4];
    for (int u = 0; u < 4; ++u) d[u] = u < live ? cand[i + u] : cand[i];
    const __m256d v = _mm256_sub_pd(
        _mm256_mul_pd(_mm256_setr_pd(w[d[0]], w[d[1]], w[d[2]], w[d[3]]), xv),
        _mm256_setr_pd(cf[d[0]], cf[d[1]], cf[d[2]], cf[d[3]]));  // deficit(): mul, then sub
    int inside = 0;
    const __m128i fixed = fixed_deficits_avx2(v, scale, &inside);
    alignas(16) int32_t row[4];
    _mm_store_si128(reinterpret_cast<__m128i*>(row),
                    _mm_add_epi32(_mm_slli_epi32(fixed, kWideIndexBits),
                                  _mm_add_epi32(_mm_setr_epi32(0, 1, 2, 3),
                                                _mm_set1_epi32(static_cast<int32_t>(i)))));
    outside |= ~inside & ((1 << live) - 1);
    for (int64_t u = 0; u < live; ++u) {
      rows[16 * (i + u)] = row[u];
      add[16 * (i + u)] = step_add[d[u]];
      sum += step_add[d[u]];
    }
  }
  *add_sum = sum;
  return outside == 0;
}

__attribute__((target("avx2"))) uint32_t screen_anchor_avx2(const double* w, int64_t k, int64_t r,
                                                           const int64_t* counts,
                                                           const int64_t* step, int32_t* rows,
                                                           double* x_max) {
  __m256d x[4];
  __m256d xm = _mm256_setzero_pd();
  for (int q = 0; q < 4; ++q) {
    x[q] = small_int64_to_double(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(step + 4 * q)));
    xm = _mm256_max_pd(xm, x[q]);
  }
  alignas(32) double xs[4];
  _mm256_store_pd(xs, xm);
  *x_max = std::max(std::max(xs[0], xs[1]), std::max(xs[2], xs[3]));
  const __m256d scale = _mm256_set1_pd(std::ldexp(1.0, kScreenFraction));
  uint32_t in = 0xFFFFu;
  for (int64_t d = 0; d < k; ++d) {
    const __m256d wv = _mm256_set1_pd(w[d]);
    __m128i fixed[4];
    for (int q = 0; q < 4; ++q) {
      const __m256d c = small_int64_to_double(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(counts + 16 * d + 4 * q)));
      const __m256d v = _mm256_sub_pd(_mm256_mul_pd(wv, x[q]), c);  // deficit(): mul, then sub
      int inside = 0;
      fixed[q] = fixed_deficits_avx2(v, scale, &inside);
      in &= ~(0xFu << (4 * q)) | (static_cast<uint32_t>(inside) << (4 * q));
    }
    const __m256i index = _mm256_set1_epi32(static_cast<int32_t>(d));
    for (int h = 0; h < 2; ++h) {
      const __m256i a = _mm256_set_m128i(fixed[2 * h + 1], fixed[2 * h]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(rows + 16 * d + 8 * h),
                          _mm256_or_si256(_mm256_slli_epi32(a, kScreenIndexBits), index));
    }
  }
  for (int64_t d = k; d < r; ++d) {
    for (int h = 0; h < 2; ++h) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(rows + 16 * d + 8 * h),
                          _mm256_set1_epi32(INT32_MIN));
    }
  }
  return ~in & 0xFFFFu;
}

// ---- Fixed-point chain (blend.h), AVX2 ----

// rows[d] = round(v * 2^F) * 64 + d for v = deficit(w[d], x, cf[d]) (v clamped into
// [-kScreenRange, 2]; false if some v lay outside), padding rows up to a multiple of 8 far below.
__attribute__((target("avx2"))) bool chain_anchor_avx2(const double* w, const double* cf,
                                                      int64_t k, double x, int32_t* rows) {
  const __m256d xv = _mm256_set1_pd(x);
  const __m256d scale = _mm256_set1_pd(std::ldexp(1.0, kChainFraction));
  const __m128i four = _mm_set1_epi32(4);
  __m128i index = _mm_setr_epi32(0, 1, 2, 3);
  bool inside = true;
  int64_t d = 0;
  for (; d + 4 <= k; d += 4) {
    const __m256d v = _mm256_sub_pd(_mm256_mul_pd(_mm256_loadu_pd(w + d), xv),
                                    _mm256_loadu_pd(cf + d));  // deficit(): mul, then sub
    int in = 0;
    const __m128i fixed = fixed_deficits_avx2(v, scale, &in);
    inside &= in == 0xF;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(rows + d),
                     _mm_or_si128(_mm_slli_epi32(fixed, kChainIndexBits), index));
    index = _mm_add_epi32(index, four);
  }
  for (; d < k; ++d) {  // the last k % 4 (the same roundings, one at a time)
    double v = deficit(w[d], x, cf[d]);
    inside &= v >= -kScreenRange && v <= 2.0;
    v = std::min(std::max(v, -kScreenRange), 2.0);
    const auto fixed = static_cast<int32_t>(std::nearbyint(v * std::ldexp(1.0, kChainFraction)));
    rows[d] = static_cast<int32_t>(static_cast<uint32_t>(fixed) << kChainIndexBits) |
              static_cast<int32_t>(d);
  }
  for (; d < chain_rows(k); ++d) rows[d] = INT32_MIN;
  return inside;
}

// m steps of the chain, rows in NV registers of 8: tops[t] = the largest row at step t (its low
// bits name the domain).  Each step drops by kChainOne every row within the margin of the
// largest (at least the largest) and adds step_add to all; true when every step dropped exactly
// one (the rows' total change, in 64 bits) and the largest stayed where no row can overflow.
template <int NV>
__attribute__((target("avx2"))) bool chain_steps_avx2(const int32_t* step_add, int32_t* rows,
                                                     int64_t m, int32_t margin, int32_t* tops) {
  __m256i r[NV];
  int64_t before = 0;
  for (int i = 0; i < 8 * NV; ++i) before += rows[i];
#pragma GCC unroll 8
  for (int i = 0; i < NV; ++i) {
    r[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows + 8 * i));
  }
  const __m256i one = _mm256_set1_epi32(kChainOne);
  // r >= top - margin <=> r > top - margin - 1
  const __m256i marginv = _mm256_set1_epi32(margin + 1);
  __m256i high = _mm256_set1_epi32(INT32_MIN), low = _mm256_set1_epi32(INT32_MAX);
  for (int64_t t = 0; t < m; ++t) {
    __m256i a = r[0];
    if constexpr (NV > 1) {
      __m256i b = r[1];
#pragma GCC unroll 8
      for (int i = 2; i < NV; i += 2) {
        a = _mm256_max_epi32(a, r[i]);
        if (i + 1 < NV) b = _mm256_max_epi32(b, r[i + 1]);
      }
      a = _mm256_max_epi32(a, b);
    }
    a = _mm256_max_epi32(a, _mm256_permute2x128_si256(a, a, 1));
    a = _mm256_max_epi32(a, _mm256_shuffle_epi32(a, 0x4E));
    const __m256i top = _mm256_max_epi32(a, _mm256_shuffle_epi32(a, 0xB1));  // in every lane
    tops[t] = _mm256_cvtsi256_si32(top);
    high = _mm256_max_epi32(high, top);
    low = _mm256_min_epi32(low, top);
    const __m256i floor = _mm256_sub_epi32(top, marginv);
#pragma GCC unroll 8
    for (int i = 0; i < NV; ++i) {
      const __m256i chosen = _mm256_cmpgt_epi32(r[i], floor);  // all ones where chosen
      const __m256i add = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(step_add + 8 * i));
      r[i] = _mm256_sub_epi32(_mm256_add_epi32(r[i], add), _mm256_and_si256(chosen, one));
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < NV; ++i) _mm256_storeu_si256(reinterpret_cast<__m256i*>(rows + 8 * i), r[i]);
  int64_t after = 0;
  for (int i = 0; i < 8 * NV; ++i) after += rows[i];
  // The largest within screen_range (where it left it, the window's rows may have wrapped, and
  // the total change below could match by accident), and within [-4, 4] (2^30 = 4 in these
  // units), where the bound on the doubles' rounding holds.
  const ScreenRange range = screen_range<8 * NV, kChainOne>(step_add, margin);
  const int32_t top_high = _mm256_cvtsi256_si32(high), top_low = _mm256_cvtsi256_si32(low);
  constexpr int32_t kFour = int32_t{1} << 30;
  const bool in_range = m == 0 || (top_high <= std::min(range.high, kFour) &&
                                   top_low >= std::max(range.low, -kFour));
  return in_range && after - before == screen_change<8 * NV, kChainOne>(step_add, m);
}

#endif

}  // namespace

double refresh_pass(Isa isa, const double* w, const double* cf, int64_t k, double x0, double level,
                    double growth, double delta, int64_t* above, int32_t* cand, int64_t* num,
                    double* cw, double* cc) {
#if defined(FASTMIX_X86_DISPATCH)
  switch (usable_isa(isa)) {
    case Isa::kAvx512:
      return refresh_avx512(w, cf, k, x0, level, growth, delta, above, cand, num, cw, cc);
    case Isa::kAvx2:
      return refresh_avx2(w, cf, k, x0, level, growth, delta, above, cand, num, cw, cc);
    case Isa::kScalar:
      break;
  }
#endif
  (void)isa;
  return refresh_scalar(w, cf, k, x0, level, growth, delta, above, cand, num, cw, cc);
}

bool register_argmax_available(Isa isa, int64_t n) {
#if defined(FASTMIX_X86_DISPATCH)
  if (n < 1) return false;
  switch (usable_isa(isa)) {
    case Isa::kAvx512: return n <= kRegisterArgmaxMax;
    case Isa::kAvx2: return n <= kAvx2RegisterMax;
    case Isa::kScalar: break;
  }
#endif
  (void)isa, (void)n;
  return false;
}

void register_argmax_steps(Isa isa, const double* cw, double* cc, int64_t n, int64_t s, int64_t m,
                           int32_t* pos) {
  register_argmax_chains(isa, cw, n, 1, &cc, &s, m, &pos, nullptr, 0);
}

int64_t register_multi_max(Isa isa, int chains) {
#if defined(FASTMIX_X86_DISPATCH)
  if (usable_isa(isa) != Isa::kAvx512) return 0;
  return chains == 2 ? 64 : 0;
#else
  (void)isa, (void)chains;
  return 0;
#endif
}

void register_argmax_multi(const double* const* cw, double* const* cc, const int64_t* n,
                           int chains, const int64_t* s, int64_t m, int32_t* const* pos) {
  int64_t most = 1;
  for (int j = 0; j < chains; ++j) most = std::max(most, n[j]);
#if defined(FASTMIX_X86_DISPATCH)
  if (chains == 2) {
    switch ((most + 7) / 8) {
      case 1: return argmax_multi_avx512<1, 2>(cw, cc, n, s, m, pos);
      case 2: return argmax_multi_avx512<2, 2>(cw, cc, n, s, m, pos);
      case 3: return argmax_multi_avx512<3, 2>(cw, cc, n, s, m, pos);
      case 4: return argmax_multi_avx512<4, 2>(cw, cc, n, s, m, pos);
      case 5: return argmax_multi_avx512<5, 2>(cw, cc, n, s, m, pos);
      case 6: return argmax_multi_avx512<6, 2>(cw, cc, n, s, m, pos);
      case 7: return argmax_multi_avx512<7, 2>(cw, cc, n, s, m, pos);
      case 8: return argmax_multi_avx512<8, 2>(cw, cc, n, s, m, pos);
      default: break;
    }
  }
#endif
  (void)cw, (void)cc, (void)s, (void)m, (void)pos;
  throw std::logic_error("register_argmax_multi: unsupported candidate or chain count");
}

// Whether the AVX-512 register kernel takes n candidates for this isa (else AVX2, if any).
static bool uses_avx512_kernel(Isa isa, int64_t n) {
  return isa == Isa::kAvx512 && register_argmax_available(Isa::kAvx512, n);
}

int register_segments_for(Isa isa, int64_t n) {
  // AVX2: three chains up to 32 candidates, one above (registers).  Thread CPU time per step on
  // Zen 4 (AMD EPYC family 25), one / two / three chains: K = 8: 7.4 / 4.0 / 3.0 ns; K = 16:
  // 8.1 / 4.9 / 4.4; K = 22: 9.0 / 7.9 / 8.1; K = 32: 13.1 / 11.9 / 9.2 (the scalar path: 28 to
  // 39 ns).
  if (!uses_avx512_kernel(isa, n)) return n <= kAvx2SegmentsMax ? 3 : 1;
  // S chains hold S * NV count registers next to NV weights and the temporaries (32 zmm in all).
  // Thread CPU time per step on Zen 5, including the emit pass, S = 1 / 2 / 3 / 4:
  // K = 22: 9.1 / 6.4 / 4.5 / 4.0 ns; K = 30: 11.1 / 7.1 / 5.0 / 4.8;
  // K = 40: 12.5 / 7.8 / 5.8 / 5.8; K = 64: 13.9 / 9.4 / 8.0 / 8.4.  (5 and 6 chains: no better.)
  // (Measured again with the step kept as a vector, K = 22, 4 / 5 / 6 chains: 3.6 / 3.6 / 3.8.)
  const int64_t nv = (n + 7) / 8;
  return nv <= 4 ? 4 : 3;
}

void register_argmax_chains(Isa isa, const double* cw, int64_t n, int segments, double* const* cc,
                            const int64_t* s, int64_t m, int32_t* const* pos,
                            double* const* snap, int64_t q, const ChainOutput* fused) {
#if defined(FASTMIX_X86_DISPATCH)
  if (!uses_avx512_kernel(isa, n)) {
    if (register_argmax_available(isa, n)) {
      // AVX2: one chain (single steps, recomputation) or three (segments, plain or fused).
#define FASTMIX_AVX2(NV)                                                                  \
  if (segments == 1 && fused == nullptr) {                                                \
    return argmax_steps_avx2<NV, 1>(cw, n, cc, s, m, pos, snap, q);                        \
  }                                                                                       \
  if (segments == 3 && fused != nullptr) {                                                \
    return argmax_steps_avx2<NV, 3, true>(cw, n, cc, s, m, pos, snap, q, fused);           \
  }                                                                                       \
  if (segments == 3) return argmax_steps_avx2<NV, 3>(cw, n, cc, s, m, pos, snap, q);       \
  break
      switch ((n + 3) / 4) {
        case 1: FASTMIX_AVX2(1);
        case 2: FASTMIX_AVX2(2);
        case 3: FASTMIX_AVX2(3);
        case 4: FASTMIX_AVX2(4);
        case 5: FASTMIX_AVX2(5);
        case 6: FASTMIX_AVX2(6);
        case 7: FASTMIX_AVX2(7);
        case 8: FASTMIX_AVX2(8);
        default: break;
      }
#undef FASTMIX_AVX2
      // Above 32 candidates, one chain only (its counts alone fill 9 to 12 of the 16 registers).
      if (segments == 1 && fused == nullptr) {
        switch ((n + 3) / 4) {
          case 9: return argmax_steps_avx2<9, 1>(cw, n, cc, s, m, pos, snap, q);
          case 10: return argmax_steps_avx2<10, 1>(cw, n, cc, s, m, pos, snap, q);
          case 11: return argmax_steps_avx2<11, 1>(cw, n, cc, s, m, pos, snap, q);
          case 12: return argmax_steps_avx2<12, 1>(cw, n, cc, s, m, pos, snap, q);
          default: break;
        }
      }
    }
    throw std::logic_error("register_argmax_chains: unsupported candidate or segment count");
  }
  if (fused != nullptr) {
#define FASTMIX_FUSED(NV)                                                          \
  if (segments == 3) {                                                             \
    return argmax_steps_avx512<NV, 3, true>(cw, n, cc, s, m, pos, snap, q, fused); \
  }                                                                                \
  if (segments == 4) {                                                             \
    return argmax_steps_avx512<NV, 4, true>(cw, n, cc, s, m, pos, snap, q, fused); \
  }                                                                                \
  break
    switch ((n + 7) / 8) {
      case 1: FASTMIX_FUSED(1);
      case 2: FASTMIX_FUSED(2);
      case 3: FASTMIX_FUSED(3);
      case 4: FASTMIX_FUSED(4);
      case 5: FASTMIX_FUSED(5);
      case 6: FASTMIX_FUSED(6);
      case 7: FASTMIX_FUSED(7);
      case 8: FASTMIX_FUSED(8);
      default: break;
    }
#undef FASTMIX_FUSED
    throw std::logic_error("register_argmax_chains: unsupported fused segment count");
  }
#define FASTMIX_CHAINS(NV)                                                       \
  switch (segments) {                                                            \
    case 1: return argmax_steps_avx512<NV, 1>(cw, n, cc, s, m, pos, snap, q);    \
    case 2: return argmax_steps_avx512<NV, 2>(cw, n, cc, s, m, pos, snap, q);    \
    case 3: return argmax_steps_avx512<NV, 3>(cw, n, cc, s, m, pos, snap, q);    \
    case 4: return argmax_steps_avx512<NV, 4>(cw, n, cc, s, m, pos, snap, q);    \
    default: break;                                                              \
  }                                                                              \
  break
  switch ((n + 7) / 8) {
    case 1: FASTMIX_CHAINS(1);
    case 2: FASTMIX_CHAINS(2);
    case 3: FASTMIX_CHAINS(3);
    case 4: FASTMIX_CHAINS(4);
    case 5: FASTMIX_CHAINS(5);
    case 6: FASTMIX_CHAINS(6);
    case 7: FASTMIX_CHAINS(7);
    case 8: FASTMIX_CHAINS(8);
    default: break;
  }
#undef FASTMIX_CHAINS
#endif
  (void)isa, (void)cw, (void)n, (void)segments, (void)cc, (void)s, (void)m, (void)pos, (void)snap;
  (void)q, (void)fused;
  throw std::logic_error("register_argmax_chains: unsupported candidate or segment count");
}

bool screen_available(Isa isa, int64_t k) {
#if defined(FASTMIX_X86_DISPATCH)
  if (k < 2 || k > kScreenMax) return false;
  return usable_isa(isa) != Isa::kScalar;
#else
  (void)isa, (void)k;
  return false;
#endif
}

bool screen_write(Isa isa, int64_t k, const int32_t* step_add, const int32_t* rows0,
                  const int32_t* rows, const int32_t* tops, int64_t* counts, uint32_t lanes,
                  const ScreenLaneOut* out, int64_t at, bool wide_samples) {
#if defined(FASTMIX_X86_DISPATCH)
  if (screen_available(isa, k)) {
    if (usable_isa(isa) == Isa::kAvx512) {
      screen_write_avx512(k, step_add, rows0, rows, tops, counts, lanes, out, at);
    } else {
      switch ((screen_rows(k) + 7) / 8) {
        case 1: screen_write_avx2<1>(k, step_add, rows0, rows, tops, counts, lanes, out, at,
                                    wide_samples); break;
        case 2: screen_write_avx2<2>(k, step_add, rows0, rows, tops, counts, lanes, out, at,
                                    wide_samples); break;
        case 3: screen_write_avx2<3>(k, step_add, rows0, rows, tops, counts, lanes, out, at,
                                    wide_samples); break;
        default: screen_write_avx2<4>(k, step_add, rows0, rows, tops, counts, lanes, out, at,
                                    wide_samples);
      }
    }
    return true;
  }
#endif
  (void)isa, (void)k, (void)step_add, (void)rows0, (void)rows, (void)tops, (void)counts;
  (void)lanes, (void)out, (void)at, (void)wide_samples;
  return false;
}

bool chain_available(Isa isa, int64_t k) {
#if defined(FASTMIX_X86_DISPATCH)
  // AVX2 only: with AVX-512 the register kernels with speculative segments take these K.
  return k >= kChainMin && k <= kChainMax && usable_isa(isa) == Isa::kAvx2;
#else
  (void)isa, (void)k;
  return false;
#endif
}

bool chain_anchor(Isa isa, const double* w, const double* cf, int64_t k, double x,
                  int32_t* rows) {
#if defined(FASTMIX_X86_DISPATCH)
  if (chain_available(isa, k)) return chain_anchor_avx2(w, cf, k, x, rows);
#endif
  (void)isa, (void)w, (void)cf, (void)k, (void)x, (void)rows;
  throw std::logic_error("chain_anchor: not available for this CPU or domain count");
}

bool chain_steps(Isa isa, const int32_t* step_add, int64_t k, int32_t* rows, int64_t m,
                 int32_t margin, int32_t* tops) {
#if defined(FASTMIX_X86_DISPATCH)
  if (chain_available(isa, k)) {
    switch (chain_rows(k) / 8) {
      case 5: return chain_steps_avx2<5>(step_add, rows, m, margin, tops);
      case 6: return chain_steps_avx2<6>(step_add, rows, m, margin, tops);
      case 7: return chain_steps_avx2<7>(step_add, rows, m, margin, tops);
      case 8: return chain_steps_avx2<8>(step_add, rows, m, margin, tops);
      default: break;
    }
  }
#endif
  (void)isa, (void)step_add, (void)k, (void)rows, (void)m, (void)margin, (void)tops;
  throw std::logic_error("chain_steps: not available for this CPU or domain count");
}

uint32_t screen_anchor(Isa isa, const double* w, int64_t k, const int64_t* counts,
                       const int64_t* step, int32_t* rows, double* x_max) {
#if defined(FASTMIX_X86_DISPATCH)
  if (screen_available(isa, k)) {
    if (usable_isa(isa) == Isa::kAvx512) {
      return screen_anchor_avx512(w, k, screen_rows(k), counts, step, rows, x_max);
    }
    return screen_anchor_avx2(w, k, screen_rows(k), counts, step, rows, x_max);
  }
#endif
  (void)isa, (void)w, (void)counts, (void)step, (void)rows, (void)x_max;
  throw std::logic_error("screen_anchor: not available for this CPU or domain count");
}

uint32_t screen_steps(Isa isa, const int32_t* step_add, int64_t k, int32_t* rows, int64_t m,
                      int32_t margin, int32_t* tops) {
#if defined(FASTMIX_X86_DISPATCH)
  if (screen_available(isa, k)) {
    const bool wide = usable_isa(isa) == Isa::kAvx512;
#define FASTMIX_SCREEN(R)                                                     \
  case R:                                                                     \
    return wide ? screen_steps_avx512<R>(step_add, rows, m, margin, tops)     \
                : screen_steps_avx2<R>(step_add, rows, m, margin, tops)
    switch (screen_rows(k)) {
      FASTMIX_SCREEN(2);
      FASTMIX_SCREEN(4);
      FASTMIX_SCREEN(6);
      FASTMIX_SCREEN(8);
      FASTMIX_SCREEN(10);
      FASTMIX_SCREEN(12);
      FASTMIX_SCREEN(14);
      FASTMIX_SCREEN(16);
      FASTMIX_SCREEN(18);
      FASTMIX_SCREEN(20);
      FASTMIX_SCREEN(22);
      FASTMIX_SCREEN(24);
      FASTMIX_SCREEN(26);
      FASTMIX_SCREEN(28);
      FASTMIX_SCREEN(30);
      FASTMIX_SCREEN(32);
      default:
        break;
    }
#undef FASTMIX_SCREEN
  }
#endif
  (void)isa, (void)step_add, (void)rows, (void)m, (void)margin, (void)tops;
  throw std::logic_error("screen_steps: not available for this CPU or domain count");
}

void wide_counts(Isa isa, const int64_t* c, int64_t k, double* out) {
#if defined(FASTMIX_X86_DISPATCH)
  if (usable_isa(isa) != Isa::kScalar) return wide_counts_avx2(c, k, out);
#endif
  (void)isa;
  for (int64_t d = 0; d < k; ++d) out[d] = static_cast<double>(c[d]);
}

bool wide_pack(Isa isa, const double* w, const double* cf, const int32_t* step_add,
               const int32_t* cand, int64_t n, double x, int32_t* rows, int32_t* add,
               int64_t* add_sum) {
#if defined(FASTMIX_X86_DISPATCH)
  if (usable_isa(isa) != Isa::kScalar) {
    return wide_pack_avx2(w, cf, step_add, cand, n, x, rows, add, add_sum);
  }
#endif
  (void)isa, (void)w, (void)cf, (void)step_add, (void)cand, (void)n, (void)x, (void)rows;
  (void)add, (void)add_sum;
  throw std::logic_error("wide_pack: not available for this CPU");
}

bool wide_available(Isa isa) {
#if defined(FASTMIX_X86_DISPATCH)
  return usable_isa(isa) != Isa::kScalar;
#else
  (void)isa;
  return false;
#endif
}

uint32_t wide_steps(Isa isa, const int32_t* step_add, int64_t r, int32_t* rows, int64_t m,
                    int32_t margin, const int64_t* expected, int32_t* tops) {
#if defined(FASTMIX_X86_DISPATCH)
  if (wide_available(isa) && r >= 4 && r % 4 == 0 && r <= kWideSlots) {
    return wide_steps_avx2(step_add, r, rows, m, margin, expected, tops);
  }
#endif
  (void)isa, (void)step_add, (void)r, (void)rows, (void)m, (void)margin, (void)expected, (void)tops;
  throw std::logic_error("wide_steps: not available for this CPU or slot count");
}
}  // namespace fastmix
