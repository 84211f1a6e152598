// The largest-deficit blending rule of Megatron-LM's build_blending_indices, exactly:
//   x = max(double(s), 1.0);  d(s) = argmax_d  w[d] * x - double(count[d])   (strict >, lowest index
//   wins ties);  count[d(s)] += 1.
// Two implementations with identical output: greedy_naive (the rule as written, O(K) per step; the
// benchmark baseline and the oracle) and GreedyFast (below: all domains, or the candidates that
// windowed pruning leaves, held in AVX-512 registers with one exact vector argmax per step; AVX2
// registers for up to 48 on CPUs without AVX-512; scalar pruning on the rest; up to 32 domains,
// first 16 segments at once in fixed point, each step proved exact or recomputed: screened
// lanes, below; 33 to 64 domains with AVX2 but no AVX-512, one chain in fixed point: the
// fixed-point chain, below; 65 to 128 there, 16 segments in fixed point over each one's pruned
// candidates: the wide lanes, below).  Both can start from any state (step s0, counts), which is
// how MixtureSampler streams the rule.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "sampler/isa.h"

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
// pass over K plus O(G) per step.  With the candidates in registers (register_argmax_steps) the
// window path measured 16 ns per step at K = 256 and 27 ns at K = 1000 (plain loop: 180 and 710);
// the scalar candidate scan it replaces, 36 and 50 ns.  One chain pays one argmax latency chain
// (~26 cycles on Zen 5) per step, so for 64 < K <= 512 two speculative segments of the stream (as
// for K <= 64 below) run as chains of windows in lockstep through one kernel, each chain with its
// own candidates (run_window_segments): K = 256 13.6 ns per step, K = 100 14.9, K = 500 16.4
// (one chain: 15.7, 19.5, 19.2).  (Three chains: no better; K = 1000 with two: slower, 32 against
// 26 ns, its windows holding too many candidates for two chains' registers.)  Then, for the two
// chains: windows of sqrt(K) steps (at most 16) with up to 64 candidates per chain, the candidates'
// weights and counts compressed inside the refresh pass, the output arrays written as the windows
// close: K = 256 12.1 ns per step against 13.8 (same run, 10M steps), K = 100 10.0 against 14.9.
// (Later, on Zen 4, the AVX-512 pass compresses only the ids and copies weights and counts by id
// after it: K = 256 about 1 ns per step less; see refresh_avx512.)
// (Tried, slower: an outer window of 4 inner ones whose refresh passes scan only the outer
// candidates, 14.7 ns at K = 256 -- the windows' fixed costs, not the O(K) scan, dominate; three
// chains with the weights read from memory, 12.1 ns.)
// (Tried on Zen 3, exact but slower: no refresh pass, a level held fixed across windows and every
// domain below it filed in a ring of buckets by the first step its value can reach the level, so
// a window's candidates are the domains above it plus those due: K = 256 46 against 31 ns per
// step.  The largest value drifts ~0.1 over ~1000 steps (Dirichlet(1): 0.39 to 0.60), so a level
// kept that long lets ~0.1 K domains in, or none, and moving it re-files all K.)

// One refresh pass over all K domains at x0 for level L (defined in blend.cpp: scalar, AVX2 and
// AVX-512 versions, the best that isa allows): returns the maximum computed value, writes the
// number of domains with value >= L to *above and the candidates (value + w * growth + delta >=
// L), in index order, to cand[0..*num), with their weights and counts to cw and cc when given
// (copied by id after the pass); cand, cw and cc must have room for K + 8 entries.
// The candidate test may round differently between versions; the proof above holds for any
// rounding of it because delta carries a ~3x margin, and the output never depends on it.
double refresh_pass(Isa isa, const double* w, const double* cf, int64_t k, double x0, double level,
                    double growth, double delta, int64_t* above, int32_t* cand, int64_t* num,
                    double* cw = nullptr, double* cc = nullptr);

// The rule restricted to n candidates (weights cw, counts cc as doubles, in index order) for the m
// steps s, s+1, ...: pos[t] = the candidate chosen at step s + t; cc is updated.  Vector registers
// hold all n values, so one step is one exact vector argmax (defined in blend.cpp: AVX-512 up to
// 64 candidates, AVX2 up to kAvx2RegisterMax).  register_argmax_available(isa, n) says whether it
// can run for n candidates with that instruction set here.
constexpr int64_t kRegisterArgmaxMax = 64;
constexpr int64_t kAvx2RegisterMax = 48;
constexpr int64_t kAvx2SegmentsMax = 32;  // speculative segments (3 chains) up to this many
bool register_argmax_available(Isa isa, int64_t n);
void register_argmax_steps(Isa isa, const double* cw, double* cc, int64_t n, int64_t s, int64_t m,
                           int32_t* pos);

// Speculative segments.  The rule's future depends only on (step, counts), and from step 0 the
// counts at step x are almost always the largest-remainder rounding of w * x (or reach the same
// state within a few hundred steps: measured for K = 2..256, Dirichlet(0.1..100), x ~ 1e6..5e6). So
// S segments of one stream run as independent chains in one loop (their latency chains overlap):
// segment 0 from the true state, segment j > 0 from that guessed state, storing its counts every q
// steps.  Then, in order, each guess is compared with the true counts at its start (the final counts
// of the verified segment before it); on a mismatch the segment is recomputed from the true state,
// q steps at a time, until its counts equal a stored snapshot -- from there on its output is exact,
// the same (step, counts) giving the same future -- or to its end.  The output never depends on the
// guesses, only the speed.  register_segments_for(n) = S for n candidates; register_argmax_chains
// runs the S chains: chain j from step s[j] and counts cc[j] (updated) for m steps into pos[j],
// snapshots of the counts after every q steps into snap[j] (ceil(n / 8) * 8 entries apart; the
// first n are the counts).  With fused (one entry per chain; S = 3 or 4), chain j writes its
// output straight into the caller's arrays instead of pos[j]: index[t] = the candidate chosen,
// sample[t] = counts[it]++ (counts: int64, the chain's counts at its start).
struct ChainOutput {
  int16_t* index;
  int64_t* sample;
  int64_t* counts;
};
int register_segments_for(Isa isa, int64_t n);
void register_argmax_chains(Isa isa, const double* cw, int64_t n, int segments, double* const* cc,
                            const int64_t* s, int64_t m, int32_t* const* pos,
                            double* const* snap, int64_t q,
                            const ChainOutput* fused = nullptr);

// Chains over different candidate sets in lockstep (the windowed path's speculative segments):
// chain j has n[j] candidates (weights cw[j], counts cc[j], updated) and runs m steps from step
// s[j], writing candidate positions to pos[j].  register_multi_max(S) = the most candidates per
// chain it takes for S chains (0: not available here).
int64_t register_multi_max(Isa isa, int chains);
void register_argmax_multi(const double* const* cw, double* const* cc, const int64_t* n,
                           int chains, const int64_t* s, int64_t m, int32_t* const* pos);

// Screened lanes (2 <= K <= kScreenMax; AVX-512, or AVX2 with a row in two registers).  The
// register kernels evaluate the rule's doubles for every domain at every step; on CPUs whose
// 512-bit units are half width (Zen 4) that is ~21 cycles per step at K = 22.  Screening runs 16
// speculative segments at once, one per 32-bit lane, in fixed point, and proves each step's
// choice exact or hands the window back:
//  * at a window's start (step s >= 1, so x = s and x grows by one per step: steps 0 and 1 share
//    x = 1, step 0 is done by the exact rule) every deficit is computed as the rule computes it,
//    v = w[d] * x - count[d] in doubles, and held as A[d] = round(v * 2^F); each step adds
//    Om[d] = round(w[d] * 2^F) to every row and subtracts 2^F from the chosen row.  Row d packs
//    A[d] * 32 + d, so one integer max finds the largest and names its row (K <= 32);
//  * after t steps, A[d] * 2^-F is within (1 + t) 2^-F / 2 + e of the exact w[d] * x - count[d],
//    and so is the rule's double (e = 2^-52 (x + 8) bounds the doubles' rounding at |v| <= 4);
//    so when every other row is more than margin = 2 + W + 4 e 2^F units below the largest, the
//    rule chooses that row, and it is no tie;
//  * each step decrements every row within the margin of the largest, at least one (the largest);
//    the rows' total change over the window, taken in 64 bits at its end, says whether some step
//    decremented more than one (four vector operations per row and step, where counting the near
//    rows at every step was a fifth: K = 22 3.4 against 3.65 ns per step, AVX2 3.65 against 4.3,
//    in the same runs); a lane where some step did, or whose deficits left
//    [-kScreenRange, 2] at the start (32-bit rows could overflow) or drifted out of range inside
//    the window (tracked through the largest row), is uncertain: that window is recomputed from
//    its counts by the exact register kernel.  Each window starts again from the exact counts;
//  * a certain window's output needs no counting: the chosen row d at step t has value
//    V0[d] + t Om[d] - 2^F n, n = the times d was chosen before t in the window, so n follows from
//    the step's top and the window's first rows, and the sample is the start count plus n
//    (screen_write: whole vectors of 16 steps, looked up by in-register permutes, where counting
//    in memory made a store-to-load chain per domain).
// Each lane's starting state is a guess, verified as for run_segments below: the largest-remainder
// rounding of w * x at 128 steps before its start, then two windows of the rule, unwritten (the
// guess at the start itself was wrong in 69% of lanes at K = 22, one count off between two
// domains; after the warm-up, in 0 of 1140 lanes, K = 32: 4).  Exact ties (equal weights, small
// common denominators: rounded to 0.01, 29% of steps tie in doubles at K = 22; a published table
// of 14 weights, 4%; two equal weights, whenever their counts are equal) make windows uncertain;
// where more than a third of a round's are, the path gives up and the register kernel runs alone.
// Thread CPU time on Zen 4 (AMD EPYC family 25 model 17), K = 22, Dirichlet(1), 10M steps into
// fresh arrays, in the same runs: 2.8 ns per step with screen_write, 3.4 counting in a scalar
// pass, 3.65 with five operations per row and step in the kernel (tie counting), 6.1 for the
// register kernel alone.  Of the 2.8 (perf): the kernel ~0.8 (four integer operations per row and
// step), screen_write ~0.7 (mostly waiting on its stores into fresh memory) and the OS zeroing
// those fresh pages ~0.5.  Windows of 64 / 128 / 256 steps: 3.5 / 3.5 / 3.7 ns (before
// screen_write).  Tried and slower: writing the previous window's output from inside the
// kernel, step by step for all 16 lanes (4.5 ns: 32 output streams at once), and computing each
// sample from the chosen row in a scalar pass (4.2 ns).  The AVX2 kernel (forced on that
// machine, counting in a scalar pass): 3.8 ns against 8.6 to 9.4 for the AVX2 register kernel.
// On Zen 3 (AVX2 only) the AVX2 screen_write (8 steps per register, lookups by 32-bit permutes)
// replaced that scalar pass: K = 22 7.4 to 8.3 ns per step against 8.4 to 8.9 (see blend.cpp).
constexpr int kScreenLanes = 16;
constexpr int64_t kScreenMax = 32;
constexpr int kScreenFraction = 24;
constexpr int kScreenIndexBits = 5;
constexpr int32_t kScreenOne = int32_t{1} << (kScreenFraction + kScreenIndexBits);
constexpr double kScreenRange = 3.0;
constexpr int64_t kScreenWindow = 64;
inline int64_t screen_rows(int64_t k) { return (k + 1) / 2 * 2; }
bool screen_available(Isa isa, int64_t k);
// rows[16 d + j] = lane j's packed deficit of domain d at step step[j] >= 1 with counts
// counts[16 d + j]; returns the lanes outside the range (bit j), *x_max = the largest step.
uint32_t screen_anchor(Isa isa, const double* w, int64_t k, const int64_t* counts,
                       const int64_t* step, int32_t* rows, double* x_max);
// m steps of all 16 lanes: tops[16 t + j] = lane j's largest packed row at step t (its row id
// in the low kScreenIndexBits); step_add[d] = Om[d] * 32; returns the uncertain lanes.
uint32_t screen_steps(Isa isa, const int32_t* step_add, int64_t k, int32_t* rows, int64_t m,
                      int32_t margin, int32_t* tops);

// Where a screened lane's window goes: blend_indices' arrays (index, sample), domain ids (pos), or
// nowhere (all null: warm-up steps, only counts kept).
struct ScreenLaneOut {
  int16_t* index;
  int64_t* sample;
  int32_t* pos;
};
// After screen_steps: the certain lanes' (bit j of lanes) choices written to out[j] from offset
// at, and their counts[16 d + j] advanced to the window's end, from the rows at its start (rows0)
// and end (rows) and the tops alone (AVX-512 and AVX2).  Returns false where not available (then
// write_lane does it).  wide_samples = true makes the AVX2 version add counts in 64 bits even
// where they fit in 32 (tests: that path otherwise needs counts near 2^32).
bool screen_write(Isa isa, int64_t k, const int32_t* step_add, const int32_t* rows0,
                  const int32_t* rows, const int32_t* tops, int64_t* counts, uint32_t lanes,
                  const ScreenLaneOut* out, int64_t at, bool wide_samples = false);

// Fixed-point chain (kChainMin <= K <= kChainMax, CPUs with AVX2 but no AVX-512).  One chain of
// the rule in 32-bit fixed point over every domain: windows of kChainWindow steps anchored on the
// exact doubles (row d = round(v[d] * 2^F) * 64 + d, F = kChainFraction), one integer max per
// step in eight-lane registers, and every step proved exact by the screened lanes' argument
// (above, with F = 22 and 6 index bits): the rows within the margin of the largest all drop, the
// rows' total change over the window says whether that was ever more than one, and the largest
// row must stay where nothing overflows and the doubles' rounding bound holds (|v| <= 4).  A
// window not proved is recomputed by the other paths; weights that tie exactly (small common
// denominators) leave most windows unproved, and the chain then gives up for the rest of the run.
// Why: above 32 domains the screened lanes' rows outgrow their 5 index bits and AVX2's register
// kernel holds at most 48 doubles, so K = 33 to 64 ran that kernel alone or the pruning windows.
// Zen 3, Dirichlet(1), ns per step, K = 33 / 40 / 48 / 49 / 64: before 14.9-15.7 / 19.7-20.9 /
// 21.2-22.1 / 30-39 / 28.5-30.8, with the chain 10.6-11.1 / 10.6-11.1 / 11.3-11.9 / 11.5-12.5 /
// 12.2-14.3 (builds alternated four times, 4M steps, medians of 5; the plain loop 37 to 82).
// ~70% of it is the kernel, whose step is one latency chain: integer max tree, in-register
// horizontal max, compare, drop.
constexpr int64_t kChainMin = kScreenMax + 1;
constexpr int64_t kChainMax = 64;
constexpr int kChainFraction = 22;
constexpr int kChainIndexBits = 6;
constexpr int32_t kChainOne = int32_t{1} << (kChainFraction + kChainIndexBits);
constexpr int64_t kChainWindow = 32;
inline int64_t chain_rows(int64_t k) { return (k + 7) / 8 * 8; }
bool chain_available(Isa isa, int64_t k);
// rows[0..chain_rows(k)) packed from the rule's doubles at step x >= 1 with counts cf (padding rows
// far below); false if some deficit lies outside [-kScreenRange, 2] (the window is not proved).
bool chain_anchor(Isa isa, const double* w, const double* cf, int64_t k, double x, int32_t* rows);
// m steps: tops[t] = the largest row at step t (its low 6 bits: the domain); step_add[d] =
// round(w[d] * 2^F) * 64 (0 for padding).  True when every step is proved (see above).
bool chain_steps(Isa isa, const int32_t* step_add, int64_t k, int32_t* rows, int64_t m,
                 int32_t margin, int32_t* tops);

// Wide screened lanes (kChainMax < K <= kWideMax, AVX2 without AVX-512).  Above 64 domains the
// screened lanes' argument runs over pruned candidates: at each window's start every lane runs
// the windowed pruning's refresh pass on its own counts (the level leaving >= kWideWindow values
// above it, so the candidates hold the rule's choice at every step of the window, see above), and
// its candidates, anchored on the exact doubles, become its rows: slot i of lane j packs
// round(v * 2^F) * 128 + i (F = kWideFraction), its step round(w * 2^F) * 128 read per lane, one
// integer max per step names the slot, and the rows within the margin of the largest all drop, so
// the rows' total change over the window proves every step exact as for the narrow lanes.  A lane
// with more candidates than slots, a deficit outside [-kScreenRange, 2] or an unproved window
// recomputes it by the windowed rule on its own counts.  Why: on AVX2 one chain of windows pays
// an argmax latency chain per step; 16 lanes in fixed point overlap them.  Zen 3 (AMD EPYC family
// 25 model 1), Dirichlet(1), 2M steps into fresh arrays, fastest of 5, builds alternated four
// times, ns per step, one chain / wide lanes: K = 65 30.5-44.1 / 18.6-27.1, K = 96 35.5-41.7 /
// 24.7-35.5, K = 128 31.5-43.0 / 27.2-29.9, K = 160 32.3-43.5 / 28.1-32.3, K = 192 33.0-44.9 /
// 31.0-47.9, K = 256 32.4-34.7 / 38.9-41.5; again with this build, four times: K = 65 31.9-40.3 /
// 18.2-28.2, K = 100 28.8-41.1 / 23.5-35.2, K = 128 32.2-38.2 / 26.9-39.4, K = 160 31.3-32.2 /
// 32.3-46.8: hence up to 128.  Each lane pays its own O(K) refresh pass per window and ~2 W
// candidates (W = 32: 64 in median, 70 at the 90th percentile at K = 100 to 512), the kernel the
// most of any lane (~99 slots at K = 256): at K = 100 the kernel took ~23% of the time, the lanes'
// refresh, anchoring and output ~30%, the OS zeroing the fresh output pages ~19% (perf).  (Tried, slower at every K here: pruning values kept per lane in 32-bit fixed
// point, advanced per window, in place of the refresh pass in doubles, with the candidates'
// doubles loaded by id, K = 80 27-39 against 21-30 ns, K = 256 40-57 against 39-42; windows of 16
// steps, K = 256 39-58.)
constexpr int64_t kWideWindow = 32;
constexpr int64_t kWideSlots = 128;
constexpr int kWideFraction = 21;
constexpr int kWideIndexBits = 7;
constexpr int32_t kWideOne = int32_t{1} << (kWideFraction + kWideIndexBits);
bool wide_available(Isa isa);
// m steps of 16 lanes over r slots (r % 4 == 0, <= kWideSlots): rows[16 i + j] = lane j's slot i,
// step_add[16 i + j] its step; tops[16 t + j] = lane j's largest row at step t; expected[j] = the
// lane's total change if each step drops exactly one row.  Returns the lanes not proved.
uint32_t wide_steps(Isa isa, const int32_t* step_add, int64_t r, int32_t* rows, int64_t m,
                    int32_t margin, const int64_t* expected, int32_t* tops);
// A lane's k counts as doubles into out (exact below 2^52).
void wide_counts(Isa isa, const int64_t* c, int64_t k, double* out);
// One lane's column (stride 16) for its n candidates cand[i] (weights w, counts cf as doubles) at
// step x: rows[16 i] = round(v 2^F) * 128 + i, v their deficits clamped into [-kScreenRange, 2],
// add[16 i] = step_add[cand[i]], *add_sum = their sum; false if some v lay outside that range.
bool wide_pack(Isa isa, const double* w, const double* cf, const int32_t* step_add,
               const int32_t* cand, int64_t n, double x, int32_t* rows, int32_t* add,
               int64_t* add_sum);

// What the screened path did in a GreedyFast's runs (tests check that it runs, and recovers).
struct ScreenStats {
  int64_t steps = 0;       // steps run by screened lanes, verified or not
  int64_t windows = 0;     // lane windows
  int64_t uncertain = 0;   // lane windows recomputed by the exact kernel
  int64_t misguessed = 0;  // lanes whose guessed start state was wrong
  int64_t redone = 0;      // steps recomputed for them
  bool gave_up = false;    // too many uncertain windows: the register kernel ran the rest
  int64_t chain_windows = 0;    // windows of the fixed-point chain (33 <= K <= 64, AVX2)
  int64_t chain_uncertain = 0;  // of those, recomputed by the other paths
  bool chain_gave_up = false;   // too many uncertain: the other paths ran the rest
  int64_t equal_steps = 0;      // steps run by the equal-weights rule (run_equal)
  int64_t group_steps = 0;      // steps run over groups of equal weights (run_groups)
  int64_t wide_windows = 0;     // of the lane windows, those of wide lanes (K > 64, AVX2)
};

class GreedyFast {
 public:
  // isa: the best instruction set to use (Isa::kScalar is the portable code that runs on any
  // CPU; tests force each level to check its path on any machine).  misguess = true makes every
  // speculative segment start from a wrong state (tests of the recovery; the output must not
  // change); wide_samples = true writes the screened lanes' samples through their 64-bit path
  // (see screen_write; tests).
  GreedyFast(const double* w, int64_t k, Isa isa = best_isa(), bool misguess = false,
             bool wide_samples = false)
      : w_(w, w + k),
        k_(k),
        candidates_(static_cast<size_t>(k) + 8),
        isa_(std::min(isa, best_isa())),
        vector_(isa_ != Isa::kScalar),
        misguess_(misguess),
        wide_samples_(wide_samples) {
    find_groups();
    // Window length ~ 0.75 sqrt(K): balances the O(K) refresh against the O(window) candidates per
    // step.  Thread CPU time on the dev machine, register kernel, ns per step at 0.5 / 0.75 / 1 /
    // 1.5 sqrt(K): K = 256: 17.9 / 15.9 / 15.5 / 22.6; K = 1000: 25.9 / 27.3 / 45.8 / 63.2 (above
    // ~1 sqrt(K) the candidates often exceed the 64 lanes of the register kernel).
    max_window_ = std::max<int64_t>(
        3, static_cast<int64_t>(std::sqrt(static_cast<double>(k)) * kWindowScale));
    if (uses_window_segments()) {
      // Two chains in lockstep (run_window_segments) pay a fixed cost per window (kernel entry
      // and exit, two refresh passes), so longer windows: sqrt(K), at most kSegmentWindowMax.
      // ns per step, 0.75 sqrt(K) / this: K = 100: 12.0 / 10.2; K = 256: 12.4 / 11.8; K = 500
      // (capped at 16 here; sqrt(K) = 22 measured 19.0): 15.5 / 15.5.
      max_window_ = std::max<int64_t>(
          3, static_cast<int64_t>(std::min(std::sqrt(static_cast<double>(k)), kSegmentWindowMax)));
    }
    gap_ = static_cast<double>(max_window_) / static_cast<double>(k);
  }

  // The rule into blend_indices' two arrays: index[j] = the domain chosen at step s0 + j,
  // sample[j] = its count before (counts updated).  Same output as run() with that emit; the
  // register path with speculative segments writes the arrays from inside its kernel.
  void run_into(int64_t s0, int64_t n, int64_t* counts, int16_t* index, int64_t* sample) {
    auto emit = [index, sample](int64_t j, int64_t d, int64_t before) {
      index[j] = static_cast<int16_t>(d);
      sample[j] = before;
    };
    index_ = index;
    sample_ = sample;
    run(s0, n, counts, emit);
    index_ = nullptr;
    sample_ = nullptr;
  }

  const ScreenStats& screen_stats() const { return screen_; }

  template <class Emit>
  void run(int64_t s0, int64_t n, int64_t* counts, Emit&& emit) {
    // One group (every weight equal): run_equal's tighter loop, not run_groups' (Zen 3, uniform
    // weights at K = 2 / 22 / 256, 10M steps: 2.9-3.1 against 3.7-5.2 ns per step).
    if (group_weight_.size() == 1 && run_equal(s0, n, counts, emit)) return;
    if (group_weight_.size() > 1 && run_groups(s0, n, counts, emit)) return;
    if (k_ > 1 && chain_available(isa_, k_) && !screen_.chain_gave_up) {
      const int64_t done = run_chain(s0, n, counts, emit);
      if (done == n) return;
      // The rest by the other paths (the chain gave up on ties, or x passed 2^43), whose fused
      // writers count from their own first step.
      auto rest = [&emit, done](int64_t j, int64_t d, int64_t before) {
        emit(done + j, d, before);
      };
      int16_t* const index = index_;
      int64_t* const sample = sample_;
      if (index_ != nullptr) {
        index_ += done;
        sample_ += done;
      }
      run_paths(s0 + done, n - done, counts, rest);
      index_ = index;
      sample_ = sample;
      return;
    }
    run_paths(s0, n, counts, emit);
  }

 private:
  template <class Emit>
  void run_paths(int64_t s0, int64_t n, int64_t* counts, Emit& emit) {
    count_f_.resize(static_cast<size_t>(k_));
    for (int64_t d = 0; d < k_; ++d) count_f_[d] = static_cast<double>(counts[d]);  // exact < 2^53
    if (k_ == 1) {  // nothing to choose
      greedy_naive(w_.data(), k_, s0, n, counts, emit);
      return;
    }
    if (k_ <= kRegisterAllBelow && vector_ && register_argmax_available(isa_, k_)) {
      // Few domains: every domain is a candidate at every step, all in registers.
      int64_t done = 0;
      if (screen_available(isa_, k_)) done = run_screened(s0, n, done, counts, emit);
      const int segments = register_segments_for(isa_, k_);
      if (segments > 1) done = run_segments(segments, s0, n, done, counts, emit);
      positions_.resize(static_cast<size_t>(std::min<int64_t>(kChunk, n - done)));
      for (; done < n; done += kChunk) {
        const int64_t m = std::min<int64_t>(kChunk, n - done);
        register_argmax_steps(isa_, w_.data(), count_f_.data(), k_, s0 + done, m,
                              positions_.data());
        emit_positions(positions_.data(), nullptr, done, m, counts, emit);
      }
      return;
    }
    if (k_ < kNaiveBelow) {
      greedy_naive(w_.data(), k_, s0, n, counts, emit);
      return;
    }
    cand_w_.resize(static_cast<size_t>(k_));
    cand_c_.resize(static_cast<size_t>(k_));
    const double* w = w_.data();
    double* cf = count_f_.data();
    int32_t* cand = candidates_.data();
    const double growth = static_cast<double>(max_window_);
    double level = HUGE_VAL;  // first window: computed from the maximum below
    int64_t done = 0;
    if (uses_wide_lanes()) {
      done = run_screened(s0, n, 0, counts, emit);
    } else if (uses_window_segments()) {
      done = run_window_segments(s0, n, counts, emit);
    }
    while (done < n) {
      const int64_t s = s0 + done;
      const double x0 = step_x(s);
      const double delta = (x0 + growth + 2.0) * 0x1p-48;  // exact scaling by 2^-48
      int64_t above = 0, num = 0;
      double top = refresh_pass(isa_, w, cf, k_, x0, level, growth, delta, &above, cand, &num);
      if (above == 0) {  // the guessed level is above every value: redo with one below the top
        level = top - gap_;
        top = refresh_pass(isa_, w, cf, k_, x0, level, growth, delta, &above, cand, &num);
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
      if (vector_ && register_argmax_available(isa_, num)) {
        positions_.resize(static_cast<size_t>(m));
        register_argmax_steps(isa_, cw, cc, num, s, m, positions_.data());
        emit_positions(positions_.data(), cand, done, m, counts, emit);
        // The chosen domains' counts, from the positions rather than from cc: the kernel stores cc
        // with masked stores, which cannot forward to loads (a stall per window on Zen 5).
        for (int64_t t = 0; t < m; ++t) cf[cand[positions_[t]]] += 1.0;
        level = top - gap_;
        done += m;
        continue;
      }
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

  // ---- Equal weights (all K equal doubles: a uniform mixture, the usual start of DoReMi).  Every
  // domain's value is A - c[d] with the same A = w * x, so the rule chooses the smallest count,
  // the lowest index among equals: while |A| < 2^51 and counts < 2^52 the doubles A - c are
  // within 1/4 of the exact ones, so counts differing by >= 1 never tie and equal counts always
  // do.  From any state that is levels: at level L (the smallest count) the domains at L in index
  // order, one step each, then L + 1; from a balanced state a round robin.  The paths below meet
  // exact ties at most of these steps and give up or recompute: on Zen 3 (10M steps into fresh
  // arrays, builds alternated twice) K = 22 took 30.9-35.1 ns per step before and 2.9-3.1 here,
  // K = 256 180-185 and 3.3-3.6 (the plain loop 39-42 and 337-424).  Returns false (nothing
  // done) where A could reach 2^51 (weights as given, far above 1).
  template <class Emit>
  bool run_equal(int64_t s0, int64_t n, int64_t* counts, Emit& emit) {
    if (n == 0) return true;
    if (!(w_[0] * step_x(s0 + n - 1) < 0x1p51)) return false;
    int64_t level = *std::min_element(counts, counts + k_);
    int64_t j = 0;
    while (j < n) {
      for (int64_t d = 0; d < k_ && j < n; ++d) {
        if (counts[d] == level) {
          emit(j, d, level);
          counts[d] = level + 1;
          ++j;
        }
      }
      ++level;
    }
    screen_.equal_steps += n;
    return true;
  }

  // ---- A few distinct weights (2 to kGroupsMax values, at least three domains per value on
  // average: one domain upweighted and the rest even, two tiers).  Within a group of equal
  // weights the argument of run_equal holds, so the rule's choice is the group leader (smallest
  // count, lowest index) with the largest value w * x - count, computed as the rule computes it,
  // the lowest leader index on an exact tie.  Each step evaluates the G leaders.  The paths below
  // meet the groups' exact ties at most steps (Zen 3, 2M steps, ns per step before, with the plain
  // loop: K = 22 with one weight 0.3 and 21 equal 25.4 / 34.5, K = 100 in two tiers 127 / 186,
  // K = 256 one at 0.5 158 / 310).
  // Returns false (nothing done) where some w * x could reach 2^51.
  static constexpr int kGroupsMax = 4;

  // The distinct weights, up to kGroupsMax, into group_weight_ (one: every weight equal, for
  // run_equal) and each one's domains into group_members_ (run_groups); nothing otherwise.
  void find_groups() {
    if (k_ <= 1) return;
    std::vector<double> values;
    for (int64_t d = 0; d < k_; ++d) {
      if (std::find(values.begin(), values.end(), w_[d]) != values.end()) continue;
      if (static_cast<int>(values.size()) == kGroupsMax) return;
      values.push_back(w_[d]);
    }
    if (values.size() == 1) {
      group_weight_ = values;
      return;
    }
    // Few domains per group: the register kernels do as well or better (Zen 3, ns per step,
    // before / with groups: K = 3 [0, 1, 1] 6.2-6.6 / 7.2-7.5, K = 4 [.5, .2, .2, .1] 4.2-4.8 /
    // 9.3-9.6, K = 8 in four groups 7.5-7.8 / 9.6-10.1; K = 6 in two 7.8-8.5 / 7.3-7.4, K = 12
    // in four 12.3-15.8 / 8.6-8.8).
    if (k_ < 3 * static_cast<int64_t>(values.size())) return;
    group_weight_ = values;
    group_members_.assign(values.size(), {});
    for (int64_t d = 0; d < k_; ++d) {
      const auto g = std::find(values.begin(), values.end(), w_[d]) - values.begin();
      group_members_[g].push_back(static_cast<int32_t>(d));
    }
  }

  template <class Emit>
  bool run_groups(int64_t s0, int64_t n, int64_t* counts, Emit& emit) {
    if (n == 0) return true;
    const int groups = static_cast<int>(group_weight_.size());
    const double x_last = step_x(s0 + n - 1);
    for (int g = 0; g < groups; ++g) {
      if (!(group_weight_[g] * x_last < 0x1p51)) return false;
    }
    int64_t level[kGroupsMax];
    int64_t settled[kGroupsMax];  // from this level on no member's count is above the level
    size_t next[kGroupsMax];  // position of the leader in group_members_[g]
    int32_t leader[kGroupsMax];
    // The leader: the first member from `next` on whose count is the group's level; a full pass
    // without one raises the level (the smallest count is then one more).  Once no count is above
    // the level the members take turns in index order, and their counts need not be read (the
    // read was ~45% of the time at two groups, waiting on the counts just written).
    auto advance = [&](int g) {
      const std::vector<int32_t>& members = group_members_[g];
      if (level[g] >= settled[g]) {
        if (next[g] == members.size()) {
          next[g] = 0;
          level[g] += 1;
        }
        leader[g] = members[next[g]];
        return;
      }
      while (true) {
        for (; next[g] < members.size(); ++next[g]) {
          if (counts[members[next[g]]] == level[g]) {
            leader[g] = members[next[g]];
            return;
          }
        }
        next[g] = 0;
        level[g] += 1;
      }
    };
    for (int g = 0; g < groups; ++g) {
      const std::vector<int32_t>& members = group_members_[g];
      level[g] = counts[members[0]];
      settled[g] = counts[members[0]];
      for (const int32_t d : members) {
        level[g] = std::min(level[g], counts[d]);
        settled[g] = std::max(settled[g], counts[d]);
      }
      next[g] = 0;
      advance(g);
    }
    for (int64_t j = 0; j < n; ++j) {
      const double x = step_x(s0 + j);
      int best = 0;
      double best_value = deficit(group_weight_[0], x, static_cast<double>(level[0]));
      for (int g = 1; g < groups; ++g) {
        const double value = deficit(group_weight_[g], x, static_cast<double>(level[g]));
        if (value > best_value || (value == best_value && leader[g] < leader[best])) {
          best_value = value;
          best = g;
        }
      }
      const int32_t d = leader[best];
      emit(j, d, level[best]);
      counts[d] = level[best] + 1;
      next[best] += 1;
      advance(best);
    }
    screen_.group_steps += n;
    return true;
  }

  // ---- The fixed-point chain (chain_steps above): windows of kChainWindow steps over every
  // domain, each proved exact or recomputed by the other paths.  Returns the steps done: all of
  // them, unless it gave up on ties or x reached 2^43 (where the doubles' rounding would swamp
  // the margin).  counts are the true counts on return.
  template <class Emit>
  int64_t run_chain(int64_t s0, int64_t n, int64_t* counts, Emit& emit) {
    const int64_t k = k_;
    // A weight above 1 (greedy_fill takes weights as given) would overflow a row's step; the
    // bounds assume w <= 1, as for the screened lanes.
    if (*std::max_element(w_.begin(), w_.end()) > 1.0) return 0;
    int64_t done = 0;
    if (s0 == 0 && n > 0) {  // step 0: x = 1 as at step 1, so not a chain step
      greedy_naive(w_.data(), k, 0, 1, counts, emit);
      done = 1;
    }
    const int64_t rows = chain_rows(k);
    chain_add_.assign(static_cast<size_t>(rows), 0);
    for (int64_t d = 0; d < k; ++d) {
      const double om = std::nearbyint(std::ldexp(w_[d], kChainFraction));  // <= 2^F
      chain_add_[d] = static_cast<int32_t>(om) * (int32_t{1} << kChainIndexBits);
    }
    chain_packed_.resize(static_cast<size_t>(rows));
    chain_tops_.resize(static_cast<size_t>(kChainWindow));
    count_f_.resize(static_cast<size_t>(k));
    for (int64_t d = 0; d < k; ++d) count_f_[d] = static_cast<double>(counts[d]);
    constexpr int32_t kIndexMask = (int32_t{1} << kChainIndexBits) - 1;
    while (done < n) {
      const int64_t s = s0 + done;
      const int64_t m = std::min<int64_t>(kChainWindow, n - done);
      if (s + m > (int64_t{1} << 43)) break;
      // margin = 2 + W + 4 e 2^F units, e = 2^-52 (x + 8) at the window's last x; packed.
      const double units = std::ceil(2.0 + kChainWindow +
                                     std::ldexp(static_cast<double>(s + m) + 8.0,
                                                kChainFraction - 50));
      const int32_t margin = static_cast<int32_t>(units) * (kIndexMask + 1) + kIndexMask;
      const bool proved =
          chain_anchor(isa_, w_.data(), count_f_.data(), k, static_cast<double>(s),
                       chain_packed_.data()) &&
          chain_steps(isa_, chain_add_.data(), k, chain_packed_.data(), m, margin,
                      chain_tops_.data());
      ++screen_.chain_windows;
      if (proved) {
        for (int64_t t = 0; t < m; ++t) {
          const int32_t d = chain_tops_[t] & kIndexMask;
          emit(done + t, d, counts[d]);
          counts[d] += 1;
          count_f_[d] += 1.0;
        }
      } else {  // the window by the other paths (none of which writes index_ / sample_ here)
        ++screen_.chain_uncertain;
        auto window = [&emit, done](int64_t j, int64_t d, int64_t before) {
          emit(done + j, d, before);
        };
        run_paths(s, m, counts, window);
        for (int64_t d = 0; d < k; ++d) count_f_[d] = static_cast<double>(counts[d]);
      }
      done += m;
      // Generic weights leave ~1% of windows unproved (K = 33 to 64); ties, most of them.
      if (screen_.chain_windows >= 16 && 4 * screen_.chain_uncertain > screen_.chain_windows) {
        screen_.chain_gave_up = true;  // mostly ties: the other paths do better
        break;
      }
    }
    return done;
  }

  // Below this many domains the portable path (no vector kernel) runs the plain loop, not the
  // pruning windows: Zen 4, ns per step, windows / plain loop, three alternating runs of 2M
  // steps: K = 8: 32.0 / 17.3, 12: 32.6 / 23.3, 16: 35.3 / 29.7, 19: 36.6 / 34.9.  From about
  // K = 20 the windows are as fast or faster (K = 32, other weights: about 38 against 44).
  static constexpr int64_t kNaiveBelow = 20;
  // Up to this many domains the register kernel scans all of them at every step, no pruning, with
  // speculative segments (K = 64: 8.0 ns per step; one chain unpruned 12.3 ns, pruned to ~15
  // candidates 15.9 ns).
  static constexpr int64_t kRegisterAllBelow = 64;
  static constexpr int64_t kChunk = 4096;  // steps per register-kernel call in that case

  static constexpr int64_t kSegment = 16384;   // steps per speculative segment (at most)
  static constexpr int64_t kCheckpoint = 512;  // steps between the segments' count snapshots

  // The register path with speculative segments (register_segments_for): whole rounds of
  // `segments` equal segments, as long as each is >= 2 checkpoints; returns the steps done (the
  // caller finishes the rest).  count_f_ holds the true counts on entry and on return.
  template <class Emit>
  int64_t run_segments(int segments, int64_t s0, int64_t n, int64_t done, int64_t* counts,
                       Emit& emit) {
    if ((n - done) / segments < 2 * kCheckpoint) return done;  // not one round: no setup
    const int64_t k = k_;
    const int64_t lanes = (k + 7) / 8 * 8;
    chain_counts_.resize(static_cast<size_t>(segments * k));
    guesses_.resize(static_cast<size_t>(segments * k));
    double* cc[kMaxSegments];
    int32_t* pos[kMaxSegments];
    double* snap[kMaxSegments];
    int64_t start[kMaxSegments];
    while (true) {
      int64_t len = std::min<int64_t>(kSegment, (n - done) / segments) / kCheckpoint * kCheckpoint;
      if (len < 2 * kCheckpoint) break;
      // Buffers sized by the round, not the largest one: a short call (a sampler's batch) would
      // otherwise zero and fault in ~200 kB of fresh pages for a few thousand steps.
      const int64_t checkpoints = len / kCheckpoint;
      positions_.resize(static_cast<size_t>(segments * len));
      snaps_.resize(static_cast<size_t>(segments * checkpoints * lanes));
      for (int j = 0; j < segments; ++j) {
        cc[j] = chain_counts_.data() + j * k;
        pos[j] = positions_.data() + j * len;
        snap[j] = snaps_.data() + j * checkpoints * lanes;
        start[j] = s0 + done + j * len;
        if (j == 0) {
          std::copy(count_f_.begin(), count_f_.end(), cc[0]);
        } else {
          guess_counts(start[j], cc[j]);
          if (misguess_) misguess(j, cc[j]);
          std::copy(cc[j], cc[j] + k, guesses_.data() + j * k);
        }
      }
      const bool fused = index_ != nullptr;
      ChainOutput out[kMaxSegments];
      if (fused) {
        chain_icounts_.resize(static_cast<size_t>(segments * k));
        for (int j = 0; j < segments; ++j) {
          int64_t* ic = chain_icounts_.data() + j * k;
          for (int64_t d = 0; d < k; ++d) ic[d] = static_cast<int64_t>(cc[j][d]);
          out[j] = {index_ + done + j * len, sample_ + done + j * len, ic};
        }
      }
      register_argmax_chains(isa_, w_.data(), k, segments, cc, start, len, pos, snap, kCheckpoint,
                             fused ? out : nullptr);
      for (int j = 1; j < segments; ++j) {
        const double* truth = cc[j - 1];  // verified: the true counts at start[j]
        if (std::equal(truth, truth + k, guesses_.data() + j * k)) continue;
        std::copy(truth, truth + k, count_f_.data());  // count_f_ as scratch for the true state
        int64_t redone = 0;
        while (redone < len) {
          register_argmax_steps(isa_, w_.data(), count_f_.data(), k, start[j] + redone, kCheckpoint,
                                pos[j] + redone);
          const double* stored = snap[j] + (redone / kCheckpoint) * lanes;
          redone += kCheckpoint;
          if (std::equal(count_f_.begin(), count_f_.end(), stored)) break;  // rejoined
        }
        if (fused) {  // rewrite the recomputed steps from the true counts; the rest was right
          int64_t* ic = chain_icounts_.data() + j * k;
          for (int64_t d = 0; d < k; ++d) ic[d] = static_cast<int64_t>(truth[d]);
          for (int64_t t = 0; t < redone; ++t) {
            const int32_t d = pos[j][t];
            out[j].index[t] = static_cast<int16_t>(d);
            out[j].sample[t] = ic[d]++;
          }
        }
        if (redone == len) std::copy(count_f_.begin(), count_f_.end(), cc[j]);
      }
      if (fused) {
        for (int64_t d = 0; d < k; ++d) counts[d] = static_cast<int64_t>(cc[segments - 1][d]);
      } else {
        emit_positions(positions_.data(), nullptr, done, segments * len, counts, emit);
      }
      std::copy(cc[segments - 1], cc[segments - 1] + k, count_f_.data());
      done += segments * len;
    }
    return done;
  }

  // ---- Screened lanes (see screen_steps above): rounds of 16 speculative segments, one per
  // lane, windows of kScreenWindow steps, each lane's counts kept in lane_counts_[16 d + j].
  static constexpr int64_t kScreenSegment = 8192;    // steps per lane per round (at most)
  static constexpr int64_t kScreenCheckpoint = 128;  // steps between the lanes' count snapshots
  static constexpr int64_t kScreenProbe = 256;       // the first round's lanes: cheap to give up
  // Steps each lane runs, unwritten, before its segment: the rule from a largest-remainder guess
  // at start - 128 has met the true state at start in 900 of 900 samples (K = 5, 22, 32), the
  // guess at start itself in 37% (most often one count is off by one between two domains).
  static constexpr int64_t kScreenWarmup = 2 * kScreenWindow;

  using LaneOut = ScreenLaneOut;

  // Lane j's counts: domain d at lane_c(j)[lane_ds() * d] (narrow lanes interleave the lanes,
  // lane_counts_[16 d + j], for the anchor's vector loads; wide lanes keep each lane's counts
  // together for its refresh pass).
  int64_t* lane_c(int j) { return lane_counts_.data() + (lanes_wide_ ? j * k_ : j); }
  int64_t lane_ds() const { return lanes_wide_ ? 1 : kScreenLanes; }

  // The exact rule for lane j's m steps from step s (the register kernel over all domains; wide
  // lanes: the pruning windows), its counts updated, its choices written to out from offset t.
  void exact_lane(int j, int64_t s, int64_t m, const LaneOut& out, int64_t t) {
    if (lanes_wide_) {
      exact_wide(j, s, m, out, t);
      return;
    }
    constexpr int S = kScreenLanes;
    int64_t* c = lane_counts_.data() + j;
    for (int64_t d = 0; d < k_; ++d) lane_cf_[d] = static_cast<double>(c[S * d]);
    lane_pos_.resize(static_cast<size_t>(m));
    register_argmax_steps(isa_, w_.data(), lane_cf_.data(), k_, s, m, lane_pos_.data());
    write_lane(lane_pos_.data(), 1, m, c, out, t);
  }

  // m choices into out from offset t, the i-th domain_of(i), from the lane's counts (domain d at
  // c[cs * d]), which are updated.
  template <class DomainOf>
  static void write_choices(DomainOf&& domain_of, int64_t m, int64_t* c, int64_t cs,
                            const LaneOut& out, int64_t t) {
    if (out.index != nullptr) {
      int16_t* index = out.index + t;
      int64_t* sample = out.sample + t;
      for (int64_t i = 0; i < m; ++i) {
        const int32_t d = domain_of(i);
        index[i] = static_cast<int16_t>(d);
        sample[i] = c[cs * d]++;
      }
      return;
    }
    if (out.pos != nullptr) {
      int32_t* pos = out.pos + t;
      for (int64_t i = 0; i < m; ++i) {
        const int32_t d = domain_of(i);
        pos[i] = d;
        c[cs * d] += 1;
      }
      return;
    }
    for (int64_t i = 0; i < m; ++i) c[cs * domain_of(i)] += 1;
  }

  // m choices (domain ids at ids[stride * i], low kScreenIndexBits bits) into out from offset t,
  // from the narrow lane's counts c (stride kScreenLanes), which are updated.
  static void write_lane(const int32_t* ids, int64_t stride, int64_t m, int64_t* c,
                         const LaneOut& out, int64_t t) {
    constexpr int32_t kMask = (1 << kScreenIndexBits) - 1;
    write_choices([ids, stride](int64_t i) { return ids[stride * i] & kMask; }, m, c, kScreenLanes,
                  out, t);
  }

  // Wide lane j's m steps from step s by the pruning windows (as run_paths' loop) on its own
  // counts, written to out from offset t.
  void exact_wide(int j, int64_t s, int64_t m, const LaneOut& out, int64_t t) {
    int64_t* c = lane_c(j);
    const double growth = static_cast<double>(max_window_);
    double level = HUGE_VAL;
    double gap = gap_;
    int32_t* cand = exact_cand_.data();
    double* cw = exact_cw_.data();
    double* cc = exact_cc_.data();
    lane_pos_.resize(static_cast<size_t>(max_window_));
    for (int64_t done = 0; done < m;) {
      wide_counts(isa_, c, k_, lane_cf_.data());
      const double x0 = step_x(s + done);
      const double delta = (x0 + growth + 2.0) * 0x1p-48;  // exact scaling by 2^-48
      int64_t above = 0, num = 0;
      double top = refresh_pass(isa_, w_.data(), lane_cf_.data(), k_, x0, level, growth, delta,
                                &above, cand, &num, cw, cc);
      if (above == 0) {
        level = top - gap;
        top = refresh_pass(isa_, w_.data(), lane_cf_.data(), k_, x0, level, growth, delta, &above,
                           cand, &num, cw, cc);
      }
      const int64_t steps = std::min<int64_t>(std::min<int64_t>(above, max_window_), m - done);
      if (above < max_window_) {
        gap = std::min(gap * 1.25, 16.0);
      } else if (above > 2 * max_window_) {
        gap = std::max(gap * 0.8, 1e-9);
      }
      int32_t* pos = lane_pos_.data();
      if (register_argmax_available(isa_, num)) {
        register_argmax_steps(isa_, cw, cc, num, s + done, steps, pos);
      } else {
        for (int64_t i = 0; i < steps; ++i) {
          const int64_t at = argmax_first(cw, cc, num, step_x(s + done + i));
          pos[i] = static_cast<int32_t>(at);
          cc[at] += 1.0;
        }
      }
      write_choices([cand, pos](int64_t i) { return cand[pos[i]]; }, steps, c, 1, out, t + done);
      level = top - gap;
      done += steps;
    }
  }

  // Whole rounds of 16 lanes from step s0 + done while they fit; returns the new done.
  // count_f_ holds the true counts on entry and on return.  K <= kScreenMax: the narrow lanes
  // (every domain a row); above, the wide lanes (uses_wide_lanes).
  template <class Emit>
  int64_t run_screened(int64_t s0, int64_t n, int64_t done, int64_t* counts, Emit& emit) {
    constexpr int S = kScreenLanes;
    const int64_t k = k_;
    if (screen_.gave_up) return done;
    // Not one round (of at least two checkpoints per lane after step 0): no setup.
    if (n - done - (s0 + done == 0 ? 1 : 0) < S * 2 * kScreenCheckpoint) return done;
    // A weight above 1 (greedy_fill takes weights as given) would overflow the 32-bit step; the
    // bounds above assume w <= 1 as well.
    if (*std::max_element(w_.begin(), w_.end()) > 1.0) return done;
    if (s0 + done == 0 && n > done) {  // step 0: x = 1 as at step 1, so not a lane step
      auto first = [&emit, done](int64_t j, int64_t d, int64_t before) {
        emit(done + j, d, before);
      };
      greedy_naive(w_.data(), k, 0, 1, counts, first);
      for (int64_t d = 0; d < k; ++d) count_f_[d] = static_cast<double>(counts[d]);
      done += 1;
    }
    lanes_wide_ = k > kScreenMax;
    const int64_t window = lanes_wide_ ? kWideWindow : kScreenWindow;
    // Each domain's packed step, round(w * 2^F) << index bits (<= 2^F before the shift).
    const int fraction = lanes_wide_ ? kWideFraction : kScreenFraction;
    const int index_bits = lanes_wide_ ? kWideIndexBits : kScreenIndexBits;
    step_add_.assign(static_cast<size_t>(lanes_wide_ ? k : screen_rows(k)), 0);
    for (int64_t d = 0; d < k; ++d) {
      const double om = std::nearbyint(std::ldexp(w_[d], fraction));
      step_add_[d] = static_cast<int32_t>(om) * (int32_t{1} << index_bits);
    }
    if (lanes_wide_) {  // step_add_ per domain; the kernel's per lane and slot in wide_add_
      lane_rows_.resize(static_cast<size_t>(S * kWideSlots));
      wide_add_.resize(static_cast<size_t>(S * kWideSlots));
      wide_slot_.resize(static_cast<size_t>(S * kWideSlots));
      wide_cand_.resize(static_cast<size_t>(k) + 8);
      exact_cand_.resize(static_cast<size_t>(k) + 8);
      exact_cw_.resize(static_cast<size_t>(k) + 8);
      exact_cc_.resize(static_cast<size_t>(k) + 8);
      wide_level_.assign(S, HUGE_VAL);
      wide_gap_.assign(S, static_cast<double>(kWideWindow) / static_cast<double>(k));
      tops_.resize(static_cast<size_t>(S * kWideWindow));
    } else {
      const int64_t rows = screen_rows(k);
      lane_rows_.resize(static_cast<size_t>(S * rows));
      lane_rows0_.resize(static_cast<size_t>(S * rows));
      tops_.resize(static_cast<size_t>(S * kScreenWindow));
    }
    lane_counts_.resize(static_cast<size_t>(S * k));
    lane_cf_.resize(static_cast<size_t>(k));
    lane_guess_.resize(static_cast<size_t>(S * k));
    lane_final_.resize(static_cast<size_t>(k));
    const int64_t ds = lane_ds();
    const bool fused = index_ != nullptr;
    bool first_round = screen_.windows == 0;
    while (true) {
      int64_t len = std::min<int64_t>(kScreenSegment, (n - done) / S);
      if (first_round) len = std::min(len, kScreenProbe);
      len = len / kScreenCheckpoint * kScreenCheckpoint;
      if (len < 2 * kScreenCheckpoint) break;
      // The doubles' rounding grows with x: past x ~ 2^43 the margin would swamp the screening.
      if (s0 + done + S * len > (int64_t{1} << 43)) break;
      int64_t start[S];
      LaneOut out[S];
      if (!fused) positions_.resize(static_cast<size_t>(S * len));
      lane_snaps_.resize(static_cast<size_t>(S * (len / kScreenCheckpoint) * k));
      for (int j = 0; j < S; ++j) {
        start[j] = s0 + done + j * len;
        // Lane 0 starts from the true state; its warm-up steps (from start[0]) are thrown away.
        int64_t* c = lane_c(j);
        if (j == 0) {
          for (int64_t d = 0; d < k; ++d) c[ds * d] = counts[d];
        } else {
          guess_counts(start[j] - kScreenWarmup, lane_cf_.data());
          for (int64_t d = 0; d < k; ++d) c[ds * d] = static_cast<int64_t>(lane_cf_[d]);
        }
        out[j] = fused ? LaneOut{index_ + done + j * len, sample_ + done + j * len, nullptr}
                       : LaneOut{nullptr, nullptr, positions_.data() + j * len};
      }
      int64_t uncertain = 0;
      for (int64_t p = -kScreenWarmup; p < len; p += window) {
        if (p == 0) start_lanes(counts);
        // Warm-up windows (p < 0) run before each lane's start, lane 0's from its start.
        int64_t step[S];
        for (int j = 0; j < S; ++j) step[j] = start[j] + p + (p < 0 && j == 0 ? kScreenWarmup : 0);
        static const LaneOut kWarmup[S] = {};
        const LaneOut* to = p >= 0 ? out : kWarmup;
        const int64_t unsure =
            lanes_wide_ ? wide_window(step, to, p) : narrow_window(step, to, p);
        if (p >= 0) uncertain += unsure;
        if (p >= 0 && (p + window) % kScreenCheckpoint == 0) {
          snapshot_lanes((p + window) / kScreenCheckpoint - 1, len / kScreenCheckpoint);
        }
      }
      screen_.windows += S * (len / window);
      screen_.uncertain += uncertain;
      if (lanes_wide_) screen_.wide_windows += S * (len / window);
      verify_lanes(start, len, out);
      if (fused) {
        const int64_t* last = lane_c(S - 1);
        for (int64_t d = 0; d < k; ++d) counts[d] = last[ds * d];
      } else {
        emit_positions(positions_.data(), nullptr, done, S * len, counts, emit);
      }
      for (int64_t d = 0; d < k; ++d) count_f_[d] = static_cast<double>(counts[d]);
      screen_.steps += S * len;
      done += S * len;
      // Mostly ties: not worth screening.  An uncertain window costs its recomputation, so
      // screening pays up to about a third of them: the DoReMi paper's Pile table (22 domains,
      // two of them 0.0036: equal weights tie whenever their counts are equal) leaves 24% of its
      // windows uncertain and ran 7.3-8.9 ns per step screened against 10.9-11.0 given up at an
      // eighth (Zen 3, 4M steps, builds alternated); RegMix's copy of it (13%) 7.0-7.3 against
      // 9.2-9.4.  Weights with a small common denominator leave every window uncertain.
      if (3 * uncertain > S * (len / window)) {
        screen_.gave_up = true;
        break;
      }
      first_round = false;
    }
    return done;
  }

  // One window of the narrow lanes (every domain a row) at steps step[j]; returns how many lanes
  // were recomputed.
  int64_t narrow_window(const int64_t* step, const LaneOut* to, int64_t p) {
    constexpr int S = kScreenLanes;
    const int64_t k = k_;
    double x_max = 0.0;
    uint32_t unsure =
        screen_anchor(isa_, w_.data(), k, lane_counts_.data(), step, lane_rows_.data(), &x_max);
    // margin = 2 + W + 4 e 2^F units (blend.h), packed: * 32 + 31.
    const double margin_units =
        std::ceil(2.0 + kScreenWindow + std::ldexp(x_max + 8.0, kScreenFraction - 50));
    const int32_t margin = static_cast<int32_t>(margin_units) * 32 + 31;
    std::copy(lane_rows_.begin(), lane_rows_.end(), lane_rows0_.begin());
    unsure |= screen_steps(isa_, step_add_.data(), k, lane_rows_.data(), kScreenWindow, margin,
                           tops_.data());
    const bool written = screen_write(isa_, k, step_add_.data(), lane_rows0_.data(),
                                      lane_rows_.data(), tops_.data(), lane_counts_.data(),
                                      ~unsure & 0xFFFFu, to, p, wide_samples_);
    int64_t recomputed = 0;
    for (int j = 0; j < S; ++j) {
      if ((unsure >> j) & 1u) {
        exact_lane(j, step[j], kScreenWindow, to[j], p);
        ++recomputed;
      } else if (!written) {
        write_lane(tops_.data() + j, S, kScreenWindow, lane_counts_.data() + j, to[j], p);
      }
    }
    return recomputed;
  }

  // One window of the wide lanes at steps step[j] (see wide_steps in blend.h): each lane's
  // refresh pass and candidates, the kernel, then each lane's choices by slot.  Returns how many
  // lanes were recomputed.
  int64_t wide_window(const int64_t* step, const LaneOut* to, int64_t p) {
    constexpr int S = kScreenLanes;
    constexpr int64_t W = kWideWindow;
    const int64_t k = k_;
    const double growth = static_cast<double>(W);
    uint32_t unsure = 0;
    int64_t num[S], add_sum[S];
    int64_t slots = 4;
    double x_max = 0.0;
    for (int j = 0; j < S; ++j) {
      wide_counts(isa_, lane_c(j), k, lane_cf_.data());
      const double x0 = step_x(step[j]);
      x_max = std::max(x_max, x0);
      const double delta = (x0 + growth + 2.0) * 0x1p-48;  // exact scaling by 2^-48
      double level = wide_level_[j];
      int64_t above = 0, n = 0;
      double top = refresh_pass(isa_, w_.data(), lane_cf_.data(), k, x0, level, growth, delta,
                                &above, wide_cand_.data(), &n);
      // The window needs W values at or above the level (see the pruning proof above).
      for (int tries = 0; above < W && tries < 8; ++tries) {
        wide_gap_[j] = std::min(wide_gap_[j] * 1.5, 16.0);
        level = top - wide_gap_[j];
        top = refresh_pass(isa_, w_.data(), lane_cf_.data(), k, x0, level, growth, delta, &above,
                           wide_cand_.data(), &n);
      }
      if (above > W + W / 2) wide_gap_[j] = std::max(wide_gap_[j] * 0.9, 1e-9);
      wide_level_[j] = top - wide_gap_[j];
      num[j] = 0;
      if (above < W || n > kWideSlots) {
        unsure |= 1u << j;
        continue;
      }
      if (!wide_pack(isa_, w_.data(), lane_cf_.data(), step_add_.data(), wide_cand_.data(), n, x0,
                     lane_rows_.data() + j, wide_add_.data() + j, &add_sum[j])) {
        unsure |= 1u << j;
        continue;
      }
      std::copy(wide_cand_.begin(), wide_cand_.begin() + n, wide_slot_.begin() + j * kWideSlots);
      num[j] = n;
      slots = std::max(slots, (n + 3) / 4 * 4);
    }
    int64_t expected[S];
    for (int j = 0; j < S; ++j) {
      for (int64_t i = num[j]; i < slots; ++i) {  // padding: never near a lane's maximum
        lane_rows_[S * i + j] = INT32_MIN;
        wide_add_[S * i + j] = 0;
      }
      expected[j] = num[j] > 0 ? W * (add_sum[j] - kWideOne) : 0;
      if (num[j] == 0) lane_rows_[j] = 0;  // a lane recomputed anyway: any row in range
    }
    // margin = 2 + W + 4 e 2^F units (blend.h), packed: * 128 + 127.
    const double margin_units = std::ceil(2.0 + W + std::ldexp(x_max + 8.0, kWideFraction - 50));
    const int32_t margin = static_cast<int32_t>(margin_units) * 128 + 127;
    unsure |= wide_steps(isa_, wide_add_.data(), slots, lane_rows_.data(), W, margin,
                         expected, tops_.data());
    int64_t recomputed = 0;
    for (int j = 0; j < S; ++j) {
      if ((unsure >> j) & 1u) {
        exact_wide(j, step[j], W, to[j], p);
        ++recomputed;
        continue;
      }
      const int32_t* slot = wide_slot_.data() + j * kWideSlots;
      const int32_t* tops = tops_.data() + j;
      constexpr int32_t kMask = (1 << kWideIndexBits) - 1;
      write_choices([slot, tops](int64_t i) { return slot[tops[S * i] & kMask]; }, W, lane_c(j),
                    1, to[j], p);
    }
    return recomputed;
  }

  // After the warm-up: lane 0 back to the true counts, lanes 1..15's states kept as their guesses
  // (made wrong on purpose for tests: misguess_).
  void start_lanes(const int64_t* counts) {
    constexpr int S = kScreenLanes;
    const int64_t ds = lane_ds();
    int64_t* c0 = lane_c(0);
    for (int64_t d = 0; d < k_; ++d) c0[ds * d] = counts[d];
    for (int j = 1; j < S; ++j) {  // verify_lanes reads the guesses of lanes 1..15
      int64_t* guess = lane_guess_.data() + j * k_;
      int64_t* c = lane_c(j);
      if (misguess_) {
        for (int64_t d = 0; d < k_; ++d) lane_cf_[d] = static_cast<double>(c[ds * d]);
        misguess(j, lane_cf_.data());
        for (int64_t d = 0; d < k_; ++d) c[ds * d] = static_cast<int64_t>(lane_cf_[d]);
      }
      for (int64_t d = 0; d < k_; ++d) guess[d] = c[ds * d];
    }
  }

  // Lanes 1..15's counts at checkpoint i of the round's `checkpoints` (after (i + 1)
  // kScreenCheckpoint steps).
  void snapshot_lanes(int64_t i, int64_t checkpoints) {
    constexpr int S = kScreenLanes;
    const int64_t ds = lane_ds();
    for (int j = 1; j < S; ++j) {
      int64_t* snap = lane_snaps_.data() + (j * checkpoints + i) * k_;
      const int64_t* c = lane_c(j);
      for (int64_t d = 0; d < k_; ++d) snap[d] = c[ds * d];
    }
  }

  // In order, lane j's guessed start against lane j - 1's final (true) counts; a wrong one is
  // recomputed from the truth a checkpoint at a time until its counts meet its own snapshot (the
  // same step and counts: from there on the guessed run was right, its end included).
  void verify_lanes(const int64_t* start, int64_t len, const LaneOut* out) {
    constexpr int S = kScreenLanes;
    const int64_t k = k_;
    const int64_t ds = lane_ds();
    const int64_t checkpoints = len / kScreenCheckpoint;  // as snapshot_lanes stored them
    for (int j = 1; j < S; ++j) {
      int64_t* c = lane_c(j);
      const int64_t* before = lane_c(j - 1);
      const int64_t* guess = lane_guess_.data() + j * k;
      bool right = true;
      for (int64_t d = 0; d < k; ++d) right = right && before[ds * d] == guess[d];
      if (right) continue;
      ++screen_.misguessed;
      for (int64_t d = 0; d < k; ++d) {
        lane_final_[d] = c[ds * d];
        c[ds * d] = before[ds * d];
      }
      int64_t redone = 0;
      bool rejoined = false;
      while (redone < len && !rejoined) {
        exact_lane(j, start[j] + redone, kScreenCheckpoint, out[j], redone);
        const int64_t* snap =
            lane_snaps_.data() + (j * checkpoints + redone / kScreenCheckpoint) * k;
        redone += kScreenCheckpoint;
        rejoined = true;
        for (int64_t d = 0; d < k; ++d) rejoined = rejoined && c[ds * d] == snap[d];
      }
      screen_.redone += redone;
      if (rejoined) {
        for (int64_t d = 0; d < k; ++d) c[ds * d] = lane_final_[d];
      }
    }
  }

  // ---- Speculative segments for the windowed path (K > 64): the same scheme as run_segments,
  // with each segment a chain of pruning windows (its own counts, level and candidates).  The
  // chains advance in lockstep through one kernel (register_argmax_multi), so their argmax
  // latency chains overlap; windows never cross a checkpoint, so the counts at each checkpoint
  // are exact for that chain's start.
  struct WindowChain {
    std::vector<double> cf, cw, cc;  // all counts; the candidates' weights and counts
    std::vector<int32_t> cand;       // candidate domain ids (room for K + 8)
    int64_t num = 0, left = 0;       // candidates, length of the window just opened
    double level = HUGE_VAL, gap = 0.0;
  };
  static constexpr int kWindowSegments = 2;
  static constexpr int64_t kWindowSegmentsMaxK = 512;

  // Opens chain c's next window at step s, at most limit steps: the refresh pass, the level and
  // gap adaptation and the compact copies, exactly as in run().
  void open_window(WindowChain& c, int64_t s, int64_t limit) {
    const double growth = static_cast<double>(max_window_);
    const double x0 = step_x(s);
    const double delta = (x0 + growth + 2.0) * 0x1p-48;  // exact scaling by 2^-48
    int64_t above = 0, num = 0;
    double top = refresh_pass(isa_, w_.data(), c.cf.data(), k_, x0, c.level, growth, delta, &above,
                              c.cand.data(), &num, c.cw.data(), c.cc.data());
    if (above == 0) {
      c.level = top - c.gap;
      top = refresh_pass(isa_, w_.data(), c.cf.data(), k_, x0, c.level, growth, delta, &above,
                         c.cand.data(), &num, c.cw.data(), c.cc.data());
    }
    c.left = std::min<int64_t>(std::min<int64_t>(above, max_window_), limit);
    if (above < max_window_) {
      c.gap = std::min(c.gap * 1.25, 16.0);
    } else if (above > 2 * max_window_) {
      c.gap = std::max(c.gap * 0.8, 1e-9);
    }
    c.num = num;
    c.level = top - c.gap;
  }

  // Chains c[0..S) from progress p0 to p1 (steps start[j] + p), windows clipped at p1; chain j
  // writes the chosen domain ids to out[j][p0..p1).
  // With direct (run_into), chain j also writes its steps into the caller's arrays: index, and
  // sample = its counts (int64, from the chain's start) before each step.
  void run_lockstep(WindowChain** c, int S, const int64_t* start, int64_t p0, int64_t p1,
                    int32_t* const* out, const ChainOutput* direct = nullptr) {
    int64_t p = p0;
    while (p < p1) {
      int64_t m = p1 - p;
      int64_t most = 0;
      // Every chain opens a window here and all run the shortest: a fresh window per kernel call
      // (K = 256: 14.3 against 15.3 ns per step keeping each chain's window open across calls,
      // which splits windows into more, shorter kernel calls).
      for (int j = 0; j < S; ++j) {
        open_window(*c[j], start[j] + p, p1 - p);
        m = std::min(m, c[j]->left);
        most = std::max(most, c[j]->num);
      }
      int64_t s[kMaxSegments];
      int32_t* pos[kMaxSegments];
      for (int j = 0; j < S; ++j) {
        s[j] = start[j] + p;
        pos[j] = out[j] + p;
      }
      if (S > 1 && most <= register_multi_max(isa_, S)) {
        const double* cw[kMaxSegments];
        double* cc[kMaxSegments];
        int64_t nn[kMaxSegments];
        for (int j = 0; j < S; ++j) {
          cw[j] = c[j]->cw.data();
          cc[j] = c[j]->cc.data();
          nn[j] = c[j]->num;
        }
        register_argmax_multi(cw, cc, nn, S, s, m, pos);
      } else {
        for (int j = 0; j < S; ++j) {
          WindowChain& cj = *c[j];
          if (register_argmax_available(isa_, cj.num)) {
            register_argmax_steps(isa_, cj.cw.data(), cj.cc.data(), cj.num, s[j], m, pos[j]);
            continue;
          }
          for (int64_t t = 0; t < m; ++t) {
            const int64_t i = argmax_first(cj.cw.data(), cj.cc.data(), cj.num, step_x(s[j] + t));
            pos[j][t] = static_cast<int32_t>(i);
            cj.cc[i] += 1.0;
          }
        }
      }
      for (int j = 0; j < S; ++j) {  // candidate positions -> domain ids; the chosen counts
        WindowChain& cj = *c[j];
        if (direct != nullptr) {  // the output arrays here, not in a separate pass (~0.4 ns/step)
          int16_t* index = direct[j].index + p;
          int64_t* sample = direct[j].sample + p;
          int64_t* ic = direct[j].counts;
          for (int64_t t = 0; t < m; ++t) {
            const int32_t d = cj.cand[pos[j][t]];
            index[t] = static_cast<int16_t>(d);
            sample[t] = ic[d]++;
            cj.cf[d] += 1.0;
          }
          continue;
        }
        for (int64_t t = 0; t < m; ++t) {
          const int32_t d = cj.cand[pos[j][t]];
          pos[j][t] = d;
          cj.cf[d] += 1.0;
        }
      }
      p += m;
    }
  }

  template <class Emit>
  int64_t run_window_segments(int64_t s0, int64_t n, int64_t* counts, Emit& emit) {
    const int S = kWindowSegments;
    const int64_t k = k_;
    if (n / S < 2 * kCheckpoint) return 0;  // not one round: no setup
    window_chains_.resize(S + 1);  // the last one: scratch for recomputing a misguessed segment
    for (auto& c : window_chains_) {
      c.cf.resize(static_cast<size_t>(k));
      c.cw.resize(static_cast<size_t>(k) + 8);
      c.cc.resize(static_cast<size_t>(k) + 8);
      c.cand.resize(static_cast<size_t>(k) + 8);
      if (c.gap == 0.0) c.gap = gap_;
    }
    guesses_.resize(static_cast<size_t>(S * k));
    WindowChain* chain[kMaxSegments];
    int32_t* out[kMaxSegments];
    int64_t start[kMaxSegments];
    int64_t done = 0;
    while (true) {
      const int64_t len =
          std::min<int64_t>(kSegment, (n - done) / S) / kCheckpoint * kCheckpoint;
      if (len < 2 * kCheckpoint) break;
      const int64_t checkpoints = len / kCheckpoint;  // buffers sized by the round (run_segments)
      positions_.resize(static_cast<size_t>(S * len));
      snaps_.resize(static_cast<size_t>(S * checkpoints * k));
      for (int j = 0; j < S; ++j) {
        chain[j] = &window_chains_[j];
        out[j] = positions_.data() + j * len;
        start[j] = s0 + done + j * len;
        if (j == 0) {
          std::copy(count_f_.begin(), count_f_.end(), chain[0]->cf.begin());
        } else {
          guess_counts(start[j], chain[j]->cf.data());
          if (misguess_) misguess(j, chain[j]->cf.data());
          std::copy(chain[j]->cf.begin(), chain[j]->cf.end(), guesses_.begin() + j * k);
        }
      }
      const bool direct = index_ != nullptr;
      ChainOutput into[kMaxSegments] = {};
      if (direct) {
        chain_icounts_.resize(static_cast<size_t>((S + 1) * k));
        for (int j = 0; j < S; ++j) {
          int64_t* ic = chain_icounts_.data() + j * k;
          for (int64_t d = 0; d < k; ++d) ic[d] = static_cast<int64_t>(chain[j]->cf[d]);
          into[j] = {index_ + done + j * len, sample_ + done + j * len, ic};
        }
      }
      for (int64_t p = 0; p < len; p += kCheckpoint) {
        run_lockstep(chain, S, start, p, p + kCheckpoint, out, direct ? into : nullptr);
        for (int j = 1; j < S; ++j) {
          std::copy(chain[j]->cf.begin(), chain[j]->cf.end(),
                    snaps_.begin() + (j * checkpoints + p / kCheckpoint) * k);
        }
      }
      for (int j = 1; j < S; ++j) {
        const std::vector<double>& truth = chain[j - 1]->cf;  // verified: true counts at start[j]
        if (std::equal(truth.begin(), truth.end(), guesses_.begin() + j * k)) continue;
        WindowChain* redo = &window_chains_[S];
        std::copy(truth.begin(), truth.end(), redo->cf.begin());
        ChainOutput redo_into = into[j];  // rewrites the recomputed steps from the true counts
        if (direct) {
          redo_into.counts = chain_icounts_.data() + S * k;
          for (int64_t d = 0; d < k; ++d) redo_into.counts[d] = static_cast<int64_t>(truth[d]);
        }
        int64_t redone = 0;
        bool rejoined = false;
        while (redone < len && !rejoined) {
          run_lockstep(&redo, 1, &start[j], redone, redone + kCheckpoint, &out[j],
                       direct ? &redo_into : nullptr);
          const auto stored = snaps_.begin() + (j * checkpoints + redone / kCheckpoint) * k;
          redone += kCheckpoint;
          rejoined = std::equal(redo->cf.begin(), redo->cf.end(), stored);
        }
        if (!rejoined) std::copy(redo->cf.begin(), redo->cf.end(), chain[j]->cf.begin());
      }
      if (direct) {
        for (int64_t d = 0; d < k; ++d) counts[d] = static_cast<int64_t>(chain[S - 1]->cf[d]);
      } else {
        emit_positions(positions_.data(), nullptr, done, S * len, counts, emit);
      }
      std::copy(chain[S - 1]->cf.begin(), chain[S - 1]->cf.end(), count_f_.begin());
      done += S * len;
    }
    return done;
  }

  // A likely state at step x (see register_argmax_chains): the largest-remainder rounding of
  // w * x / sum(w), never below the current counts (counts only grow).  Any guess is safe.
  void guess_counts(int64_t x, double* out) const {
    const int64_t k = k_;
    double total_w = 0.0;
    for (int64_t d = 0; d < k; ++d) total_w += w_[d];
    const double scale = static_cast<double>(x) / total_w;
    if (!std::isfinite(scale)) {
      // Weights taken as given (greedy_fill, _C.blend_indices) may be subnormal: x / sum(w)
      // overflows, and inf counts (NaN for a zero weight: 0 * inf) were cast to int64 (undefined)
      // and reached the register kernels, whose argmax finds no maximum among NaNs (ctz of 0).
      // The current counts are a safe guess.
      std::copy(count_f_.begin(), count_f_.end(), out);
      return;
    }
    int64_t assigned = 0;
    std::vector<std::pair<double, int64_t>> remainder(static_cast<size_t>(k));
    for (int64_t d = 0; d < k; ++d) {
      const double target = w_[d] * scale;
      const double whole = std::max(std::floor(target), count_f_[d]);
      out[d] = whole;
      assigned += static_cast<int64_t>(whole);
      remainder[d] = {target - whole, d};
    }
    int64_t left = x - assigned;
    if (left <= 0) return;  // an unlikely guess; verification will recompute the segment
    std::stable_sort(remainder.begin(), remainder.end(),
                     [](const auto& a, const auto& b) { return a.first > b.first; });
    for (int64_t i = 0; left > 0; i = (i + 1) % k, --left) out[remainder[i].second] += 1.0;
  }

  // A wrong state for tests: odd segments get all-zero counts (which never rejoin the true path, so
  // the whole segment is recomputed), even ones one count moved between two domains (which rejoins
  // at some snapshot, or not).
  void misguess(int j, double* state) const {
    if (j % 2 == 1) {
      std::fill(state, state + k_, 0.0);
      return;
    }
    const int64_t from = std::max_element(state, state + k_) - state;
    state[from] -= 1.0;
    state[(from + 1) % k_] += 1.0;
  }

  // emit() the m chosen candidates pos[0..m) (domain ids via ids, or the positions themselves).
  template <class Emit>
  static void emit_positions(const int32_t* pos, const int32_t* ids, int64_t first, int64_t m,
                             int64_t* counts, Emit& emit) {
    for (int64_t t = 0; t < m; ++t) {
      const int64_t d = ids != nullptr ? ids[pos[t]] : pos[t];
      emit(first + t, d, counts[d]);
      counts[d] += 1;
    }
  }
  static constexpr double kWindowScale = 0.75;
  static constexpr double kSegmentWindowMax = 16.0;

  // The wide screened lanes: AVX2 CPUs without AVX-512 (there the two lockstep chains of windows
  // run), above the fixed-point chain's domains.
  static constexpr int64_t kWideMax = 128;
  bool uses_wide_lanes() const {
    return vector_ && isa_ == Isa::kAvx2 && k_ > kChainMax && k_ <= kWideMax &&
           wide_available(isa_);
  }

  bool uses_window_segments() const {
    return vector_ && k_ > kRegisterAllBelow && k_ <= kWindowSegmentsMaxK &&
           register_multi_max(isa_, kWindowSegments) > 0;
  }

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
  std::vector<int32_t> positions_;
  static constexpr int kMaxSegments = 4;

  std::vector<double> snaps_, chain_counts_, guesses_;
  std::vector<int64_t> chain_icounts_;
  std::vector<WindowChain> window_chains_;
  std::vector<int64_t> lane_counts_, lane_snaps_, lane_guess_, lane_final_;
  std::vector<int32_t> lane_rows_, lane_rows0_, step_add_, tops_, lane_pos_;
  std::vector<double> lane_cf_;
  bool lanes_wide_ = false;  // the screened lanes are wide (see run_screened)
  std::vector<int32_t> wide_add_, wide_slot_, wide_cand_, exact_cand_;
  std::vector<double> exact_cw_, exact_cc_, wide_level_, wide_gap_;
  std::vector<int32_t> chain_add_, chain_packed_, chain_tops_;
  ScreenStats screen_;
  int16_t* index_ = nullptr;  // run_into's arrays while it runs
  int64_t* sample_ = nullptr;
  Isa isa_;
  bool vector_ = true;
  bool misguess_ = false;
  bool wide_samples_ = false;
  std::vector<double> group_weight_;  // the distinct weights (run_equal, run_groups), or none
  std::vector<std::vector<int32_t>> group_members_;  // each one's domains, in index order
  int64_t max_window_ = 3;
  double gap_ = 0.0;
};

}  // namespace fastmix
