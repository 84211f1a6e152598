"""Property test: MixtureDataset's resume, rollback, workers and ranks against an uninterrupted run.

Each example draws a small corpus, a sampler, a batch split over ranks, an epoch cap, weight
changes made at chosen steps (``set_weights(w, step=s)``, some with zero weights, some at the same
step, some without ``step=``) and a checkpoint at step ``c`` (an in-process iterator's
``state_dict()``, a single worker's state, or ``state_dict(step=c)`` while emulated DataLoader
workers prefetch ahead).  The reference replays the source run's ``weight_schedule`` in one
process.  The checkpoint is resumed in fresh datasets on every rank with another worker count
(which checkpoint again, resumed and rolled back in turn), loaded back into the dataset that ran
past it (a rollback), and a deepcopy taken at it runs on; each must give the reference's samples
from ``c`` on, and the same ``weights``, ``next_step`` and ``exhausted_at``.  DataLoader workers
are emulated in-process (``ds._iter_worker``), prefetching a few steps ahead of what the training
loop has consumed (tests/test_data_loader.py runs real ones).

A second property makes the changes only a resumed run can make: right after loading a
``state_dict(step=c)`` (or in-process) state, for steps between ``c`` and the state's floor (how far
the saving run's workers had prefetched), and checks them through further checkpoints, resumes,
rollbacks and copies.
"""

import copy
import pickle
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from test_data_helpers import SEQ_LEN, flatten, make_corpus

from fastmix.data import MixtureDataset

# Deterministic in CI (the same examples every run); about 10 s on 2 shared CPU cores.
settings.register_profile(
    "fastmix-data-properties",
    max_examples=400,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = settings.get_profile("fastmix-data-properties")
# Changes made after step 0 go at least this far ahead of the steps consumed: past what the
# emulated workers have prefetched (set_weights refuses a step some worker has started).
MAX_AHEAD = 2


@pytest.fixture(scope="module")
def corpora():
    root = Path(tempfile.mkdtemp(prefix="fastmix-props-"))
    cache = {}

    def get(files):
        if files not in cache:
            where = root / str(len(cache))
            where.mkdir()
            cache[files] = make_corpus(where, {"abcd"[d]: list(f) for d, f in enumerate(files)})
        return cache[files]

    yield get
    shutil.rmtree(root, ignore_errors=True)


def weight_vectors(k):
    # zero weights included; not all zero
    return st.lists(st.integers(0, 3), min_size=k, max_size=k).filter(any)


@st.composite
def scenarios(draw):
    k = draw(st.integers(2, 4))
    # 1 to 14 windows per file at seq_len 4, one or two files per domain: epochs end within a few
    # steps, so caps and drops happen
    files = tuple(
        tuple(draw(st.lists(st.integers(5, 60), min_size=1, max_size=2))) for _ in range(k)
    )
    s = {"files": files, "k": k}
    s["method"] = draw(st.sampled_from(["alias", "stratified", "greedy"]))
    s["seed"] = draw(st.integers(0, 3))
    # one global batch, split over the source run's ranks and the resumed run's ranks
    s["res_world"] = draw(st.integers(1, 3))
    s["res_batch"] = draw(st.integers(1, 3))
    g = s["global"] = s["res_world"] * s["res_batch"]
    s["src_world"] = draw(st.sampled_from([w for w in (1, 2, 3) if g % w == 0]))
    s["src_rank"] = draw(st.integers(0, s["src_world"] - 1))
    # the runs yielding single samples (batch_size=None) where a rank's batch is 1
    s["single"] = draw(st.sets(st.sampled_from(["src", "ref", "res", "res2"])))
    s["max_epochs"] = draw(st.sampled_from([None, 1, 2, 3]))
    s["on_exhausted"] = draw(st.sampled_from(["reshuffle", "reshuffle", "stop"]))
    s["weights"] = draw(weight_vectors(k))
    total = s["total"] = draw(st.integers(3, 24))
    changes = []
    for _ in range(draw(st.integers(0, 6))):
        if changes and draw(st.booleans()):  # at a step another change already targets
            step = changes[-1][1]
            made = draw(st.integers(0, max(0, min(total, step - MAX_AHEAD))))
        else:
            made = draw(st.integers(0, total))
            step = made + (MAX_AHEAD if made else 0) + draw(st.integers(0, 4))
        changes.append((made, step, draw(weight_vectors(k))))
    # made in the order of the steps consumed, and in list order at one step
    s["changes"] = sorted(changes, key=lambda c: c[0])
    # which of them the source run makes without step= (at the first step not started)
    s["timed"] = draw(st.lists(st.booleans(), min_size=len(changes), max_size=len(changes)))
    # The source run (rank 0 of src_world) and its checkpoint at c.
    s["src_workers"], s["src_ahead"], s["kind"] = draw(loaders())
    s["checkpoint"] = draw(st.integers(0, total))
    # state_dict(step=) calls made along the way (the replay goes on from the previous call's):
    # (steps consumed, how far back)
    s["probes"] = draw(st.lists(st.tuples(st.integers(0, total), st.integers(0, 3)), max_size=3))
    # Resumed on every rank of res_world; rank 0 checkpoints again at c2 >= c.
    s["res_workers"], s["res_ahead"], s["kind2"] = draw(loaders())
    s["checkpoint2"] = draw(st.integers(0, total))
    # The second checkpoint resumed on one rank; the first rolled back into the source dataset.
    s["res2_workers"], s["res2_ahead"], _ = draw(loaders())
    s["rb_workers"], s["rb_ahead"], _ = draw(loaders())
    return s


@st.composite
def loaders(draw):
    """(emulated workers, steps they prefetch ahead, how a checkpoint is taken)"""
    workers = draw(st.integers(0, 3))
    ahead = draw(st.integers(0, MAX_AHEAD)) if workers else 0
    kinds = ["step"]
    if workers == 0:
        kinds.append("inproc")  # the in-process iterator's state
    if workers == 1 and ahead == 0:
        kinds.append("worker")  # the one worker's state (StatefulDataLoader's, taken as it yields)
    return workers, ahead, draw(st.sampled_from(kinds))


def build(corpora, s, rank, world_size, role):
    per_rank = s["global"] // world_size
    return MixtureDataset(
        corpora(s["files"]),
        SEQ_LEN,
        s["weights"],
        seed=s["seed"],
        method=s["method"],
        batch_size=None if per_rank == 1 and role in s["single"] else per_rank,
        rank=rank,
        world_size=world_size,
        max_epochs=s["max_epochs"],
        on_exhausted=s["on_exhausted"],
    )


def run(ds, num_workers, ahead, start, total, changes, checkpoint=None, at=None, probes=(),
        refuse=False):  # fmt: skip
    """Consume steps ``start..total-1`` as a training loop would: through an in-process iterator,
    or ``num_workers`` emulated workers taking every n-th step and prefetching ``ahead`` steps
    beyond the one consumed.  When ``j`` steps are consumed: the checkpoint (kind ``checkpoint``)
    if ``j == at``, then the changes ``(made, step, weights, timed)`` made at ``j`` (step None:
    without ``step=``; timed: made so in the source run), then the ``probes``
    (``state_dict(step=)`` calls whose result is dropped); with ``refuse``, a change for the
    last step produced is refused at each step.

    Returns a dict: "samples" (flattened), "saved" (the pickled checkpoint), "weights" (ds.weights
    at the checkpoint), "applied" (the step each change applies from)."""
    n = max(1, num_workers)
    iterators = []  # made at the first step produced, after the changes made at `start`
    produced, next_produce, ended = {}, start, False
    result = {"samples": [], "saved": None, "weights": None, "applied": {}, "late": False,
              "copy": None, "next_step": None}

    def produce_through(step):
        nonlocal next_produce, ended
        if not iterators:
            iterators.extend(
                [iter(ds)] if num_workers == 0
                else [ds._iter_worker(w, num_workers) for w in range(num_workers)]
            )  # fmt: skip
        while next_produce <= min(step, total - 1) and not ended:
            try:
                produced[next_produce] = next(iterators[(next_produce - start) % n])
            except StopIteration:  # the stream has ended: every later step is gone too
                ended = True
            next_produce += 1

    for j in range(start, total + 1):
        if j == at:
            result["saved"] = pickle.dumps(save(ds, checkpoint, j, iterators))
            result["weights"] = ds.weights.tolist()
            # (once the stream has ended, next_step is the next pass's: its resume point)
            result["next_step"] = None if ended else ds.next_step
            if checkpoint == "inproc":
                result["copy"] = copy.deepcopy(ds)
        for i, (made, step, w, timed) in enumerate(changes):
            if made != j or step is None and ended:
                # (not without step= once the stream has ended: the pass has freed its progress
                # slot, so such a change applies from the next pass's first step)
                continue
            if step is None:
                expected = ds.next_step
            elif timed and j == start and not iterators and ds.world_size == 1:
                # Made again right after loading a checkpoint, without step=: it applies where
                # it did in the run that saved the checkpoint (the state records its next_step).
                expected, step = step, None
            else:
                expected = step
            result["applied"][i] = ds.set_weights(w, step=step)
            assert result["applied"][i] == expected, "set_weights' step"
        if refuse and iterators and not ended and next_produce > start:
            with pytest.raises(ValueError, match="already been produced"):
                ds.set_weights(ds.weights, step=next_produce - 1)
        for when, back in probes:
            if when == j:
                ds.state_dict(step=max(start, j - back))
        if j == total:
            break
        produce_through(j + ahead)
        if j not in produced:
            break
        result["samples"].extend(flatten([produced.pop(j)]))
    if at is not None and result["saved"] is None:
        # The stream ended before: checkpointed at its end, after the changes made there.
        result["saved"] = pickle.dumps(save(ds, checkpoint, j, iterators))
        result["weights"] = ds.weights.tolist()
        result["late"] = True
    return result


def save(ds, kind, step, iterators):
    if kind == "step":
        return ds.state_dict(step=step)
    if kind == "inproc" or not iterators:  # (not iterated yet: the dataset's own)
        return ds.state_dict()
    if kind == "worker":  # what the one DataLoader worker's own dataset would save
        return {**ds._header(), **iterators[0].state_dict(), "events": [],
                "exhausted": ds.exhausted_at}  # fmt: skip
    raise AssertionError(kind)


def rank_rows(reference, s, rank, world_size, start):
    """Rank ``rank``'s rows of the reference's global steps from ``start`` on."""
    g, per_rank = s["global"], s["global"] // world_size
    steps = len(reference) // g
    return [x for j in range(start, steps) for x in
            reference[j * g + rank * per_rank : j * g + (rank + 1) * per_rank]]  # fmt: skip


def interleave(per_rank, s):
    """The ranks' samples step by step: the global stream."""
    per = s["global"] // len(per_rank)
    steps = min(len(r) for r in per_rank) // per
    assert all(len(r) == steps * per for r in per_rank)  # every rank sees the same steps
    return [x for j in range(steps) for r in per_rank for x in r[j * per : (j + 1) * per]]


def check(corpora, s):
    note(repr(s))
    total, g, c = s["total"], s["global"], s["checkpoint"]
    src_rank, src_world = s["src_rank"], s["src_world"]
    # Changes made without step= in the source run: only with one rank, and up to the checkpoint
    # (the runs that make them again afterwards make them with step= where the source's went).
    changes = [
        (m, None if timed and src_world == 1 and m <= c else step, w, timed)
        for (m, step, w), timed in zip(s["changes"], s["timed"], strict=True)
    ]

    # The source run: rank src_rank of src_world, checkpointed at c, run on to the end.
    src = build(corpora, s, src_rank, src_world, "src")
    first = run(src, s["src_workers"], s["src_ahead"], 0, total, changes, s["kind"], c,
                s["probes"])  # fmt: skip
    # (a stream that ended before the checkpoint is checkpointed at its end)
    c = min(c, len(first["samples"]) // (g // src_world))
    changes = [(m, first["applied"][i], w, step is None) for i, (m, step, w, _) in
               enumerate(changes) if i in first["applied"]]  # fmt: skip
    schedule = [(step, [float(x) for x in w]) for _, step, w, _ in changes]
    assert src.weight_schedule == schedule, "weight_schedule"

    # The uninterrupted run: one rank takes the whole global batch, in-process, with the source
    # run's weight_schedule replayed.
    ref_ds = build(corpora, s, 0, 1, "ref")
    for step, w in schedule:
        ref_ds.set_weights(w, step=step)
    reference = run(ref_ds, 0, 0, 0, total, [])["samples"]
    assert len(reference) % g == 0
    steps = len(reference) // g
    assert c <= steps
    c2 = min(max(c, s["checkpoint2"]), steps)
    assert first["samples"] == rank_rows(reference, s, src_rank, src_world, 0), "source run"
    assert src.exhausted_at == ref_ds.exhausted_at, "source run: exhausted_at"
    if first["copy"] is not None:  # a deepcopy at the checkpoint continues from there
        got = run(first["copy"], 0, 0, c, total, [ch for ch in changes if ch[0] >= c])
        assert got["samples"] == rank_rows(reference, s, src_rank, src_world, c), "copy"

    # A second pass over the source dataset: from its resume point (0), every change replayed.
    # In-process after an in-process pass (emulated workers of the first pass would still hold
    # their progress slots: real ones exit), its checkpoint at c resumes as the first pass's does
    # (from its second step: until the new pass starts, the old one holds next_step).
    if s["src_workers"] == 0:
        again = run(src, 0, 0, 0, total, [], "step", c if c else None)
        assert again["samples"] == rank_rows(reference, s, src_rank, src_world, 0), "second pass"
        if c:
            ds = build(corpora, s, 0, 1, "res2")
            ds.load_state_dict(pickle.loads(again["saved"]))
            got = run(ds, 0, 0, c, total, [ch[:3] + (False,) for ch in changes if ch[0] >= c])
            assert got["samples"] == reference[c * g :], "resumed from the second pass"

    # Resumed in fresh datasets on every rank of res_world; rank 0 checkpoints again at c2.
    # The changes made from the checkpoint on (a late one holds those made at its step):
    after = [ch for ch in changes if ch[0] > c or ch[0] == c and not first["late"]]
    per_rank, second, resumed = [], None, None
    for rank in range(s["res_world"]):
        ds = build(corpora, s, rank, s["res_world"], "res")
        ds.load_state_dict(pickle.loads(first["saved"]))
        if s["kind"] != "worker":  # (a worker's own state does not hold the main process's)
            assert ds.weights.tolist() == first["weights"], "resumed: weights"
        assert first["next_step"] in (None, ds.next_step), "resumed: next_step"
        got = run(ds, s["res_workers"], s["res_ahead"], c, total, after, s["kind2"],
                  c2 if rank == 0 else None)  # fmt: skip
        per_rank.append(got["samples"])
        if rank == 0:
            second, resumed = got, ds
            assert ds.exhausted_at == ref_ds.exhausted_at, "resumed: exhausted_at"
    assert interleave(per_rank, s) == reference[c * g :], "resumed"

    # The second checkpoint resumed on one rank taking the whole global batch, and rolled back
    # into the resumed dataset that saved it.
    after2 = [ch for ch in after if ch[0] >= c2]
    ds = build(corpora, s, 0, 1, "res2")
    ds.load_state_dict(pickle.loads(second["saved"]))
    assert second["next_step"] in (None, ds.next_step), "resumed again: next_step"
    got = run(ds, s["res2_workers"], s["res2_ahead"], c2, total, after2)
    assert got["samples"] == reference[c2 * g :], "resumed from the second checkpoint"
    resumed.load_state_dict(pickle.loads(second["saved"]))
    assert second["next_step"] in (None, resumed.next_step), "second rollback: next_step"
    got = run(resumed, s["rb_workers"], s["rb_ahead"], c2, total, after2)
    assert got["samples"] == rank_rows(reference, s, 0, s["res_world"], c2), "second rollback"

    # Rolled back: the source dataset, which ran to the end, loads the first checkpoint again and
    # is then what a fresh dataset loading it is.
    src.load_state_dict(pickle.loads(first["saved"]))
    fresh = build(corpora, s, src_rank, src_world, "src")
    fresh.load_state_dict(pickle.loads(first["saved"]))
    assert src.weight_schedule == fresh.weight_schedule, "rolled back: weight_schedule"
    assert src.exhausted_at == fresh.exhausted_at, "rolled back: exhausted_at"
    assert src.weights.tolist() == fresh.weights.tolist(), "rolled back: weights"
    assert src.next_step == fresh.next_step, "rolled back: next_step"
    assert first["next_step"] in (None, src.next_step), "rolled back: next_step"
    got = run(src, s["rb_workers"], s["rb_ahead"], c, total, after, probes=s["probes"])
    assert got["samples"] == rank_rows(reference, s, src_rank, src_world, c), "rolled back"
    assert src.exhausted_at == ref_ds.exhausted_at, "rolled back: exhausted_at"


@PROFILE
@given(s=scenarios())
def test_resume_and_rollback_give_the_uninterrupted_stream(corpora, s):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # domains dropped at their cap
        check(corpora, s)


# -- changes between a loaded state's step and its floor ----------------------------------------
#
# A state produced by one iterator up to its step (state_dict(step=c), or the in-process
# iterator's) resumes with any number of workers, so set_weights(w, step=s) is accepted for any
# s >= c no iterator of the resumed run has started, even below the state's floor (how far the
# saving run's workers had prefetched); a change without step= still goes to the floor.  The
# source run checkpoints so while its workers prefetch, the resumed runs make changes between c
# and the floor (which the source run could no longer reach) right after loading, checkpoint
# again (before iterating, mid-way, a worker's state, state_dict(step=)), and that checkpoint is
# resumed on other ranks, rolled back and copied - each against a run that made the same changes
# at the same steps from the start.

BELOW_FLOOR = settings(PROFILE, max_examples=100)
SRC_AHEAD = 4


@st.composite
def below_floor_scenarios(draw):
    s = draw(scenarios())
    # Fewer streams that end before the checkpoint, which is early (the resumed runs go on).
    s["on_exhausted"] = draw(st.sampled_from(["reshuffle", "reshuffle", "reshuffle", "stop"]))
    s["checkpoint"] = draw(st.integers(1, min(s["total"], 8)))
    # The source run's workers prefetch up to SRC_AHEAD steps (the state's floor is up to that
    # far past its step); its changes go past them.
    workers = draw(st.sampled_from([2, 3, 1, 0]))
    ahead = draw(st.sampled_from([2, SRC_AHEAD, 1, 3, 0])) if workers else 0
    s["src_workers"], s["src_ahead"] = workers, ahead
    s["kind"] = "step" if workers else draw(st.sampled_from(["step", "inproc"]))
    s["changes"] = [(m, max(step, m + ahead) if m else step, w) for m, step, w in s["changes"]]
    # Changes made right after loading, before the run has produced anything: (offset from the
    # state's step, or None: without step=, where one rank resumes; weights).
    now = st.lists(
        st.tuples(st.sampled_from([0, 1, 2, None, 3, 4, 5]), weight_vectors(s["k"])),
        min_size=1,
        max_size=3,
    )
    s["now1"] = draw(now)  # by the runs resuming the first checkpoint
    s["now2"] = draw(now)  # by the runs resuming the second (None: at its step)
    # Changes the first resumed run makes once it has consumed j_off steps, before the second
    # checkpoint: extra steps past the first step none of its iterators has started.
    mid = st.tuples(st.integers(1, 3), st.integers(0, 2), weight_vectors(s["k"]))
    s["mid"] = draw(st.lists(mid, max_size=2))
    # The second checkpoint this far past the first (None: at checkpoint2), often before the
    # resumed run has consumed anything or while it is still below the first state's floor;
    # the in-process iterator's state, the one worker's, or state_dict(step=).
    s["c2_offset"] = draw(st.sampled_from([0, 0, 1, 2, 3, None]))
    s["kind2"] = kind2 = draw(st.sampled_from(["step", "step", "inproc", "worker"]))
    if kind2 != "step":
        s["res_workers"], s["res_ahead"] = int(kind2 == "worker"), 0
    s["res2_world"] = draw(st.sampled_from([w for w in (1, 2, 3) if s["global"] % w == 0]))
    return s


def make_now(ds, now, single):
    """Changes ``(step, weights, timed)`` made right after loading a state; timed ones without
    step= where ``single`` (they must land at ``step``, the state's floor)."""
    for step, w, timed in now:
        assert ds.set_weights(w, step=None if timed and single else step) == step, "set_weights"


def reference_run(corpora, s, schedule, total):
    ds = build(corpora, s, 0, 1, "ref")
    for step, w in schedule:
        ds.set_weights(w, step=step)
    return run(ds, 0, 0, 0, total, [])["samples"], ds


def check_below_floor(corpora, s):
    note(repr(s))
    total, g, c0 = s["total"], s["global"], s["checkpoint"]
    src_rank, src_world, res_world = s["src_rank"], s["src_world"], s["res_world"]
    # The source run makes the changes made before the checkpoint (some without step=) and runs
    # just past it, its workers prefetching.
    before = [
        (m, None if timed and src_world == 1 else step, w, timed)
        for (m, step, w), timed in zip(s["changes"], s["timed"], strict=True)
        if m < c0
    ]
    src = build(corpora, s, src_rank, src_world, "src")
    first = run(src, s["src_workers"], s["src_ahead"], 0, min(total, c0 + SRC_AHEAD + 1), before,
                s["kind"], c0, s["probes"])  # fmt: skip
    c = min(c0, len(first["samples"]) // (g // src_world))
    state = pickle.loads(first["saved"])
    floor = first["next_step"]  # (None: the source's workers had reached the stream's end)
    assert floor is None or floor == state["floor"] >= c
    schedule = [(first["applied"][i], w) for i, (_, _, w, _) in enumerate(before)
                if i in first["applied"]]  # fmt: skip
    # A stream that had ended at the state's step (every domain dropped, or one exhausted under
    # "stop") stays ended: no changes then (the base test's changes stop at the end too).
    late = first["late"]
    now1 = [] if state["finished"] else [
        (floor, w, True) if off is None and floor is not None else (c + (off or 0), w, False)
        for off, w in s["now1"]
    ]  # fmt: skip
    # Made later, each where the source run would have (step= at least MAX_AHEAD ahead), and
    # the resumed run's own, from the first step its iterators have not started (below the
    # floor too): they register at c (worker i as having started c + i - 1) and prefetch.
    later = [] if late else [(m, step, w, False) for m, step, w in s["changes"] if m >= c]
    n, ahead = max(1, s["res_workers"]), s["res_ahead"]
    mid = [] if late else [
        (c + j, max(c + n - 1, c + j + ahead) + extra, w, False) for j, extra, w in s["mid"]
    ]  # fmt: skip
    off = s["c2_offset"]
    c2 = c + off if off is not None else max(c, s["checkpoint2"])
    mid = sorted((ch for ch in mid if ch[0] < c2), key=lambda ch: ch[0])
    r1_changes = sorted(later + mid, key=lambda ch: ch[0])  # (in list order at one step)
    schedule1 = schedule + [(st_, w) for st_, w, _ in now1] + [ch[1:3] for ch in r1_changes]
    ref1, ref1_ds = reference_run(corpora, s, schedule1, total)
    steps = len(ref1) // g
    c2 = min(c2, steps)
    upto = c * (g // src_world)  # (its samples past c lack the resumed runs' changes)
    assert first["samples"][:upto] == rank_rows(ref1, s, src_rank, src_world, 0)[:upto], "source"

    # Resumed on every rank of res_world (changes between c and the floor first); rank 0
    # checkpoints again at c2 (state_dict(step=) calls on the way).
    per_rank, second, r1 = [], None, None
    for rank in range(res_world):
        ds = build(corpora, s, rank, res_world, "res")
        ds.load_state_dict(pickle.loads(first["saved"]))
        assert floor in (None, ds.next_step), "resumed: next_step"
        make_now(ds, now1, res_world == 1)
        got = run(ds, s["res_workers"], s["res_ahead"], c, total, r1_changes, s["kind2"],
                  c2 if rank == 0 else None, s["probes"] if rank == 0 else (),
                  refuse=rank == 0)  # fmt: skip
        per_rank.append(got["samples"])
        if rank == 0:
            second, r1 = got, ds
            assert ds.exhausted_at == ref1_ds.exhausted_at, "resumed: exhausted_at"
    assert interleave(per_rank, s) == ref1[c * g :], "resumed"
    if second["copy"] is not None:  # an in-process deepcopy at c2 continues from there
        got = run(second["copy"], 0, 0, c2, total, [ch for ch in r1_changes if ch[0] >= c2])
        assert got["samples"] == rank_rows(ref1, s, 0, res_world, c2), "copy"

    # The second checkpoint: resumed on every rank of res2_world, which first make changes from
    # c2 on (below its floor too), and rolled back into the dataset that saved it, which makes
    # them too.  Against a run that made them after the changes made before the checkpoint.
    assert not second["late"]
    ended = pickle.loads(second["saved"])["finished"]
    now2 = [] if ended else [(c2 + (off or 0), w, False) for off, w in s["now2"]]
    later2 = [ch for ch in r1_changes if ch[0] >= c2]
    schedule2 = (
        schedule
        + [(st_, w) for st_, w, _ in now1]
        + [ch[1:3] for ch in r1_changes if ch[0] < c2]
        + [(st_, w) for st_, w, _ in now2]
        + [ch[1:3] for ch in later2]
    )
    ref2 = reference_run(corpora, s, schedule2, total)[0] if now2 else ref1
    per_rank = []
    for rank in range(s["res2_world"]):
        ds = build(corpora, s, rank, s["res2_world"], "res2")
        ds.load_state_dict(pickle.loads(second["saved"]))
        if s["kind2"] != "worker":  # (a worker's own state holds neither, nor the floor)
            assert ds.weights.tolist() == second["weights"], "resumed again: weights"
            assert second["next_step"] in (None, ds.next_step), "resumed again: next_step"
        make_now(ds, now2, False)
        got = run(ds, s["res2_workers"], s["res2_ahead"], c2, total, later2)
        per_rank.append(got["samples"])
    assert interleave(per_rank, s) == ref2[c2 * g :], "resumed from the second checkpoint"
    r1.load_state_dict(pickle.loads(second["saved"]))
    make_now(r1, now2, False)
    got = run(r1, s["rb_workers"], s["rb_ahead"], c2, total, later2)
    assert got["samples"] == rank_rows(ref2, s, 0, res_world, c2), "second rollback"

    # The source dataset rolled back to the first checkpoint makes the same changes (those
    # made mid-way with as many workers as the resumed run, which reached those steps then).
    src.load_state_dict(pickle.loads(first["saved"]))
    assert floor in (None, src.next_step), "rolled back: next_step"
    make_now(src, now1, src_world == 1)
    workers, ahead = (s["res_workers"], s["res_ahead"]) if mid else (s["rb_workers"], s["rb_ahead"])
    got = run(src, workers, ahead, c, total, r1_changes, probes=s["probes"])
    assert got["samples"] == rank_rows(ref1, s, src_rank, src_world, c), "rolled back"
    assert src.exhausted_at == ref1_ds.exhausted_at, "rolled back: exhausted_at"


@BELOW_FLOOR
@given(s=below_floor_scenarios())
def test_changes_below_a_loaded_floor_give_the_uninterrupted_stream(corpora, s):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # domains dropped at their cap
        check_below_floor(corpora, s)
