// Walker/Vose alias table in integer fixed point, and the counter-based draw loop.
//
// Table: every domain gets an integer mass a[i] (sum exactly K * C, C = 2^b, see weights.h); Vose's
// pairing then runs on integers, so the table is exact and identical on every machine.  Column j
// keeps itself with probability thr[j] / 2^64 and otherwise yields alias[j].
//
// Draw i: r = random_u64(key, i); the 128-bit product r * K splits into the column (high 64 bits,
// uniform in [0, K)) and a 64-bit fraction (low bits) compared against the column's threshold.  One
// multiply, two table loads and a select per draw: no division, no float, no branch.  alias.cpp
// adds AVX-512 and AVX2 loops (8 draws at a time, same integers) picked at run time.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "sampler/isa.h"
#include "sampler/rng.h"
#include "sampler/weights.h"

namespace fastmix {

// A column's domain pair packed in 64 bits so that one load (or one gather) fetches both.
inline uint64_t pack_pair(int64_t self, int64_t alias) {
  return static_cast<uint64_t>(static_cast<uint32_t>(self)) |
         (static_cast<uint64_t>(static_cast<uint32_t>(alias)) << 32);
}

struct AliasTable {
  int64_t k = 0;
  std::vector<uint64_t> thresholds;  // keep the column when the 64-bit fraction is below this
  std::vector<uint64_t> pairs;       // low 32 bits: the column's own domain; high 32: its alias
  // The AVX2 loops' 32-bit table (K <= kPackedMax, else empty): column j's alias in the low
  // packed_bits = ceil(log2 K) bits, the top 32 - packed_bits bits of thresholds[j] above them,
  // the sign bit flipped (AVX2 compares 32-bit lanes as signed).  A draw whose fraction has the
  // same top bits as its column's threshold is not decided by them (probability
  // 2^(packed_bits - 32)); the scalar loop redraws that pass of the loop, so the output is exactly
  // fill_scalar's.
  static constexpr int64_t kPackedMax = int64_t{1} << 16;
  std::vector<uint32_t> packed;
  int packed_bits = 0;

  AliasTable() = default;

  AliasTable(const double* w, int64_t num_domains) : k(num_domains) {
    const int bits = fraction_bits(static_cast<uint64_t>(num_domains));
    const uint64_t capacity = uint64_t{1} << bits;  // C: the mass of one full column
    std::vector<uint64_t> mass =
        integer_masses(w, num_domains, capacity * static_cast<uint64_t>(num_domains));
    thresholds.assign(static_cast<size_t>(num_domains), 0);
    pairs.assign(static_cast<size_t>(num_domains), 0);
    std::vector<int64_t> small, large;
    small.reserve(static_cast<size_t>(num_domains));
    large.reserve(static_cast<size_t>(num_domains));
    for (int64_t i = 0; i < num_domains; ++i) (mass[i] < capacity ? small : large).push_back(i);
    const int shift = 64 - bits;
    while (!small.empty() && !large.empty()) {
      const int64_t s = small.back();
      small.pop_back();
      const int64_t l = large.back();
      // mass[s] < C: keep s with probability mass[s] / C, give the rest of the column to l.
      thresholds[s] = mass[s] << shift;
      pairs[s] = pack_pair(s, l);
      mass[l] -= capacity - mass[s];  // mass[l] >= C > C - mass[s], no underflow
      if (mass[l] < capacity) {
        large.pop_back();
        small.push_back(l);
      }
    }
    // With exact integer masses both lists empty together, except for full columns (mass == C),
    // which always yield themselves: alias == self.  (`small` is empty here; treating any leftover
    // the same way keeps the table valid even if that invariant were broken.)
    for (int64_t i : large) pairs[i] = pack_pair(i, i);
    for (int64_t i : small) pairs[i] = pack_pair(i, i);
    if (num_domains <= kPackedMax) {
      while ((int64_t{1} << packed_bits) < num_domains) ++packed_bits;
      const uint32_t alias_mask = (uint32_t{1} << packed_bits) - 1;
      packed.resize(static_cast<size_t>(num_domains));
      for (int64_t i = 0; i < num_domains; ++i) {
        const auto top = static_cast<uint32_t>(thresholds[i] >> 32);
        packed[i] = ((top & ~alias_mask) ^ 0x80000000u) | static_cast<uint32_t>(pairs[i] >> 32);
      }
    }
  }

  // The domain for one 64-bit random value.
  inline int32_t lookup(uint64_t r) const {
    const uint64_t kk = static_cast<uint64_t>(k);
    const uint64_t column = mulhi64(r, kk);
    const uint64_t fraction = r * kk;  // low 64 bits of the product
    const uint64_t pair = pairs[column];
    // Branch-free select: the comparison is a coin flip, so a branch would mispredict ~half the
    // time (measured ~10 ns/draw with a branch vs ~2 ns without).
    const int shift = fraction < thresholds[column] ? 0 : 32;
    return static_cast<int32_t>(static_cast<uint32_t>(pair >> shift));
  }

  // out[j] = domain of draw (start + j) for j in [0, n), with the best loop `isa` allows here.
  void fill(uint64_t key, uint64_t start, int64_t n, int32_t* out, Isa isa = best_isa()) const;

  void fill_scalar(uint64_t key, uint64_t start, int64_t n, int32_t* out) const {
    for (int64_t j = 0; j < n; ++j) out[j] = lookup(random_u64(key, start + static_cast<uint64_t>(j)));
  }
};

}  // namespace fastmix
