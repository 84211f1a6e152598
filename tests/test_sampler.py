"""Tests of fastmix.sampler (alias / stratified / greedy streams, blend_indices) on the CPU."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import platform
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from fastmix import _C, MixtureSampler, blend_indices, sample_domains

# Fixed seeds make every statistical test deterministic; 1e-4 is the rejection level, so a correct
# sampler fails one of these with probability ~1e-4 per (weights, seed) pair, i.e. effectively never
# unless the distribution is wrong.
P_MIN = 1e-4

WEIGHT_CASES = {
    "uniform": np.ones(22),
    "dirichlet": np.random.default_rng(7).dirichlet(np.ones(50)),
    "extreme": np.array([0.999, 0.001]),
    "single": np.array([3.0]),
    "k1000": np.random.default_rng(8).dirichlet(np.full(1000, 2.0)),
    "zeros": np.array([0.5, 0.0, 0.3, 0.0, 0.2, 0.0]),
}


def _chi_square_p(ids: np.ndarray, weights: np.ndarray) -> float:
    p = weights / weights.sum()
    counts = np.bincount(ids, minlength=p.size)
    assert counts.size == p.size, "a draw fell outside [0, K)"
    assert np.all(counts[p == 0] == 0), "a zero-weight domain was drawn"
    positive = p > 0
    if positive.sum() == 1:
        assert counts[positive][0] == ids.size
        return 1.0
    return float(chisquare(counts[positive], ids.size * p[positive]).pvalue)


# ------------------------------------------------------------------------------- distribution
@pytest.mark.parametrize("case", sorted(WEIGHT_CASES))
@pytest.mark.parametrize("method", ["alias", "stratified"])
def test_chi_square_goodness_of_fit(case: str, method: str) -> None:
    weights = WEIGHT_CASES[case]
    sampler = MixtureSampler(weights, seed=2024, method=method)
    ids = sampler.sample(200_000)
    assert ids.dtype == np.int32
    assert _chi_square_p(ids, weights) > P_MIN
    np.testing.assert_array_equal(sampler.counts, np.bincount(ids, minlength=weights.size))


def test_chi_square_detects_wrong_weights() -> None:
    # The test above can fail: draws from w are rejected against a 5% perturbation of w.
    weights = np.array([0.5, 0.3, 0.2])
    ids = sample_domains(weights, 200_000, seed=1)
    assert _chi_square_p(ids, np.array([0.475, 0.315, 0.21])) < P_MIN


def test_alias_matches_weights_closely() -> None:
    weights = np.random.default_rng(3).dirichlet(np.ones(256))
    ids = sample_domains(weights, 1_000_000, seed=5)
    freq = np.bincount(ids, minlength=256) / ids.size
    # 5 binomial standard deviations per domain
    assert np.all(np.abs(freq - weights) <= 5 * np.sqrt(weights * (1 - weights) / ids.size) + 1e-12)


# ------------------------------------------------------------------------------- determinism
def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


PIN_WEIGHTS = [0.5, 0.25, 0.125, 0.0625, 0.0625, 0.0]

# Short hashes of fixed streams, computed once from this implementation.  They guard cross-machine
# and cross-version stability: the streams are pure integer arithmetic (SplitMix64 counters,
# integer alias/stratification tables, IEEE double blending without FMA), so any machine must
# reproduce them; a change here means the algorithm changed, and with it every saved data order.
PINNED = {
    "alias": "5051ed46d478ad9c",
    "stratified": "b47b990b830aa68c",
    "greedy": "ac1ce8032d23bcfb",
}


@pytest.mark.parametrize("method", ["alias", "stratified", "greedy"])
def test_pinned_streams(method: str) -> None:
    ids = MixtureSampler(PIN_WEIGHTS, seed=12345, method=method).sample(10_000)
    assert _digest(ids) == PINNED[method]


def test_same_seed_same_bits_other_seed_other_bits() -> None:
    a = MixtureSampler(WEIGHT_CASES["dirichlet"], seed=9).sample(50_000)
    b = MixtureSampler(WEIGHT_CASES["dirichlet"], seed=9).sample(50_000)
    c = MixtureSampler(WEIGHT_CASES["dirichlet"], seed=10).sample(50_000)
    np.testing.assert_array_equal(a, b)
    assert np.mean(a != c) > 0.5


def test_same_bits_in_another_process() -> None:
    code = textwrap.dedent(
        """
        import hashlib, numpy as np
        from fastmix import MixtureSampler, sample_domains
        parts = [sample_domains([3, 1, 2, 0.5], 20000, seed=77, offset=123)]
        for method in ("stratified", "greedy"):
            parts.append(MixtureSampler([3, 1, 2, 0.5], seed=77, method=method).sample(20000))
        print(hashlib.sha256(np.concatenate(parts).tobytes()).hexdigest())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    parts = [sample_domains([3, 1, 2, 0.5], 20000, seed=77, offset=123)]
    for method in ("stratified", "greedy"):
        parts.append(MixtureSampler([3, 1, 2, 0.5], seed=77, method=method).sample(20000))
    assert out == hashlib.sha256(np.concatenate(parts).tobytes()).hexdigest()


# ------------------------------------------------------------------------------- slicing
@settings(max_examples=30, deadline=None)
@given(
    offset=st.integers(0, 5000),
    n=st.integers(0, 3000),
    seed=st.integers(0, 2**64 - 1),
)
def test_offset_returns_the_slice(offset: int, n: int, seed: int) -> None:
    weights = [0.1, 0.2, 0.3, 0.4, 0.0, 1.5]
    full = sample_domains(weights, offset + n, seed=seed)
    np.testing.assert_array_equal(
        sample_domains(weights, n, seed=seed, offset=offset), full[offset:]
    )


@pytest.mark.parametrize("k", [1, 5, 22, 32, 33, 300])
def test_short_and_long_calls_agree(k: int) -> None:
    # Calls below 64 draws take the scalar loop; longer ones a vector loop where the CPU has one
    # (register permutes for K <= 32, gathers above).  All must give the same integers.
    weights = np.random.default_rng(k).dirichlet(np.ones(k))
    full = sample_domains(weights, 5000, seed=21)
    pieces = [sample_domains(weights, 50, seed=21, offset=o) for o in range(0, 5000, 50)]
    np.testing.assert_array_equal(np.concatenate(pieces), full)


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
@pytest.mark.parametrize("k", [1, 2, 7, 8, 9, 16, 17, 22, 32, 33, 256, 40_000, 65_536, 65_537])
def test_every_alias_loop_gives_the_scalar_draws(k: int, isa: str) -> None:
    # Each vector loop (or the scalar one where this CPU lacks the instruction set) against the
    # scalar loop, across the register-table sizes (8, 16, 32 columns), the gathers and the largest
    # packed table.  The AVX2 loops decide a draw on the top 32 - ceil(log2 K) bits of its fraction
    # and hand the rare draws those leave undecided to the scalar loop: at K > 2^15 about 15 per
    # million draws, where a wrong hand-over changes about half of them (checked by breaking it).
    weights = np.random.default_rng(k).dirichlet(np.ones(k))
    table = _C.AliasTable(weights)
    n = 1_000_003 if k > 2**15 else 20_011  # odd lengths leave a scalar tail
    for offset in (0, 2**64 - n):  # also where the draw counter wraps to 0
        expected = np.empty(n, dtype=np.int32)
        table.fill(9, offset, expected, isa="scalar")
        got = np.empty(n, dtype=np.int32)
        table.fill(9, offset, got, isa=isa)
        np.testing.assert_array_equal(got, expected, err_msg=f"offset {offset}")


def test_alias_fill_rejects_an_unknown_isa() -> None:
    with pytest.raises(ValueError, match="isa must be 'best', 'avx512', 'avx2' or 'scalar'"):
        _C.AliasTable(np.ones(3)).fill(0, 0, np.zeros(100, dtype=np.int32), isa="sse")


def test_offset_near_the_end_of_the_counter_space() -> None:
    ids = sample_domains([1, 2], 10, seed=1, offset=2**64 - 10)
    np.testing.assert_array_equal(ids[5:], sample_domains([1, 2], 5, seed=1, offset=2**64 - 5))
    assert sample_domains([1, 2], 0, seed=1, offset=2**64).shape == (0,)  # the empty last slice
    with pytest.raises(ValueError, match="offset \\+ n must be <= 2\\*\\*64"):
        sample_domains([1, 2], 1, seed=1, offset=2**64)


def test_out_argument_is_filled_and_returned() -> None:
    out = np.full(100, -1, dtype=np.int32)
    result = sample_domains([1, 2, 3], 100, seed=4, out=out)
    assert result is out
    np.testing.assert_array_equal(out, sample_domains([1, 2, 3], 100, seed=4))


@pytest.mark.parametrize("method", ["alias", "stratified", "greedy"])
def test_chunked_sampling_equals_one_call(method: str) -> None:
    weights = WEIGHT_CASES["dirichlet"]
    whole = MixtureSampler(weights, seed=3, method=method).sample(30_000)
    sampler = MixtureSampler(weights, seed=3, method=method)
    chunks = [sampler.sample(n) for n in (1, 999, 1024, 5000, 0, 7, 22_969)]
    np.testing.assert_array_equal(np.concatenate(chunks), whole)
    assert sampler.position == 30_000


def test_alias_sampler_is_the_stateless_stream() -> None:
    weights = [4, 0, 1, 2]
    np.testing.assert_array_equal(
        MixtureSampler(weights, seed=11).sample(5000), sample_domains(weights, 5000, seed=11)
    )


def test_greedy_sampler_is_blend_indices() -> None:
    weights = WEIGHT_CASES["dirichlet"]
    np.testing.assert_array_equal(
        MixtureSampler(weights, method="greedy").sample(20_000), blend_indices(weights, 20_000)[0]
    )


def test_greedy_never_draws_zero_weights_unlike_megatron() -> None:
    weights = [0.0, 1.0, 1.0, 0.0, 2.0]
    # Megatron's rule picks domain 0 on the all-zero tie at sample 2 ...
    assert blend_indices(weights, 3)[0].tolist() == _blend_reference(weights, 3)[0]
    assert 0 in blend_indices(weights, 50)[0]
    # ... the sampler runs the same rule over the positive-weight domains
    ids = MixtureSampler(weights, method="greedy").sample(5000)
    positive = np.array([1, 2, 4])
    np.testing.assert_array_equal(ids, positive[blend_indices([1.0, 1.0, 2.0], 5000)[0]])


@pytest.mark.parametrize("method", ["alias", "stratified", "greedy"])
def test_peek_does_not_advance(method: str) -> None:
    sampler = MixtureSampler([1, 2, 3], seed=8, method=method)
    sampler.sample(100)
    peeked = sampler.peek(500)
    assert sampler.position == 100
    np.testing.assert_array_equal(sampler.sample(500), peeked)


# ------------------------------------------------------------------------------- stratified
@pytest.mark.parametrize(
    "weights,block",
    [
        (np.ones(3), 4),
        (np.ones(22), 1024),
        (np.array([0.999, 0.001]), 1024),
        (np.random.default_rng(1).dirichlet(np.ones(40)), 100),
        (np.random.default_rng(2).dirichlet(np.full(300, 0.3)), 1000),
        (np.array([0.5, 0.0, 0.5]), 7),
        (np.array([1.0]), 5),
    ],
)
def test_stratified_block_bounds(weights: np.ndarray, block: int) -> None:
    blocks = 40
    sampler = MixtureSampler(weights, seed=6, method="stratified", block=block)
    ids = sampler.sample(blocks * block).reshape(blocks, block)
    quota = weights / weights.sum() * block
    for row in ids:
        counts = np.bincount(row, minlength=weights.size)
        assert np.all(counts >= np.floor(quota - 1e-9)), (counts, quota)
        assert np.all(counts <= np.ceil(quota + 1e-9)), (counts, quota)
    # the order within a block is shuffled, not sorted by domain
    if weights.size > 1 and block >= 100:
        assert any(np.any(np.diff(row) < 0) for row in ids)


def test_stratified_small_reads_across_a_large_block() -> None:
    # Partial reads of a block come from the table's cached copy of it: the same draws.
    whole = MixtureSampler([5, 3, 1], seed=9, method="stratified", block=4096).sample(10_000)
    sampler = MixtureSampler([5, 3, 1], seed=9, method="stratified", block=4096)
    sizes = np.random.default_rng(0).integers(0, 700, size=100)
    parts = []
    while sampler.position < 10_000:
        n = min(int(sizes[len(parts) % 100]), 10_000 - sampler.position)
        assert np.array_equal(sampler.peek(n), whole[sampler.position : sampler.position + n])
        parts.append(sampler.sample(n))
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    table = _C.StratifiedTable(np.array([5.0, 3.0, 1.0]), 4096)
    out = np.empty(10, np.int32)
    for segment in (0, 7, 0):  # another segment key, then the first again
        table.fill(9, segment, 100, out)
        np.testing.assert_array_equal(out, table.block_ids(9, segment, 0)[100:110])


def test_stratified_random_access_by_block() -> None:
    weights = np.random.default_rng(0).dirichlet(np.ones(30))
    sampler = MixtureSampler(weights, seed=17, method="stratified", block=64)
    stream = sampler.sample(64 * 20)
    table = _C.StratifiedTable(weights, 64)
    for index in (0, 7, 19):
        np.testing.assert_array_equal(
            table.block_ids(17, 0, index), stream[64 * index : 64 * (index + 1)]
        )


def test_stratified_blocks_differ_and_restart_after_set_weights() -> None:
    sampler = MixtureSampler(np.ones(4), seed=1, method="stratified", block=8)
    first = sampler.sample(8 * 50).reshape(50, 8)
    assert len({row.tobytes() for row in first}) > 10  # a fresh offset and shuffle per block
    sampler.sample(3)  # mid-block
    sampler.set_weights([0.5, 0.25, 0.25, 0.0])
    after = sampler.sample(8 * 10).reshape(10, 8)
    for row in after:  # blocks are aligned to the change point
        np.testing.assert_array_equal(np.bincount(row, minlength=4), [4, 2, 2, 0])


# ------------------------------------------------------------------------------- state
@pytest.mark.parametrize("method", ["alias", "stratified", "greedy"])
def test_state_dict_round_trip_mid_stream(method: str) -> None:
    weights = {"web": 0.6, "code": 0.3, "books": 0.1}
    sampler = MixtureSampler(weights, seed=99, method=method)
    sampler.sample(1234)
    state = json.loads(json.dumps(sampler.state_dict()))  # JSON-friendly
    expected = sampler.sample(5000)
    restored = MixtureSampler([1.0], seed=0)  # anything: the state replaces it
    restored.load_state_dict(state)
    assert restored.names == ("web", "code", "books")
    assert restored.method == method and restored.position == 1234
    np.testing.assert_array_equal(restored.sample(5000), expected)
    np.testing.assert_array_equal(restored.counts, sampler.counts)


@pytest.mark.parametrize("method", ["alias", "stratified", "greedy"])
def test_pickle_and_deepcopy_continue_the_stream(method: str) -> None:
    sampler = MixtureSampler({"web": 5, "code": 3, "math": 1}, seed=7, method=method)
    sampler.sample(1001)
    sampler.set_weights({"web": 1, "code": 3, "math": 2})
    sampler.sample(55)
    for copy_ in (pickle.loads(pickle.dumps(sampler)), copy.deepcopy(sampler)):
        assert copy_.state_dict() == sampler.state_dict()
        assert copy_.names == ("web", "code", "math")
        np.testing.assert_array_equal(copy_.sample(3000), sampler.peek(3000))
        assert copy_.position == sampler.position + 3000  # independent of the original


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore:.*multi-threaded.*fork:DeprecationWarning")
def test_a_fork_during_a_call_waits_for_it_and_the_child_can_draw() -> None:
    # A thread inside a call (holding the sampler's lock) while another thread forks: without the
    # fork hooks the child inherits the held lock and its first call waits forever (here: until
    # the alarm ends it, exit code -14).
    sampler = MixtureSampler([1, 2, 3], seed=5)
    sampler.sample(10)
    inside, leave = threading.Event(), threading.Event()

    def call_in_progress() -> None:
        with sampler._lock:
            inside.set()
            leave.wait(10)

    thread = threading.Thread(target=call_in_progress)
    thread.start()
    assert inside.wait(10)
    timer = threading.Timer(0.2, leave.set)  # the call ends while the fork waits for it
    timer.start()
    pid = os.fork()
    if pid == 0:  # the child: exit code 0 if it draws the stream's next four
        try:
            signal.alarm(10)
            ok = np.array_equal(sampler.sample(4), sample_domains([1, 2, 3], 4, seed=5, offset=10))
            os._exit(0 if ok and sampler.position == 14 else 1)
        except BaseException:
            os._exit(2)
    thread.join()
    timer.join()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    np.testing.assert_array_equal(  # the parent's locks are free again too
        sampler.sample(4), sample_domains([1, 2, 3], 4, seed=5, offset=10)
    )


@pytest.mark.parametrize("method", ["alias", "stratified", "greedy"])
def test_threads_sharing_a_sampler_get_disjoint_slices_of_the_stream(method: str) -> None:
    # The draws release the GIL: without the sampler's lock two threads read the same position
    # (duplicated slices; greedy raised "counts must sum to start_step").
    weights = np.random.default_rng(0).dirichlet(np.ones(64))
    n, calls, threads = 100_000, 8, 4
    expected = MixtureSampler(weights, seed=3, method=method).sample(n * calls * threads)
    sampler = MixtureSampler(weights, seed=3, method=method)
    chunks: list[np.ndarray] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(calls):
                chunks.append(sampler.sample(n))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert not errors, errors
    slices = expected.reshape(-1, n)
    found = sorted(
        next(i for i, ref in enumerate(slices) if np.array_equal(chunk, ref)) for chunk in chunks
    )
    assert found == list(range(calls * threads))
    assert sampler.position == expected.size
    np.testing.assert_array_equal(sampler.counts, np.bincount(expected, minlength=64))


class _Staged(MixtureSampler):
    def __init__(self, weights: list[float], stages: list[int]) -> None:
        super().__init__(weights, seed=1)
        self.stages = stages


def test_a_masked_array_without_masked_entries_is_taken() -> None:
    weights = np.ma.array([0.5, 0.3, 0.2])
    np.testing.assert_array_equal(
        sample_domains(weights, 100, seed=1), sample_domains([0.5, 0.3, 0.2], 100, seed=1)
    )


def test_pickle_keeps_a_subclass_attributes() -> None:
    sampler = _Staged([1.0, 2.0], stages=[10, 20])
    sampler.sample(7)
    for copy_ in (pickle.loads(pickle.dumps(sampler)), copy.deepcopy(sampler)):
        assert type(copy_) is _Staged and copy_.stages == [10, 20] and copy_.position == 7


@pytest.mark.parametrize("loaded", ["stratified", "greedy"])
def test_set_weights_racing_load_state_dict_builds_for_the_loaded_sampler(
    loaded: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # set_weights used to read method/block and build its table before taking the lock: a
    # load_state_dict finishing in between left a table for the old block (or method) installed.
    state = {
        "stratified": MixtureSampler(np.ones(50), seed=1, method="stratified", block=64),
        "greedy": MixtureSampler(np.ones(50), method="greedy"),
    }[loaded].state_dict()
    sampler = MixtureSampler(np.ones(50), seed=1, method="stratified", block=4096)
    build = MixtureSampler._build
    loader = threading.Thread(target=sampler.load_state_dict, args=(state,))

    def build_while_another_thread_loads(raw: np.ndarray, method: str, block: int) -> object:
        if loader.ident is None:  # the first build: set_weights's
            loader.start()
            loader.join(timeout=0.5)  # finishes here unless set_weights holds the lock
        return build(raw, method, block)

    monkeypatch.setattr(MixtureSampler, "_build", staticmethod(build_while_another_thread_loads))
    sampler.set_weights(np.arange(1, 51, dtype=np.float64))
    loader.join()
    monkeypatch.setattr(MixtureSampler, "_build", staticmethod(build))
    twin = MixtureSampler([1.0])
    twin.load_state_dict(sampler.state_dict())
    assert sampler.method == loaded
    np.testing.assert_array_equal(sampler.peek(5000), twin.peek(5000))


@pytest.mark.parametrize("method", ["alias", "stratified", "greedy"])
def test_weight_change_mid_stream_and_round_trip(method: str) -> None:
    sampler = MixtureSampler([1, 2, 3, 4], seed=5, method=method)
    head = sampler.sample(777)
    sampler.set_weights([4, 3, 0, 1])
    middle = sampler.sample(2000)
    assert np.all(middle != 2), "the new zero weight was drawn"
    state = json.loads(json.dumps(sampler.state_dict()))
    sampler.set_weights([0.3, 0.1 + 0.2, 0.0, 0.1])  # 0.1+0.2 != 0.3: exercises exact float storage
    tail = sampler.sample(3000)
    restored = MixtureSampler([1, 1, 1, 1], method="alias")
    restored.load_state_dict(state)
    restored.set_weights([0.3, 0.1 + 0.2, 0.0, 0.1])
    np.testing.assert_array_equal(restored.sample(3000), tail)
    np.testing.assert_array_equal(
        restored.counts, np.bincount(np.concatenate([head, middle, tail]), minlength=4)
    )
    if method == "alias":  # the counter keeps running: the stream at the new table's offset
        np.testing.assert_array_equal(
            middle, sample_domains([4, 3, 0, 1], 2000, seed=5, offset=777)
        )
    if method == "greedy":  # the rule restarts at the change point
        np.testing.assert_array_equal(middle, blend_indices([4, 3, 0, 1], 2000)[0])


def test_set_weights_by_name_in_any_order() -> None:
    a = MixtureSampler({"x": 1, "y": 2}, seed=1)
    b = MixtureSampler({"x": 1, "y": 2}, seed=1)
    a.set_weights({"y": 1, "x": 3})
    b.set_weights([3, 1])
    np.testing.assert_array_equal(a.sample(100), b.sample(100))
    np.testing.assert_allclose(a.weights, [0.75, 0.25])


# ------------------------------------------------------------------------------- blend_indices
def _assert_blend_equal(got: tuple, expected: tuple, name: str = "") -> None:
    """Both blend_indices arrays (dataset_index, dataset_sample_index) are equal."""
    np.testing.assert_array_equal(got[0], expected[0], err_msg=name)
    np.testing.assert_array_equal(got[1], expected[1], err_msg=name)


def _blend_reference(weights: list[float], size: int) -> tuple[list[int], list[int]]:
    """The rule as written in Megatron-LM's helpers.cpp, in plain Python floats."""
    w = np.asarray(weights, dtype=np.float64)
    w = (w / np.sum(w)).tolist()
    counts = [0] * len(w)
    index, sample_index = [], []
    for s in range(size):
        x = max(float(s), 1.0)
        best, best_value = 0, w[0] * x - float(counts[0])
        for d in range(1, len(w)):
            value = w[d] * x - float(counts[d])
            if value > best_value:
                best, best_value = d, value
        index.append(best)
        sample_index.append(counts[best])
        counts[best] += 1
    return index, sample_index


@pytest.mark.parametrize(
    "weights",
    [
        [1.0],
        [0.5, 0.5],
        [1, 1, 1],
        [0.999, 0.001],
        [0.001, 0.999],
        [0.3, 0.0, 0.7],
        [0.0, 1.0, 0.0],
        [0.1, 0.2, 0.3, 0.4],
        [2, 2, 1, 1, 1, 1],
        [1e-12, 1, 1e-12],
        list(np.random.default_rng(0).dirichlet(np.ones(12))),
        list(np.random.default_rng(1).dirichlet(np.full(40, 0.2))),
    ],
)
def test_blend_indices_matches_the_rule(weights: list[float]) -> None:
    size = 3000
    index, sample_index = blend_indices(weights, size)
    assert index.dtype == np.int16 and sample_index.dtype == np.int64
    ref_index, ref_sample = _blend_reference(weights, size)
    np.testing.assert_array_equal(index, ref_index)
    np.testing.assert_array_equal(sample_index, ref_sample)


PUBLISHED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.parametrize(
    "config",
    [*sorted(PUBLISHED.glob("doremi/*.json")), *sorted(PUBLISHED.glob("regmix/config_1b_*.yaml"))]
    or [None],
    ids=lambda p: p and p.name,
)
def test_blend_indices_matches_the_rule_for_published_weights(config) -> None:
    # Published tables are rounded (to 4 decimals): exact ties between domains at many steps.
    if config is None:
        pytest.skip(f"no published weights at {PUBLISHED}")
    if config.suffix == ".json":
        weights = list(json.loads(config.read_text())["train_domain_weights"].values())
    else:  # RegMix's "train:" block of "  name: weight" lines
        text = config.read_text().split("train:", 1)[1].split("\n")
        weights = [float(line.split(":")[1]) for line in text[1:] if line.startswith("  ")]
    assert len(weights) >= 1
    size = 20_000
    index, sample_index = blend_indices(weights, size)
    ref_index, ref_sample = _blend_reference(weights, size)
    np.testing.assert_array_equal(index, ref_index)
    np.testing.assert_array_equal(sample_index, ref_sample)


weight_vectors = st.one_of(
    st.lists(st.floats(0, 1e3, allow_nan=False, allow_subnormal=False), min_size=1, max_size=300),
    st.lists(st.sampled_from([0.0, 1.0, 2.0, 0.5, 1e-9]), min_size=1, max_size=300),  # many ties
    st.integers(1, 600).map(lambda k: np.random.default_rng(k).dirichlet(np.full(k, 0.3)).tolist()),
)


@settings(max_examples=40, deadline=None)
@given(weights=weight_vectors, size=st.integers(0, 20_000))
def test_blend_indices_matches_naive_loop(weights: list[float], size: int) -> None:
    if sum(weights) <= 0:
        weights = weights + [1.0]
    w = np.asarray(weights, dtype=np.float64)
    w = w / np.sum(w)
    fast = _C.blend_indices(w, size)
    naive = _C._blend_indices_naive(w, size)
    _assert_blend_equal(fast, naive)


@pytest.mark.parametrize("k", [5, 22, 64, 256, 2000])
def test_blend_indices_matches_naive_loop_long(k: int) -> None:
    w = np.random.default_rng(k).dirichlet(np.ones(k))
    size = 400_000 if k <= 256 else 100_000
    fast = blend_indices(w, size)
    w = w / np.sum(w)
    naive = _C._blend_indices_naive(w, size)
    _assert_blend_equal(fast, naive)


def _rule_from(w: np.ndarray, start_step: int, counts: list[int], n: int) -> np.ndarray:
    """The rule from any state (step, counts) with the weights as given, in numpy doubles: the
    first maximum of w * x - counts, one step at a time."""
    w = np.asarray(w, dtype=np.float64)
    c = np.array(counts, dtype=np.int64)
    ids = np.empty(n, dtype=np.int32)
    for t in range(n):
        d = int(np.argmax(w * max(float(start_step + t), 1.0) - c.astype(np.float64)))
        ids[t] = d
        c[d] += 1
    return ids


@pytest.mark.parametrize("k", [2, 5, 22, 40, 256, 1000])
def test_blend_indices_equal_weights_run_as_levels(k: int) -> None:
    # All weights equal: the smallest count wins, the lowest index among equals (run_equal).
    w = np.full(k, 1.0 / k)
    index, sample, info = _C._blend_indices_screened(w, 30_000, False, "best", False)
    _assert_blend_equal((index, sample), _C._blend_indices_naive(w, 30_000))
    assert info["equal_steps"] == 30_000
    np.testing.assert_array_equal(index[: 2 * k], np.tile(np.arange(k), 2))


@pytest.mark.parametrize(
    ("weights", "counts"),
    [
        # all equal (run_equal)
        ([0.25] * 4, [50, 0, 3, 3]),  # one domain far ahead: the others catch up in index order
        ([3.0] * 5, [0, 7, 7, 2, 0]),  # weights as given, above 1
        ([5e-324] * 3, [5, 0, 5]),  # subnormal
        ([1 / 7] * 7, np.random.default_rng(7).integers(0, 1000, 7).tolist()),
        ([1.0] * 6, [2**40 + 3 * i for i in range(6)]),  # far into a stream
        # a few distinct (run_groups)
        ([0.5, 0.25, 0.25, 0.5, 0.25, 0.25], [9, 40, 0, 9, 3, 3]),  # a group far apart inside
        ([3.0, 1.0, 1.0, 1.0, 3.0, 1.0], [0, 7, 7, 2, 50, 1]),  # weights as given, above 1
        ([0.0, 2.0, 2.0, 0.0, 2.0, 2.0], [4, 4, 3, 0, 1, 1]),  # zero weights: chosen on ties at 0
        ([0.1] * 5 + [0.05] * 5 + [0.02] * 4, [2**40 + i for i in range(14)]),  # far in
    ],
)
def test_greedy_fill_equal_and_grouped_weights_from_any_state(weights: list, counts: list) -> None:
    start = sum(counts)
    expected = _rule_from(np.array(weights), start, counts, 3000)
    for isa in ("best", "avx2", "scalar"):
        c = np.array(counts, dtype=np.int64)
        out = np.empty(3000, dtype=np.int32)
        _C.greedy_fill(np.array(weights), start, c, out, isa=isa)
        np.testing.assert_array_equal(out, expected, err_msg=isa)
        np.testing.assert_array_equal(c, np.array(counts) + np.bincount(expected, minlength=len(c)))


def test_blend_indices_equal_weights_leave_the_levels_where_doubles_tie() -> None:
    # Weights as given (_C.blend_indices does not normalise) so large that w * x passes 2^51:
    # there the doubles tie counts apart (at w * x ~ 2^60 a count below 2^7 is lost in the
    # rounding), so the levels would be wrong and the general paths run the rule.
    w = np.full(3, 2.0**50)
    index, sample, info = _C._blend_indices_screened(w, 5000, False, "best", False)
    assert info["equal_steps"] == 0
    _assert_blend_equal((index, sample), _C._blend_indices_naive(w, 5000))
    assert not np.array_equal(index, np.arange(5000) % 3)


def _lane_boundary_cases(ks: tuple[int, ...], seed: int) -> list[tuple[str, np.ndarray]]:
    """Weights for K around a vector kernel's register boundaries: spread, peaked, tied, zeros."""
    rng = np.random.default_rng(seed)
    cases = []
    for k in ks:
        cases.append((f"dirichlet0.1-k{k}", rng.dirichlet(np.full(k, 0.1))))
        cases.append((f"dirichlet5-k{k}", rng.dirichlet(np.full(k, 5.0))))
        cases.append((f"uniform-k{k}", np.ones(k)))  # exact ties at every round
        dup = rng.choice([0.0, 0.5, 1.0, 2.0], size=k)
        dup[-1] = 1.0  # at least one positive
        cases.append((f"duplicates-zeros-k{k}", dup))
    return cases


# AVX-512: 8 lanes per register, K <= 64 unpruned.
_AVX512_CASES = _lane_boundary_cases(
    (1, 2, 3, 7, 8, 9, 15, 16, 17, 22, 31, 32, 33, 63, 64, 65), 2024
)
# AVX2: 4 lanes per register, K <= 48 unpruned (three segments up to 32).
_AVX2_CASES = _lane_boundary_cases(
    (1, 2, 3, 4, 5, 8, 12, 13, 21, 22, 24, 31, 32, 33, 40, 47, 48, 49), 2025
)


@pytest.mark.parametrize(("name", "weights"), _AVX512_CASES)
def test_blend_indices_vector_kernel_lane_boundaries(name: str, weights: np.ndarray) -> None:
    w = weights / np.sum(weights)
    size = 30_000
    fast = _C.blend_indices(w, size)
    naive = _C._blend_indices_naive(w, size)
    _assert_blend_equal(fast, naive, name)


@pytest.mark.parametrize(("name", "weights"), _AVX2_CASES)
def test_blend_indices_avx2_path_matches_naive_loop(name: str, weights: np.ndarray) -> None:
    # CPUs with AVX2 but no AVX-512 run the register kernel on 4-lane registers (up to 48 domains,
    # and for the windows' candidates above); forced here on any machine that has AVX2 (on one
    # without, the call runs the scalar path, which must match as well).  The misguessed variant
    # starts every speculative segment from a wrong state, so the recovery decides the output.
    w = weights / np.sum(weights)
    size = 40_000
    naive = _C._blend_indices_naive(w, size)
    for fast in (_C._blend_indices_avx2(w, size), _C._blend_indices_avx2_misguessed(w, size)):
        _assert_blend_equal(fast, naive, name)


@pytest.mark.parametrize("k", [22, 101, 256])
def test_blend_indices_avx2_path_long_streams(k: int) -> None:
    # Long enough for several rounds of speculative segments (K <= 32) and many windows (K > 48,
    # refreshed 4 domains per register; 101 leaves a scalar tail).
    w = np.random.default_rng(1100 + k).dirichlet(np.ones(k))
    size = 300_000
    naive = _C._blend_indices_naive(w, size)
    fast = _C._blend_indices_avx2(w, size)
    _assert_blend_equal(fast, naive)


def test_best_isa_follows_the_cpu_flags() -> None:
    # blend_indices picks its kernels from the CPU's features at run time.
    cpuinfo = Path("/proc/cpuinfo")
    if platform.machine() not in ("x86_64", "AMD64") or not cpuinfo.exists():
        pytest.skip("x86-64 Linux only (reads /proc/cpuinfo)")
    flags: set[str] = set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    if {"avx512f", "avx512vl", "avx512dq"} <= flags:
        expected = "avx512"
    elif "avx2" in flags:
        expected = "avx2"
    else:
        expected = "scalar"
    assert _C._best_isa() == expected


@pytest.mark.parametrize("k", [3, 12, 19, 20, 22, 64, 256, 1000])  # 19 | 20: plain loop | windows
def test_blend_indices_portable_path_matches_naive_loop(k: int) -> None:
    # The scalar pruning path runs on CPUs without AVX-512; check it here on any machine.
    w = np.random.default_rng(100 + k).dirichlet(np.full(k, 0.5))
    size = 100_000 if k <= 256 else 30_000
    portable = _C._blend_indices_portable(w, size)
    naive = _C._blend_indices_naive(w, size)
    _assert_blend_equal(portable, naive)


@pytest.mark.parametrize("k", [2, 9, 22, 40, 64])
def test_blend_indices_recovers_from_wrong_speculative_states(k: int) -> None:
    # Segments of the stream run from guessed states and are verified; here every guess is wrong
    # (all-zero counts, or one count moved), so the recovery decides every output.
    w = np.random.default_rng(300 + k).dirichlet(np.full(k, 0.3))
    w = w / np.sum(w)
    size = 150_000
    misguessed = _C._blend_indices_misguessed(w, size)
    naive = _C._blend_indices_naive(w, size)
    _assert_blend_equal(misguessed, naive)


@pytest.mark.parametrize(
    ("k", "concentration"), [(65, 0.3), (128, 0.05), (256, 1.0), (256, None), (500, 2.0)]
)
def test_blend_indices_windowed_segments_match_naive_loop(
    k: int, concentration: float | None
) -> None:
    # K > 64: two speculative segments, each a chain of pruning windows, run in lockstep; the
    # misguessed variant starts the second from all-zero counts, so it is recomputed and verified.
    # Uniform weights (None) tie everywhere and leave too many candidates for the register kernel.
    rng = np.random.default_rng(500 + k)
    w = np.ones(k) if concentration is None else rng.dirichlet(np.full(k, concentration))
    w = w / np.sum(w)
    size = 120_000
    naive = _C._blend_indices_naive(w, size)
    for fast in (_C.blend_indices(w, size), _C._blend_indices_misguessed(w, size)):
        _assert_blend_equal(fast, naive)


@pytest.mark.parametrize("k", [65, 100, 200, 300, 512])
@pytest.mark.parametrize("concentration", [0.05, 10.0])
def test_blend_indices_long_windows_match_naive_loop(k: int, concentration: float) -> None:
    # 64 < K <= 512: windows of sqrt(K) (at most 16) steps whose candidates (up to 64 per chain,
    # 8 registers) are compressed inside the refresh pass; the output arrays are written as each
    # window closes (and rewritten where a misguessed segment is recomputed).  Dirichlet(0.05)
    # concentrates the weight on a few domains, Dirichlet(10) spreads it evenly (many candidates).
    w = np.random.default_rng(700 + k).dirichlet(np.full(k, concentration))
    w = w / np.sum(w)
    size = 60_000
    naive = _C._blend_indices_naive(w, size)
    for fast in (_C.blend_indices(w, size), _C._blend_indices_misguessed(w, size)):
        _assert_blend_equal(fast, naive)


# The screened lanes run on CPUs with AVX-512, or AVX2 (two registers per row; forced by "avx2").
_SCREENS = _C._best_isa() != "scalar"
_SCREEN_ISAS = ["best", "avx2"]


@pytest.mark.parametrize("isa", _SCREEN_ISAS)
@pytest.mark.parametrize("k", [2, 5, 16, 17, 22, 32])  # 16 / 17: one or two count lookups
def test_blend_indices_screened_lanes_run_and_match(k: int, isa: str) -> None:
    # K <= 32 on AVX-512: 16 speculative segments in 32-bit fixed point; a step is kept only when
    # no other domain is within the rounding margin of the largest, otherwise the lane's window is
    # recomputed in doubles.  Generic weights keep almost every window and still meet a few close
    # calls in 1M steps; each lane's start is guessed and warmed up for two windows (the rule from
    # a guess 128 steps early), which gets nearly every start right (wrong ones are recomputed:
    # test_blend_indices_screened_lanes_recover_from_wrong_guesses).
    w = np.random.default_rng(1500 + k).dirichlet(np.ones(k))
    w = w / np.sum(w)
    index, sample, info = _C._blend_indices_screened(w, 1_000_000, isa=isa)
    _assert_blend_equal((index, sample), _C._blend_indices_naive(w, len(index)), f"k={k}")
    if not _SCREENS:
        assert info["steps"] == 0
        return
    assert not info["gave_up"]
    assert info["steps"] >= 950_000
    assert info["windows"] == info["steps"] // 64
    assert 0 < info["uncertain"] < info["windows"] // 50
    lanes = 15 * (1 + (info["steps"] - 16 * 256) // (16 * 8192))
    assert info["misguessed"] <= lanes // 20


@pytest.mark.parametrize("k", [5, 17, 22, 32])
def test_blend_indices_screened_lanes_write_samples_in_64_bits_too(k: int) -> None:
    # The AVX2 output pass adds counts in 32 bits while every count fits there (always, below
    # 2^32 - 64 steps); wide_samples forces its 64-bit path, which larger outputs take.
    w = np.random.default_rng(1600 + k).dirichlet(np.ones(k))
    w = w / np.sum(w)
    index, sample, info = _C._blend_indices_screened(w, 300_000, isa="avx2", wide_samples=True)
    _assert_blend_equal((index, sample), _C._blend_indices_naive(w, len(index)), f"k={k}")
    assert info["steps"] >= 250_000 or not _SCREENS


@pytest.mark.parametrize(
    "weights",
    # (Up to four distinct weights among more domains never reach the lanes: run_equal and
    # run_groups take them.)
    [
        np.r_[np.ones(8), 2, 3, 4, 5],
        np.array([0.5, 0.3, 0.2]),
        np.round(np.linspace(0.01, 0.2, 22), 2),
    ],
    ids=["equal-and-four", "tenths", "hundredths"],
)
@pytest.mark.parametrize("isa", _SCREEN_ISAS)
def test_blend_indices_screened_lanes_give_up_on_ties(weights: np.ndarray, isa: str) -> None:
    # Weights with small common denominators tie exactly (in doubles) at a large share of steps;
    # every window is then uncertain, and after a short first round the double kernel runs alone.
    w = weights / np.sum(weights)
    index, sample, info = _C._blend_indices_screened(w, 200_000, isa=isa)
    _assert_blend_equal((index, sample), _C._blend_indices_naive(w, len(index)))
    if _SCREENS:
        assert info["gave_up"]
        assert info["uncertain"] == info["windows"] > 0
        assert info["steps"] <= 16 * 256


@pytest.mark.parametrize("isa", _SCREEN_ISAS)
def test_blend_indices_screened_lanes_catch_near_ties(isa: str) -> None:
    # Two domains whose weights differ by 2e-13 (relative) come within the fixed point's margin of
    # each other whenever both are near the top, without tying in doubles.  The kernel decrements
    # both rows at such a step and must notice (the rows' total change over the window): those
    # windows are recomputed, the rest kept, and the output is still the rule's.
    w = np.random.default_rng(1700).dirichlet(np.ones(22))
    w[[4, 9]] = 0.001
    w[9] *= 1 + 2e-13
    w = w / np.sum(w)
    index, sample, info = _C._blend_indices_screened(w, 1_000_000, isa=isa)
    _assert_blend_equal((index, sample), _C._blend_indices_naive(w, len(index)))
    if _SCREENS:
        assert not info["gave_up"]
        assert info["uncertain"] > info["windows"] // 50


@pytest.mark.parametrize("k", [33, 40, 48, 49, 57, 64])
def test_blend_indices_fixed_point_chain_runs_and_matches(k: int) -> None:
    # 33 <= K <= 64 with AVX2 (the best this CPU has, or forced by "avx2"): one chain of the rule
    # in 32-bit fixed point, windows of 32 steps, each proved exact (no other row within the
    # rounding margin of the largest at any step) or recomputed by the other paths.  Generic weights
    # keep nearly every window and still meet a few close calls.
    w = np.random.default_rng(1800 + k).dirichlet(np.ones(k))
    w = w / np.sum(w)
    index, sample, info = _C._blend_indices_screened(w, 500_000, isa="avx2")
    _assert_blend_equal((index, sample), _C._blend_indices_naive(w, len(index)), f"k={k}")
    if not _SCREENS:
        assert info["chain_windows"] == 0
        return
    assert not info["chain_gave_up"]
    assert info["chain_windows"] == -(-(len(index) - 1) // 32)  # every step after step 0
    assert 0 < info["chain_uncertain"] < info["chain_windows"] // 20


@pytest.mark.parametrize(
    "weights",
    [np.r_[np.ones(36), 2, 3, 4, 5], np.round(np.linspace(0.01, 0.2, 50), 2)],
    ids=["equal-and-four", "hundredths"],
)
def test_blend_indices_fixed_point_chain_gives_up_on_ties(weights: np.ndarray) -> None:
    # Exact ties in doubles leave the chain's windows unproved (each then recomputed by the other
    # paths); after 16 windows with more than a quarter unproved it gives up, and the other paths
    # run the rest.
    w = weights / np.sum(weights)
    index, sample, info = _C._blend_indices_screened(w, 100_000, isa="avx2")
    _assert_blend_equal((index, sample), _C._blend_indices_naive(w, len(index)))
    if _SCREENS:
        assert info["chain_gave_up"]
        assert info["chain_windows"] == 16 and info["chain_uncertain"] > 4


@pytest.mark.parametrize("isa", _SCREEN_ISAS)
def test_blend_indices_screened_lanes_keep_screening_through_a_few_ties(isa: str) -> None:
    # Two equal small weights (as in published tables) tie whenever their counts are equal: ~14%
    # of the windows are recomputed, fewer than the third at which screening stops paying.
    w = np.random.default_rng(2001).dirichlet(np.ones(22))
    w[[3, 17]] = 0.002
    w = w / np.sum(w)
    index, sample, info = _C._blend_indices_screened(w, 300_000, isa=isa)
    _assert_blend_equal((index, sample), _C._blend_indices_naive(w, len(index)))
    if _SCREENS:
        assert not info["gave_up"]
        assert info["windows"] // 10 < info["uncertain"] < info["windows"] // 4


def test_blend_indices_fixed_point_chain_catches_near_ties() -> None:
    # Two domains whose weights differ by 2e-13 (relative) come within the margin of each other
    # whenever both are near the top: both rows drop at such a step, the window's total change
    # shows it, and the window is recomputed.
    w = np.random.default_rng(1900).dirichlet(np.ones(40))
    w[[4, 9]] = 0.001
    w[9] *= 1 + 2e-13
    w = w / np.sum(w)
    index, sample, info = _C._blend_indices_screened(w, 1_000_000, isa="avx2")
    _assert_blend_equal((index, sample), _C._blend_indices_naive(w, len(index)))
    if _SCREENS:
        assert not info["chain_gave_up"]
        assert info["chain_uncertain"] > info["chain_windows"] // 50


@pytest.mark.parametrize("k", [65, 100, 128])
def test_blend_indices_wide_lanes_run_and_match(k: int) -> None:
    # 65 <= K <= 128 with AVX2 but no AVX-512 (forced by "avx2" where the CPU has more): 16 lanes
    # in fixed point, each over its own candidates (the refresh pass's, ~70 for windows of 32
    # steps), every window proved exact or recomputed by the pruning windows.  Generic weights keep
    # nearly every window (2-4% recomputed at these K) and still meet a few close calls.
    w = np.random.default_rng(2100 + k).dirichlet(np.ones(k))
    w = w / np.sum(w)
    index, sample, info = _C._blend_indices_screened(w, 600_000, isa="avx2")
    _assert_blend_equal((index, sample), _C._blend_indices_naive(w, len(index)), f"k={k}")
    if not _SCREENS:
        assert info["wide_windows"] == 0
        return
    assert not info["gave_up"]
    assert info["steps"] >= 550_000
    assert info["wide_windows"] == info["windows"] == info["steps"] // 32
    assert 0 < info["uncertain"] < info["windows"] // 10
    lanes = 15 * (1 + (info["steps"] - 16 * 256) // (16 * 8192))
    assert info["misguessed"] <= lanes // 10


@pytest.mark.parametrize("k", [64, 129])
def test_blend_indices_wide_lanes_only_between_65_and_128_domains(k: int) -> None:
    # 64: the fixed-point chain; 129: one chain of pruning windows (as fast from ~160 domains on
    # Zen 3, faster at 256).
    w = np.random.default_rng(2200 + k).dirichlet(np.ones(k))
    w = w / np.sum(w)
    index, sample, info = _C._blend_indices_screened(w, 100_000, isa="avx2")
    _assert_blend_equal((index, sample), _C._blend_indices_naive(w, len(index)), f"k={k}")
    assert info["wide_windows"] == 0


def test_blend_indices_wide_lanes_recover_and_give_up() -> None:
    # Wrong starting guesses (recomputed from the truth until they rejoin), near ties two weights
    # 2e-13 apart (windows recomputed), and weights rounded to hundredths, which tie exactly so
    # often that after the first round the lanes give up.
    w = np.random.default_rng(2300).dirichlet(np.full(100, 0.5))
    w = w / np.sum(w)
    index, sample, info = _C._blend_indices_screened(w, 100_000, misguess=True, isa="avx2")
    _assert_blend_equal((index, sample), _C._blend_indices_naive(w, len(index)))
    if _SCREENS:
        assert info["wide_windows"] > 0
        assert info["misguessed"] == 15 and info["redone"] > 0

    # (Without the pair, 2.5% of these windows are recomputed; with it 8.9%.)
    w = np.random.default_rng(2301).dirichlet(np.ones(100))
    w[[4, 9]] = 0.002
    w[9] *= 1 + 2e-13
    w = w / np.sum(w)
    index, sample, info = _C._blend_indices_screened(w, 600_000, isa="avx2")
    _assert_blend_equal((index, sample), _C._blend_indices_naive(w, len(index)))
    if _SCREENS:
        assert not info["gave_up"]
        assert info["uncertain"] > info["windows"] // 20

    w = np.round(np.linspace(0.01, 0.2, 100), 2)
    w = w / np.sum(w)
    index, sample, info = _C._blend_indices_screened(w, 100_000, isa="avx2")
    _assert_blend_equal((index, sample), _C._blend_indices_naive(w, len(index)))
    if _SCREENS:
        assert info["gave_up"]
        assert info["wide_windows"] == info["windows"] == 16 * 256 // 32


def test_blend_indices_screened_rejects_an_unknown_isa() -> None:
    with pytest.raises(ValueError, match="isa must be"):
        _C._blend_indices_screened(np.ones(3) / 3, 10, isa="avx512")


@pytest.mark.parametrize("isa", _SCREEN_ISAS)
@pytest.mark.parametrize("k", [3, 22, 31])
def test_blend_indices_screened_lanes_recover_from_wrong_guesses(k: int, isa: str) -> None:
    # Every lane after the first starts from a wrong state (all-zero counts, or one count moved):
    # the zero states leave the fixed-point range (their windows are recomputed) and never rejoin.
    w = np.random.default_rng(1600 + k).dirichlet(np.full(k, 0.5))
    w = w / np.sum(w)
    index, sample, info = _C._blend_indices_screened(w, 100_000, misguess=True, isa=isa)
    _assert_blend_equal((index, sample), _C._blend_indices_naive(w, len(index)))
    if _SCREENS:
        assert info["misguessed"] == 15 and info["redone"] > 0


@pytest.mark.parametrize("k", [22, 40, 100])
def test_greedy_fill_screened_lanes_from_far_states(k: int) -> None:
    # Streaming from states far from the weights (deficits of thousands, outside the 32-bit
    # range: those windows are recomputed until the rule has caught up), and at steps near 2^40,
    # where the doubles' rounding widens the margin; checked against the scalar path.  K = 22:
    # the screened lanes; K = 40: the fixed-point chain; K = 100: the wide lanes.
    w = np.random.default_rng(1700).dirichlet(np.ones(k))
    w = w / np.sum(w)
    starts = []
    lopsided = np.zeros(k, dtype=np.int64)
    lopsided[0] = 6_000
    starts.append((6_000, lopsided))
    big = 2**40 + 12_345
    near = np.floor(w * big).astype(np.int64)
    near[np.argsort(-(w * big - near))[: big - near.sum()]] += 1
    starts.append((big, near))
    for start, counts in starts:
        ids = {}
        ends = {}
        for isa in ("best", "avx2", "scalar"):
            c = counts.copy()
            out = np.empty(60_000, dtype=np.int32)
            _C.greedy_fill(w, start, c, out, isa=isa)
            ids[isa], ends[isa] = out, c
        for isa in ("best", "avx2"):
            np.testing.assert_array_equal(ids[isa], ids["scalar"], err_msg=f"{isa} {start}")
            np.testing.assert_array_equal(ends[isa], ends["scalar"], err_msg=f"{isa} {start}")


def test_greedy_fill_takes_unnormalised_weights_on_every_path() -> None:
    # greedy_fill uses the weights as given; weights above 1 are outside the screened lanes'
    # 32-bit range (they must not be screened), weights summing below 1 drift out of it.
    # K = 40: the same for the fixed-point chain.
    for w in (np.array([300.0, 100.0, 50.0]), np.array([0.2, 0.1, 0.05, 0.05]),
              np.arange(1.0, 41.0), np.full(40, 0.01)):  # fmt: skip
        ids = {}
        for isa in ("best", "avx2", "scalar"):
            out = np.empty(40_000, dtype=np.int32)
            _C.greedy_fill(w, 0, np.zeros(len(w), dtype=np.int64), out, isa=isa)
            ids[isa] = out
        np.testing.assert_array_equal(ids["best"], ids["scalar"])
        np.testing.assert_array_equal(ids["avx2"], ids["scalar"])


@pytest.mark.parametrize("k", [8, 40, 100])
def test_blend_indices_subnormal_unnormalised_weights(k: int) -> None:
    # Weights taken as given can be subnormal: step / sum(w) overflows, and the speculative
    # segments' guessed counts were inf (NaN for a zero weight), cast to int64 and fed to the
    # register kernels, whose argmax then had no maximum (ctz of 0, an index out of range).  The
    # output was right on x86 (the guesses are verified); UBSan (float-cast-overflow, and ctz)
    # flagged it.  K = 8: screened lanes, 40: register segments, 100: windowed segments.
    w = np.full(k, 1e-310)
    w[0] = 0.0
    naive = _C._blend_indices_naive(w, 40_000)
    _assert_blend_equal(_C.blend_indices(w, 40_000), naive)
    _assert_blend_equal(_C._blend_indices_avx2(w, 40_000), naive)
    out = np.empty(40_000, dtype=np.int32)
    _C.greedy_fill(w, 0, np.zeros(k, dtype=np.int64), out)
    np.testing.assert_array_equal(out, naive[0])


def _greedy_fill_in_pieces(
    w: np.ndarray, sizes: tuple[int, ...], isa: str = "best"
) -> tuple[np.ndarray, np.ndarray]:
    """greedy_fill once per size from step 0, each call continuing the last: (ids, counts)."""
    counts = np.zeros(len(w), dtype=np.int64)
    pieces, step = [], 0
    for n in sizes:
        out = np.empty(n, dtype=np.int32)
        _C.greedy_fill(w, step, counts, out, isa=isa)
        pieces.append(out)
        step += n
    return np.concatenate(pieces), counts


@pytest.mark.parametrize("k", [100, 300])
def test_greedy_fill_windowed_segments_from_mid_stream(k: int) -> None:
    # greedy_fill takes the windowed path without the output arrays (ids only), from a state
    # reached by earlier calls; it must continue the naive rule exactly.
    w = np.random.default_rng(900 + k).dirichlet(np.ones(k))
    w = w / np.sum(w)
    expected = _C._blend_indices_naive(w, 80_000)[0]
    ids, _ = _greedy_fill_in_pieces(w, (3, 39_997, 40_000))
    np.testing.assert_array_equal(ids, expected)


@pytest.mark.parametrize("k", [22, 256])
def test_greedy_fill_in_chunks_matches_blend_indices(k: int) -> None:
    # Streaming restarts the fast path from a mid-stream state (step s0 > 0, counts > 0).
    w = np.random.default_rng(k).dirichlet(np.ones(k))
    w = w / np.sum(w)
    expected = blend_indices(w, 50_000)[0]
    ids, counts = _greedy_fill_in_pieces(w, (1, 7, 4096, 10_000, 1, 35_895))
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_array_equal(counts, np.bincount(expected, minlength=k))


@pytest.mark.parametrize("isa", ["best", "avx2"])
@pytest.mark.parametrize("k", [5, 22, 40, 256])
def test_greedy_fill_calls_at_the_edges_of_a_round(isa: str, k: int) -> None:
    # The speculative paths run whole rounds only (16 lanes x 256 steps after step 0, 3 or 2
    # segments x 1024 steps) and size their buffers by the round: calls one step either side of
    # those lengths, from step 0 and mid-stream, must continue the rule.
    w = np.random.default_rng(1700 + k).dirichlet(np.ones(k))
    w = w / np.sum(w)
    sizes = (4097, 4095, 4096, 2047, 2048, 2049, 3071, 3072, 3073, 4097, 1)
    expected = _C._blend_indices_naive(w, sum(sizes))[0]
    ids, _ = _greedy_fill_in_pieces(w, sizes, isa=isa)
    np.testing.assert_array_equal(ids, expected)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
@pytest.mark.parametrize("k", [5, 22, 32, 40, 100])
def test_greedy_fill_every_instruction_set_continues_the_rule(isa: str, k: int) -> None:
    # The streaming path (ids only, speculative segments without the fused output) on each set of
    # kernels a CPU may have (a set this one lacks falls back to the best it has).
    w = np.random.default_rng(1300 + k).dirichlet(np.ones(k))
    w = w / np.sum(w)
    expected = _C._blend_indices_naive(w, 120_000)[0]
    ids, _ = _greedy_fill_in_pieces(w, (5, 70_000, 49_995), isa=isa)
    np.testing.assert_array_equal(ids, expected)


def test_greedy_fill_rejects_an_unknown_isa() -> None:
    with pytest.raises(ValueError, match="isa must be"):
        _C.greedy_fill(np.ones(3) / 3, 0, np.zeros(3, dtype=np.int64), np.empty(4, np.int32), "sse")


def test_greedy_resume_from_any_state_matches() -> None:
    w = np.random.default_rng(4).dirichlet(np.ones(100))
    w = w / np.sum(w)
    whole = np.empty(50_000, dtype=np.int32)
    _C.greedy_fill(w, 0, np.zeros(100, dtype=np.int64), whole)
    counts = np.zeros(100, dtype=np.int64)
    first = np.empty(12_345, dtype=np.int32)
    _C.greedy_fill(w, 0, counts, first)
    rest = np.empty(50_000 - 12_345, dtype=np.int32)
    _C.greedy_fill(w, 12_345, counts, rest)
    np.testing.assert_array_equal(np.concatenate([first, rest]), whole)


# ------------------------------------------------------------------------------- bad input
BAD_WEIGHTS = [
    ([1.0, -0.1], ValueError, "negative"),
    ([1.0, float("nan")], ValueError, "finite"),
    ([1.0, float("inf")], ValueError, "finite"),
    ([0.0, 0.0], ValueError, "positive"),
    ([], ValueError, "empty"),
    ([1e308, 1e308], ValueError, "overflow"),
    (["a", "b"], TypeError, "weights"),
    ([1 + 1j, 2], TypeError, "weights"),
    ([object(), 1.0], TypeError, "weights"),
    ([True, False], TypeError, "weights"),
    ([[1.0, 2.0]], ValueError, "1-D"),
    ("abc", TypeError, "weights"),
    (b"\x01\x02", TypeError, "got bytes"),
    (bytearray(b"\x01\x02"), TypeError, "got bytearray"),  # was the weights [1, 2]
    ({1: 0.5}, TypeError, "weights"),
    # np.asarray drops the mask: the masked 9 used to be drawn
    (np.ma.array([1.0, 9.0], mask=[0, 1]), TypeError, "masked entries"),
    ([True, 1.0], TypeError, "bool among them"),  # numpy makes it [1.0, 1.0]
    ({"a": True, "b": 1}, TypeError, "bool among them"),
    # 0-d bool arrays and tensors beside numbers: np.asarray made them 1.0 and 0.0
    ([np.array(True), 0.5], TypeError, "bool among them"),
    ({"a": torch.tensor(True), "b": torch.tensor(0.5)}, TypeError, "bool among them"),
    (torch.tensor([True, False]), TypeError, "torch.bool tensor"),
    (torch.tensor([1 + 1j, 2]), TypeError, "complex64 tensor"),
    (torch.empty(2, device="meta"), ValueError, "meta tensor"),
]


@pytest.mark.parametrize(
    "tensor",
    [
        torch.tensor([3.0, 1.0, 0.5, 2.0], dtype=torch.bfloat16),  # numpy has no bfloat16
        torch.tensor([3.0, 1.0, 0.5, 2.0]).to_sparse(),  # numpy() refuses a sparse tensor
        torch.tensor([3.0, 1.0, 0.5, 2.0], dtype=torch.float16),
    ],
)
def test_tensor_weights_of_any_real_dtype_and_layout(tensor) -> None:
    # Both were TypeErrors quoting torch ("unsupported ScalarType BFloat16", "Use
    # Tensor.to_dense() first"), though MixtureDataset took a bfloat16 tensor.
    plain = [3.0, 1.0, 0.5, 2.0]
    assert np.array_equal(MixtureSampler(tensor, seed=3).sample(500),
                          MixtureSampler(plain, seed=3).sample(500))
    assert np.array_equal(sample_domains(tensor, 100, seed=1), sample_domains(plain, 100, seed=1))
    assert np.array_equal(blend_indices(tensor, 100)[0], blend_indices(plain, 100)[0])
    sampler = MixtureSampler([1.0] * 4)
    sampler.set_weights(tensor)
    assert np.array_equal(sampler.weights, np.array(plain) / sum(plain))


@pytest.mark.parametrize("weights,error,message", BAD_WEIGHTS)
def test_bad_weights_are_rejected_everywhere(weights, error, message) -> None:
    with pytest.raises(error, match=message):
        MixtureSampler(weights)
    with pytest.raises(error, match=message):
        sample_domains(weights, 10, seed=0)
    with pytest.raises(error, match=message):
        blend_indices(weights, 10)
    try:  # a sampler of the same size, so the size check does not answer first
        size = len(weights) if np.ndim(weights) == 1 else 0
    except TypeError:
        size = 0
    if size:
        with pytest.raises(error, match=message):
            MixtureSampler([1.0] * size).set_weights(weights)
    else:
        with pytest.raises((ValueError, TypeError), match="weights"):
            MixtureSampler([1.0, 1.0]).set_weights(weights)


@pytest.mark.parametrize(
    "call",
    [
        lambda: _C.AliasTable(np.array([1.0, -1.0])),
        lambda: _C.AliasTable(np.array([np.nan])),
        lambda: _C.AliasTable(np.zeros(3)),
        lambda: _C.AliasTable(np.zeros(0)),
        lambda: _C.StratifiedTable(np.ones(2), 0),
        lambda: _C.blend_indices(np.array([1.0, np.inf]), 4),
        lambda: _C.blend_indices(np.ones(3), -1),
        lambda: _C.blend_indices(np.ones(40_000), 1),
        lambda: _C.AliasTable(np.ones(2)).fill(0, 0, np.zeros((2, 2), dtype=np.int32)),
        lambda: _C.AliasTable(np.ones(2)).fill(0, 0, np.zeros(4, dtype=np.int32)[::2]),
        lambda: _C.AliasTable(np.ones(2)).fill(0, 2**64 - 1, np.zeros(4, dtype=np.int32)),
        lambda: _C.greedy_fill(np.ones(2), 3, np.zeros(2, dtype=np.int64), np.zeros(2, np.int32)),
        lambda: _C.accumulate_counts(np.array([0, 5], np.int32), np.zeros(2, dtype=np.int64)),
        # Four counts of 2**62 and a 5 wrap around to 5 in int64: not a sum of 5.
        lambda: _C.greedy_fill(
            np.ones(5), 5, np.array([2**62] * 4 + [5], np.int64), np.zeros(2, np.int32)
        ),
        # counts (int64, updated in place) overlapping out: ids 3 and 4 came out at K = 2
        lambda: _C.greedy_fill(
            np.array([0.25, 0.75]), 0, (buf := np.zeros(4, np.int64))[:2], buf.view(np.int32)
        ),
    ],
)
def test_cpp_layer_validates_with_value_error(call) -> None:
    with pytest.raises(ValueError):
        call()


@pytest.mark.parametrize(
    "call",
    [
        lambda: _C.AliasTable(np.ones(3, dtype=np.float32)),
        lambda: _C.AliasTable([1.0, 2.0]),
        lambda: _C.AliasTable(np.ones(2)).fill(0, 0, np.zeros(4, dtype=np.int64)),
    ],
)
def test_cpp_layer_rejects_wrong_types(call) -> None:
    with pytest.raises(TypeError):
        call()


def test_cpp_layer_takes_every_spelling_of_its_dtypes() -> None:
    # longlong is int64 under another dtype object; a dtype with metadata is another object too.
    counts = np.zeros(3, np.longlong)
    _C.accumulate_counts(np.array([2, 2], np.int32), counts)
    assert counts.tolist() == [0, 0, 2]
    tagged = np.array([0.5, 0.5], dtype=np.dtype(np.float64, metadata={"unit": "share"}))
    out = np.empty(8, np.int32)
    _C.AliasTable(tagged).fill(3, 0, out)
    np.testing.assert_array_equal(out, sample_domains([0.5, 0.5], 8, seed=3))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="method"):
        MixtureSampler([1, 2], method="nope")
    with pytest.raises(ValueError, match="block"):
        MixtureSampler([1, 2], method="stratified", block=0)
    with pytest.raises(TypeError, match="block"):
        MixtureSampler([1, 2], method="stratified", block=2.5)
    with pytest.raises(ValueError, match="block"):
        MixtureSampler([1, 2], method="alias", block=16)
    with pytest.raises(ValueError, match="seed"):
        MixtureSampler([1, 2], seed=-1)
    with pytest.raises(ValueError, match="seed"):
        sample_domains([1, 2], 3, seed=2**64)
    with pytest.raises(TypeError, match="seed"):
        sample_domains([1, 2], 3, seed="1")
    with pytest.raises(ValueError, match="n"):
        MixtureSampler([1, 2]).sample(-1)
    with pytest.raises(TypeError, match="n"):
        MixtureSampler([1, 2]).sample(2.0)
    with pytest.raises(ValueError, match="n"):
        sample_domains([1, 2], -5, seed=0)
    with pytest.raises(ValueError, match="offset"):
        sample_domains([1, 2], 3, seed=0, offset=-1)
    with pytest.raises(ValueError, match="offset"):
        sample_domains([1, 2], 3, seed=0, offset=2**64 - 1)
    with pytest.raises(ValueError, match="size"):
        blend_indices([1, 2], -1)
    with pytest.raises(ValueError, match="32767"):
        blend_indices(np.ones(32768), 1)
    with pytest.raises(ValueError, match="n=9223372036854775807: cannot allocate"):
        sample_domains([1, 2], 2**63 - 1, seed=0)
    with pytest.raises(ValueError, match="n=4611686018427387904: cannot allocate"):
        MixtureSampler([1, 2]).sample(2**62)
    with pytest.raises(ValueError, match=r"size=4503599627370496: cannot allocate the outputs"):
        blend_indices([1, 2], 2**52)  # 45 PB: more than the address space
    assert blend_indices(np.ones(32767), 2)[0].tolist() == [0, 1]


@pytest.mark.parametrize(
    "out,error",
    [
        (np.zeros(10, dtype=np.int64), TypeError),
        (np.zeros(9, dtype=np.int32), ValueError),
        (np.zeros((2, 5), dtype=np.int32), ValueError),
        (np.zeros(20, dtype=np.int32)[::2], ValueError),
        ([0] * 10, TypeError),
    ],
)
def test_bad_out(out, error) -> None:
    with pytest.raises(error, match="out"):
        sample_domains([1, 2], 10, seed=0, out=out)


def test_read_only_out() -> None:
    out = np.zeros(10, dtype=np.int32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out"):
        sample_domains([1, 2], 10, seed=0, out=out)


def test_bad_state_dicts() -> None:
    sampler = MixtureSampler([1, 2, 3], seed=1)
    sampler.sample(10)
    good = sampler.state_dict()
    # Each case breaks one thing, and the message says which (several checks overlap, so an
    # error from another check would hide a missing one).
    broken = [
        ({**good, "method": "zipf"}, ValueError, r"state\['method'\] must be one of"),
        ({**good, "weights": [1, -2, 3]}, ValueError, r"state\['weights'\] must be non-negative"),
        ({**good, "counts": [1, 2]}, ValueError, r"state\['counts'\] must hold 3 integers$"),
        ({**good, "counts": [10, 0, 1]}, ValueError, r"state\['counts'\] must be non-negative and"),
        ({**good, "position": -1}, ValueError, r"state\['position'\] must be >= 0"),
        ({**good, "segment_start": 11}, ValueError, r"state\['segment_start'\] must be <= 10"),
        ({**good, "version": 2}, ValueError, r"state\['version'\] must be 1, got 2"),
        # compared with !=: "truth value ... ambiguous" naming no key; "1" was "not 1"
        ({**good, "version": np.array([1, 1])}, TypeError,
         r"state\['version'\] must be an int, got ndarray"),
        ({**good, "version": "1"}, TypeError, r"state\['version'\] must be an int, got str"),
        ({k: v for k, v in good.items() if k != "seed"}, ValueError, "state has keys"),
        ({**good, "seed": "x"}, TypeError, r"state\['seed'\] must be an int"),
        ([("position", 0)], TypeError, "state must be a dict"),
        ({**good, "counts": np.array(good["counts"]).reshape(3, 1)}, ValueError,
         r"state\['counts'\] must hold 3 integers, got shape \(3, 1\)"),
        ({**good, "names": ["a", "a", "b"]}, ValueError, r"state\['names'\] must be distinct"),
        # len() of a 0-d array and numpy's ragged-list error named no key
        ({**good, "counts": np.array(10)}, ValueError,
         r"state\['counts'\] must hold 3 integers, got shape \(\)"),
        ({**good, "segment_counts": [2, [3, 3], 2]}, ValueError,
         r"state\['segment_counts'\] must hold 3 integers, got a ragged"),
        # numpy reads the bool as the int 1: this state loaded
        ({**good, "counts": [True, 4, 5], "segment_counts": [True, 4, 5]}, TypeError,
         r"state\['counts'\] must hold integers, got a bool among them"),
        ({**good, "position": 2**63, "counts": [2**63 - 10, 10, 0]}, ValueError,
         r"state\['position'\] must be <= 9223372036854775807"),  # int64 counts
        # draws of a domain whose weight is 0 in the current segment
        ({**good, "weights": [0, 2, 3], "segment_start": 0}, ValueError,
         "draws of a zero-weight domain"),
        # the greedy rule is exact only below 2**52 steps of a segment
        ({**good, "method": "greedy", "position": 2**60, "counts": [2**59, 2**59, 0],
          "segment_counts": [2**59, 2**59, 0]}, ValueError, "exact only below 2\\*\\*52"),
        # np.sum (pairwise) is finite, the C++ in-order sum overflows: refused before any change
        ({**good, "method": "stratified", "weights": [2.0**1023, 2.0**1023, 0.0]}, ValueError,
         r"state\['weights'\] sum overflows"),
        # a dict's keys were ignored: weights went to the domains in the dict's order
        ({**good, "names": ["a", "b", "c"], "weights": {"c": 3, "b": 2, "a": 1}}, TypeError,
         r"state\['weights'\] must be a list of weights in the order of state\['names'\]"),
        ({**good, "counts": [4, 3, 3], "segment_counts": [5, 3, 2]}, ValueError,
         r"state\['segment_counts'\] exceeds state\['counts'\]"),
        # 2 * (2**63 - 1) + 12 wraps to 10 in int64: not a sum of 10
        ({**good, "counts": [2**63 - 1, 2**63 - 1, 12], "segment_counts": [0, 0, 0],
          "segment_start": 10}, ValueError, r"state\['counts'\] must be non-negative and sum"),
    ]  # fmt: skip
    for state, error, message in broken:
        with pytest.raises(error, match=message):
            sampler.load_state_dict(state)
    assert sampler.state_dict() == good  # a failed load changes nothing


def test_a_failed_set_weights_changes_nothing() -> None:
    top = np.finfo(np.float64).max
    bad = [2.0**967] * 8 + [top] + [0.0] * 7  # finite pairwise sum, infinite in index order
    for method in ("alias", "stratified", "greedy"):
        sampler = MixtureSampler([1.0] * 16, seed=2, method=method)
        sampler.sample(5)
        before = sampler.state_dict()
        with pytest.raises(ValueError, match="overflows"):
            sampler.set_weights(bad)
        assert sampler.state_dict() == before
        np.testing.assert_array_equal(sampler.peek(7), MixtureSampler([1.0] * 16, seed=2,
                                      method=method).sample(12)[5:])  # fmt: skip


def test_position_stops_before_int64_counts_overflow() -> None:
    sampler = MixtureSampler([1.0], seed=1)
    state = sampler.state_dict()
    edge = 2**63 - 5
    sampler.load_state_dict({**state, "position": edge, "counts": [edge], "segment_counts": [edge]})
    sampler.sample(4)
    with pytest.raises(ValueError, match="2\\*\\*63 - 1"):
        sampler.sample(1)
    assert sampler.counts.tolist() == [2**63 - 1]
    MixtureSampler([1.0]).load_state_dict(sampler.state_dict())  # and it reloads


def test_set_weights_needs_matching_domains() -> None:
    with pytest.raises(ValueError, match="3 entries"):
        MixtureSampler([1, 2, 3]).set_weights([1, 2])
    with pytest.raises(ValueError, match="keys"):
        MixtureSampler({"a": 1, "b": 2}).set_weights({"a": 1, "c": 2})
    with pytest.raises(ValueError, match="names"):
        MixtureSampler([1, 2]).set_weights({"a": 1, "b": 2})
