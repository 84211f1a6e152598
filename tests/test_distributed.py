"""DoReMi across gloo ranks on CPU: every rank ends with the same α, that of one process; the
cross-rank consistency checks of DoReMi, ODM and MixtureDataset."""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import os
import pickle
import socket
import sys
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from fastmix import distributed as fdist
from fastmix.data import MixtureDataset, TokenCorpus
from fastmix.mixers.doremi import DoReMi
from fastmix.mixers.odm import ODM

K = 5
STEPS = 3
ROWS_PER_RANK = 3
SEQ = 17


def global_batch(step: int, world: int):
    g = torch.Generator().manual_seed(1000 + step)
    rows = ROWS_PER_RANK * world
    loss = torch.rand(rows, SEQ, generator=g) * 4
    ref = torch.rand(rows, SEQ, generator=g) * 4
    domain = torch.randint(0, K, (rows,), generator=g)
    mask = torch.rand(rows, SEQ, generator=g) > 0.25
    return loss, ref, domain, mask


def shard(tensors, rank):
    lo, hi = rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK
    return [t[lo:hi] for t in tensors]


def run_mixer(world: int, rank: int | None, accumulate: bool, group=None) -> DoReMi:
    mixer = DoReMi(K, step_size=0.7, smoothing=0.01, process_group=group)
    for step in range(STEPS):
        batch = global_batch(step, world)
        if rank is not None:
            batch = shard(batch, rank)
        if accumulate:  # two micro-batches per update
            half = batch[0].shape[0] // 2 + 1
            mixer.accumulate(*[t[:half] for t in batch])
            mixer.accumulate(*[t[half:] for t in batch])
            mixer.update()
        else:
            mixer.step(*batch)
    return mixer


@contextlib.contextmanager
def gloo_rank(rank: int, world: int, port: int) -> Iterator[None]:
    """One spawned rank of a gloo group on this host.  At the end every rank waits for the
    others, and none calls destroy_process_group (with torch 2.4 a rank could hang in it once
    rank 0, which hosts the store, had exited); the process's exit frees the group."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        yield
    finally:
        dist.barrier()
    # Done, results on disk: leave without the interpreter's finalisation.  One CI run lost a
    # rank there to SIGABRT after its work was done, failing the test.  (A core of a spawned
    # DataLoader worker dying the same way showed the mechanism: CPython up to 3.13 ends a daemon
    # thread still inside a torch C++ call with a forced unwind, "terminate called without an
    # active exception".)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def worker(rank: int, world: int, port: int, out_dir: str, accumulate: bool, explicit: bool):
    with gloo_rank(rank, world, port):
        group = dist.new_group(list(range(world))) if explicit else None
        mixer = run_mixer(world, rank, accumulate, group)
        torch.save(mixer.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))


def nonmember_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    with gloo_rank(rank, world, port):
        group = dist.new_group([0])  # every rank must call new_group; only rank 0 is in it
        mixer = DoReMi(K, process_group=group)
        try:
            mixer.step(*global_batch(0, 1))
            message = "ok"
        except ValueError as exc:
            message = str(exc)
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(message)


def make_corpus(root: str, tokens_b: int) -> TokenCorpus:
    os.makedirs(root, exist_ok=True)
    files = {}
    for name, n in (("a", 400), ("b", tokens_b)):
        path = os.path.join(root, f"{name}.bin")
        np.arange(n, dtype=np.uint16).tofile(path)
        files[name] = [path]
    return TokenCorpus(files, dtype="uint16")


def check_scenarios(rank: int, out_dir: str) -> dict[str, str]:
    """Each scenario on every rank: "ok", or the ValueError's message."""
    other = rank == 1  # the rank that differs, where a scenario makes one differ

    def dataset(**changes):
        short = changes.pop("short_file", False) and other
        corpus = make_corpus(os.path.join(out_dir, f"corpus{rank}"), 300 if short else 500)
        kwargs = dict(seed=7, batch_size=2, rank=rank, world_size=2)
        kwargs.update(changes)
        return MixtureDataset(corpus, 16, [0.5, 0.5], **kwargs)

    def doremi_step(k: int) -> None:
        mixer = DoReMi(k, debug=True)
        loss, ref, domain, mask = shard(global_batch(0, 2), rank)
        mixer.step(loss, ref, domain % k, mask)

    def with_bad_id() -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """This rank's batch (loss, ref, domain, mask) and its ids with rank 1's first row out
        of range (rank 0's all valid)."""
        loss, ref, domain, mask = shard(global_batch(0, 2), rank)
        bad = domain.clone()
        if other:
            bad[0] = K
        return loss, ref, domain, mask, bad

    def then_good_step(run, good_step) -> str:
        """run()'s error (both ranks must raise), then a valid step that both ranks take."""
        try:
            run()
            first = "no error"
        except ValueError as exc:
            first = str(exc)
        return f"{first} | then {good_step()}"

    def doremi_bad_id(accumulate: bool) -> None:
        mixer = DoReMi(K)
        loss, ref, domain, mask, bad = with_bad_id()

        def run() -> None:
            if accumulate:
                mixer.accumulate(loss, ref, domain, mask)
                mixer.accumulate(loss, ref, bad, mask)
                mixer.update()
            else:
                mixer.step(loss, ref, bad, mask)

        def good_step() -> str:
            mixer.step(loss, ref, domain, mask)
            return f"{int(mixer.num_updates)} update(s), {int(mixer.num_out_of_range)} dropped"

        raise ValueError(then_good_step(run, good_step))

    def odm_bad_id() -> None:
        mixer = ODM(K)
        loss, _, domain, mask, bad = with_bad_id()

        def good_step() -> str:
            mixer.step(loss, domain, mask)
            return f"{mixer.num_steps} step(s)"

        raise ValueError(then_good_step(lambda: mixer.step(loss, bad, mask), good_step))

    def doremi_bad_id_compiled() -> None:
        # where bad ids are dropped and counted (GPU, torch.compile), the count is summed over
        # the ranks: debug mode raises on both at the same update
        mixer = DoReMi(K, debug=True)
        loss, ref, _, mask, bad = with_bad_id()
        torch.compile(mixer.step, backend="eager")(loss, ref, bad, mask)

    def changed(first_step: int, first_weights: list[float]) -> MixtureDataset:
        ds = dataset()
        ds.set_weights(first_weights, step=first_step)
        ds.set_weights([0.5, 0.5], step=6)  # the same latest weights on every rank
        return ds

    def resumed(batches: int) -> MixtureDataset:
        source = dataset()
        batch_iter = iter(source)
        for _ in range(batches):
            next(batch_iter)
        ds = dataset()
        ds.load_state_dict(source.state_dict())
        return ds

    scenarios = {
        "doremi same": lambda: DoReMi(K, step_size=0.5).check_ranks(),
        "doremi step_size": lambda: DoReMi(K, step_size=0.5 + other).check_ranks(),
        "doremi init_weights": lambda: DoReMi(
            K, init_weights=[1.0 + other] + [1.0] * (K - 1)
        ).check_ranks(),
        "doremi debug K": lambda: doremi_step(K + other),
        "doremi debug same": lambda: doremi_step(K),
        "doremi bad id step": lambda: doremi_bad_id(False),
        "doremi bad id accumulate": lambda: doremi_bad_id(True),
        "doremi bad id compiled": doremi_bad_id_compiled,
        "odm bad id": odm_bad_id,
        "odm same": lambda: ODM(K).check_ranks(),
        "odm smoothing": lambda: ODM(K, smoothing=0.9 - 0.1 * other).check_ranks(),
        "dataset same": lambda: dataset().check_ranks(),
        "dataset seed": lambda: dataset(seed=7 + rank).check_ranks(),
        "dataset corpus": lambda: dataset(short_file=True).check_ranks(),
        "dataset resumed same": lambda: resumed(2).check_ranks(),
        "dataset resumed apart": lambda: resumed(2 + other).check_ranks(),
        "dataset changes same": lambda: changed(3, [0.25, 0.75]).check_ranks(),
        "dataset change step apart": lambda: changed(3 + other, [0.25, 0.75]).check_ranks(),
        "dataset change weights apart": lambda: changed(3, [0.25 + other, 0.75]).check_ranks(),
        "dataset rank": lambda: dataset(rank=0).check_ranks(),
        "dataset world_size": lambda: dataset(world_size=3).check_ranks(),
        # the public helper: another dict order, sets (whose order follows each process's hash
        # seed), and a bfloat16 tensor on one rank only (same verdict on both, no hang)
        "fields order": lambda: fdist.check_ranks_agree(
            "Thing", {"a": 1, "b": 2} if other else {"b": 2, "a": 1}, dist.group.WORLD
        ),
        "fields set": lambda: fdist.check_ranks_agree(
            "Thing", {"s": {"alpha", "beta", "gamma", "delta", "epsilon"}}, dist.group.WORLD
        ),
        "fields bf16": lambda: fdist.check_ranks_agree(
            "Thing", {"w": torch.ones(3, dtype=torch.bfloat16 if other else torch.float32)},
            dist.group.WORLD,
        ),
    }
    results = {}
    for name, run in scenarios.items():
        try:
            run()
            results[name] = "ok"
        except ValueError as exc:
            results[name] = str(exc)
    return results


def check_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    with gloo_rank(rank, world, port):
        results = check_scenarios(rank, out_dir)
        with open(os.path.join(out_dir, f"checks{rank}.json"), "w") as f:
            json.dump(results, f)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, out_dir: str, accumulate: bool, explicit: bool, timeout_s: float = 120,
           target=worker):  # fmt: skip
    extra = (accumulate, explicit) if target is worker else ()
    context = mp.start_processes(
        target,
        args=(world, free_port(), out_dir, *extra),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            pytest.fail(f"{world} gloo ranks did not finish within {timeout_s} s")


@pytest.mark.parametrize(
    "world,accumulate,explicit", [(2, False, False), (4, True, True)]
)
def test_ranks_agree_with_one_process(tmp_path, world, accumulate, explicit):
    launch(world, str(tmp_path), accumulate, explicit)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for state in states[1:]:  # every rank holds the same bits
        for key in ("weights", "excess", "average_weights", "num_updates"):
            assert torch.equal(state[key], states[0][key]), key
    single = run_mixer(world, None, accumulate=False)
    torch.testing.assert_close(states[0]["weights"], single.weights, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(states[0]["excess"], single.excess, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        states[0]["average_weights"], single.average_weights, rtol=1e-6, atol=1e-7
    )
    assert int(states[0]["num_updates"]) == STEPS
    # the weights moved away from uniform, so the comparison above is not vacuous
    assert float((single.weights - 1 / K).abs().max()) > 1e-3


def test_process_group_without_init_is_rejected():
    mixer = DoReMi(2, process_group=object())
    with pytest.raises(ValueError, match="process_group was given"):
        mixer.step(torch.ones(2), torch.zeros(2), torch.tensor([0, 1]))


def test_process_group_of_another_type_is_rejected(tmp_path):
    # With torch.distributed initialised, a str or an int reached torch's collectives:
    # AttributeError "'str' object has no attribute 'size'".
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)  # fmt: skip
    try:
        loss, ref, dom = torch.rand(2, 3), torch.rand(2, 3), torch.tensor([0, 1])
        calls = [
            lambda group: DoReMi(3, process_group=group).step(loss, ref, dom),
            lambda group: DoReMi(3, process_group=group).check_ranks(),
            lambda group: ODM(3, process_group=group).step(loss, dom),
            lambda group: ODM(3, process_group=group).check_ranks(),
            lambda group: MixtureDataset(make_corpus(str(tmp_path), 500), 16, [0.5, 0.5])
            .check_ranks(group),
        ]  # fmt: skip
        for call in calls:
            for group in ("world", 0, object()):
                with pytest.raises(TypeError, match="process_group must be a torch.distributed"
                                                    r"\.ProcessGroup .*, got "):  # fmt: skip
                    call(group)
        # a real group still works, and so does a pickled mixer's marker message
        group = dist.new_group([0])
        DoReMi(3, process_group=group).step(loss, ref, dom)
        ODM(3, process_group=dist.group.WORLD).step(loss, dom)
        with pytest.raises(ValueError, match="set its .process_group again"):
            pickle.loads(pickle.dumps(ODM(3, process_group=_Unpicklable()))).step(loss, dom)
    finally:
        dist.destroy_process_group()


class _Unpicklable:
    """Like a torch.distributed ProcessGroup: no pickling."""

    def __reduce__(self):
        raise TypeError("cannot pickle 'ProcessGroup' object")


def _odm_step(mixer: ODM) -> Tensor:
    return mixer.step(torch.ones(2, 3), torch.tensor([0, 1]))


def _doremi_step(mixer: DoReMi) -> Tensor:
    return mixer.step(torch.ones(2, 3), torch.zeros(2, 3), torch.tensor([0, 1]))


@pytest.mark.parametrize("cls,step", [(DoReMi, _doremi_step), (ODM, _odm_step)])
def test_a_mixer_with_a_process_group_copies_and_pickles(cls, step):
    group = _Unpicklable()
    mixer = cls(K, process_group=group)
    twin = copy.deepcopy(mixer)  # shares the group, copies the rest
    assert twin.process_group is group
    assert twin.weights is not mixer.weights and torch.equal(twin.weights, mixer.weights)
    restored = pickle.loads(pickle.dumps(mixer))  # the group cannot travel: asked for again
    with pytest.raises(ValueError, match="set its .process_group again"):
        step(restored)
    restored.process_group = None
    expected = step(cls(K))
    torch.testing.assert_close(step(restored), expected, rtol=0, atol=0)


def test_a_rank_outside_the_process_group_is_told_so(tmp_path):
    launch(2, str(tmp_path), False, False, target=nonmember_worker)
    assert (tmp_path / "rank0.txt").read_text() == "ok"
    assert "does not include this rank (1)" in (tmp_path / "rank1.txt").read_text()


def test_check_ranks_names_what_differs_on_every_rank(tmp_path):
    # Every scenario runs on both ranks in turn: a check that raised on one rank only would leave
    # the other waiting in the next scenario's collective (the launch's timeout).
    launch(2, str(tmp_path), False, False, target=check_worker)
    results = [json.loads((tmp_path / f"checks{r}.json").read_text()) for r in range(2)]
    assert results[0] == results[1]  # the same verdict and message on both ranks
    got = results[0]
    bad_tokens = int(shard(global_batch(0, 2), 1)[3][0].sum())
    for name in ("doremi same", "doremi debug same", "odm same", "dataset same",
                 "dataset resumed same", "dataset changes same", "fields order", "fields set"):
        assert got[name] == "ok", (name, got[name])
    expected = {
        "doremi step_size": "DoReMi is not the same on the 2 ranks of its process group: "
        "they differ in step_size",
        "doremi init_weights": "they differ in weights, average_weights",
        "doremi debug K": "they differ in num_domains, weights, excess, average_weights",
        "odm smoothing": "ODM is not the same on the 2 ranks of its process group: they differ "
        "in smoothing",
        "dataset seed": "MixtureDataset is not the same on the 2 ranks of its process group: "
        "they differ in seed",
        "dataset corpus": "they differ in corpus files",
        "dataset resumed apart": "they differ in resume point",
        "dataset change step apart": "they differ in set_weights changes",
        "dataset change weights apart": "they differ in set_weights changes",
        "dataset rank": "rank(s) [1] are taken by no process",
        "dataset world_size": "world_size=3, but the group has 2 ranks",
        "fields bf16": "Thing is not the same on the 2 ranks of its process group: they differ "
        "in w",
        # raised on both ranks (rank 0's ids were all valid), nothing updated, and both ranks
        # then took the next step together; the count is rank 1's unmasked tokens of row 0
        "doremi bad id step": f"domain ids must be in [0, num_domains={K}) on unmasked tokens; "
        f"found {bad_tokens} outside across the 2 ranks; nothing was updated | then 1 update(s), "
        "0 dropped",
        "doremi bad id accumulate": f"found {bad_tokens} outside across the 2 ranks; the pending "
        "micro-batches were discarded | then 1 update(s), 0 dropped",
        "doremi bad id compiled": f"{bad_tokens} token(s) had a domain id outside [0, "
        f"num_domains={K}); they were dropped from the statistics",
        "odm bad id": f"found {bad_tokens} outside across the 2 ranks; nothing was updated | "
        "then 1 step(s)",
    }
    for name, text in expected.items():
        assert text in got[name], (name, got[name])


def test_check_ranks_in_one_process(tmp_path):
    DoReMi(K).check_ranks()  # nothing to compare with: no error
    ODM(K).check_ranks()
    corpus = make_corpus(str(tmp_path), 500)
    MixtureDataset(corpus, 16, [0.5, 0.5]).check_ranks()
    two = MixtureDataset(corpus, 16, [0.5, 0.5], rank=1, world_size=2)
    with pytest.raises(ValueError, match="world_size=2 but torch.distributed is not initialised"):
        two.check_ranks()


def test_fingerprints_see_every_element():
    a = np.arange(5000, dtype=np.int64)
    b = a.copy()
    b[2500] += 1  # in the middle, where numpy's repr would print "..."
    assert fdist._fingerprint(a) == fdist._fingerprint(a.copy())
    assert fdist._fingerprint(a) != fdist._fingerprint(b)
    assert fdist._fingerprint(([a], "x")) != fdist._fingerprint(([b], "x"))
    assert fdist._fingerprint(torch.tensor([1.0, 2.0])) == fdist._fingerprint(
        np.array([1.0, 2.0], np.float32)
    )
    assert fdist._fingerprint(a.astype(np.int32)) != fdist._fingerprint(a)  # dtype counts
    assert fdist._fingerprint([1, 2]) != fdist._fingerprint((1, 2))
    # mappings by sorted key, so insertion order does not matter; values with numpy scalars work
    assert fdist._fingerprint({"a": 1, "b": [a]}) == fdist._fingerprint({"b": [a], "a": 1})
    assert fdist._fingerprint({"a": np.int64(1)}) != fdist._fingerprint({"a": np.int64(2)})
    assert fdist._fingerprint([np.int64(3), np.float64(0.5)]) == fdist._fingerprint([3, 0.5])
    assert 0 <= fdist._fingerprint("anything") < 2**62
    # dtypes numpy lacks digest by their bytes; sets by their elements' digests, in any order
    bf16 = torch.tensor([1.0, 2.5], dtype=torch.bfloat16)
    assert fdist._fingerprint(bf16) == fdist._fingerprint(bf16.clone())
    assert fdist._fingerprint(bf16) != fdist._fingerprint(bf16.float())
    assert fdist._fingerprint(torch.tensor(1.0, dtype=torch.bfloat16)) != fdist._fingerprint(bf16)
    assert fdist._fingerprint({3, 1, 2}) == fdist._fingerprint({1, 2, 3})
    assert fdist._fingerprint({1, 2}) != fdist._fingerprint([1, 2])
    with pytest.raises(ValueError, match="needs torch.distributed initialised"):
        fdist.check_ranks_agree("Thing", {"a": 1}, None)
