// Counter-based random numbers for fastmix: pure functions of (key, counter), no state, no std::
// distributions, so every draw is the same bits on every compiler, standard library and CPU.
//
// Choice of generator.  random_u64(key, counter) = mix64(key ^ (counter + 1) * GOLDEN), where mix64
// is the SplitMix64 finaliser (Stafford's "variant 13").  For key 0 this is exactly the SplitMix64
// stream, which passes BigCrush and PractRand to terabytes; every output costs 3 multiplies and 3
// shift-xors and has no loop-carried dependency, so a draw loop pipelines at ~1 ns per value on one
// core (Philox-4x32-10 needs 20 multiplies per 128 bits and gains nothing we need here).  The key
// enters by XOR rather than by addition so that two keys never give streams that are plain shifts of
// one another on the Weyl circle.  Keys are not used raw: derive_key() runs the seed and a stream id
// through two rounds of the finaliser, so sub-keys are independent-looking 64-bit values.
#pragma once

#include <cstdint>

namespace fastmix {

// Odd 64-bit constants: 2^64 / golden ratio (SplitMix64's increment) and a second odd constant
// (from MurmurHash3's finaliser) so seed and stream never combine through the same multiplier.
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;
constexpr uint64_t kStreamMul = 0xC2B2AE3D27D4EB4FULL;
constexpr uint64_t kSeedSalt = 0x6A09E667F3BCC909ULL;  // fractional bits of sqrt(2)

// SplitMix64's output function: a bijection on 64 bits with full avalanche.
inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// 64 well-mixed bits for (key, counter).  Pure: the same arguments give the same bits everywhere.
inline uint64_t random_u64(uint64_t key, uint64_t counter) {
  return mix64(key ^ ((counter + 1) * kGolden));
}

// An independent-looking sub-key for `stream` under `seed` (e.g. stream = domain id, epoch, purpose).
// Two rounds so that neighbouring seeds and neighbouring streams land far apart.
inline uint64_t derive_key(uint64_t seed, uint64_t stream) {
  return mix64(mix64(seed ^ kSeedSalt) ^ ((stream + 1) * kStreamMul));
}

// High 64 bits of the 128-bit product a*b.
inline uint64_t mulhi64(uint64_t a, uint64_t b) {
#if defined(__SIZEOF_INT128__)
  return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
#else
  const uint64_t a_lo = a & 0xFFFFFFFFULL, a_hi = a >> 32;
  const uint64_t b_lo = b & 0xFFFFFFFFULL, b_hi = b >> 32;
  const uint64_t lo_lo = a_lo * b_lo, hi_lo = a_hi * b_lo, lo_hi = a_lo * b_hi, hi_hi = a_hi * b_hi;
  const uint64_t cross = (lo_lo >> 32) + (hi_lo & 0xFFFFFFFFULL) + lo_hi;
  return hi_hi + (hi_lo >> 32) + (cross >> 32);
#endif
}

// Uniform double in [0, 1) from the top 53 bits (exact: every value is a multiple of 2^-53).
inline double uniform_double(uint64_t bits) {
  return static_cast<double>(bits >> 11) * 0x1.0p-53;
}

// Unbiased integer in [0, n) for (key, counter), n >= 1: Lemire's multiply-shift with rejection.
// A rejection happens with probability < n / 2^64; retries draw from keys derived from `key`, so the
// result is still a pure function of (key, counter, n).
inline uint64_t random_below(uint64_t key, uint64_t counter, uint64_t n) {
  uint64_t x = random_u64(key, counter);
  uint64_t low = x * n;  // low 64 bits of the 128-bit product
  if (low < n) {
    const uint64_t threshold = (0 - n) % n;  // 2^64 mod n
    for (uint64_t attempt = 1; low < threshold; ++attempt) {
      x = random_u64(derive_key(key, attempt), counter);
      low = x * n;
    }
  }
  return mulhi64(x, n);
}

}  // namespace fastmix
