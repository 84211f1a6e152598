// Validation and exact fixed-point conversion of mixture weights, shared by the alias and stratified
// samplers.  After validation everything is integer arithmetic, so the tables are the same bits on
// every machine and compiler.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#if !defined(__SIZEOF_INT128__)
#error "fastmix needs a compiler with unsigned __int128 (GCC or Clang on a 64-bit target)"
#endif

namespace fastmix {

using u128 = unsigned __int128;

// Domain ids are int32.
constexpr int64_t kMaxDomains = (int64_t{1} << 31) - 1;

// Throws std::invalid_argument (-> ValueError) unless w[0..k) is a usable weight vector:
// non-empty, finite, non-negative, at least one positive, with a finite float64 sum.
inline void check_weights(const double* w, int64_t k, const char* name = "weights") {
  const std::string arg(name);
  if (k <= 0) throw std::invalid_argument(arg + " must not be empty");
  if (k > kMaxDomains) throw std::invalid_argument(arg + " has more than 2^31 - 1 domains");
  if (w == nullptr) throw std::invalid_argument(arg + " is a null pointer");
  double sum = 0.0;
  for (int64_t i = 0; i < k; ++i) {
    const double v = w[i];
    if (!std::isfinite(v)) {
      throw std::invalid_argument(arg + "[" + std::to_string(i) + "] is not finite");
    }
    if (v < 0.0) throw std::invalid_argument(arg + "[" + std::to_string(i) + "] is negative");
    sum += v;
  }
  if (!(sum > 0.0)) throw std::invalid_argument(arg + " must have at least one positive entry");
  if (!std::isfinite(sum)) throw std::invalid_argument(arg + " sum overflows float64");
}

// Integer masses m[i] with sum exactly `total` (total <= 2^62) proportional to w, by exact integer
// arithmetic:
//   1. W[i] = trunc(w[i] * 2^(62 - e)) where 2^(e-1) <= max(w) < 2^e: exact for every weight within
//      2^9 of the largest, and a relative error below 2^-61 of max(w) otherwise;
//   2. m[i] = floor(W[i] * total / sum(W))  (128-bit products, exact);
//   3. the R < K units left over go, one each, to the R largest remainders (lowest index on ties):
//      Hamilton's largest-remainder rounding.
// So m[i] is floor or ceil of the exact quota W[i] * total / sum(W), a zero weight gets mass 0 (it is
// never drawn), and equal weights get masses that differ by at most one unit.
inline std::vector<uint64_t> integer_masses(const double* w, int64_t k, uint64_t total) {
  check_weights(w, k);
  const double w_max = *std::max_element(w, w + k);
  int exponent = 0;
  std::frexp(w_max, &exponent);  // w_max = f * 2^exponent, f in [0.5, 1)
  std::vector<uint64_t> scaled(static_cast<size_t>(k));
  u128 scaled_sum = 0;
  for (int64_t i = 0; i < k; ++i) {
    scaled[i] = static_cast<uint64_t>(std::ldexp(w[i], 62 - exponent));  // < 2^62, truncated
    scaled_sum += scaled[i];
  }
  std::vector<uint64_t> mass(static_cast<size_t>(k));
  std::vector<u128> remainder(static_cast<size_t>(k));  // < sum(W) < 2^93
  uint64_t assigned = 0;
  for (int64_t i = 0; i < k; ++i) {
    const u128 product = static_cast<u128>(scaled[i]) * total;  // < 2^124
    mass[i] = static_cast<uint64_t>(product / scaled_sum);
    remainder[i] = product % scaled_sum;
    assigned += mass[i];
  }
  const uint64_t left_over = total - assigned;  // R < K
  if (left_over > 0) {
    std::vector<int64_t> order(static_cast<size_t>(k));
    for (int64_t i = 0; i < k; ++i) order[i] = i;
    // A strict total order (remainder descending, then index), so the chosen set is unique.
    auto before = [&](int64_t a, int64_t b) {
      return remainder[a] != remainder[b] ? remainder[a] > remainder[b] : a < b;
    };
    std::nth_element(order.begin(), order.begin() + static_cast<int64_t>(left_over) - 1, order.end(),
                     before);
    for (uint64_t j = 0; j < left_over; ++j) mass[order[j]] += 1;
  }
  return mass;
}

// Number of bits b such that n * 2^b <= 2^62.
inline int fraction_bits(uint64_t n) {
  int bits_n = 0;
  while ((uint64_t{1} << bits_n) < n) ++bits_n;  // ceil(log2 n)
  return 62 - bits_n;
}

}  // namespace fastmix
