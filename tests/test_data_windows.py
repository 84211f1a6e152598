"""The compiled window mapping: keyed permutations and map_windows (fastmix._C)."""

import types

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_data_helpers import SEQ_LEN, make_corpus

import fastmix.data as data
from fastmix import _C
from fastmix.data import MixtureDataset


def perm(n, seed=0, domain=0, epoch=0, inverse=False, indices=None):
    idx = np.arange(n, dtype=np.int64) if indices is None else indices
    return _C.permute_windows(n, seed, domain, epoch, idx, inverse=inverse)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 15, 16, 17, 63, 64, 65, 1000, 4097, 65537])
def test_permutation_is_a_bijection_with_inverse(n):
    p = perm(n, seed=11, domain=2, epoch=5)
    assert np.array_equal(np.sort(p), np.arange(n))
    assert np.array_equal(perm(n, 11, 2, 5, inverse=True, indices=p), np.arange(n))


def test_permutation_depends_on_every_key_part_and_is_deterministic():
    base = perm(1000, seed=1, domain=2, epoch=3)
    assert np.array_equal(base, perm(1000, seed=1, domain=2, epoch=3))
    for other in (perm(1000, 9, 2, 3), perm(1000, 1, 9, 3), perm(1000, 1, 2, 9)):
        assert not np.array_equal(base, other)
        # different keys give (nearly) unrelated orders: few fixed coincidences
        assert np.mean(base == other) < 0.02


def test_permutation_looks_shuffled():
    n = 10_000
    p = perm(n, seed=3).astype(np.float64)
    # rank correlation between position and image is ~0 for a shuffle (|r| < 4 / sqrt(n))
    r = np.corrcoef(np.arange(n), p)[0, 1]
    assert abs(r) < 4 / np.sqrt(n)
    # first positions spread over the whole range
    assert p[:100].max() > 0.9 * n and p[:100].min() < 0.1 * n


def test_permutation_large_n_without_materialising():
    n = 3 * 10**12  # a domain that size would be 6 TB of windows: only evaluated points are touched
    idx = np.array([0, 1, n // 2, n - 1], dtype=np.int64)
    p = perm(n, seed=5, indices=idx)
    assert ((p >= 0) & (p < n)).all() and len(set(p.tolist())) == 4
    assert np.array_equal(perm(n, seed=5, indices=p, inverse=True), idx)


def test_permutation_rejects_bad_input():
    with pytest.raises(ValueError, match="n must be >= 1"):
        perm(0)
    with pytest.raises(ValueError, match="outside"):
        perm(10, indices=np.array([10], dtype=np.int64))
    with pytest.raises(ValueError, match="outside"):
        perm(10, indices=np.array([-1], dtype=np.int64))
    with pytest.raises(TypeError):
        perm(10, indices=np.arange(3, dtype=np.int32))  # no silent conversion


def table(n_per_file, k_files):
    """Domains with the given files (window counts); returns the arrays map_windows takes."""
    n_windows, file_begin, ends = [], [0], []
    for files in k_files:
        total = 0
        for f in files:
            total += n_per_file[f]
            ends.append(total)
        n_windows.append(total)
        file_begin.append(len(ends))
    return (np.array(n_windows, np.int64), np.array(file_begin, np.int64), np.array(ends, np.int64))


def run_map(domains, cursors, n_windows, caps, fb, fwe, seq_len=8, begin=0, end=None, seed=1):
    end = len(domains) if end is None else end
    outs = [np.full(end - begin, -1, np.int64) for _ in range(4)]
    done = _C.map_windows(
        np.asarray(domains, np.int32),
        cursors,
        n_windows,
        caps,
        fb,
        fwe,
        seed,
        seq_len,
        begin,
        end,
        *outs,
    )
    return done, outs


def test_map_windows_visits_every_window_once_per_epoch_across_files():
    # domain 0: files of 3 and 5 windows, domain 1: one file of 4 windows
    n_windows, fb, fwe = table([3, 5, 4], [[0, 1], [2]])
    caps = np.full(2, 2**62, np.int64)
    cursors = np.zeros(2, np.int64)
    domains = [0] * 16 + [1] * 8  # two epochs of each domain
    done, (file, offset, epoch, window) = run_map(domains, cursors, n_windows, caps, fb, fwe)
    assert done == 24 and cursors.tolist() == [16, 8]
    for _, lo, hi, n in ((0, 0, 8, 8), (0, 8, 16, 8), (1, 16, 20, 4), (1, 20, 24, 4)):
        assert sorted(window[lo:hi].tolist()) == list(range(n))  # a permutation per epoch
    assert epoch[:8].tolist() == [0] * 8 and epoch[8:16].tolist() == [1] * 8
    assert not np.array_equal(window[:8], window[8:16])  # a new order each epoch
    # windows 0-2 live in file 0, 3-7 in file 1 at offsets (w - 3) * seq_len
    w = window[:8]
    assert np.array_equal(file[:8], np.where(w < 3, 0, 1))
    assert np.array_equal(offset[:8], np.where(w < 3, w, w - 3) * 8)
    assert np.array_equal(file[16:], np.full(8, 2))


def test_map_windows_slice_matches_full_and_cursors_count_everything():
    n_windows, fb, fwe = table([50, 70], [[0], [1]])
    caps = np.full(2, 2**62, np.int64)
    rng = np.random.default_rng(0)
    domains = rng.integers(0, 2, 64)
    c_full = np.array([3, 140], np.int64)
    _, full = run_map(domains, c_full, n_windows, caps, fb, fwe)
    c_part = np.array([3, 140], np.int64)
    _, part = run_map(domains, c_part, n_windows, caps, fb, fwe, begin=20, end=37)
    assert np.array_equal(c_full, c_part)
    for a, b in zip(full, part, strict=True):
        assert np.array_equal(a[20:37], b)


def test_map_windows_stops_at_a_cap():
    n_windows, fb, fwe = table([4, 4], [[0], [1]])
    caps = np.array([4, 2**62], np.int64)
    cursors = np.array([2, 0], np.int64)
    done, _ = run_map([1, 0, 0, 1, 0, 1], cursors, n_windows, caps, fb, fwe)
    assert done == 4 and cursors.tolist() == [4, 2]  # the third read of domain 0 would pass the cap


def test_map_windows_validates_inputs():
    n_windows, fb, fwe = table([4, 4], [[0], [1]])
    caps = np.full(2, 2**62, np.int64)
    with pytest.raises(ValueError, match="outside"):
        run_map([0, 2], np.zeros(2, np.int64), n_windows, caps, fb, fwe)
    with pytest.raises(ValueError, match="cursors"):
        run_map([0], np.zeros(3, np.int64), n_windows, caps, fb, fwe)
    with pytest.raises(ValueError, match="slice"):
        run_map([0], np.zeros(2, np.int64), n_windows, caps, fb, fwe, begin=0, end=2)
    with pytest.raises(ValueError, match="file_window_end"):
        run_map([0], np.zeros(2, np.int64), n_windows, caps, fb, np.array([4, 5], np.int64))
    with pytest.raises(ValueError, match="no windows"):
        run_map(
            [1],
            np.zeros(2, np.int64),
            np.array([4, 0], np.int64),
            caps,
            fb,
            np.array([4, 0], np.int64),
        )
    with pytest.raises(ValueError, match="seq_len"):
        run_map([0], np.zeros(2, np.int64), n_windows, caps, fb, fwe, seq_len=0)
    read_only = np.zeros(2, np.int64)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        run_map([0], read_only, n_windows, caps, fb, fwe)
    # file_begin is checked whole before file_window_end is read through it.
    for bad_fb in ([0, 513, 2], [0, 10**6, 2], [0, -5, 2]):
        with pytest.raises(ValueError, match="file_begin must be non-decreasing"):
            run_map([0], np.zeros(2, np.int64), n_windows, caps, np.array(bad_fb), fwe)
    # Token offsets that overflow int64.
    with pytest.raises(ValueError, match="overflow int64"):
        big = np.array([2**40], np.int64)
        run_map([0], np.zeros(1, np.int64), big, caps[:1], np.array([0, 1]), big, seq_len=2**30)


def test_map_windows_rejects_arrays_that_share_memory():
    # Advancing an aliased cursor would change a window count or a domain id under the loop.
    n_windows, fb, fwe = table([3, 3], [[0], [1]])
    caps = np.full(2, 100, np.int64)
    with pytest.raises(ValueError, match="cursors and n_windows share memory"):
        run_map([0, 1, 0, 1], n_windows, n_windows, caps, fb, fwe)
    buf = np.zeros(4, np.int64)
    with pytest.raises(ValueError, match="cursors and domains share memory"):
        _C.map_windows(
            buf[:2].view(np.int32), buf[:2], n_windows, caps, fb, fwe, 1, 8, 0, 4,
            *[np.zeros(4, np.int64) for _ in range(4)],
        )
    shared = np.zeros(2, np.int64)
    with pytest.raises(ValueError, match="out_file and out_offset share memory"):
        _C.map_windows(
            np.zeros(2, np.int32), np.zeros(2, np.int64), n_windows, caps, fb, fwe, 1, 8, 0, 2,
            shared, shared, np.zeros(2, np.int64), np.zeros(2, np.int64),
        )


@settings(max_examples=60, deadline=None)
@given(
    files=st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=3), min_size=1, max_size=4),
    seed=st.integers(0, 2**64 - 1),
    data=st.data(),
)
def test_map_windows_matches_a_python_oracle(files, seed, data):
    # files[d] = window counts of domain d's files; domains with windows only are drawn
    n_windows, fb, fwe = table(sum(files, []), _ranges(files))
    drawable = [d for d, n in enumerate(n_windows) if n > 0]
    if not drawable:
        return
    domains = data.draw(st.lists(st.sampled_from(drawable), min_size=1, max_size=40))
    start = data.draw(st.lists(st.integers(0, 50), min_size=len(files), max_size=len(files)))
    cursors = np.array(start, np.int64)
    caps = np.full(len(files), 2**62, np.int64)
    done, (file, offset, epoch, window) = run_map(
        domains, cursors, n_windows, caps, fb, fwe, seed=seed
    )
    assert done == len(domains)
    assert np.array_equal(cursors - start, np.bincount(domains, minlength=len(files)))
    position = list(start)
    for i, d in enumerate(domains):
        n = int(n_windows[d])
        c = position[d]
        position[d] += 1
        w = int(_C.permute_windows(n, seed, d, c // n, np.array([c % n], np.int64))[0])
        assert (epoch[i], window[i]) == (c // n, w)
        # the file: the first of the domain's files whose cumulative end passes w
        ends = fwe[fb[d] : fb[d + 1]]
        f = int(np.searchsorted(ends, w, side="right"))
        assert file[i] == fb[d] + f
        assert offset[i] == (w - (ends[f - 1] if f else 0)) * 8



def test_map_windows_matches_the_oracle_over_many_domains():
    # Hundreds of domains, each drawn a few times in one batch (the table keeps state per drawn
    # domain, found by hashing its id: colliding ids must keep their own cursors and epochs).
    rng = np.random.default_rng(7)
    sizes = rng.integers(1, 4, 700).tolist()
    n_windows, fb, fwe = table(sizes, [[d] for d in range(700)])
    domains = rng.integers(0, 700, 900)
    domains[::7] = 512  # one domain through several epochs
    start = rng.integers(0, 5, 700)
    cursors = start.copy()
    caps = np.full(700, 2**62, np.int64)
    done, (file, offset, epoch, window) = run_map(
        domains, cursors, n_windows, caps, fb, fwe, begin=100, end=850, seed=3
    )
    assert done == 900
    assert np.array_equal(cursors - start, np.bincount(domains, minlength=700))
    position = start.tolist()
    for i, d in enumerate(domains.tolist()):
        n, c = int(n_windows[d]), position[d]
        position[d] += 1
        if not 100 <= i < 850:
            continue
        w = int(_C.permute_windows(n, 3, d, c // n, np.array([c % n], np.int64))[0])
        j = i - 100
        assert (file[j], offset[j], epoch[j], window[j]) == (d, w * 8, c // n, w)


def test_map_windows_refuses_a_negative_cursor_or_cap_of_a_drawn_domain():
    n_windows, fb, fwe = table([4, 4, 4], [[0], [1], [2]])
    for which in ("cursors", "caps"):
        cursors, caps = np.zeros(3, np.int64), np.full(3, 100, np.int64)
        {"cursors": cursors, "caps": caps}[which][2] = -1
        with pytest.raises(ValueError, match=rf"{which}\[2\] is negative"):
            run_map([0, 1, 2, 0], cursors, n_windows, caps, fb, fwe)
        assert cursors.tolist() == ([0, 0, -1] if which == "cursors" else [0, 0, 0])  # untouched


def _ranges(files):
    out, k = [], 0
    for fs in files:
        out.append(list(range(k, k + len(fs))))
        k += len(fs)
    return out


def test_window_table_maps_as_map_windows_and_keeps_its_own_copy():
    n_windows, fb, fwe = table([3, 5, 4, 7], [[0, 1], [2, 3]])
    caps = np.full(2, 2**62, np.int64)
    domains = np.random.default_rng(1).integers(0, 2, 50).astype(np.int32)
    c1 = np.array([2, 30], np.int64)
    _, expected = run_map(domains, c1, n_windows, caps, fb, fwe, seq_len=16, begin=5, end=40)
    wt = _C.WindowTable(n_windows, fb, fwe, 16)
    assert (wt.num_domains, wt.num_files, wt.seq_len) == (2, 4, 16)
    fwe[:] = 0  # the table holds its own copy, checked when it was built
    c2 = np.array([2, 30], np.int64)
    outs = [np.full(35, -1, np.int64) for _ in range(4)]
    assert wt.map(domains, c2, caps, 1, 5, 40, *outs) == 50
    assert np.array_equal(c1, c2)
    for a, b in zip(expected, outs, strict=True):
        assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="file_window_end of domain 0"):
        _C.WindowTable(n_windows, fb, fwe, 16)
    with pytest.raises(ValueError, match="cursors must have length 2"):
        wt.map(domains, np.zeros(3, np.int64), caps, 1, 0, 0, *[np.empty(0, np.int64)] * 4)


def test_the_dataset_checks_the_file_table_once_not_every_step(tmp_path, monkeypatch):
    # Each global step called map_windows, which copied and checked the whole file table: O(files)
    # per step on every DataLoader worker (a million files: 1.3 ms a step against ~10 us).
    built = []

    class CountingTable(_C.WindowTable):
        def __init__(self, *args):
            built.append(args)
            super().__init__(*args)

    def no_map_windows(*args):
        raise AssertionError("map_windows checks the whole file table on every call")

    fake = types.SimpleNamespace(WindowTable=CountingTable, map_windows=no_map_windows)
    corpus = make_corpus(tmp_path)
    expected = [
        b["input_ids"]
        for b in _take(MixtureDataset(corpus, SEQ_LEN, [1, 2, 3], seed=4, batch_size=3), 20)
    ]
    monkeypatch.setattr(data, "_C", fake)
    ds = MixtureDataset(corpus, SEQ_LEN, [1, 2, 3], seed=4, batch_size=3)
    got = [b["input_ids"] for b in _take(ds, 20)]
    assert len(built) == 1
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))


def _take(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]
