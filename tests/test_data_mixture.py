"""MixtureDataset in one process: order, windows, frequencies, exhaustion, resume, live weights."""

import copy
import pickle
import threading
import warnings

import numpy as np
import pytest
import torch
from scipy import stats
from test_data_helpers import SEQ_LEN, flatten, make_corpus, take, window_index

from fastmix import data
from fastmix.data import _EVENT_CAPACITY, MixtureDataset


@pytest.fixture
def corpus(tmp_path):
    return make_corpus(tmp_path)


def stream(ds, n):
    return flatten(take(iter(ds), n))


def test_samples_are_the_windows_they_claim(corpus):
    index = window_index(corpus)
    ds = MixtureDataset(corpus, SEQ_LEN, [1, 1, 1], batch_size=5, seed=1)
    for batch in take(iter(ds), 10):
        assert (
            batch["input_ids"].shape == (5, SEQ_LEN + 1) and batch["input_ids"].dtype == torch.long
        )
        assert batch["domain"].dtype == torch.long
        for row, d in zip(batch["input_ids"], batch["domain"].tolist(), strict=True):
            assert index[int(row[0])][0] == d
            assert torch.equal(row, torch.arange(int(row[0]), int(row[0]) + SEQ_LEN + 1))
    single = next(iter(MixtureDataset(corpus, SEQ_LEN, [1, 1, 1])))
    assert single["input_ids"].shape == (SEQ_LEN + 1,) and isinstance(single["domain"], int)


@pytest.mark.parametrize("method", ["alias", "stratified", "greedy"])
def test_deterministic_and_seeded(corpus, method):
    a = stream(MixtureDataset(corpus, SEQ_LEN, [3, 2, 1], seed=7, method=method, batch_size=4), 30)
    b = stream(MixtureDataset(corpus, SEQ_LEN, [3, 2, 1], seed=7, method=method, batch_size=4), 30)
    c = stream(MixtureDataset(corpus, SEQ_LEN, [3, 2, 1], seed=8, method=method, batch_size=4), 30)
    assert a == b and a != c
    # the global sample stream does not depend on how it is cut into batches
    d = stream(MixtureDataset(corpus, SEQ_LEN, [3, 2, 1], seed=7, method=method), 120)
    assert a == d


def test_every_window_once_per_epoch(corpus):
    index = window_index(corpus)
    n_windows = corpus.num_windows(SEQ_LEN)
    samples = stream(MixtureDataset(corpus, SEQ_LEN, [1, 1, 1], seed=3, batch_size=8), 40)
    reads = {name: [] for name in corpus.names}
    for token, d in samples:
        reads[corpus.names[d]].append(index[token][1])
    for name, seq in reads.items():
        n = n_windows[name]
        assert len(seq) > 2 * n  # at least two full epochs of every domain
        for e in range(len(seq) // n):
            assert sorted(seq[e * n : (e + 1) * n]) == list(range(n)), (name, e)
        tail = seq[(len(seq) // n) * n :]
        assert len(set(tail)) == len(tail)
        assert seq[:n] != seq[n : 2 * n]  # each epoch has its own order


@pytest.mark.parametrize("method", ["alias", "stratified"])
def test_realised_frequencies_match_weights(tmp_path, method):
    corpus = make_corpus(tmp_path, {"a": [400], "b": [400], "c": [400], "d": [400]})
    weights = np.array([0.4, 0.3, 0.2, 0.1])
    n = 8000
    samples = stream(
        MixtureDataset(corpus, SEQ_LEN, weights, seed=11, batch_size=200, method=method), n // 200
    )
    counts = np.bincount([d for _, d in samples], minlength=4)
    assert counts.sum() == n
    _, p = stats.chisquare(counts, weights * n)
    assert p > 1e-3
    if method == "stratified":  # low discrepancy: within a couple of samples per block
        assert np.abs(counts - weights * n).max() <= 2 * n / 1024 + 2


def test_reshuffle_with_max_epochs_drops_and_renormalises(corpus):
    n_windows = corpus.num_windows(SEQ_LEN)
    index = window_index(corpus)
    ds = MixtureDataset(corpus, SEQ_LEN, [1, 1, 8], seed=2, batch_size=2, max_epochs=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = stream(ds, 1000)
    messages = [str(w.message) for w in caught if w.category is RuntimeWarning]
    assert len(messages) == 3 and "domain 'c' reached max_epochs=1" in messages[0]
    seen = {name: [] for name in corpus.names}
    for token, d in samples:
        seen[corpus.names[d]].append(index[token][1])
    total = sum(n_windows.values())
    # every window at most once; the stream ends when all are used, minus the dropped last step
    assert all(len(set(v)) == len(v) for v in seen.values())
    assert total - 2 < len(samples) <= total and len(samples) % 2 == 0
    assert sorted(ds.exhausted) == ["a", "b", "c"] and ds.exhausted[0] == "c"
    at = ds.exhausted_at
    assert at["c"] == [i for i, (_, d) in enumerate(samples) if d == 2][-1] + 1


def test_stop_and_error_policies(corpus):
    ds = MixtureDataset(corpus, SEQ_LEN, [1, 1, 1], seed=4, batch_size=3, on_exhausted="stop")
    samples = stream(ds, 1000)
    assert len(ds.exhausted) == 1
    name = ds.exhausted[0]
    d = corpus.names.index(name)
    # the stream stopped at the first read past a domain's single epoch; the step is dropped whole
    assert sum(1 for _, x in samples if x == d) <= corpus.num_windows(SEQ_LEN)[name]
    assert len(samples) == 3 * (ds.exhausted_at[name] // 3)
    ds2 = MixtureDataset(
        corpus, SEQ_LEN, [1, 1, 1], seed=4, batch_size=3, on_exhausted="stop", max_epochs=2
    )
    assert len(stream(ds2, 1000)) > len(samples)
    ds3 = MixtureDataset(corpus, SEQ_LEN, [1, 1, 1], seed=4, batch_size=3, on_exhausted="error")
    with pytest.raises(RuntimeError, match=f"domain '{name}' is exhausted after 1 epoch"):
        stream(ds3, 1000)


def test_error_policy_leaves_the_stream_at_the_failed_step(corpus):
    # The error came after the sampler had drawn the whole step and the cursors had moved past
    # its first samples: a retry reported another sample, and a state saved then (to resume with
    # a larger max_epochs) went on from a stream that no run produces.
    ds = MixtureDataset(corpus, SEQ_LEN, [1, 1, 1], seed=4, batch_size=3, on_exhausted="error")
    it = iter(ds)
    produced = []
    with pytest.raises(RuntimeError, match="is exhausted") as first:
        for _ in range(1000):
            produced.append(next(it))
    with pytest.raises(RuntimeError) as again:
        next(it)
    assert str(again.value) == str(first.value)
    state = ds.state_dict()
    step = len(produced)
    assert state["step"] == step and state["sampler"]["position"] == 3 * step
    assert sum(state["cursors"]) == 3 * step
    # resumed with room for a second epoch: the stream of a run that had it from the start
    kwargs = dict(seed=4, batch_size=3, on_exhausted="error", max_epochs=2)
    resumed = MixtureDataset(corpus, SEQ_LEN, [1, 1, 1], **kwargs)
    resumed.load_state_dict(state)
    fresh = MixtureDataset(corpus, SEQ_LEN, [1, 1, 1], **kwargs)
    assert stream(resumed, 5) == stream(fresh, step + 5)[3 * step :]


def test_after_an_error_policy_error_a_change_reaches_the_failed_step(corpus):
    # The failed step was counted as started: next_step named the step after it, step= refused
    # it as "already produced", and a retry failed there again whatever was changed.
    kwargs = dict(seed=4, batch_size=3, on_exhausted="error", max_epochs=2)
    ds = MixtureDataset(corpus, SEQ_LEN, [1, 1, 1], **kwargs)
    it = iter(ds)
    produced = []
    with pytest.raises(RuntimeError, match="'c' is exhausted"):
        for _ in range(1000):
            produced.append(next(it))
    step = len(produced)
    assert ds.next_step == step and ds.state_dict()["floor"] == step
    assert ds.set_weights([1, 1, 0], step=ds.next_step) == step
    produced += take(it, 3)
    fresh = MixtureDataset(corpus, SEQ_LEN, [1, 1, 1], **kwargs)
    fresh.set_weights([1, 1, 0], step=step)
    assert flatten(produced) == stream(fresh, step + 3)


def test_resume_mid_epoch_and_after_weight_changes(corpus):
    def run(resume_at=None, state=None, total=30):
        ds = MixtureDataset(corpus, SEQ_LEN, [1, 1, 1], seed=5, batch_size=3, max_epochs=3)
        if state is not None:
            ds.load_state_dict(pickle.loads(state))
        it = iter(ds)
        out, saved = [], None
        start = 0 if state is None else resume_at
        for i in range(start, total):
            if i == 4:
                ds.set_weights([0, 1, 3])  # applies from the next step
            if i == 9:
                ds.set_weights({"a": 2, "c": 1}, step=14)  # scheduled ahead, across the checkpoint
            if i == resume_at and state is None:
                saved = pickle.dumps(ds.state_dict())
            try:
                out.append(next(it))
            except StopIteration:
                break
        return flatten(out), saved, ds

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        full, saved, ds = run(resume_at=11)
        assert [s for s, _ in ds.weight_schedule] == [4, 14]
        resumed, _, _ = run(resume_at=11, state=saved)
    assert resumed == full[11 * 3 :]
    assert ds.exhausted  # the run crossed a domain drop after the checkpoint
    assert len(saved) < 20_000  # O(K) numbers, no per-sample index


def test_a_state_is_refused_on_a_corpus_that_has_changed(tmp_path):
    # Domain b prepared again with more tokens: every saved cursor would map to other windows.
    for sub in ("old", "grown", "copy"):
        (tmp_path / sub).mkdir()
    old = make_corpus(tmp_path / "old")
    ds = MixtureDataset(old, SEQ_LEN, [1, 1, 1], seed=5, batch_size=3)
    take(iter(ds), 4)
    state = ds.state_dict()
    assert state["windows"] == [15, 12, 7]
    grown = make_corpus(tmp_path / "grown", {"a": [41, 23], "b": [90], "c": [30]})
    with pytest.raises(ValueError, match="domain 'b' held 12 windows .* holds 22"):
        MixtureDataset(grown, SEQ_LEN, [1, 1, 1], seed=5, batch_size=3).load_state_dict(state)
    with pytest.raises(ValueError, match=r"state\['windows'\] must list one count per domain"):
        MixtureDataset(old, SEQ_LEN, [1, 1, 1], seed=5, batch_size=3).load_state_dict(
            {**state, "windows": [15, 12]}
        )
    # The same corpus elsewhere (the files copied) continues; so does a state from before the
    # check, which has no "windows".
    for saved in (state, {k: v for k, v in state.items() if k != "windows"}):
        again = MixtureDataset(make_corpus(tmp_path / "copy"), SEQ_LEN, [1, 1, 1], seed=5,
                               batch_size=3)
        again.load_state_dict(saved)
        assert stream(again, 3) == stream(_resumed(old, state), 3)


def _resumed(corpus, state):
    ds = MixtureDataset(corpus, SEQ_LEN, [1, 1, 1], seed=5, batch_size=3)
    ds.load_state_dict(state)
    return ds


def test_live_weights_apply_from_the_returned_step(corpus):
    ds = MixtureDataset(corpus, SEQ_LEN, [1, 0, 0], seed=1, batch_size=2)
    it = iter(ds)
    first = take(it, 3)
    step = ds.set_weights([0, 0, 1])
    assert step == 3
    rest = take(it, 3)
    assert all(d == 0 for _, d in flatten(first)) and all(d == 2 for _, d in flatten(rest))
    with pytest.raises(ValueError, match="earliest step a change can reach now is 6"):
        ds.set_weights([1, 1, 1], step=5)


def test_changes_scheduled_ahead_apply_at_their_steps_and_the_last_made_wins(corpus):
    # The iterator takes each change from the shared ring once, when it first sees it; a change
    # made later for a step it holds one for already wins there.
    ds = MixtureDataset(corpus, SEQ_LEN, [1, 0, 0], seed=1, batch_size=2)
    for step, w in ((4, [0, 1, 0]), (6, [1, 0, 0]), (8, [1, 0, 0])):
        ds.set_weights(w, step=step)
    it = iter(ds)
    first = [d for _, d in flatten(take(it, 5))]
    assert ds.set_weights([0, 0, 1], step=6) == 6
    rest = [d for _, d in flatten(take(it, 5))]
    assert first + rest == [0] * 8 + [1] * 4 + [2] * 4 + [0] * 4
    assert ds.state_dict(step=10) == ds.state_dict()


class FakeEvent:
    """Stands in for torch.cuda.Event: synchronize() blocks until the test releases it."""

    def __init__(self):
        self.done = threading.Event()

    def synchronize(self):
        assert self.done.wait(10)


def test_device_weights_publish_after_the_copy_completes(corpus):
    # The CUDA path minus the device: pinned host copy + event; the helper thread publishes it.
    ds = MixtureDataset(corpus, SEQ_LEN, [1, 0, 0], seed=1, batch_size=2)
    it = iter(ds)
    event = FakeEvent()
    ds._submit_async(torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), event, None)
    before = take(it, 4)  # the copy has not completed: the old weights stay
    assert all(d == 0 for _, d in flatten(before)) and ds.weight_schedule == []
    event.done.set()
    ds.flush_weights()
    assert ds.weight_schedule == [(4, [0.0, 1.0, 0.0])]  # first step boundary after completion
    assert all(d == 1 for _, d in flatten(take(it, 3)))


def test_device_weights_at_a_fixed_step_make_workers_wait(corpus):
    ds = MixtureDataset(corpus, SEQ_LEN, [1, 0, 0], seed=1, batch_size=2)
    it = iter(ds)
    take(it, 1)
    assert ds.next_step == 1  # in-process: the steps consumed so far
    event = FakeEvent()
    ds._submit_async(torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), event, 3)
    timer = threading.Timer(0.2, event.done.set)
    timer.start()
    got = flatten(take(it, 4))  # steps 1-4: step 3 waits for the copy, then uses it
    timer.join()
    assert [d for _, d in got] == [0, 0, 0, 0, 2, 2, 2, 2]
    assert ds.weight_schedule == [(3, [0.0, 0.0, 1.0])]


def test_a_host_change_after_a_device_change_lands_after_it(corpus):
    # Published at once, the host change used to land before the CUDA change still in flight,
    # which then won: the older weights ended up in use (and in ds.weights).
    ds = MixtureDataset(corpus, SEQ_LEN, [1, 1, 1], seed=1, batch_size=2)
    it = iter(ds)
    take(it, 2)
    event = FakeEvent()
    ds._submit_async(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), event, None)
    assert ds.set_weights([0, 0, 1]) is None  # queued behind the copy in flight
    take(it, 1)
    event.done.set()
    ds.flush_weights()
    assert [w for _, w in ds.weight_schedule] == [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    assert ds.weights.tolist() == [0.0, 0.0, 1.0]
    assert {d for _, d in flatten(take(it, 10))} == {2}
    assert ds.set_weights([0, 1, 0]) == ds.weight_schedule[-1][0]  # nothing in flight: at once
    # A host change at a fixed step while a CUDA change is in flight: published at once, and at
    # that step the change made last wins, also when the CUDA one lands at the same step.
    event = FakeEvent()
    ds._submit_async(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), event, None)
    step = ds.next_step
    assert ds.set_weights([0, 0, 1], step=step) == step
    event.done.set()
    ds.flush_weights()
    assert ds.weight_schedule[-2:] == [(step, [1.0, 0.0, 0.0]), (step, [0.0, 0.0, 1.0])]
    assert ds.weights.tolist() == [0.0, 0.0, 1.0]
    state = ds.state_dict()  # before `it` reaches that step: the changes are in "events"
    assert {d for _, d in flatten(take(it, 5))} == {2}
    # A resumed run restores them in the order they were made (in publishing order, the CUDA
    # change came last and won the step there)
    resumed = MixtureDataset(corpus, SEQ_LEN, [1, 1, 1], seed=1, batch_size=2)
    resumed.load_state_dict(state)
    assert {d for _, d in flatten(take(iter(resumed), 5))} == {2}


def test_device_weights_with_bad_values_raise_later(corpus):
    ds = MixtureDataset(corpus, SEQ_LEN, [1, 1, 1], batch_size=2)
    event = FakeEvent()
    event.done.set()
    ds._submit_async(torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64), event, None)
    with pytest.raises(ValueError, match="CUDA tensor.*>= 0"):
        ds.flush_weights()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensor_weights(corpus):
    ds = MixtureDataset(corpus, SEQ_LEN, [1, 0, 0], batch_size=2)
    it = iter(ds)
    take(it, 2)
    assert ds.set_weights(torch.tensor([0.0, 1.0, 0.0], device="cuda")) is None
    ds.flush_weights()
    step = ds.weight_schedule[-1][0]
    rest = flatten(take(it, 4))
    assert all(d == 1 for _, d in rest[(step - 2) * 2 :])
    for bad in (torch.tensor([True, False, True]), torch.ones(3, dtype=torch.complex64)):
        with pytest.raises(TypeError, match="real numbers"):
            ds.set_weights(bad.cuda())


def test_weights_json_from_elsewhere(corpus, tmp_path):
    path = tmp_path / "weights.json"
    path.write_text('{"weights": {"c": 1.0}}')
    ds = MixtureDataset(corpus, SEQ_LEN, path, batch_size=4)
    assert ds.weights.tolist() == [0.0, 0.0, 1.0]
    assert {d for _, d in stream(ds, 5)} == {2}


def test_bad_input_is_clear(tmp_path):
    corpus = make_corpus(tmp_path, {"big": [100], "tiny": [3]})
    with pytest.raises(
        ValueError, match=r"domain 'tiny' has weight 1 but no window.*tiny0.bin.*3 tok"
    ):
        MixtureDataset(corpus, SEQ_LEN, [1, 1])
    ds = MixtureDataset(corpus, SEQ_LEN, [1, 0])  # a zero weight on it is fine
    with pytest.raises(ValueError, match="domain 'tiny' has weight"):
        ds.set_weights({"tiny": 1})
    with pytest.raises(ValueError, match=r"unknown domains \['web'\]"):
        ds.set_weights({"web": 1})
    with pytest.raises(ValueError, match=r"domain 'big' has weight 1 but no window.*big0.bin"):
        MixtureDataset(corpus, 200, [1, 0])
    for kwargs, match in (
        ({"method": "magic"}, "method"),
        ({"on_exhausted": "ignore"}, "on_exhausted"),
        ({"rank": 2, "world_size": 2}, "rank"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_epochs": 0}, "max_epochs"),
        ({"seed": -1}, "seed"),
        ({"method": "alias", "block": 64}, "block"),
    ):
        with pytest.raises(ValueError, match=match):
            MixtureDataset(corpus, SEQ_LEN, [1, 0], **kwargs)
    with pytest.raises(TypeError, match="corpus"):
        MixtureDataset("corpus", SEQ_LEN, [1, 0])
    # Sizes no allocation can take: numpy's MemoryError came at the first step (from a worker)
    with pytest.raises(ValueError, match=r"batch_size=1,099,511,627,776: a batch of "
                                         r"1,099,511,627,776 x \(seq_len \+ 1 = 5\) tokens is "
                                         r"40,960.0 GiB"):
        MixtureDataset(corpus, SEQ_LEN, [1, 0], batch_size=2**40)
    with pytest.raises(ValueError, match="batch_size=4,611,686,018,427,387,904"):
        MixtureDataset(corpus, SEQ_LEN, [1, 0], batch_size=2**62)  # past int64 bytes
    with pytest.raises(ValueError, match="batch_size x world_size = 4,611,686,018,427,387,904 "
                                         "draws per step"):
        MixtureDataset(corpus, SEQ_LEN, [1, 0], rank=0, world_size=2**62)
    other = MixtureDataset(corpus, SEQ_LEN, [1, 0], seed=9)
    with pytest.raises(ValueError, match="seed=0"):
        other.load_state_dict(ds.state_dict())
    with pytest.raises(ValueError, match="step must be"):
        ds.set_weights([1, 0], step=-1)
    ranked = MixtureDataset(corpus, SEQ_LEN, [1, 0], rank=1, world_size=2)
    with pytest.raises(ValueError, match="with world_size=2 pass step="):
        ranked.set_weights([1, 0])
    assert ranked.set_weights([1, 0], step=3) == 3


def test_a_full_ring_never_overwrites_a_change_not_yet_applied(corpus):
    ds = MixtureDataset(corpus, SEQ_LEN, [1, 0, 0], batch_size=2, seed=0)
    changes = [[0, 1, 0], [0, 0, 1]]
    with pytest.raises(RuntimeError, match="weight changes are pending at once"):
        for step in range(2000):  # none applied yet: the 1025th would overwrite step 0's
            ds.set_weights(changes[step % 2], step=step)
    assert step == 1024
    # The 1024 changes that were accepted all apply, the first one included.
    assert [d for _, d in stream(ds, 3)] == [1, 1, 2, 2, 1, 1]


def test_a_full_ring_is_guarded_with_several_workers(corpus):
    # Worker 0 of 2 registers as "about to start step 0" (step - 1 = -1): it must count as live,
    # or step 0's change looks consumed and the 1025th change overwrites it.
    ds = MixtureDataset(corpus, SEQ_LEN, [1, 0, 0], batch_size=2, seed=0)
    changes = [[0, 1, 0], [0, 0, 1]]
    for step in range(1024):
        ds.set_weights(changes[step % 2], step=step)
    workers = [ds._iter_worker(w, 2) for w in range(2)]
    with pytest.raises(RuntimeError, match="weight changes are pending at once"):
        ds.set_weights([1, 0, 0], step=2000)
    got = [next(workers[0]), next(workers[1]), next(workers[0])]
    assert [d for _, d in flatten(got)] == [1, 1, 2, 2, 1, 1]


def test_a_replay_going_on_takes_a_change_recorded_after_later_ones(corpus):
    # state_dict(step=) goes on from the previous call's replay with the changes recorded since;
    # a CUDA change is recorded when its copy lands, after a change made later.
    ds = MixtureDataset(corpus, SEQ_LEN, [1, 1, 1], batch_size=2, seed=1)
    it = iter(ds)
    take(it, 2)
    ds.state_dict(step=2)
    replay = ds._replay
    event = FakeEvent()
    ds._submit_async(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), event, 4)
    assert ds.set_weights([0, 0, 1], step=6) == 6  # recorded first
    event.done.set()
    ds.flush_weights()
    assert ds.weight_schedule == [(4, [1.0, 0.0, 0.0]), (6, [0.0, 0.0, 1.0])]
    got = [d for _, d in flatten(take(it, 6))]
    assert set(got[4:8]) == {0} and set(got[8:]) == {2}
    live = ds.state_dict()
    assert ds.state_dict(step=8) == live
    assert ds._replay is replay  # went on
    ds._replay = None
    assert ds.state_dict(step=8) == live
    # A dataset pickled before the replay kept its list of recorded changes replays too.
    state = ds.__getstate__()
    del state["_recorded"]
    old = MixtureDataset.__new__(MixtureDataset)
    old.__setstate__(state)
    assert old.state_dict(step=8) == live
    # ... and one pickled when weight_schedule was a list of (step, list) pairs (as a
    # DataLoader worker gets it, without the copy's own state loaded over it).
    state = ds.__getstate__()
    del state["_copy_of"]
    state["weight_schedule"] = [(s, list(w)) for s, w in ds.weight_schedule]
    old = MixtureDataset.__new__(MixtureDataset)
    old.__setstate__(state)
    assert isinstance(old.weight_schedule, data.WeightSchedule)
    assert old.weight_schedule == ds.weight_schedule
    assert [w.tolist() for _, w in old.weight_schedule._entries()] == [[1, 0, 0], [0, 0, 1]]



def test_changes_recorded_from_two_threads_at_once_are_all_kept(corpus):
    # A host set_weights(step=) is recorded in the calling thread while the thread that waits
    # for CUDA copies records theirs (emulated: a change queued with no event): unguarded, one
    # of two changes recorded at once was lost, or set_weights raised IndexError, and
    # state_dict(step=) then failed ("zip() argument 2 is shorter than argument 1").
    import sys

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        for _ in range(5):
            ds = MixtureDataset(corpus, SEQ_LEN, [1, 1, 1], batch_size=2)
            for j in range(300):
                ds._submit_async(torch.tensor([1.0, 2.0, j + 1.0], dtype=torch.float64), None, None)
            for j in range(300):
                ds.set_weights([2.0, 1.0, j + 1.0], step=10 + j)
            ds.flush_weights()
            assert len(ds.weight_schedule) == len(ds._schedule_made) == 600
            assert sorted(w[2] for _, w in ds.weight_schedule) == sorted(2 * list(range(1, 301)))
            ds.state_dict(step=0)
    finally:
        sys.setswitchinterval(interval)

def test_weight_schedule_reads_as_the_list_of_its_changes():
    schedule = data.WeightSchedule(3)
    expected = []
    rng = np.random.default_rng(0)
    for n in range(40):  # past the first growth of its array, inserting anywhere
        i = int(rng.integers(0, n + 1))
        w = rng.random(3)
        schedule._insert(i, 10 * n, w)
        expected.insert(i, (10 * n, w.tolist()))
        if n == 5:
            early = iter(schedule)  # a reader holding the schedule as it was
            first = next(early)
    assert schedule == expected and expected == schedule and schedule == tuple(expected)
    assert len(schedule) == 40 and list(schedule) == expected and schedule[-1] == expected[-1]
    assert schedule[3:30:4] == expected[3:30:4] and repr(schedule) == repr(expected)
    assert [w for _, w in schedule] == [w for _, w in expected]
    assert len([first, *early]) == 6  # the six entries it began with, whatever came after
    assert schedule != expected[:-1] and schedule != "x" and (schedule == 5) is False
    with pytest.raises(IndexError):
        schedule[40]
    with pytest.raises(TypeError):
        hash(schedule)
    steps, rows = schedule._arrays()
    assert steps.tolist() == [s for s, _ in expected] and rows.tolist() == [w for _, w in expected]
    assert pickle.loads(pickle.dumps(schedule)) == expected
    # only the rows in use are pickled (not the unset ones reserved for growth): same bytes
    again = data.WeightSchedule(3)
    for i, (step, w) in enumerate(expected):
        again._insert(i, step, np.array(w))
    assert pickle.dumps(again) == pickle.dumps(schedule)
    assert len(pickle.dumps(schedule)) < 40 * 3 * 8 + 1000


def test_checkpoint_waits_for_a_weight_copy_in_flight(corpus):
    # set_weights(cuda_tensor, step=ds.next_step) and a checkpoint right after it, before the
    # device-to-host copy has landed: the change must be in the checkpoint.
    def make():
        return MixtureDataset(corpus, SEQ_LEN, [1, 0, 0], batch_size=2, seed=1)

    ds = make()
    it = iter(ds)
    take(it, 3)
    event = FakeEvent()
    ds._submit_async(torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), event, ds.next_step)
    timer = threading.Timer(0.2, event.done.set)
    timer.start()
    saved = pickle.dumps(ds.state_dict())  # returns once the copy is published
    timer.join()
    assert ds.weight_schedule == [(3, [0.0, 0.0, 1.0])]
    uninterrupted = flatten(take(it, 4))
    resumed = make()
    resumed.load_state_dict(pickle.loads(saved))
    assert flatten(take(iter(resumed), 4)) == uninterrupted
    assert {d for _, d in uninterrupted} == {2}
    assert resumed.weights.tolist() == [0.0, 0.0, 1.0]


def test_rolling_back_in_the_same_process_gives_the_checkpoints_stream(corpus):
    # e.g. after a loss spike: load an earlier checkpoint into the dataset that ran past it.
    def make():
        return MixtureDataset(corpus, SEQ_LEN, [1, 1, 0], batch_size=2, seed=3, max_epochs=1)

    ds = make()
    it = iter(ds)
    take(it, 4)
    saved = pickle.dumps(ds.state_dict())
    ds.set_weights([1, 1, 1], step=6)  # scheduled across the checkpoint: part of it
    saved_later = pickle.dumps(ds.state_dict())
    take(it, 3)
    ds.set_weights([0, 0, 1], step=8)  # made after the checkpoint: abandoned by the rollback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        take(it, 20)
        assert ds.exhausted  # the abandoned run exhausted domains
        for state in (saved, saved_later):
            ds.load_state_dict(pickle.loads(state))
            fresh = make()
            fresh.load_state_dict(pickle.loads(state))
            assert ds.exhausted == fresh.exhausted == []
            assert ds.weight_schedule == fresh.weight_schedule
            assert ds.weights.tolist() == fresh.weights.tolist()
            assert flatten(take(iter(ds), 12)) == flatten(take(iter(fresh), 12))
    assert ds.weight_schedule == [(6, [1.0, 1.0, 1.0])]
    assert ds.weights.tolist() == [1.0, 1.0, 1.0]


def test_an_iterator_of_the_abandoned_run_stops_and_writes_nothing(corpus):
    ds = MixtureDataset(corpus, SEQ_LEN, [1, 1, 1], batch_size=2, seed=2, max_epochs=1)
    it = iter(ds)
    take(it, 2)
    saved = ds.state_dict()
    old = ds._iter_worker(1, 2)  # e.g. a DataLoader worker still alive when the rollback happens
    take(it, 3)
    ds.load_state_dict(saved)
    assert take(old, 5) == [] and take(it, 5) == []  # they end; their progress is not recorded
    assert ds.next_step == 2 and ds.exhausted == []
    # a damaged state is refused before anything changes
    ds.set_weights([0, 1, 1], step=5)
    for bad in ({"zzz": 4}, {"a": -1}, [1]):
        with pytest.raises(ValueError, match="exhausted"):
            ds.load_state_dict({**ds.state_dict(), "exhausted": bad})
    assert ds.weight_schedule[-1] == (5, [0.0, 1.0, 1.0]) and ds.next_step == 2


def test_a_newer_in_process_iterator_supersedes_the_older(corpus):
    ds = MixtureDataset(corpus, SEQ_LEN, [1, 1, 1], batch_size=2, seed=3)
    it = iter(ds)
    take(it, 4)
    peek = iter(ds)
    take(peek, 1)
    with pytest.raises(RuntimeError, match="a newer iterator over this MixtureDataset"):
        next(it)  # (it used to go on, its changes placed by the newer iterator's progress)
    assert ds.state_dict()["step"] == 1 and ds.next_step == 1  # the newest one's stream


def test_an_in_process_peek_leaves_the_workers_progress_alone(corpus):
    # The peek used to take worker 0's slot and free worker 1's: next_step fell back to 1 and a
    # change went to a step both workers had passed (never applied, no error).
    ds = MixtureDataset(corpus, SEQ_LEN, [1, 1, 0], batch_size=2, seed=3)
    workers = [ds._iter_worker(w, 2) for w in range(2)]
    for _ in range(4):
        for worker in workers:
            next(worker)
    assert ds.next_step == 8
    next(iter(ds))
    assert ds.next_step == 8
    assert ds.set_weights([0, 0, 1]) == 8
    assert {d for worker in workers for _, d in flatten(take(worker, 3))} == {2}


def test_a_finished_pass_frees_its_slot_for_the_next_pass(corpus):
    # A finished iterator used to keep its last step: a change made between passes went past
    # the end of the next pass (a per-pass curriculum never applied).
    ds = MixtureDataset(corpus, SEQ_LEN, [1, 1, 1], batch_size=2, seed=3, on_exhausted="stop")
    first = list(iter(ds))
    assert len(first) > 3 and ds.next_step == 0  # the pass ended: back to the resume point
    assert ds.set_weights([0, 1, 0]) == 0
    assert {d for _, d in flatten(list(iter(ds)))} == {1}  # from the next pass's first step


def test_state_dict_from_another_thread_is_one_steps(corpus):
    # next() in one thread, state_dict() in another: a state used to mix the step, cursors and
    # sampler of different steps, and resumed to another stream.
    def make():
        return MixtureDataset(corpus, SEQ_LEN, [2, 1, 1], batch_size=16, seed=13)

    reference = flatten(take(iter(make()), 300))
    ds = make()
    it = iter(ds)
    producer = threading.Thread(target=take, args=(it, 300))
    producer.start()
    states = []
    while producer.is_alive() or not states:
        states.append(ds.state_dict())
    producer.join()
    for state in states[:: max(1, len(states) // 25)]:
        if state["step"] < 300:
            resumed = make()
            resumed.load_state_dict(state)
            k = state["step"] * 16
            assert flatten(take(iter(resumed), 1)) == reference[k : k + 16], state["step"]


def test_copies_continue_from_where_the_dataset_is(corpus):
    # A copy used to restart from step 0 while keeping the original's progress (next_step 5).
    ds = MixtureDataset(corpus, SEQ_LEN, [1, 1, 1], batch_size=2, seed=3)
    it = iter(ds)
    take(it, 5)
    ds.set_weights([1, 0, 1], step=7)
    copies = [pickle.loads(pickle.dumps(ds)), copy.deepcopy(ds), copy.copy(ds)]
    expected = flatten(take(it, 6))
    for twin in copies:
        assert twin.state_dict()["step"] == 5 and twin.next_step == 5
        assert flatten(take(iter(twin), 6)) == expected
        twin.set_weights([0, 1, 0])  # its own: the original does not see it
    assert ds.weight_schedule == [(7, [1.0, 0.0, 1.0])] and ds.next_step == 11


def test_an_idle_peek_does_not_hold_the_change_ring(corpus):
    # The peek's slot (still referenced as ds's latest in-process iterator) stayed at step 0 and
    # the ring refused change 1025 while workers ran on.
    ds = MixtureDataset(corpus, SEQ_LEN, [1, 1, 1], seed=3)
    peek = iter(ds)
    next(peek)
    workers = [ds._iter_worker(w, 2) for w in range(2)]
    for step in range(_EVENT_CAPACITY + 100):
        ds.set_weights([1 + step % 2, 1, 1])
        next(workers[step % 2])
    # the peek missed changes the ring no longer holds: it says so, not a silent other stream
    with pytest.raises(RuntimeError, match="while this iterator was idle"):
        next(peek)


def test_more_changes_than_the_ring_holds_in_a_finished_pass(tmp_path):
    corpus = make_corpus(tmp_path, {"a": [2001], "b": [2001], "c": [2001]})  # 500 windows each
    ds = MixtureDataset(corpus, SEQ_LEN, [1, 1, 1], seed=3, on_exhausted="stop")
    steps = 0
    for _ in ds:
        ds.set_weights([1, 1, 1 + steps % 2])  # (released slots used to make the ring raise)
        steps += 1
    assert steps > 1100
    assert ds.set_weights([0, 1, 0]) == 0
    assert {d for _, d in flatten(take(iter(ds), 5))} == {1}


def test_rollback_after_a_finished_pass_forgets_it(corpus):
    # Finished iterators free their slots; the "same position, nothing ran" shortcut of
    # load_state_dict used to take that for nothing having run, and kept the abandoned run.
    ds = MixtureDataset(corpus, SEQ_LEN, [1, 1, 1], batch_size=2, seed=3, on_exhausted="stop")
    saved = ds.state_dict()
    ds.load_state_dict(saved)
    it = iter(ds)
    take(it, 2)
    ds.set_weights([0, 1, 0], step=3)
    list(it)
    ds.load_state_dict(saved)
    assert ds.weight_schedule == [] and ds.exhausted == []
    fresh = MixtureDataset(corpus, SEQ_LEN, [1, 1, 1], batch_size=2, seed=3, on_exhausted="stop")
    fresh.load_state_dict(saved)
    assert stream(ds, 20) == stream(fresh, 20)


def test_after_a_finished_pass_the_state_says_finished_and_a_new_pass_replays(corpus):
    ds = MixtureDataset(corpus, SEQ_LEN, [1, 1, 1], batch_size=2, seed=3, on_exhausted="stop")
    first = list(iter(ds))
    state = ds.state_dict()  # where the stream is: at its end
    assert state["finished"] and state["step"] == len(first)
    twin = copy.deepcopy(ds)  # continues from there: nothing left
    assert list(iter(twin)) == []
    assert flatten(list(iter(ds))) == flatten(first)  # ds's own next pass: from its resume point


def test_state_dict_inside_next_in_the_same_thread_says_so(corpus):
    # A signal handler calling ds.state_dict() while next() is reading a batch used to wait for
    # the iterator's lock forever.
    ds = MixtureDataset(corpus, SEQ_LEN, [1, 1, 1], batch_size=2, seed=3)
    it = iter(ds)
    take(it, 2)
    read = corpus._map

    def read_and_checkpoint(i):
        corpus._map = read
        ds.state_dict()

    corpus._map = read_and_checkpoint
    with pytest.raises(RuntimeError, match="inside next"):
        next(it)


def test_a_single_iterators_state_resumes_with_any_number_of_workers(corpus):
    def make():
        return MixtureDataset(corpus, SEQ_LEN, [2, 1, 1], batch_size=2, seed=4)

    ds = make()
    it = iter(ds)
    take(it, 3)
    saved = pickle.dumps(ds.state_dict())  # in-process: every step before 3 was produced
    expected = flatten(take(it, 6))
    for num_workers in (1, 2, 3):
        resumed = make()
        resumed.load_state_dict(pickle.loads(saved))
        workers = [resumed._iter_worker(w, num_workers) for w in range(num_workers)]
        got = [next(workers[i % num_workers]) for i in range(6)]
        assert flatten(got) == expected



@pytest.mark.parametrize("on_exhausted", ["reshuffle", "stop"])
@pytest.mark.parametrize("batch_size,max_epochs", [(1, 1), (3, 2), (7, 1), (16, 3)])
def test_the_cap_check_skipped_while_no_cap_is_near_changes_nothing(
    tmp_path, monkeypatch, on_exhausted, batch_size, max_epochs
):
    # plan() skips the O(K) look for a domain near its cap while the cursors cannot reach one;
    # the same streams with the look made at every step (a skip that ran past a cap would end
    # in an AssertionError, or in a sample beyond the cap).
    corpus = make_corpus(tmp_path, {"a": [41, 23], "b": [50], "c": [30], "d": [9]})

    def run():
        ds = MixtureDataset(corpus, SEQ_LEN, [1, 3, 2, 0.5], seed=4, batch_size=batch_size,
                            max_epochs=max_epochs, on_exhausted=on_exhausted)  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            samples = stream(ds, 10_000)
        return samples, ds.exhausted_at

    skipping = run()
    plan = data._Stream.plan

    def plan_checking_every_step(self, produce):
        self._cap_check_at = 0
        return plan(self, produce)

    monkeypatch.setattr(data._Stream, "plan", plan_checking_every_step)
    assert run() == skipping
    assert skipping[1]  # some domain reached its cap

def test_huge_caps_and_steps(corpus):
    # windows * max_epochs beyond int64 must not wrap around into a tiny cap.
    ds = MixtureDataset(corpus, SEQ_LEN, [1, 1, 1], batch_size=2, max_epochs=2**64 // 7 + 1)
    assert len(stream(ds, 50)) == 100
    with pytest.raises(ValueError, match="step must be < 2\\*\\*62"):
        ds.set_weights([1, 1, 1], step=2**63)


def test_set_weights_rejects_a_sum_that_overflows(corpus):
    ds = MixtureDataset(corpus, SEQ_LEN, [1, 1, 1], batch_size=2)
    it = iter(ds)
    next(it)
    with pytest.raises(ValueError, match="overflows"):
        ds.set_weights([1e308] * 3)
    assert ds.weight_schedule == []
    next(it)  # the stream goes on with the weights it had


def test_load_state_dict_checks_the_body(corpus):
    ds = MixtureDataset(corpus, SEQ_LEN, [1, 1, 1], batch_size=2)
    it = iter(ds)
    take(it, 2)
    good = ds.state_dict()
    k1 = MixtureDataset(corpus, SEQ_LEN, [1, 0, 0], batch_size=2)
    cases = [
        ("cursors", None, "cursors.*missing"),
        ("user_weights", [1, 1], "user_weights.*one entry per domain"),
        ("user_weights", [1, -1, 1], "user_weights.*not a valid weight"),
        ("dropped", [False], "dropped.*one entry per domain"),
        ("step", -1, r"step.*must be an int in \[0, 2\*\*62\)|step.*4611686018427387904"),
        ("step", 1.5, "step.*must be an int"),
        ("floor", "7", "floor.*must be an int"),
        ("pending", [[9, [1, 1]]], "pending.*not a valid weight vector"),
        # values a resumed stream would only trip over later, or silently use
        ("pending", [[9, [float("nan"), 1, 1]]], "pending.*finite"),
        ("events", [[9, [0, 0, 0]]], "events.*positive sum"),
        ("events", [["x", [1, 1, 1]]], "events.*step"),
        ("pending", [5], "pending.*pairs"),
        ("finished", "False", "finished.*must be a bool"),  # bool("False") ended the stream
        ("dropped", ["False"] * 3, "dropped.*bools"),
        ("cursors", ["a", "b", "c"], "cursors.*ints"),
        ("cursors", [2**63, 0, 0], "cursors.*ints"),
        ("exhausted", {"a": 2**70}, "exhausted"),
        ("next_step", 2**70, "next_step.*must be an int"),
    ]
    # A worker's position: these failed only in iter(), as a state "saved by DataLoader worker 0
    # of 1" that "cannot resume worker 0 of 1".
    at = {"next_step": good["step"], "worker": 0, "stride": 1}
    assert {k: good[k] for k in at} == at
    cases += [
        ("next_step", dict(at, next_step=None), "'next_step'.*must be set with next_step, worker"),
        ("worker", dict(at, worker="0"), r"'worker'.*must be an int in \[0, 1\), got '0'"),
        ("worker", dict(at, worker=True), "'worker'.*must be an int"),
        ("worker", dict(at, worker=1), r"'worker'.*must be an int in \[0, 1\), got 1"),
        ("worker", dict(at, worker=None), "'worker'.*must be set with next_step"),
        ("stride", dict(at, stride="1"), r"'stride'.*an int in \[1, 256\], got '1'"),
        ("stride", dict(at, stride=0), r"'stride'.*an int in \[1, 256\], got 0"),
        ("stride", dict(at, stride=257, worker=3), r"'stride'.*an int in \[1, 256\]"),
        ("next_step", dict(at, next_step="2"), "'next_step'.*must be an int"),
        ("next_step", dict(at, next_step=good["step"] - 1), r"next_step.*\[step, step \+ stride\)"),
        ("next_step", dict(at, next_step=good["step"] + 2, stride=2),
         r"next_step.*\[step, step \+ stride\) = \[2, 4\), got 4"),
        ("sampler", dict(good["sampler"], method="greedy"), "sampler.*method='greedy'"),
        ("sampler", dict(good["sampler"], seed=999), "sampler.*seed=999"),
        ("sampler", dict(good["sampler"], position=-1), "sampler.*not a valid sampler state"),
        # parts that disagree on where the stream is (it went on silently as another stream)
        ("step", 0, "sampler.*not step \\* global_batch = 0"),
        ("cursors", [good["cursors"][0] + 1, *good["cursors"][1:]],
         r"cursors.*must sum to step \* global_batch = 4"),
        ("cursors", [2**63 - 1, 0, 0], "cursors.*must sum"),  # a bare AssertionError later
    ]
    for key, value, match in cases:
        bad = dict(good)
        if value is None:
            del bad[key]
        elif key in at and isinstance(value, dict):
            bad.update(value)  # the three fields together
        else:
            bad[key] = value
        fresh = MixtureDataset(corpus, SEQ_LEN, [1, 1, 1], batch_size=2)
        with pytest.raises(ValueError, match=match):
            fresh.load_state_dict(bad)
        assert fresh._resume is None  # nothing was loaded
        with pytest.raises(ValueError, match=match):  # into the running dataset: nothing changes
            ds.load_state_dict(bad)
        assert ds.state_dict() == good
    # Weights that converted to floats without a word, as load_weights and set_weights refuse.
    type_cases = [
        ("user_weights", ["1", "1", "1"], r"'user_weights'.*real numbers, got strings"),
        ("user_weights", [True, True, True], "'user_weights'.*real numbers, got a bool"),
        ("weights", np.array([True, True, True]), "'weights'.*real numbers, got bools"),
        ("weights", [1 + 1j, 1, 1], "'weights'.*real numbers, got complex"),
        ("pending", [[9, [True, 1, 1]]], "'pending'.*real numbers, got a bool"),
        ("events", [[9, ["1", "1", "1"]]], "'events'.*real numbers, got strings"),
        ("user_weights", [2**70, "1", 1], r"'user_weights'\]\[1\] must be a number"),
    ]
    for key, value, match in type_cases:
        fresh = MixtureDataset(corpus, SEQ_LEN, [1, 1, 1], batch_size=2)
        with pytest.raises(TypeError, match=match):
            fresh.load_state_dict(dict(good, **{key: value}))
        assert fresh._resume is None
    fresh = MixtureDataset(corpus, SEQ_LEN, [1, 1, 1], batch_size=2)
    fresh.load_state_dict(dict(good, user_weights=[2**70, 1, 1], weights=np.ones(3, np.float32)))
    # A tensor or an array in the header: torch's or NumPy's "ambiguous" error naming no key.
    with pytest.raises(TypeError, match=r"state\['version'\] must be an int, got Tensor"):
        ds.load_state_dict(dict(good, version=torch.tensor([1, 1])))
    with pytest.raises(ValueError, match=r"state\['version'\] must be 1, got 2"):
        ds.load_state_dict(dict(good, version=2))
    with pytest.raises(ValueError, match=r"saved with seed=array\(\[0, 0\]\)"):
        ds.load_state_dict(dict(good, seed=np.array([0, 0])))
    with pytest.raises(ValueError, match=r"saved with domains=array\(\['a', 'b', 'c'\]"):
        ds.load_state_dict(dict(good, domains=np.array(good["domains"])))
    with pytest.raises(ValueError, match=r"saved with domains=array\(\['a', 'b'\]"):
        ds.load_state_dict(dict(good, domains=np.array(good["domains"][:2])))
    with pytest.raises(ValueError, match="not a MixtureDataset state_dict"):
        ds.load_state_dict(dict(good, format=np.array([good["format"]] * 2)))
    for not_a_dict in ([], None, "state"):  # a TypeError, as for the sampler and the mixers
        with pytest.raises(TypeError, match="state must be a dict"):
            ds.load_state_dict(not_a_dict)
    one_domain = dict(good, sampler=dict(good["sampler"], weights=[1.0]))
    with pytest.raises(ValueError, match="sampler.*over 3 domains"):
        k1.load_state_dict(one_domain)
    for position in ({k: None for k in at}, dict(at, next_step=3, worker=1, stride=2)):
        MixtureDataset(corpus, SEQ_LEN, [1, 1, 1], batch_size=2).load_state_dict(
            dict(good, **position)
        )
    fresh = MixtureDataset(corpus, SEQ_LEN, [1, 1, 1], batch_size=2)
    fresh.load_state_dict(good)
    assert stream(fresh, 3) == flatten(take(it, 3))


def test_stream_keys_match_the_stream_state(corpus):
    # check_ranks compares the resume point by these keys; a key added to the state must be
    # compared too.
    from fastmix.data import _STREAM_KEYS, _Stream

    ds = MixtureDataset(corpus, SEQ_LEN, [1, 1, 1])
    assert tuple(_Stream(ds, None).state()) == _STREAM_KEYS


def test_seed_and_step_of_another_type_are_type_errors(tmp_path):
    # As for every other int argument (and MixtureSampler's seed): a float, a bool or a str is a
    # TypeError, a negative int a ValueError; both were ValueErrors here.
    corpus = make_corpus(tmp_path, {"a": [100], "b": [100]})
    for seed in (1.0, True, "1"):
        with pytest.raises(TypeError, match="seed must be an int"):
            MixtureDataset(corpus, SEQ_LEN, [1, 1], seed=seed)
    for seed, match in ((-1, "seed must be >= 0"), (2**64, "seed must be <= 18446744073709551615")):
        with pytest.raises(ValueError, match=match):
            MixtureDataset(corpus, SEQ_LEN, [1, 1], seed=seed)
    assert MixtureDataset(corpus, SEQ_LEN, [1, 1], seed=np.uint64(2**64 - 1)).seed == 2**64 - 1
    ds = MixtureDataset(corpus, SEQ_LEN, [1, 1])
    for step in (1.5, True, "3"):
        with pytest.raises(TypeError, match="step must be an int"):
            ds.set_weights([1, 2], step=step)
    assert ds.set_weights([1, 2], step=np.int64(3)) == 3


def test_state_dict_holds_the_changes_to_come_not_the_ring_of_past_ones(corpus):
    # Weights changed every step (a DoReMi-style rule): the state held every change still in the
    # ring, up to 1024 weight vectors that load_state_dict skips (K = 10,000: 93 MB, 8.7 s).
    ds = MixtureDataset(corpus, SEQ_LEN, [1, 1, 1], seed=5, batch_size=2)
    it = iter(ds)
    rng = np.random.default_rng(0)
    for _ in range(40):
        next(it)
        ds.set_weights(rng.random(3) + 0.1, step=ds.next_step)
    ds.set_weights([1, 2, 3], step=ds.next_step + 3)  # one further ahead
    state = ds.state_dict()
    assert [s for s, _ in state["events"]] == [40, 43]
    assert [s for s, _ in state["pending"]] == [40, 43]
    resumed = MixtureDataset(corpus, SEQ_LEN, [1, 1, 1], seed=5, batch_size=2)
    resumed.load_state_dict(pickle.loads(pickle.dumps(state)))
    assert flatten(take(iter(resumed), 8)) == flatten(take(it, 8))
    assert [s for s, _ in resumed.weight_schedule] == [40, 43]


def test_loading_a_state_that_holds_arrays_again_keeps_the_changes_made_between(corpus):
    # StatefulDataLoader(num_workers=0) loads the dataset's state again inside iter(loader). A
    # state holding NumPy arrays (which load) failed that second load with NumPy's "truth value
    # of an array ... is ambiguous", naming no key.
    ds = MixtureDataset(corpus, SEQ_LEN, [1, 1, 1], seed=5, batch_size=2)
    it = iter(ds)
    take(it, 3)
    state = ds.state_dict()
    state.update(cursors=np.array(state["cursors"]), user_weights=np.array(state["user_weights"]))
    resumed = MixtureDataset(corpus, SEQ_LEN, [1, 1, 1], seed=5, batch_size=2)
    resumed.load_state_dict(state)
    assert resumed.set_weights([0, 0, 1], step=4) == 4
    resumed.load_state_dict(dict(state))  # the same position: the change above stays
    assert resumed.weight_schedule == [(4, [0.0, 0.0, 1.0])]
    ds.set_weights([0, 0, 1], step=4)
    assert stream(resumed, 4) == flatten(take(it, 4))
