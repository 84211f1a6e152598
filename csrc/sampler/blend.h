// The largest-deficit blending rule of Megatron-LM's build_blending_indices, exactly:
//   x = max(double(s), 1.0);  d(s) = argmax_d  w[d] * x - double(count[d])   (strict >, lowest index
//   wins ties);  count[d(s)] += 1.
// Two implementations with identical output: greedy_naive (the rule as written, O(K) per step; the
// benchmark baseline and the oracle) and GreedyFast (windowed candidate pruning, below).  Both can
// start from any state (step s0, counts), which is how MixtureSampler streams the rule.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace fastmix {

// The compared value, written once so every path evaluates exactly the same expression.  setup.py
// builds with -ffp-contract=off: one IEEE multiply, one IEEE subtract, never a fused multiply-add.
inline double deficit(double weight, double x, double count) { return weight * x - count; }

inline double step_x(int64_t s) { return std::max(static_cast<double>(s), 1.0); }

// emit(j, d, count_before) for j in [0, n): the j-th step after s0 chose d, which had count_before.
template <class Emit>
void greedy_naive(const double* w, int64_t k, int64_t s0, int64_t n, int64_t* counts, Emit&& emit) {
  for (int64_t j = 0; j < n; ++j) {
    const double x = step_x(s0 + j);
    int64_t best = 0;
    double best_value = deficit(w[0], x, static_cast<double>(counts[0]));
    for (int64_t d = 1; d < k; ++d) {
      const double value = deficit(w[d], x, static_cast<double>(counts[d]));
      if (value > best_value) {
        best_value = value;
        best = d;
      }
    }
    emit(j, best, counts[best]);
    counts[best] += 1;
  }
}

// Windowed candidate pruning.  At the start s0 of a window, with v[d] the computed value of every
// domain, pick a level L such that at least m domains have v >= L; then for the next m steps:
//  * lower bound: at most t < m domains have been chosen before step s0 + t, so one of the m domains
//    with v >= L is still unchosen; its computed value only grows with x (IEEE rounding is monotone
//    and its count is unchanged), so the computed maximum is >= L at every step of the window;
//  * upper bound: an unchosen domain's exact value grows by w[d] * (x - x0) < w[d] * G (G >= m);
//    the computed values differ from the exact ones by less than delta = 2^-48 * (x0 + G + 2) in
//    total (each of the ~6 roundings involved is at most 2^-53 of a magnitude <= 2 x0 + G + 1).
// So a domain with v[d] + w[d] * G + delta < L can never reach the maximum (not even tie it) inside
// the window, and the rule restricted to the remaining candidates, scanned in index order with the
// same strict >, chooses exactly what the full scan chooses.  L = max(v) - gap (guessed from the
// previous window's maximum, redone if it lies above every value), with the gap adapted so that ~G
// domains lie above it; the candidates are then ~2G domains, and a window costs one vectorisable
// pass over K plus O(G) per step.  Measured: 1.5x the plain loop at K = 22, 5x at K = 256, 16x at
// K = 1000; each step still pays one argmax over the candidates, whose compare chain bounds it.

// One refresh pass over all K domains at x0 for level L (defined in blend.cpp, with an AVX-512
// version picked at run time): returns the maximum computed value, writes the number of domains with
// value >= L to *above and the candidates (value + w * growth + delta >= L), in index order, to
// cand[0..*num); cand must have room for K + 8 entries.  The candidate test may round differently
// between versions; the proof above holds for any rounding of it because delta carries a ~3x margin,
// and the output never depends on it.
double refresh_pass(const double* w, const double* cf, int64_t k, double x0, double level,
                    double growth, double delta, int64_t* above, int32_t* cand, int64_t* num);

class GreedyFast {
 public:
  GreedyFast(const double* w, int64_t k)
      : w_(w, w + k), k_(k), candidates_(static_cast<size_t>(k) + 8) {  // +8: refresh_pass
    // Window length ~ 0.75 sqrt(K): balances the O(K) refresh against the O(window) candidates per
    // step (thread CPU time on the dev machine: within ~10% of the best of 0.35, 0.5, 0.75, 1 and
    // 1.5 sqrt(K) at K = 22, 64, 256 and 1000).
    max_window_ = std::max<int64_t>(
        3, static_cast<int64_t>(std::sqrt(static_cast<double>(k)) * kWindowScale));
    gap_ = static_cast<double>(max_window_) / static_cast<double>(k);
  }

  template <class Emit>
  void run(int64_t s0, int64_t n, int64_t* counts, Emit&& emit) {
    if (k_ < kNaiveBelow) {
      greedy_naive(w_.data(), k_, s0, n, counts, emit);
      return;
    }
    count_f_.resize(static_cast<size_t>(k_));
    for (int64_t d = 0; d < k_; ++d) count_f_[d] = static_cast<double>(counts[d]);  // exact < 2^53
    cand_w_.resize(static_cast<size_t>(k_));
    cand_c_.resize(static_cast<size_t>(k_));
    const double* w = w_.data();
    double* cf = count_f_.data();
    int32_t* cand = candidates_.data();
    const double growth = static_cast<double>(max_window_);
    double level = HUGE_VAL;  // first window: computed from the maximum below
    int64_t done = 0;
    while (done < n) {
      const int64_t s = s0 + done;
      const double x0 = step_x(s);
      const double delta = (x0 + growth + 2.0) * 0x1p-48;  // exact scaling by 2^-48
      int64_t above = 0, num = 0;
      double top = refresh_pass(w, cf, k_, x0, level, growth, delta, &above, cand, &num);
      if (above == 0) {  // the guessed level is above every value: redo with one below the top
        level = top - gap_;
        top = refresh_pass(w, cf, k_, x0, level, growth, delta, &above, cand, &num);
      }
      const int64_t m = std::min<int64_t>(std::min<int64_t>(above, max_window_), n - done);
      // Aim for ~max_window_ values above the level next time; guess the next level from this top.
      // (Clamped: any gap > 0 is correct, these bounds only keep the adaptation from running off.)
      if (above < max_window_) {
        gap_ = std::min(gap_ * 1.25, 16.0);
      } else if (above > 2 * max_window_) {
        gap_ = std::max(gap_ * 0.8, 1e-9);
      }
      // Compact copies of the candidates' weights and counts: the per-step scan reads ~2 sqrt(K)
      // contiguous doubles.  (Tried and measured slower: scanning in value order with a
      // predictable branch, and four interleaved select chains.)
      for (int64_t j = 0; j < num; ++j) {
        cand_w_[j] = w[cand[j]];
        cand_c_[j] = cf[cand[j]];
      }
      const double* cw = cand_w_.data();
      double* cc = cand_c_.data();
      for (int64_t t = 0; t < m; ++t) {
        const int64_t j = argmax_first(cw, cc, num, step_x(s + t));
        const int64_t d = cand[j];
        emit(done + t, d, counts[d]);
        counts[d] += 1;
        cc[j] += 1.0;
      }
      for (int64_t j = 0; j < num; ++j) cf[cand[j]] = cc[j];
      level = top - gap_;
      done += m;
    }
  }

 private:
  static constexpr int64_t kNaiveBelow = 8;
  static constexpr double kWindowScale = 0.75;

  // First j maximising cw[j] * x - cc[j] (strict >): two independent branch-free scans over the
  // halves, then the lower half wins ties, which is the first-index rule.
  static int64_t argmax_first(const double* cw, const double* cc, int64_t num, double x) {
    const int64_t half = (num + 1) / 2;
    int64_t best_a = 0, best_b = half;
    double value_a = deficit(cw[0], x, cc[0]);
    double value_b = half < num ? deficit(cw[half], x, cc[half]) : -HUGE_VAL;
    for (int64_t j = 1; j < half; ++j) {
      const double va = deficit(cw[j], x, cc[j]);
      const bool better_a = va > value_a;
      value_a = better_a ? va : value_a;
      best_a = better_a ? j : best_a;
      if (half + j < num) {
        const double vb = deficit(cw[half + j], x, cc[half + j]);
        const bool better_b = vb > value_b;
        value_b = better_b ? vb : value_b;
        best_b = better_b ? half + j : best_b;
      }
    }
    return value_b > value_a ? best_b : best_a;
  }

  std::vector<double> w_;
  int64_t k_;
  std::vector<int32_t> candidates_;
  std::vector<double> count_f_, cand_w_, cand_c_;
  int64_t max_window_ = 3;
  double gap_ = 0.0;
};

}  // namespace fastmix
