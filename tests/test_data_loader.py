"""MixtureDataset across ranks and DataLoader workers: one global order, live weights, resume."""

import os
import pickle
import warnings

import pytest
import torch
from test_data_helpers import SEQ_LEN, flatten, make_corpus, take
from torch.utils.data import DataLoader

from fastmix.data import MixtureDataset


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def rank_outputs(ds, num_workers, steps):
    """What rank ``ds.rank``'s DataLoader yields: workers' outputs interleaved round-robin."""
    if num_workers == 0:
        return take(iter(ds), steps)
    iterators = [ds._iter_worker(w, num_workers) for w in range(num_workers)]
    out = []
    for j in range(steps):
        try:
            out.append(next(iterators[j % num_workers]))
        except StopIteration:  # the stream ended: every later step is gone too
            break
    return out


def global_stream(per_rank):
    """Interleave ranks' outputs step by step into the global sample stream."""
    steps = min(len(r) for r in per_rank)
    assert all(len(r) == steps for r in per_rank)  # every rank sees the same number of steps
    return [s for j in range(steps) for r in per_rank for s in flatten([r[j]])]


def make(corpus, rank, world_size, batch_size, **kwargs):
    kwargs.setdefault("seed", 13)
    return MixtureDataset(
        corpus,
        SEQ_LEN,
        kwargs.pop("weights", [2, 1, 1]),
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        **kwargs,
    )


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
@pytest.mark.parametrize("num_workers", [0, 1, 2, 4])
def test_union_over_ranks_and_workers_is_the_single_stream(corpus, world_size, num_workers):
    steps = 12
    reference = flatten(take(iter(make(corpus, 0, 1, None)), steps * world_size * 2))
    per_rank = [
        rank_outputs(make(corpus, r, world_size, 2), num_workers, steps) for r in range(world_size)
    ]
    assert global_stream(per_rank) == reference  # no duplicate, no gap, same order
    per_rank = [
        rank_outputs(make(corpus, r, world_size, None), num_workers, steps)
        for r in range(world_size)
    ]
    assert global_stream(per_rank) == reference[: steps * world_size]


@pytest.mark.parametrize("world_size,num_workers", [(2, 3), (3, 2)])
def test_union_with_weight_changes_and_exhaustion(corpus, world_size, num_workers):
    def build(rank, ws, batch):
        ds = make(corpus, rank, ws, batch, max_epochs=2, method="stratified")
        ds.set_weights([1, 3, 1], step=2)
        ds.set_weights([0, 1, 5], step=5)
        return ds

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        reference = flatten(take(iter(build(0, 1, 2 * world_size)), 1000))
        per_rank = [
            rank_outputs(build(r, world_size, 2), num_workers, 1000) for r in range(world_size)
        ]
    assert len(reference) > 40 and global_stream(per_rank) == reference


def test_real_workers_union(corpus):
    steps = 10
    reference = flatten(take(iter(make(corpus, 0, 1, 4)), steps))
    per_rank = []
    for r in range(2):
        loader = DataLoader(make(corpus, r, 2, 2), batch_size=None, num_workers=2)
        per_rank.append(take(iter(loader), steps))
    assert global_stream(per_rank) == reference
    # single samples collated by the DataLoader: the same samples, grouped per worker
    loader = DataLoader(make(corpus, 0, 1, None), batch_size=3, num_workers=2)
    got = flatten(take(iter(loader), 4))
    assert sorted(got) == sorted(flatten(take(iter(make(corpus, 0, 1, None)), 12)))


def test_live_weights_reach_real_workers(corpus):
    ds = make(corpus, 0, 1, 2, weights=[1, 0, 0])
    loader = DataLoader(ds, batch_size=None, num_workers=2, prefetch_factor=2)
    it = iter(loader)
    before = take(it, 3)
    step = ds.set_weights([0, 0, 1])
    assert 3 <= step <= 3 + 2 * 2  # the lag: at most prefetch_factor * num_workers batches
    after = take(it, 10)
    domains = [d for _, d in flatten(before + after)]
    assert domains == [0] * (2 * step) + [2] * (len(domains) - 2 * step)
    assert ds.weight_schedule == [(step, [0.0, 0.0, 1.0])]
    # the stream is a function of the seed and the schedule: replaying it in-process matches
    replay = make(corpus, 0, 1, 2, weights=[1, 0, 0])
    replay.set_weights([0, 0, 1], step=step)
    assert flatten(take(iter(replay), 13)) == flatten(before + after)
    del it


def test_workers_that_have_exited_do_not_hold_back_changes(corpus):
    # Their slots used to keep their last steps: after an abandoned pass, a change for the next
    # pass (which starts again at step 0) went to step 11 or more, or step=2 was refused.
    ds = make(corpus, 0, 1, 2, weights=[1, 1, 0])
    loader = DataLoader(ds, batch_size=None, num_workers=2, prefetch_factor=2)
    it = iter(loader)
    take(it, 5)
    assert ds.next_step >= 5
    del it  # shuts the workers down
    assert ds.next_step == 0
    assert ds.set_weights([0, 0, 1], step=2) == 2
    domains = [[d for _, d in flatten([batch])] for batch in take(iter(loader), 4)]
    assert 2 not in domains[0] + domains[1] and set(domains[2] + domains[3]) == {2}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stateful_dataloader_resume_after_weight_changes(corpus, num_workers):
    from torchdata.stateful_dataloader import StatefulDataLoader

    def run(saved=None, total=24):
        ds = make(corpus, 0, 1, 2, max_epochs=3)
        loader = StatefulDataLoader(ds, batch_size=None, num_workers=num_workers)
        start = 0
        if saved is not None:
            state = pickle.loads(saved)
            ds.load_state_dict(state["data"])  # the dataset's pending changes first
            loader.load_state_dict(state["loader"])
            start = 6
        out, checkpoint = [], None
        it = iter(loader)
        for i in range(start, total):
            out.append(next(it))
            if i == 2:
                ds.set_weights([0, 2, 1])  # applies wherever the workers are
            if i == 5:
                state = {"loader": loader.state_dict(), "data": ds.state_dict()}
                assert "fastmix.MixtureDataset" in repr(state["loader"])  # not a fast-forward
                checkpoint = pickle.dumps(state)
            if i == 7:
                ds.set_weights([1, 0, 1], step=18)
            if i == 6 and saved is not None:
                # the weights last set before the checkpoint, not those at the resume point of
                # the main process's own stream (with workers, its start)
                assert ds.weights.tolist() == [0.0, 2.0, 1.0]
        return flatten(out), checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        full, checkpoint = run()
        resumed, _ = run(checkpoint)
    assert resumed == full[6 * 2 :]


@pytest.mark.parametrize("resume_workers", [0, 1, 3])
def test_plain_dataloader_resumes_from_the_steps_consumed(corpus, resume_workers):
    # With workers the main process does not know their position: ds.state_dict() alone gave
    # the resume point (step 0), so a run resumed from it silently replayed the batches it had
    # trained on.  state_dict(step=consumed) replays the draws up to there.
    def run(saved=None, num_workers=2, total=20):
        ds = make(corpus, 0, 1, 2, max_epochs=2)
        start = 0
        if saved is not None:
            state = pickle.loads(saved)
            ds.load_state_dict(state["data"])
            start = state["step"]
        out, checkpoint = [], None
        it = iter(DataLoader(ds, batch_size=None, num_workers=num_workers))
        for i in range(start, total):
            batch = next(it, None)
            if batch is None:
                break
            out.append(batch)
            if i == 1:
                ds.set_weights([0, 2, 1], step=8)
            if i == 6 and saved is None:
                checkpoint = pickle.dumps({"data": ds.state_dict(step=i + 1), "step": i + 1})
            if i == 9:
                ds.set_weights([1, 1, 0], step=17)  # consumed + 2 * 3 workers < 17
        return flatten(out), checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        full, checkpoint = run()
        assert run(num_workers=0)[0] == full
        resumed, _ = run(checkpoint, resume_workers)
    assert resumed == full[7 * 2 :]


def test_a_state_at_a_step_resumes_with_fewer_workers_and_their_safe_step(corpus):
    # The old run's 4 workers had started steps up to 9 when state_dict(step=2) was taken; that
    # state resumes with any number of workers, which produce every step from 2 again.  Their
    # lead, recorded as the floor, refused set_weights(step=consumed + prefetch_factor *
    # num_workers) - "always safe" - after resuming with fewer workers ("already produced up to
    # step 9"); with real workers the floor (how far each rank's had prefetched) differs between
    # ranks, so one rank raised and the others went on.
    ds = make(corpus, 0, 1, 2)
    workers = [ds._iter_worker(w, 4) for w in range(4)]
    for j in range(10):
        next(workers[j % 4])
    state = ds.state_dict(step=2)
    resumed = make(corpus, 0, 1, 2)
    resumed.load_state_dict(state)
    assert resumed.set_weights([0, 0, 1], step=3) == 3  # e.g. 2 consumed + 1 worker ahead
    with pytest.raises(ValueError, match="earliest step a change can reach now is 2"):
        resumed.set_weights([0, 1, 0], step=1)  # consumed before the checkpoint
    # a change without step= still goes where it would have without the interruption
    assert resumed.next_step == ds.next_step == 10
    assert resumed.set_weights([1, 0, 0]) == 10
    reference = make(corpus, 0, 1, 2)
    reference.set_weights([0, 0, 1], step=3)
    reference.set_weights([1, 0, 0], step=10)
    expected = flatten(take(iter(reference), 12))
    assert flatten(take(iter(resumed), 10)) == expected[2 * 2 :]
    assert {d for _, d in expected[3 * 2 : 10 * 2]} == {2}


def test_a_change_between_a_loaded_state_and_its_floor_is_saved_again(corpus):
    # After loading a state_dict(step=2) whose workers had run to step 9, a change with step=3
    # is allowed (nothing of this run has produced step 3).  A state saved before iterating must
    # keep it: its changes were written only from the old floor on (below it, only the loaded
    # state's own could lie), and the change at 3 was lost on the next resume.
    ds = make(corpus, 0, 1, 2)
    workers = [ds._iter_worker(w, 4) for w in range(4)]
    for j in range(10):
        next(workers[j % 4])
    resumed = make(corpus, 0, 1, 2)
    resumed.load_state_dict(ds.state_dict(step=2))
    resumed.set_weights([0, 0, 1], step=3)
    again = make(corpus, 0, 1, 2)
    again.load_state_dict(resumed.state_dict())
    reference = make(corpus, 0, 1, 2)
    reference.set_weights([0, 0, 1], step=3)
    assert flatten(take(iter(again), 6)) == flatten(take(iter(reference), 8))[2 * 2 :]
    assert again.weight_schedule == reference.weight_schedule


def test_a_worker_state_after_resuming_keeps_the_old_workers_lead(tmp_path):
    # The source run's worker had prefetched steps 0-2 when state_dict(step=1) was taken: a
    # change without step= made after resuming from it goes to step 3, where it would have gone
    # without the interruption.  The resumed run's worker, which has produced step 1 only, saves
    # its own state at step 2 (as StatefulDataLoader takes it): a dataset loading that state
    # placed such a change at step 2 (next_step 2), not at 3 as the run that saved it would.
    small = make_corpus(tmp_path, {"a": [5], "b": [5]})

    def mk():
        return MixtureDataset(small, SEQ_LEN, [0, 1], seed=0, batch_size=1)

    src = mk()
    worker = src._iter_worker(0, 1)
    source = flatten(take(worker, 3))  # steps 0-2: consumed 0, prefetched 2 ahead
    resumed = mk()
    resumed.load_state_dict(src.state_dict(step=1))
    assert resumed.next_step == src.next_step == 3
    worker = resumed._iter_worker(0, 1)
    assert flatten(take(worker, 1)) == source[1:2]  # step 1
    state = {**resumed._header(), **worker.state_dict(), "events": [], "exhausted": {}}
    assert state["step"] == 2 and resumed.next_step == 3
    fresh = mk()
    fresh.load_state_dict(state)
    assert fresh.next_step == 3
    assert fresh.set_weights([1, 0]) == 3  # as resumed.set_weights would have
    resumed.load_state_dict(state)  # rolled back into the dataset that saved it
    assert resumed.next_step == 3
    reference = mk()
    reference.set_weights([1, 0], step=3)
    expected = flatten(take(iter(reference), 5))
    assert expected[:3] == source
    assert flatten(take(iter(fresh), 3)) == expected[2:]


def test_a_worker_state_before_iterating_keeps_the_old_workers_lead(tmp_path, monkeypatch):
    # As above, but the resumed run's worker saves its state before producing anything (as
    # StatefulDataLoader takes a worker's first state): that state lost the loaded floor, and
    # a dataset loading it placed a change without step= at step 1, not at 3.
    small = make_corpus(tmp_path, {"a": [5], "b": [5]})

    def mk():
        return MixtureDataset(small, SEQ_LEN, [0, 1], seed=0, batch_size=1)

    src = mk()
    source = flatten(take(src._iter_worker(0, 1), 3))  # steps 0-2: consumed 0, prefetched 2
    resumed = mk()
    resumed.load_state_dict(src.state_dict(step=1))
    assert resumed.next_step == 3
    with monkeypatch.context() as m:  # inside a DataLoader worker
        m.setattr(torch.utils.data, "get_worker_info", lambda: object())
        state = resumed.state_dict()
    assert state["step"] == 1 and state["floor"] == 3
    fresh = mk()
    fresh.load_state_dict(state)
    assert fresh.next_step == 3
    assert fresh.set_weights([1, 0]) == 3
    reference = mk()
    reference.set_weights([1, 0], step=3)
    expected = flatten(take(iter(reference), 5))
    assert expected[:3] == source
    assert flatten(take(iter(fresh), 4)) == expected[1:]


def test_state_dict_at_a_step_after_the_workers_have_gone(corpus):
    # A last checkpoint after the loop: the DataLoader's workers have exited, so no live
    # iterator holds the position any more; the steps they claimed still bound the step.
    ds = make(corpus, 0, 1, 2)
    it = iter(DataLoader(ds, batch_size=None, num_workers=2))
    seen = flatten(take(it, 5))
    del it  # the workers exit
    assert ds.next_step == 0
    state = ds.state_dict(step=5)
    fresh = make(corpus, 0, 1, 2)
    full = flatten(take(iter(fresh), 9))
    assert seen == full[: 5 * 2]
    resumed = make(corpus, 0, 1, 2)
    resumed.load_state_dict(state)
    assert flatten(take(iter(resumed), 4)) == full[5 * 2 :]
    with pytest.raises(ValueError, match=r"furthest step started \d+"):
        ds.state_dict(step=100)


def test_state_dict_at_a_step_marks_the_domains_its_replay_drops(corpus):
    # Right after a load the floor counts as started, so a step no iterator of this run has
    # produced can be asked for: the domain its replay dropped was missing from "exhausted".
    def mk():
        return make(corpus, 0, 1, 2, max_epochs=1, seed=1, weights=[1, 1, 1])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ds = mk()
        workers = [ds._iter_worker(w, 2) for w in range(2)]
        for j in range(8):
            next(workers[j % 2])
        reference = dict(ds.exhausted_at)
        state = ds.state_dict(step=2)
        resumed = mk()
        resumed.load_state_dict(state)
        later = resumed.state_dict(step=8)
    dropped = [n for n, d in zip(resumed.names, later["dropped"], strict=True) if d]
    assert dropped and set(dropped) <= set(later["exhausted"])
    assert later["exhausted"] == {k: v for k, v in reference.items() if k in later["exhausted"]}


def test_a_worker_state_names_the_way_to_another_worker_count(corpus):
    ds = make(corpus, 0, 1, 2)
    it = ds._iter_worker(1, 2)
    take(it, 2)
    state = it.state_dict()
    other = make(corpus, 0, 1, 2)
    other.load_state_dict({**ds._header(), **state})
    with pytest.raises(ValueError, match=r"cannot resume worker 1 of 3 .*state_dict\(step="):
        other._iter_worker(1, 3)


def test_state_dict_at_a_step_replays_every_change(corpus):
    # More changes than the shared ring holds (1024): the replay takes them from
    # weight_schedule, and gives what the live iterator's own state says.
    ds = make(corpus, 0, 1, 2)
    it = iter(ds)
    for i in range(1100):
        next(it)
        ds.set_weights([1 + i % 3, 1, 1 + i % 5], step=i + 1)
    assert ds.state_dict(step=1100) == ds.state_dict()
    with pytest.raises(ValueError, match="furthest step started 1100"):
        ds.state_dict(step=1101)


def test_a_state_at_a_step_holds_no_more_changes_than_a_resumed_run_can(corpus):
    # A step far behind a run that changed the weights at every step left more than 1024 changes
    # to come: state_dict gave a state that load_state_dict refused as damaged.
    ds = make(corpus, 0, 1, 2)
    it = iter(ds)
    batches = []
    for i in range(1200):
        batches.append(next(it))
        ds.set_weights([1 + i % 3, 1, 1 + i % 5], step=i + 1)
    with pytest.raises(ValueError, match=r"step=176 leaves 1025 weight changes .* step 177 or"):
        ds.state_dict(step=176)
    resumed = make(corpus, 0, 1, 2)
    resumed.load_state_dict(ds.state_dict(step=177))
    assert flatten(take(iter(resumed), 1023)) == flatten(batches[177:])


def test_state_dict_at_a_step_goes_on_from_the_last_replay(corpus):
    # Each call replays from where the previous one stopped, not from the resume point; what it
    # gives is what a replay from scratch and the live iterator give, also when a new pass has
    # put a change before the step the last replay reached.
    ds = make(corpus, 0, 1, 2)
    it = iter(ds)
    for i in range(40):
        next(it)
        if i % 7 == 3:
            ds.set_weights([1 + i % 3, 2, 1], step=i + 2)
        if i % 10 == 9:
            replay = ds._replay
            assert ds.state_dict(step=i + 1) == ds.state_dict()
            assert replay is None or ds._replay is replay  # went on, not started again
            ds._replay = None
            assert ds.state_dict(step=i + 1) == ds.state_dict()
    # A new pass starts again from the resume point: a change at its step 3 lies before the
    # step the last replay reached (40).
    it = iter(ds)
    take(it, 3)
    assert ds.set_weights([0, 1, 1]) == 3
    take(it, 42)
    live = ds.state_dict()
    assert ds.state_dict(step=45) == live
    ds._replay = None
    assert ds.state_dict(step=45) == live
    assert ds.state_dict(step=10) == ds.state_dict(step=10)  # an earlier step: from scratch


def test_a_replay_that_ended_takes_a_change_at_the_step_it_ended_in(corpus):
    # A pass that ran to its end ("stop") frees its slot, so a change for the next pass may name
    # the step the stream ended in; a replay that had gone on to the end kept it ended there, while
    # a replay from scratch applied the change before that step's draw and went on.
    kwargs = dict(seed=0, weights=[1, 1, 1], max_epochs=1, on_exhausted="stop")
    ds = make(corpus, 0, 1, None, **kwargs)
    end = len(list(iter(ds)))
    assert ds.state_dict(step=end + 1)["finished"]
    ds.set_weights([0, 1, 0], step=end)
    went_on = ds.state_dict(step=end + 1)
    ds._replay = None
    assert went_on == ds.state_dict(step=end + 1)
    assert not went_on["finished"] and went_on["step"] == end + 1


def test_state_dict_at_a_step_silences_only_its_own_replay(corpus, monkeypatch):
    # The replay does not warn again of the domains the iterators dropped, and does not do it
    # by a process-wide warnings filter, which hid the RuntimeWarnings of every other thread
    # (a training thread's, an in-process iterator's) while it ran.
    from fastmix import data

    ds = make(corpus, 0, 1, 2, max_epochs=1)
    it = iter(ds)
    with pytest.warns(RuntimeWarning, match="reached max_epochs"):
        consumed = len(take(it, 10**6))
    plan = data._Stream.plan

    def plan_while_another_thread_warns(self, produce):
        warnings.warn("from another thread", RuntimeWarning, stacklevel=1)
        return plan(self, produce)

    monkeypatch.setattr(data._Stream, "plan", plan_while_another_thread_warns)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ds.state_dict(step=consumed)
    messages = [str(w.message) for w in seen]
    assert messages and all(m == "from another thread" for m in messages)


def test_a_change_between_resuming_and_iterating_survives_the_loaders_own_load(corpus):
    # StatefulDataLoader(num_workers=0) loads the dataset's state itself, inside iter(loader),
    # after the user's ds.load_state_dict: a change made in between must not be wiped.
    from torchdata.stateful_dataloader import StatefulDataLoader

    def make_ds():
        return make(corpus, 0, 1, 2, weights=[2, 1, 1])

    ds = make_ds()
    loader = StatefulDataLoader(ds, batch_size=None, num_workers=0)
    it = iter(loader)
    take(it, 3)
    saved = pickle.dumps({"loader": loader.state_dict(), "data": ds.state_dict()})
    del it
    resumed = make_ds()
    loader = StatefulDataLoader(resumed, batch_size=None, num_workers=0)
    state = pickle.loads(saved)
    resumed.load_state_dict(state["data"])
    loader.load_state_dict(state["loader"])
    assert resumed.set_weights([0, 0, 1], step=resumed.next_step) == 3
    assert {d for _, d in flatten(take(iter(loader), 4))} == {2}
    assert resumed.weight_schedule == [(3, [0.0, 0.0, 1.0])]
    assert resumed.weights.tolist() == [0.0, 0.0, 1.0]


def test_persistent_workers_from_before_a_rollback_say_so(corpus):
    # Their copy of the dataset is the one they started with: after ds.load_state_dict they
    # would silently replay the old position.  They raise instead, naming the fix.
    ds = make(corpus, 0, 1, 2)
    saved = ds.state_dict()
    loader = DataLoader(ds, batch_size=None, num_workers=1, persistent_workers=True)
    take(iter(loader), 2)
    ds.load_state_dict(saved)
    with pytest.raises(RuntimeError, match="make a new DataLoader after loading a state"):
        take(iter(loader), 1)
    fresh = DataLoader(ds, batch_size=None, num_workers=1)
    assert len(take(iter(fresh), 2)) == 2


def test_rank_and_world_size_default_from_torch_distributed(corpus, tmp_path):
    import torch.distributed as dist

    assert (make(corpus, None, None, 2).rank, make(corpus, None, None, 2).world_size) == (0, 1)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        ds = MixtureDataset(corpus, SEQ_LEN, [1, 1, 1], batch_size=2)
        assert (ds.rank, ds.world_size) == (0, 1)
    finally:
        dist.destroy_process_group()
    with pytest.raises(ValueError, match="up to 256 DataLoader workers"):
        make(corpus, 0, 1, 2)._iter_worker(0, 300)


def test_live_weights_reach_spawned_workers(corpus):
    # spawn pickles the dataset: the lock and shared tensors must travel as handles, not copies
    ds = make(corpus, 0, 1, 2, weights=[1, 0, 0])
    loader = DataLoader(ds, batch_size=None, num_workers=1, multiprocessing_context="spawn")
    it = iter(loader)
    before = take(it, 2)
    step = ds.set_weights([0, 1, 0])
    domains = [d for _, d in flatten(before + take(it, 5))]
    assert 2 <= step <= 4 and domains == [0] * (2 * step) + [1] * (14 - 2 * step)


def test_exhausted_is_reported_from_workers(corpus):
    ds = make(corpus, 0, 1, 2, max_epochs=1, on_exhausted="stop")
    got = take(iter(DataLoader(ds, batch_size=None, num_workers=2)), 1000)
    assert len(ds.exhausted) == 1 and len(got) == ds.exhausted_at[ds.exhausted[0]] // 2


def test_cpu_tensor_weights_reach_workers(corpus):
    # a CPU tensor takes the synchronous path and still reaches the workers
    ds = make(corpus, 0, 1, 2, weights=[1, 0, 0])
    it = iter(DataLoader(ds, batch_size=None, num_workers=1))
    take(it, 1)
    step = ds.set_weights(torch.tensor([0.0, 1.0, 0.0]))
    assert 2 <= step <= 1 + 2 * 1  # past the batches the one worker prefetched (factor 2)
    got = [d for _, d in flatten(take(it, 6))]
    assert len(got) == 12 and set(got[: 2 * (step - 1)]) == {0}
    assert got[2 * (step - 1) :] == [1] * (len(got) - 2 * (step - 1))


def test_change_right_after_resuming_workers_reaches_them(corpus):
    """With workers the main process holds no position; its state records the progress floor."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    def loader_of(ds):
        return StatefulDataLoader(ds, batch_size=None, num_workers=2)

    ds = make(corpus, 0, 1, 2)
    loader = loader_of(ds)
    it = iter(loader)
    full = [next(it) for _ in range(6)]
    saved = pickle.dumps({"loader": loader.state_dict(), "data": ds.state_dict()})
    full += [next(it) for _ in range(14)]  # the same stream, no change made
    del it
    state = pickle.loads(saved)
    floor = state["data"]["floor"]
    assert 6 <= floor <= 20  # at least the consumed steps; at most what the workers prefetched

    ds = make(corpus, 0, 1, 2)
    loader = loader_of(ds)
    ds.load_state_dict(state["data"])
    loader.load_state_dict(state["loader"])
    assert ds.next_step == floor
    with pytest.raises(ValueError, match=f"earliest step a change can reach now is {floor}"):
        ds.set_weights([0, 1, 0], step=3)  # already produced before the checkpoint
    assert ds.set_weights([0, 0, 1]) == floor
    it = iter(loader)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        resumed = [next(it) for _ in range(6, floor + 4)]
    del it
    # Steps before the floor are what the uninterrupted run produced; from it on only domain c.
    assert flatten(resumed[: floor - 6]) == flatten(full[6:floor])
    assert {d for _, d in flatten(resumed[floor - 6 :])} == {2}


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc")
def test_an_exited_process_not_yet_joined_is_not_alive():
    # A worker that has exited but is not joined yet (a zombie) used to count as alive and hold
    # back where changes go until its parent joined it.
    import subprocess
    import sys
    import time

    from fastmix.data import _alive

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 10  # (the child exits at once)
        while _alive(child.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child.pid)
    finally:
        child.wait()
    assert _alive(os.getpid())


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc")
@pytest.mark.parametrize("pidfds", [True, False])
def test_running_tells_live_exited_and_reused_pids_apart(monkeypatch, pidfds):
    # _running answers set_weights' question (which slot owners still run) for all of them in
    # one poll over pidfds kept open; without pidfds (not Linux, old kernels) _alive answers.
    # Both must agree, and the open pidfds must not outlive their processes.
    import subprocess
    import sys

    from fastmix import data
    from fastmix.data import _PIDFDS, _running, _start_time

    if not pidfds:
        monkeypatch.delattr(os, "pidfd_open", raising=False)
    elif not hasattr(os, "pidfd_open"):
        pytest.skip("no pidfds here")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = _start_time(child.pid)
        owners = [(child.pid, start), (child.pid, start + 1), (child.pid, 0)]
        assert _running(owners) == {owners[0]: True, owners[1]: False, owners[2]: True}
        assert _running(owners[:1]) == {owners[0]: True}  # asked again: from the open pidfd
        if pidfds:
            assert set(_PIDFDS) >= {owners[0], owners[2]} and owners[1] not in _PIDFDS
    finally:
        child.kill()
        child.wait()
    assert _running(owners) == dict.fromkeys(owners, False)
    assert not any(pid == child.pid for pid, _ in data._PIDFDS)  # closed with their process


def test_loader_passes_leave_no_pidfds_behind(corpus):
    # Each pass of a DataLoader starts new workers; the pidfds opened for the old ones must be
    # closed once those have exited, not pile up until the process runs out of descriptors.
    from fastmix import data

    ds = make(corpus, 0, 1, 2, weights=[1, 1, 1])
    loader = DataLoader(ds, batch_size=None, num_workers=2, prefetch_factor=2)
    for p in range(3):
        it = iter(loader)
        take(it, 3)
        ds.set_weights([1, 1, p + 1])
        workers = {w.pid for w in it._workers}
        assert {pid for pid, _ in data._PIDFDS} <= workers | {os.getpid()}
        del it
    ds.set_weights([1, 1, 1])  # the last pass's workers have exited
    assert not data._PIDFDS


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc")
def test_a_slot_whose_pid_went_to_another_process_is_free(corpus):
    # A slot was known by its pid alone: once the worker had exited and the OS gave its pid to
    # another process, the slot held back where changes go for as long as that process ran.
    import subprocess
    import sys

    from fastmix.data import _alive, _start_time

    me = _start_time(os.getpid())
    assert me > 0 and _alive(os.getpid(), me) and not _alive(os.getpid(), me + 1)
    ds = make(corpus, 0, 1, 2)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        v = ds._control.v
        v["started"][0], v["owner_pid"][0], v["owner_token"][0] = 40, other.pid, 7
        v["owner_start"][0] = _start_time(other.pid)
        assert ds.next_step == 41  # the worker that started step 40 is running: it holds back
        v["owner_start"][0] += 1  # the worker that held the slot started at another time
        assert ds.next_step == 0
        assert ds.set_weights([0, 0, 1], step=2) == 2
    finally:
        other.kill()
        other.wait()
