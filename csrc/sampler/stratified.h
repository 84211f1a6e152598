// Stratified (systematic) sampling in blocks, with a keyed shuffle inside each block.
//
// Every domain gets an integer mass m[d] (weights.h) with sum exactly B * Q, Q = 2^q.  Block b of a
// segment lays the B points  off + t * Q  (t = 0..B-1, off uniform in [0, Q) drawn from the block's
// key) over the cumulative masses, so domain d receives floor or ceil of m[d] / Q = w[d] * B points
// (systematic sampling), and a zero weight receives none.  The B ids are then put in a keyed
// Fisher-Yates order.  A block is a pure function of (segment key, block index, table): random access
// by block, and resuming needs only the position.
#pragma once

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <vector>

#include "sampler/rng.h"
#include "sampler/weights.h"

namespace fastmix {

constexpr int64_t kMaxBlock = int64_t{1} << 30;

struct StratifiedTable {
  int64_t k = 0;
  int64_t block = 0;
  int q_bits = 0;
  std::vector<uint64_t> cumulative;  // k + 1 entries, cumulative[k] == block * 2^q_bits

  StratifiedTable(const double* w, int64_t num_domains, int64_t block_size)
      : k(num_domains), block(block_size) {
    if (block_size < 1 || block_size > kMaxBlock) {
      throw std::invalid_argument("block must be in [1, 2^30], got " + std::to_string(block_size));
    }
    q_bits = fraction_bits(static_cast<uint64_t>(block_size));
    const uint64_t total = static_cast<uint64_t>(block_size) << q_bits;
    const std::vector<uint64_t> mass = integer_masses(w, num_domains, total);
    cumulative.assign(static_cast<size_t>(num_domains) + 1, 0);
    for (int64_t d = 0; d < num_domains; ++d) cumulative[d + 1] = cumulative[d] + mass[d];
  }

  // The B domain ids of block `index` under `segment_key`, in their shuffled order.  O(B + K).
  void fill_block(uint64_t segment_key, uint64_t index, int32_t* out) const {
    const uint64_t block_key = derive_key(segment_key, index);
    const uint64_t step = uint64_t{1} << q_bits;
    const uint64_t offset = random_u64(block_key, 0) >> (64 - q_bits);  // uniform in [0, Q)
    int64_t d = 0;
    for (int64_t t = 0; t < block; ++t) {
      const uint64_t point = offset + static_cast<uint64_t>(t) * step;  // < B * Q = cumulative[k]
      while (cumulative[d + 1] <= point) ++d;
      out[t] = static_cast<int32_t>(d);
    }
    // Fisher-Yates, swap partner of position j from counter j (counter 0 gave the offset).
    for (int64_t j = block - 1; j > 0; --j) {
      const uint64_t r = random_below(block_key, static_cast<uint64_t>(j), static_cast<uint64_t>(j) + 1);
      const int32_t tmp = out[j];
      out[j] = out[r];
      out[r] = tmp;
    }
  }

  // out[0..n) = draws [start, start + n) of the segment keyed by `segment_key`.
  void fill(uint64_t segment_key, uint64_t start, int64_t n, int32_t* out) const {
    uint64_t index = start / static_cast<uint64_t>(block);
    int64_t within = static_cast<int64_t>(start % static_cast<uint64_t>(block));
    int64_t written = 0;
    while (written < n) {
      const int64_t take = std::min<int64_t>(block - within, n - written);
      if (within == 0 && take == block) {
        fill_block(segment_key, index, out + written);  // whole block: no copy
      } else {
        copy_from_cached_block(segment_key, index, within, take, out + written);
      }
      written += take;
      within = 0;
      ++index;
    }
  }

 private:
  // The last block read in part, kept so that a stream read a few draws at a time (a batch of one
  // sample per step) generates each block once, not once per call: with a block of 2^24 every
  // sample(1) used to cost 0.43 s.  It costs 4 bytes per draw of the block while the table lives.
  mutable std::mutex cache_mutex_;
  mutable std::vector<int32_t> cache_;
  mutable uint64_t cache_key_ = 0;
  mutable uint64_t cache_index_ = 0;
  mutable bool cache_valid_ = false;

  void copy_from_cached_block(uint64_t segment_key, uint64_t index, int64_t within, int64_t take,
                              int32_t* out) const {
    std::lock_guard<std::mutex> hold(cache_mutex_);
    if (!cache_valid_ || cache_key_ != segment_key || cache_index_ != index) {
      cache_valid_ = false;  // (stays so if the allocation throws)
      cache_.resize(static_cast<size_t>(block));
      fill_block(segment_key, index, cache_.data());
      cache_key_ = segment_key;
      cache_index_ = index;
      cache_valid_ = true;
    }
    std::copy(cache_.begin() + within, cache_.begin() + within + take, out);
  }
};

}  // namespace fastmix
