// Keyed pseudo-random permutation of [0, n): which window of a domain the i-th read of an epoch
// takes, without materialising anything of size n.
//
// Construction.  A balanced Feistel network on 2h bits, where 4^h is the smallest power of four
// >= n, turns any round function into a bijection of [0, 4^h); cycle-walking (apply the network
// again while the value is >= n) restricts it to a bijection of [0, n).  Because 4^h < 4n, a walk
// takes fewer than 4 network evaluations on average (the expected count is 4^h / n).  Round
// functions are random_u64(round_key, half) truncated to h bits; six rounds, past the four that
// Luby-Rackoff needs for a pseudo-random permutation, cost ~6 ns per evaluation.
//
// Keys: key(seed, domain, epoch) = derive_key(derive_key(derive_key(seed, kWindowStream), domain),
// epoch), so every (domain, epoch) gets an independent-looking permutation and none of them shares a
// stream with the domain sampler under the same seed.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "sampler/rng.h"

namespace fastmix {

// Stream id that separates window keys from every other use of the run's seed ("WINDOWS" in ASCII).
constexpr uint64_t kWindowStream = 0x57494E444F5753ULL;
// 4^31 = 2^62: the largest domain the network covers, far beyond any corpus's window count.
constexpr uint64_t kMaxPermutationSize = 1ULL << 62;

inline uint64_t window_key(uint64_t seed, uint64_t domain, uint64_t epoch) {
  return derive_key(derive_key(derive_key(seed, kWindowStream), domain), epoch);
}

class KeyedPermutation {
 public:
  static constexpr int kRounds = 6;

  KeyedPermutation() = default;

  KeyedPermutation(uint64_t n, uint64_t key) : n_(n) {
    if (n == 0) throw std::invalid_argument("KeyedPermutation: n must be >= 1, got 0");
    if (n > kMaxPermutationSize)
      throw std::invalid_argument("KeyedPermutation: n must be <= 2^62, got " + std::to_string(n));
    half_bits_ = 0;
    while ((uint64_t{1} << (2 * half_bits_)) < n) ++half_bits_;
    half_mask_ = (uint64_t{1} << half_bits_) - 1;
    for (int r = 0; r < kRounds; ++r) round_keys_[r] = derive_key(key, static_cast<uint64_t>(r));
  }

  uint64_t size() const { return n_; }

  // The image of i (0 <= i < n; the caller checks).
  uint64_t operator()(uint64_t i) const {
    uint64_t x = network(i);
    while (x >= n_) x = network(x);  // cycle-walking: terminates because the network is a bijection
    return x;
  }

  // The preimage of y (0 <= y < n): walks the inverse network the same way.
  uint64_t inverse(uint64_t y) const {
    uint64_t x = inverse_network(y);
    while (x >= n_) x = inverse_network(x);
    return x;
  }

 private:
  uint64_t round(int r, uint64_t half) const { return random_u64(round_keys_[r], half) & half_mask_; }

  uint64_t network(uint64_t x) const {
    if (half_bits_ == 0) return x;  // n == 1
    uint64_t left = x >> half_bits_, right = x & half_mask_;
    for (int r = 0; r < kRounds; ++r) {
      const uint64_t next = left ^ round(r, right);
      left = right;
      right = next;
    }
    return (left << half_bits_) | right;
  }

  uint64_t inverse_network(uint64_t x) const {
    if (half_bits_ == 0) return x;
    uint64_t left = x >> half_bits_, right = x & half_mask_;
    for (int r = kRounds - 1; r >= 0; --r) {
      const uint64_t prev = right ^ round(r, left);
      right = left;
      left = prev;
    }
    return (left << half_bits_) | right;
  }

  uint64_t n_ = 1;
  int half_bits_ = 0;
  uint64_t half_mask_ = 0;
  uint64_t round_keys_[kRounds] = {};
};

}  // namespace fastmix
