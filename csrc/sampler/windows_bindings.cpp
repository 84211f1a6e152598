// fastmix._C window mapping: global sample -> (domain window, token offset) for a whole batch.
//
// The data pipeline draws a global batch of domain ids with the sampler, then calls map_windows
// once: for each sample, in order, the domain's cursor (windows of that domain consumed so far in the
// global stream) gives epoch = cursor / n and position = cursor % n; the window is
// KeyedPermutation(n, window_key(seed, domain, epoch))(position).  Every call validates its inputs
// before touching memory and runs without the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "sampler/arrays.h"
#include "sampler/constructed.h"
#include "sampler/permutation.h"

namespace py = pybind11;

namespace fastmix {
namespace {

using I32 = py::array_t<int32_t, py::array::c_style>;
using I64 = py::array_t<int64_t, py::array::c_style>;

void check_1d(const py::array& a, const char* name, py::ssize_t size) {
  if (a.ndim() != 1)
    throw std::invalid_argument(std::string(name) + " must be 1-D, got " + std::to_string(a.ndim()) +
                                " dimensions");
  if (size >= 0 && a.shape(0) != size)
    throw std::invalid_argument(std::string(name) + " must have length " + std::to_string(size) +
                                ", got " + std::to_string(a.shape(0)));
}

void check_writeable(const py::array& a, const char* name) {
  if (!a.writeable()) throw std::invalid_argument(std::string(name) + " must be writeable");
}

// domain id -> slot (-1 until assigned) for the domains one batch of `batch` draws: open
// addressing, at most half full, so a short batch costs O(batch) whatever the number of domains.
class SlotIndex {
 public:
  explicit SlotIndex(py::ssize_t batch) {
    size_t size = 16;
    while (size < 2 * static_cast<size_t>(batch)) size *= 2;
    mask_ = size - 1;
    keys_.assign(size, -1);
    values_.assign(size, -1);
  }
  int32_t& find(int32_t d) {
    size_t h = (static_cast<uint32_t>(d) * 0x9E3779B1u) & mask_;
    while (keys_[h] != d && keys_[h] != -1) h = (h + 1) & mask_;
    keys_[h] = d;
    return values_[h];
  }

 private:
  size_t mask_ = 0;
  std::vector<int32_t> keys_, values_;
};

// The file table of a corpus at one seq_len, validated and copied once: domain d owns files
// [fb[d], fb[d+1]); fwe[f] is the cumulative window count of the domain up to and including file f,
// so it ends at n_windows[d].  map_windows used to copy and check it on every call, O(files) per
// global step (1.3 ms at a million files, on every step every DataLoader worker plans); a
// MixtureDataset's stream builds one WindowTable and maps each step in O(batch + K).  The copies
// are its own, so nothing another thread does to the arrays can move a mapping out of bounds.
class WindowTable {
 public:
  WindowTable(const I64& n_windows, const I64& file_begin, const I64& file_window_end,
              int64_t seq_len)
      : seq_len_(seq_len) {
    check_1d(n_windows, "n_windows", -1);
    k_ = n_windows.shape(0);
    if (k_ < 1) throw std::invalid_argument("n_windows must name at least one domain");
    check_1d(file_begin, "file_begin", k_ + 1);
    check_1d(file_window_end, "file_window_end", -1);
    if (seq_len < 1)
      throw std::invalid_argument("seq_len must be >= 1, got " + std::to_string(seq_len));
    nw_.assign(n_windows.data(), n_windows.data() + k_);
    fb_.assign(file_begin.data(), file_begin.data() + k_ + 1);
    const py::ssize_t F = file_window_end.shape(0);
    fwe_.assign(file_window_end.data(), file_window_end.data() + F);
    // file_begin is checked whole before fwe is read through it.
    if (fb_[0] != 0 || fb_[k_] != F)
      throw std::invalid_argument("file_begin must start at 0 and end at len(file_window_end)");
    for (py::ssize_t d = 0; d < k_; ++d) {
      if (fb_[d + 1] < fb_[d]) throw std::invalid_argument("file_begin must be non-decreasing");
    }
    for (py::ssize_t d = 0; d < k_; ++d) {
      if (nw_[d] < 0)
        throw std::invalid_argument("n_windows[" + std::to_string(d) + "] is negative");
      int64_t prev = 0;
      for (int64_t f = fb_[d]; f < fb_[d + 1]; ++f) {
        if (fwe_[f] < prev)
          throw std::invalid_argument("file_window_end must be non-decreasing within a domain");
        // The token offset (window - the file's first window) * seq_len must fit in int64.
        int64_t tokens = 0;
        if (__builtin_mul_overflow(fwe_[f] - prev, seq_len, &tokens))
          throw std::invalid_argument("file " + std::to_string(f) + " holds " +
                                      std::to_string(fwe_[f] - prev) + " windows of seq_len " +
                                      std::to_string(seq_len) + ": its token offsets overflow int64");
        prev = fwe_[f];
      }
      if (prev != nw_[d])
        throw std::invalid_argument("file_window_end of domain " + std::to_string(d) +
                                    " ends at " + std::to_string(prev) + ", n_windows says " +
                                    std::to_string(nw_[d]));
    }
  }

  py::ssize_t num_domains() const { return k_; }
  py::ssize_t num_files() const { return static_cast<py::ssize_t>(fwe_.size()); }
  int64_t seq_len() const { return seq_len_; }

  // Map samples [0, n_done) of a global batch; evaluate the permutation only for [begin, end).
  // Returns n_done: the batch length, or the index of the first sample whose domain has reached
  // its cap (caps[d] windows read), so the caller can drop that domain and redraw from there.
  int64_t map(const I32& domains, I64& cursors, const I64& caps, uint64_t seed, int64_t begin,
              int64_t end, I64& out_file, I64& out_offset, I64& out_epoch, I64& out_window) const {
    const py::ssize_t K = k_;
    check_1d(domains, "domains", -1);
    const py::ssize_t G = domains.shape(0);
    check_1d(cursors, "cursors", K);
    check_1d(caps, "caps", K);
    check_writeable(cursors, "cursors");
    if (begin < 0 || end < begin || end > G)
      throw std::invalid_argument("slice [" + std::to_string(begin) + ", " + std::to_string(end) +
                                  ") is not inside the batch of " + std::to_string(G) + " samples");
    const py::ssize_t S = end - begin;
    for (auto* a : {&out_file, &out_offset, &out_epoch, &out_window}) {
      check_1d(*a, "outputs", S);
      check_writeable(*a, "outputs");
    }
    // Every array the loop writes must be apart from every other array: a cursor or output that
    // aliased an input would change the domain ids or caps under the loop.
    const std::pair<const py::array*, const char*> arrays[] = {
        {&cursors, "cursors"},     {&out_file, "out_file"},     {&out_offset, "out_offset"},
        {&out_epoch, "out_epoch"}, {&out_window, "out_window"}, {&domains, "domains"},
        {&caps, "caps"}};
    constexpr int kWritten = 5;  // the first five
    constexpr int kArrays = 7;
    for (int a = 0; a < kWritten; ++a) {
      for (int b = a + 1; b < kArrays; ++b) {
        if (share_memory(*arrays[a].first, *arrays[b].first))
          throw std::invalid_argument(std::string(arrays[a].second) + " and " + arrays[b].second +
                                      " share memory");
      }
    }
    // A copy of the batch's ids, so nothing another thread does to the array while the GIL is
    // released can move the loop out of bounds.
    const std::vector<int32_t> dom(domains.data(), domains.data() + G);
    for (py::ssize_t i = 0; i < G; ++i) {
      if (dom[i] < 0 || dom[i] >= K)
        throw std::invalid_argument("domains[" + std::to_string(i) + "] = " +
                                    std::to_string(dom[i]) + " is outside [0, " +
                                    std::to_string(K) + ")");
    }
    const int64_t seq_len = seq_len_;
    const int64_t* caps_in = caps.data();
    int64_t* cursors_io = cursors.mutable_data();
    int64_t* o_file = out_file.mutable_data();
    int64_t* o_off = out_offset.mutable_data();
    int64_t* o_epoch = out_epoch.mutable_data();
    int64_t* o_win = out_window.mutable_data();

    int64_t done = G;
    std::string error;
    // Per-domain state of the call (cursor, cap, the epoch and permutation last used), in slots:
    // slot d for domain d when K is not much larger than the batch; otherwise one slot per
    // domain the batch draws (at most G), found by hashing.  K-sized copies, epochs and
    // permutations were ~35 us per call at K = 10,000 for a batch of 32; a hash lookup per draw
    // costs more than an index, so long batches index.  Each field is an array of its own:
    // samples outside [begin, end) touch only the cursor and cap.
    const bool direct = K <= 2 * G;
    const size_t n_slots = static_cast<size_t>(direct ? K : std::min(G, K));
    std::vector<int32_t> slot_domain;
    std::vector<int64_t> slot_cursor(n_slots), slot_cap(n_slots), slot_epoch(n_slots, -1);
    std::vector<KeyedPermutation> slot_perm(n_slots);
    size_t used = 0;       // slots in use when hashing
    bool refused = false;  // a negative cursor or cap: nothing is written back
    {
      py::gil_scoped_release release;
      int64_t* cursor = slot_cursor.data();
      int64_t* cap = slot_cap.data();
      int64_t* last_epoch = slot_epoch.data();
      KeyedPermutation* perm = slot_perm.data();
      const int64_t* nw = nw_.data();
      const int64_t* fb = fb_.data();
      const int64_t* fwe = fwe_.data();
      // The loop over the batch, given slot_of(d): the domain's slot, or -1 after an error.
      auto map_batch = [&](auto&& slot_of) {
        for (py::ssize_t i = 0; i < G; ++i) {
          const int32_t d = dom[i];
          const int32_t s = slot_of(d);
          if (s < 0) break;
          if (cursor[s] >= cap[s]) {
            done = i;
            break;
          }
          const int64_t n = nw[d];
          if (n == 0) {
            error = "domain " + std::to_string(d) + " was drawn but has no windows";
            break;
          }
          const int64_t c = cursor[s]++;
          if (i < begin || i >= end) continue;
          // One permutation per domain, rebuilt only when that domain's epoch changes.
          const int64_t epoch = c / n;
          if (last_epoch[s] != epoch) {
            perm[s] = KeyedPermutation(
                static_cast<uint64_t>(n),
                window_key(seed, static_cast<uint64_t>(d), static_cast<uint64_t>(epoch)));
            last_epoch[s] = epoch;
          }
          const int64_t w = static_cast<int64_t>(perm[s](static_cast<uint64_t>(c % n)));
          // The file holding window w: the first of the domain's files whose cumulative end
          // exceeds w.
          const int64_t* first = fwe + fb[d];
          const int64_t* last = fwe + fb[d + 1];
          const int64_t* hit = std::upper_bound(first, last, w);
          const int64_t f = hit - fwe;
          const int64_t file_first_window = (hit == first) ? 0 : *(hit - 1);
          const py::ssize_t j = i - begin;
          o_file[j] = f;
          o_off[j] = (w - file_first_window) * seq_len;
          o_epoch[j] = epoch;
          o_win[j] = w;
        }
      };
      // The cursors and caps are copied once and checked; only the copies are used, so nothing
      // another thread writes to the arrays meanwhile can move the loop out of bounds.
      auto negative = [&](int64_t cursor_d, int64_t cap_d, int32_t d) {
        refused = true;
        error = std::string(cursor_d < 0 ? "cursors" : "caps") + "[" + std::to_string(d) +
                "] is negative";
      };
      if (direct) {
        std::copy(cursors_io, cursors_io + K, cursor);
        std::copy(caps_in, caps_in + K, cap);
        for (int32_t d = 0; d < K && error.empty(); ++d) {
          if (cursor[d] < 0 || cap[d] < 0) negative(cursor[d], cap[d], d);
        }
        if (error.empty()) map_batch([](int32_t d) { return d; });
      } else {
        slot_domain.resize(n_slots);
        SlotIndex index(G);
        map_batch([&](int32_t d) -> int32_t {
          int32_t& s = index.find(d);
          if (s >= 0) return s;
          // Only the drawn domains' cursors and caps are read (a pass over all K was ~4 us per
          // call at K = 10,000).
          const int64_t cursor_d = cursors_io[d], cap_d = caps_in[d];
          if (cursor_d < 0 || cap_d < 0) {
            negative(cursor_d, cap_d, d);
            return -1;
          }
          s = static_cast<int32_t>(used++);
          slot_domain[s] = d;
          cursor[s] = cursor_d;
          cap[s] = cap_d;
          return s;
        });
      }
    }
    if (refused) throw std::invalid_argument(error);
    // The advanced cursors.
    if (direct) {
      std::copy(slot_cursor.begin(), slot_cursor.end(), cursors_io);
    } else {
      for (size_t s = 0; s < used; ++s) cursors_io[slot_domain[s]] = slot_cursor[s];
    }
    if (!error.empty()) throw std::invalid_argument(error);
    return done;
  }

 private:
  py::ssize_t k_ = 0;
  int64_t seq_len_ = 1;
  std::vector<int64_t> nw_, fb_, fwe_;
};

// The one-call form: a table for this call alone (O(files) per call; see WindowTable).
int64_t map_windows(const I32& domains, I64& cursors, const I64& n_windows, const I64& caps,
                    const I64& file_begin, const I64& file_window_end, uint64_t seed, int64_t seq_len,
                    int64_t begin, int64_t end, I64& out_file, I64& out_offset, I64& out_epoch,
                    I64& out_window) {
  // The table's own arrays must not alias what the call writes either.
  const std::pair<const py::array*, const char*> written[] = {
      {&cursors, "cursors"},     {&out_file, "out_file"},   {&out_offset, "out_offset"},
      {&out_epoch, "out_epoch"}, {&out_window, "out_window"}};
  const std::pair<const py::array*, const char*> table_arrays[] = {
      {&n_windows, "n_windows"}, {&file_begin, "file_begin"}, {&file_window_end, "file_window_end"}};
  for (const auto& a : written) {
    for (const auto& b : table_arrays) {
      if (share_memory(*a.first, *b.first))
        throw std::invalid_argument(std::string(a.second) + " and " + b.second + " share memory");
    }
  }
  const WindowTable table(n_windows, file_begin, file_window_end, seq_len);
  return table.map(domains, cursors, caps, seed, begin, end, out_file, out_offset, out_epoch,
                   out_window);
}

// The permutation itself, for tests and tools: perm_{seed, domain, epoch}(indices) over [0, n).
I64 permute_windows(uint64_t n, uint64_t seed, uint64_t domain, uint64_t epoch, const I64& indices,
                    bool inverse) {
  check_1d(indices, "indices", -1);
  KeyedPermutation perm(n, window_key(seed, domain, epoch));  // validates n
  const py::ssize_t m = indices.shape(0);
  const int64_t* in = indices.data();
  for (py::ssize_t i = 0; i < m; ++i) {
    if (in[i] < 0 || static_cast<uint64_t>(in[i]) >= n)
      throw std::invalid_argument("indices[" + std::to_string(i) + "] = " + std::to_string(in[i]) +
                                  " is outside [0, " + std::to_string(n) + ")");
  }
  I64 out(m);
  int64_t* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    for (py::ssize_t i = 0; i < m; ++i) {
      const uint64_t x = static_cast<uint64_t>(in[i]);
      o[i] = static_cast<int64_t>(inverse ? perm.inverse(x) : perm(x));
    }
  }
  return out;
}

}  // namespace

void bind_windows(py::module_& m) {
  m.def("map_windows", &map_windows, py::arg("domains").noconvert(), py::arg("cursors").noconvert(),
        py::arg("n_windows").noconvert(), py::arg("caps").noconvert(),
        py::arg("file_begin").noconvert(), py::arg("file_window_end").noconvert(), py::arg("seed"),
        py::arg("seq_len"), py::arg("begin"), py::arg("end"), py::arg("out_file").noconvert(),
        py::arg("out_offset").noconvert(), py::arg("out_epoch").noconvert(),
        py::arg("out_window").noconvert(),
        "Map a global batch of domain ids to windows: advances `cursors` (int64[K], in place) for "
        "every sample in order and, for samples [begin, end), writes the file index, token offset, "
        "domain epoch and window index.  Stops before the first sample whose domain has read "
        "caps[d] windows and returns how many samples were mapped (len(domains) when none).");
  // Members bound through checked<>: TypeError on an instance whose __init__ never ran.
  py::class_<WindowTable>(m, "WindowTable",
                          "A corpus's file table at one seq_len (n_windows[K], file_begin[K + 1], "
                          "file_window_end[F], as TokenCorpus.window_table gives them), validated "
                          "and copied once; map() is map_windows without the table's O(F) work.")
      .def(py::init<const I64&, const I64&, const I64&, int64_t>(),
           py::arg("n_windows").noconvert(), py::arg("file_begin").noconvert(),
           py::arg("file_window_end").noconvert(), py::arg("seq_len"))
      .def_property_readonly("num_domains", checked<&WindowTable::num_domains>)
      .def_property_readonly("num_files", checked<&WindowTable::num_files>)
      .def_property_readonly("seq_len", checked<&WindowTable::seq_len>)
      .def("map", checked<&WindowTable::map>, py::arg("domains").noconvert(),
           py::arg("cursors").noconvert(), py::arg("caps").noconvert(), py::arg("seed"),
           py::arg("begin"), py::arg("end"), py::arg("out_file").noconvert(),
           py::arg("out_offset").noconvert(), py::arg("out_epoch").noconvert(),
           py::arg("out_window").noconvert(),
           "map_windows(domains, cursors, <this table>, caps, seed, begin, end, outputs...).");
  m.def("permute_windows", &permute_windows, py::arg("n"), py::arg("seed"), py::arg("domain"),
        py::arg("epoch"), py::arg("indices").noconvert(), py::arg("inverse") = false,
        "The keyed bijection of [0, n) that orders a domain's windows in one epoch (or its inverse).");
}

}  // namespace fastmix
