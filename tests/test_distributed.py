"""DoReMi across gloo ranks on CPU: every rank ends with the same α, that of one process."""

from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastmix.mixers.doremi import DoReMi

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


def worker(rank: int, world: int, port: int, out_dir: str, accumulate: bool, explicit: bool):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        group = dist.new_group(list(range(world))) if explicit else None
        mixer = run_mixer(world, rank, accumulate, group)
        torch.save(mixer.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def nonmember_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        group = dist.new_group([0])  # every rank must call new_group; only rank 0 is in it
        mixer = DoReMi(K, process_group=group)
        try:
            mixer.step(*global_batch(0, 1))
            message = "ok"
        except ValueError as exc:
            message = str(exc)
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(message)
    finally:
        dist.destroy_process_group()


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


def test_a_rank_outside_the_process_group_is_told_so(tmp_path):
    launch(2, str(tmp_path), False, False, target=nonmember_worker)
    assert (tmp_path / "rank0.txt").read_text() == "ok"
    assert "does not include this rank (1)" in (tmp_path / "rank1.txt").read_text()
