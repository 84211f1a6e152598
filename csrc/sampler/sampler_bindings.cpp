// pybind11 bindings of the mixture samplers (fastmix._C).  Python (fastmix/sampler.py) validates
// first with friendly messages; everything here checks again before touching memory, and throws
// std::invalid_argument (-> ValueError) or pybind11::type_error (-> TypeError).  Long loops run with
// the GIL released, writing into numpy buffers allocated beforehand.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>

#include "sampler/alias.h"
#include "sampler/arrays.h"
#include "sampler/blend.h"
#include "sampler/constructed.h"
#include "sampler/rng.h"
#include "sampler/stratified.h"
#include "sampler/weights.h"

namespace py = pybind11;

namespace fastmix {
namespace {

// Sub-streams of one seed: each sampling method draws from its own key.
constexpr uint64_t kStreamAlias = 1;
constexpr uint64_t kStreamStratified = 2;

// A 1-D C-contiguous array of exactly dtype T (no silent casts), optionally writable.
template <class T>
py::array_t<T> expect_array(const py::handle& obj, const char* name, bool writable) {
  if (!py::isinstance<py::array>(obj)) {
    throw py::type_error(std::string(name) + " must be a numpy array");
  }
  auto arr = py::reinterpret_borrow<py::array>(obj);
  // equal(), not is(): int64 has two dtype objects (long and longlong) on some platforms, and a
  // dtype with metadata is another object of the same type.
  if (!arr.dtype().equal(py::dtype::of<T>())) {
    throw py::type_error(std::string(name) + " must have dtype " +
                         std::string(py::str(py::dtype::of<T>())) + ", got " +
                         std::string(py::str(arr.dtype())));
  }
  if (arr.ndim() != 1) throw std::invalid_argument(std::string(name) + " must be 1-D");
  if (!(arr.flags() & py::array::c_style)) {
    throw std::invalid_argument(std::string(name) + " must be C-contiguous");
  }
  if (writable && !arr.writeable()) {
    throw std::invalid_argument(std::string(name) + " must be writable");
  }
  return py::reinterpret_borrow<py::array_t<T>>(arr);
}

py::array_t<double> expect_weights(const py::handle& obj) {
  auto w = expect_array<double>(obj, "weights", false);
  check_weights(w.data(), static_cast<int64_t>(w.size()));
  return w;
}

// offset + n must stay inside the 2^64 counter space.
void check_range(uint64_t offset, int64_t n, const char* what) {
  if (n < 0) throw std::invalid_argument(std::string(what) + " must be >= 0");
  // The last draw's counter, offset + n - 1, must fit in 64 bits.
  if (n > 0 && static_cast<uint64_t>(n - 1) > std::numeric_limits<uint64_t>::max() - offset) {
    throw std::invalid_argument("offset + n overflows the 64-bit draw counter");
  }
}

// "best" (what this CPU runs), or a lower instruction set for tests: "avx512", "avx2", "scalar".
Isa parse_isa(const std::string& name) {
  if (name == "best") return best_isa();
  if (name == "avx512") return Isa::kAvx512;
  if (name == "avx2") return Isa::kAvx2;
  if (name == "scalar") return Isa::kScalar;
  throw std::invalid_argument("isa must be 'best', 'avx512', 'avx2' or 'scalar', got '" + name +
                              "'");
}

class PyAliasTable {
 public:
  explicit PyAliasTable(const py::handle& weights) {
    auto w = expect_weights(weights);
    table_ = AliasTable(w.data(), static_cast<int64_t>(w.size()));
  }
  int64_t num_domains() const { return table_.k; }

  void fill(uint64_t seed, uint64_t offset, const py::handle& out_obj,
            const std::string& isa_name) const {
    const Isa isa = parse_isa(isa_name);
    auto out = expect_array<int32_t>(out_obj, "out", true);
    const int64_t n = static_cast<int64_t>(out.size());
    check_range(offset, n, "n");
    int32_t* dst = out.mutable_data();
    const uint64_t key = derive_key(seed, kStreamAlias);
    py::gil_scoped_release release;
    table_.fill(key, offset, n, dst, isa);
  }

 private:
  AliasTable table_;
};

class PyStratifiedTable {
 public:
  PyStratifiedTable(const py::handle& weights, int64_t block) {
    auto w = expect_weights(weights);
    table_ = std::make_unique<StratifiedTable>(w.data(), static_cast<int64_t>(w.size()), block);
  }
  int64_t num_domains() const { return table_->k; }
  int64_t block() const { return table_->block; }

  void fill(uint64_t seed, uint64_t segment_start, uint64_t start, const py::handle& out_obj) const {
    auto out = expect_array<int32_t>(out_obj, "out", true);
    const int64_t n = static_cast<int64_t>(out.size());
    check_range(start, n, "n");
    int32_t* dst = out.mutable_data();
    const uint64_t key = derive_key(derive_key(seed, kStreamStratified), segment_start);
    py::gil_scoped_release release;
    table_->fill(key, start, n, dst);
  }

  py::array_t<int32_t> block_ids(uint64_t seed, uint64_t segment_start, uint64_t index) const {
    py::array_t<int32_t> out(table_->block);
    int32_t* dst = out.mutable_data();
    const uint64_t key = derive_key(derive_key(seed, kStreamStratified), segment_start);
    py::gil_scoped_release release;
    table_->fill_block(key, index, dst);
    return out;
  }

 private:
  std::unique_ptr<StratifiedTable> table_;
};

// Weights for the greedy rule are used exactly as given (the caller normalises, as Megatron-LM's
// Python side does before calling its C++ helper).
py::array_t<double> expect_blend_weights(const py::handle& obj) {
  auto w = expect_array<double>(obj, "weights", false);
  check_weights(w.data(), static_cast<int64_t>(w.size()));
  return w;
}

void greedy_fill(const py::handle& weights, int64_t start_step, const py::handle& counts_obj,
                 const py::handle& out_obj, const std::string& isa_name) {
  const Isa isa = parse_isa(isa_name);
  auto w = expect_blend_weights(weights);
  auto counts = expect_array<int64_t>(counts_obj, "counts", true);
  auto out = expect_array<int32_t>(out_obj, "out", true);
  const int64_t k = static_cast<int64_t>(w.size());
  if (static_cast<int64_t>(counts.size()) != k) {
    throw std::invalid_argument("counts must have one entry per domain");
  }
  // The rule reads the counts while it writes the ids: overlapping buffers give garbage.
  if (share_memory(counts, out) || share_memory(w, out) || share_memory(w, counts)) {
    throw std::invalid_argument("weights, counts and out must not share memory");
  }
  if (start_step < 0) throw std::invalid_argument("start_step must be >= 0");
  int64_t total = 0;
  for (int64_t d = 0; d < k; ++d) {
    if (counts.data()[d] < 0) throw std::invalid_argument("counts must be >= 0");
    if (__builtin_add_overflow(total, counts.data()[d], &total))  // a wrapped sum could match
      throw std::invalid_argument("counts must sum to start_step (their sum overflows int64)");
  }
  if (total != start_step) throw std::invalid_argument("counts must sum to start_step");
  const int64_t n = static_cast<int64_t>(out.size());
  if (n > (int64_t{1} << 52) - start_step) {
    throw std::invalid_argument("the greedy rule is exact only below 2^52 steps");
  }
  const double* wp = w.data();
  int64_t* cp = counts.mutable_data();
  int32_t* dst = out.mutable_data();
  py::gil_scoped_release release;
  GreedyFast fast(wp, k, isa);
  fast.run(start_step, n, cp, [dst](int64_t j, int64_t d, int64_t) {
    dst[j] = static_cast<int32_t>(d);
  });
}

// How to run the rule: the plain loop, or GreedyFast with at most `isa` (test-only paths force a
// lower one than the CPU's best) and, for tests of the recovery, misguessed speculative segments.
struct BlendHow {
  bool naive;
  Isa isa;
  bool misguess;
  bool wide_samples = false;  // the screened lanes' 64-bit sample path (see screen_write)
};

enum class BlendPath { kFast, kNaive, kPortable, kMisguessed, kAvx2, kAvx2Misguessed };

BlendHow how_for(BlendPath path) {
  switch (path) {
    case BlendPath::kNaive: return {true, Isa::kScalar, false};
    case BlendPath::kPortable: return {false, Isa::kScalar, false};
    case BlendPath::kMisguessed: return {false, best_isa(), true};
    case BlendPath::kAvx2: return {false, Isa::kAvx2, false};
    case BlendPath::kAvx2Misguessed: return {false, Isa::kAvx2, true};
    default: return {false, best_isa(), false};
  }
}

std::pair<py::array_t<int16_t>, py::array_t<int64_t>> blend_run(const py::handle& weights,
                                                               int64_t size, const BlendHow& how,
                                                               ScreenStats* stats) {
  auto w = expect_blend_weights(weights);
  const int64_t k = static_cast<int64_t>(w.size());
  if (k > 32767) {
    throw std::invalid_argument("weights has " + std::to_string(k) +
                                " domains; dataset_index is int16, so at most 32767");
  }
  if (size < 0) throw std::invalid_argument("size must be >= 0");
  if (size > (int64_t{1} << 52)) throw std::invalid_argument("size must be below 2^52");
  py::array_t<int16_t> dataset_index(size);
  py::array_t<int64_t> sample_index(size);
  const double* wp = w.data();
  int16_t* di = dataset_index.mutable_data();
  int64_t* si = sample_index.mutable_data();
  {
    py::gil_scoped_release release;
    std::vector<int64_t> counts(static_cast<size_t>(k), 0);
    auto emit = [di, si](int64_t j, int64_t d, int64_t before) {
      di[j] = static_cast<int16_t>(d);
      si[j] = before;
    };
    if (how.naive) {
      greedy_naive(wp, k, 0, size, counts.data(), emit);
    } else {
      GreedyFast fast(wp, k, how.isa, how.misguess, how.wide_samples);
      fast.run_into(0, size, counts.data(), di, si);
      if (stats != nullptr) *stats = fast.screen_stats();
    }
  }
  return {dataset_index, sample_index};
}

template <BlendPath kPath>
std::pair<py::array_t<int16_t>, py::array_t<int64_t>> blend(const py::handle& weights, int64_t size) {
  return blend_run(weights, size, how_for(kPath), nullptr);
}

// blend_indices (or its misguessed variant) and what the screened lanes did (tests).
py::tuple blend_screened(const py::handle& weights, int64_t size, bool misguess,
                         const std::string& isa, bool wide_samples) {
  if (isa != "best" && isa != "avx2") throw std::invalid_argument("isa must be 'best' or 'avx2'");
  ScreenStats stats;
  const BlendHow how{false, isa == "avx2" ? Isa::kAvx2 : best_isa(), misguess, wide_samples};
  auto arrays = blend_run(weights, size, how, &stats);
  py::dict info;
  info["steps"] = stats.steps;
  info["windows"] = stats.windows;
  info["uncertain"] = stats.uncertain;
  info["misguessed"] = stats.misguessed;
  info["redone"] = stats.redone;
  info["gave_up"] = stats.gave_up;
  info["chain_windows"] = stats.chain_windows;
  info["chain_uncertain"] = stats.chain_uncertain;
  info["chain_gave_up"] = stats.chain_gave_up;
  info["equal_steps"] = stats.equal_steps;
  info["group_steps"] = stats.group_steps;
  info["wide_windows"] = stats.wide_windows;
  return py::make_tuple(arrays.first, arrays.second, info);
}

void accumulate_counts(const py::handle& ids_obj, const py::handle& counts_obj,
                       const py::handle& also_obj) {
  auto ids = expect_array<int32_t>(ids_obj, "ids", false);
  auto counts = expect_array<int64_t>(counts_obj, "counts", true);
  const int32_t* src = ids.data();
  int64_t* dst = counts.mutable_data();
  const int64_t n = static_cast<int64_t>(ids.size());
  const int64_t k = static_cast<int64_t>(counts.size());
  // A second counts array to add the same histogram to (MixtureSampler's total and segment
  // counts): one pass over the ids instead of two (~0.45 ns per id at 10M ids, K = 22).
  int64_t* dst2 = nullptr;
  py::array_t<int64_t> also;
  if (!also_obj.is_none()) {
    also = expect_array<int64_t>(also_obj, "also", true);
    if (static_cast<int64_t>(also.size()) != k) {
      throw py::value_error("also must have the length of counts");
    }
    dst2 = also.mutable_data();
  }
  bool in_range = true;
  if (n < 16 * k) {
    // A batch short against K (a data step's 32 draws at K = 10,000): four K-sized histograms
    // to zero and merge cost more than the draws (~25 us per call there).  The ids are copied
    // first, so the range check holds for the values used even if another thread writes them.
    py::gil_scoped_release release;
    const std::vector<uint32_t> local(src, src + n);
    for (const uint32_t a : local) in_range &= static_cast<int64_t>(a) < k;
    if (in_range) {
      for (const uint32_t a : local) dst[a] += 1;
      if (dst2 != nullptr) {
        for (const uint32_t a : local) dst2[a] += 1;
      }
    }
  } else {
    py::gil_scoped_release release;
    // Four interleaved histograms: consecutive equal ids would otherwise serialise on one counter
    // (a store-to-load chain of ~5 cycles per draw).  Range-checked before any write to `counts`.
    std::vector<int64_t> partial(static_cast<size_t>(4 * k), 0);
    const uint32_t limit = static_cast<uint32_t>(k);
    uint32_t bad = 0;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
      const uint32_t a = static_cast<uint32_t>(src[i]), b = static_cast<uint32_t>(src[i + 1]);
      const uint32_t c = static_cast<uint32_t>(src[i + 2]), d = static_cast<uint32_t>(src[i + 3]);
      bad |= static_cast<uint32_t>(a >= limit) | static_cast<uint32_t>(b >= limit) |
             static_cast<uint32_t>(c >= limit) | static_cast<uint32_t>(d >= limit);
      if (bad) break;
      partial[a] += 1;
      partial[k + b] += 1;
      partial[2 * k + c] += 1;
      partial[3 * k + d] += 1;
    }
    for (; i < n && !bad; ++i) {
      const uint32_t a = static_cast<uint32_t>(src[i]);
      bad |= static_cast<uint32_t>(a >= limit);
      if (!bad) partial[a] += 1;
    }
    in_range = bad == 0;
    if (in_range) {
      for (int64_t d = 0; d < k; ++d) {
        const int64_t sum = partial[d] + partial[k + d] + partial[2 * k + d] + partial[3 * k + d];
        dst[d] += sum;
        if (dst2 != nullptr) dst2[d] += sum;
      }
    }
  }
  if (!in_range) throw std::invalid_argument("ids has an entry outside [0, len(counts))");
}

}  // namespace

void bind_sampler(py::module_& m) {
  // Members are bound through checked<> (sampler/constructed.h): on an instance whose __init__
  // never ran (cls.__new__(cls)) they raise TypeError instead of reading unconstructed memory.
  py::class_<PyAliasTable>(m, "AliasTable", R"doc(
Walker/Vose alias table over K domains, built exactly in integer fixed point in O(K).

AliasTable(weights: numpy.ndarray[float64]) -- finite, non-negative, at least one positive;
normalised internally; a zero weight is never drawn.
)doc")
      .def(py::init<const py::handle&>(), py::arg("weights"))
      .def_property_readonly("num_domains", checked<&PyAliasTable::num_domains>)
      .def("fill", checked<&PyAliasTable::fill>, py::arg("seed"), py::arg("offset"),
           py::arg("out"), py::arg("isa") = "best", R"doc(
Write draws [offset, offset + len(out)) of the alias stream for `seed` into `out`
(int32, 1-D, C-contiguous, writable).  Draw i depends only on (seed, i, table).  Releases the GIL.
`isa` ("best", or "avx512", "avx2", "scalar" to use at most that loop; for tests) never changes
the output, only the speed.
)doc");

  py::class_<PyStratifiedTable>(m, "StratifiedTable", R"doc(
Systematic sampling in blocks of `block` draws: each domain appears floor or ceil of w*block
times per block, in a keyed shuffled order.  StratifiedTable(weights: float64 array, block: int).
)doc")
      .def(py::init<const py::handle&, int64_t>(), py::arg("weights"), py::arg("block"))
      .def_property_readonly("num_domains", checked<&PyStratifiedTable::num_domains>)
      .def_property_readonly("block", checked<&PyStratifiedTable::block>)
      .def("fill", checked<&PyStratifiedTable::fill>, py::arg("seed"), py::arg("segment_start"),
           py::arg("start"), py::arg("out"), R"doc(
Write draws [start, start + len(out)) of the segment that began at absolute position
`segment_start` (blocks are counted from there) into `out` (int32).  Releases the GIL.
)doc")
      .def("block_ids", checked<&PyStratifiedTable::block_ids>, py::arg("seed"),
           py::arg("segment_start"), py::arg("index"),
           "The `block` domain ids of block `index` of the segment (int32).");

  m.def("greedy_fill", &greedy_fill, py::arg("weights"), py::arg("start_step"), py::arg("counts"),
        py::arg("out"), py::arg("isa") = "best", R"doc(
Continue the largest-deficit rule from step `start_step` with per-domain `counts` (int64, updated
in place; must sum to start_step), writing len(out) domain ids into `out` (int32).  `weights` are
used as given (normalise them first).  `isa` ("best", or "avx512", "avx2", "scalar" to use at most
that instruction set; tests) does not change the output.  Releases the GIL.
)doc");

  m.def("blend_indices", &blend<BlendPath::kFast>, py::arg("weights"), py::arg("size"), R"doc(
Megatron-LM's build_blending_indices: (dataset_index int16[size], dataset_sample_index int64[size])
for float64 `weights` used as given.  Candidates in AVX-512 registers (windowed pruning above 64
domains; AVX2 registers up to 48 domains on CPUs without AVX-512), up to 32 domains 16 segments
at once in 32-bit fixed point, and 33 to 64 domains on AVX2 one chain in 32-bit fixed point, with
every step proved exact or recomputed; bit-identical to the plain rule.
)doc");
  m.def("_blend_indices_naive", &blend<BlendPath::kNaive>, py::arg("weights"), py::arg("size"),
        "The plain O(K)-per-sample loop of the same rule (benchmark baseline and test oracle).");
  m.def("_blend_indices_portable", &blend<BlendPath::kPortable>, py::arg("weights"),
        py::arg("size"),
        "blend_indices without the AVX-512 kernel: the scalar pruning that runs on other CPUs.");
  m.def("_blend_indices_misguessed", &blend<BlendPath::kMisguessed>, py::arg("weights"),
        py::arg("size"),
        "blend_indices with every speculative segment started from a wrong state (tests).");
  m.def("_blend_indices_avx2", &blend<BlendPath::kAvx2>, py::arg("weights"), py::arg("size"),
        "blend_indices as a CPU with AVX2 but no AVX-512 runs it (the scalar path without AVX2).");
  m.def("_blend_indices_avx2_misguessed", &blend<BlendPath::kAvx2Misguessed>, py::arg("weights"),
        py::arg("size"), "_blend_indices_avx2 with every speculative segment misguessed (tests).");
  m.def("_blend_indices_screened", &blend_screened, py::arg("weights"), py::arg("size"),
        py::arg("misguess") = false, py::arg("isa") = "best", py::arg("wide_samples") = false,
        "(dataset_index, sample_index, what the screened lanes and the fixed-point chain did: a "
        "dict) of blend_indices, or "
        "of its misguessed variant, with the CPU's best kernels or ('avx2') at most AVX2, the "
        "samples through the 64-bit path where wide_samples (tests).");
  m.def("_best_isa", []() {
    switch (best_isa()) {
      case Isa::kAvx512: return "avx512";
      case Isa::kAvx2: return "avx2";
      default: return "scalar";
    }
  }, "The instruction set blend_indices uses on this CPU: 'avx512', 'avx2' or 'scalar'.");

  m.def("accumulate_counts", &accumulate_counts, py::arg("ids"), py::arg("counts"),
        py::arg("also") = py::none(),
        "counts[ids[i]] += 1 for every i (ids int32 in [0, len(counts)), counts int64), and the\n"
        "same for `also` (int64, the length of counts) when given.  Nothing is written if an id\n"
        "is out of range.");
}

}  // namespace fastmix
