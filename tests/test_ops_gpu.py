"""GPU tests (skipped without CUDA): the cuda and triton backends against torch, no host sync in
step(), torch.compile, CUDA-graph capture and replay."""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from ops_helpers import make_batch

import fastmix
from fastmix.ops import resolve_backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

BACKENDS = ["cuda", "triton"]


make = partial(make_batch, device="cuda")


def need(backend: str) -> None:
    try:
        resolve_backend(backend, torch.device("cuda"))
    except RuntimeError as exc:
        pytest.skip(str(exc))


SHAPES = [((1,), 1, False), ((4097,), 3, False), ((3, 4097), 8, True), ((64, 2048), 22, True),
          ((7, 333), 22, False), ((50001,), 256, False), ((9, 500), 512, True),
          ((16, 1000), 1024, True), ((0,), 5, False)]  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,k,per_sequence", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("deterministic", [False, True])
def test_stats_match_torch(backend, shape, k, per_sequence, dtype, deterministic):
    need(backend)
    for seed, (with_mask, with_ref, id_dtype) in enumerate(
        [(True, True, torch.int64), (False, False, torch.int32)]
    ):
        loss, domain, ref, mask = make(seed, shape, k, dtype, per_sequence, id_dtype, with_mask,
                                       with_ref)  # fmt: skip
        got = fastmix.domain_loss_stats(loss, domain, k, ref_loss=ref, mask=mask,
                                        backend=backend, deterministic=deterministic)  # fmt: skip
        want = fastmix.domain_loss_stats(loss, domain, k, ref_loss=ref, mask=mask,
                                         backend="torch", deterministic=True)  # fmt: skip
        assert torch.equal(got[0], want[0])
        torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-3)


_FIRST_LAUNCH_AT_512 = """
import torch, fastmix
from ops_helpers import make_batch
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for id_dtype in (torch.int32, torch.int64):
        loss, domain, ref, mask = make_batch(0, (9, 500), 512, dtype, True, id_dtype,
                                             device="cuda")
        got = fastmix.domain_loss_stats(loss, domain, 512, ref_loss=ref, mask=mask,
                                        backend="cuda")
        want = fastmix.domain_loss_stats(loss, domain, 512, ref_loss=ref, mask=mask,
                                         backend="torch")
        torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-3)
print("OK")
"""


def test_cuda_kernels_launch_first_at_exactly_48_kib_of_shared_memory():
    # K = 512 asks for 8 x 3 x 512 floats = 48 KiB of dynamic shared memory; with the kernel's
    # static shared memory that is over the default limit, so it needs the opt-in attribute too
    # (it was set only above 48 KiB: the launch failed).  A fresh process, so no earlier launch
    # with a larger K has raised the limit of these kernel instances already.
    need("cuda")
    here = str(Path(__file__).resolve().parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [here, *filter(None, [os.environ.get("PYTHONPATH")])])}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", _FIRST_LAUNCH_AT_512], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_is_bitwise_repeatable(backend):
    need(backend)
    loss, domain, ref, mask = make(1, (512, 2048), 22, per_sequence=True)
    runs = [
        fastmix.domain_loss_stats(loss, domain, 22, ref_loss=ref, mask=mask, backend=backend,
                                  deterministic=True)  # fmt: skip
        for _ in range(3)
    ]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
def test_out_of_range_ids_counted_on_device(backend):
    need(backend)
    mixer = fastmix.DoReMi(4, backend=backend, device="cuda")
    loss, domain, ref, mask = make(2, (6000,), 4, with_mask=False)
    domain[::3] = 7  # 2000 bad ids: no ValueError on GPU (that would need a sync)
    mixer.step(loss, ref, domain)
    assert int(mixer.num_out_of_range) == 2000
    with pytest.raises(ValueError, match="2000 token"):
        mixer.check()
    strict = fastmix.DoReMi(4, backend=backend, device="cuda", debug=True)
    with pytest.raises(ValueError, match="outside"):
        strict.step(loss, ref, domain)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("proxy", ["dro", "reweighted"])
@pytest.mark.parametrize("k,deterministic", [(1, False), (8, True), (22, False), (256, True)])
def test_doremi_matches_torch(backend, proxy, k, deterministic):
    need(backend)
    kwargs = dict(step_size=0.8, smoothing=0.02, proxy_loss=proxy, device="cuda")
    fast = fastmix.DoReMi(k, backend=backend, deterministic=deterministic, **kwargs)
    slow = fastmix.DoReMi(k, backend="torch", **kwargs)
    for seed in range(5):
        loss, domain, ref, mask = make(seed, (32, 257), k, dtype=torch.bfloat16,
                                       per_sequence=seed % 2 == 0)  # fmt: skip
        if seed == 3:
            loss[0, 0], mask[0, 0] = float("nan"), True
        a_loss = loss.clone().requires_grad_(True)
        b_loss = loss.clone().requires_grad_(True)
        a = fast.step(a_loss, ref, domain, mask)
        b = slow.step(b_loss, ref, domain, mask)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, equal_nan=True)
        a.backward()
        b.backward()
        torch.testing.assert_close(a_loss.grad, b_loss.grad)
        for name in ("weights", "excess", "average_weights"):
            torch.testing.assert_close(getattr(fast, name), getattr(slow, name), rtol=1e-5,
                                       atol=1e-6)  # fmt: skip
    assert int(fast.num_skipped) == int(slow.num_skipped) == 1
    assert int(fast.num_updates) == int(slow.num_updates) == 4
    # the update-only kernel (accumulate + update) too
    for mixer in (fast, slow):
        for seed in (10, 11):
            loss, domain, ref, mask = make(seed, (8, 300), k)
            mixer.accumulate(loss, ref, domain, mask)
        mixer.update()
    torch.testing.assert_close(fast.weights, slow.weights, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
def test_step_makes_no_host_sync(backend):
    need(backend)
    mixer = fastmix.DoReMi(22, backend=backend, device="cuda")
    loss, domain, ref, mask = make(0, (16, 512), 22, per_sequence=True)
    loss.requires_grad_(True)
    mixer.step(loss, ref, domain, mask)  # warm-up: compiles kernels, allocates the workspace
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            objective = mixer.step(loss, ref, domain, mask)
        objective.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert int(mixer.num_updates) == 4


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
def test_compiled_step(backend):
    need(backend)
    eager = fastmix.DoReMi(8, backend=backend, device="cuda", proxy_loss="reweighted")
    compiled = fastmix.DoReMi(8, backend=backend, device="cuda", proxy_loss="reweighted")
    step = torch.compile(compiled.step, fullgraph=True)
    for seed in range(3):
        loss, domain, ref, mask = make(seed, (8, 129), 8, per_sequence=True)
        a_loss = loss.clone().requires_grad_(True)
        b_loss = loss.clone().requires_grad_(True)
        eager.step(a_loss, ref, domain, mask).backward()
        step(b_loss, ref, domain, mask).backward()
        torch.testing.assert_close(b_loss.grad, a_loss.grad)
    torch.testing.assert_close(compiled.weights, eager.weights)


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
@pytest.mark.parametrize("deterministic", [False, True])
# 512: 48 KiB of dynamic shared memory plus the static (opt-in); 1024: 96 KiB
@pytest.mark.parametrize("k", [22, 512, 1024])
def test_cuda_graph_capture_and_replay(backend, deterministic, k):
    need(backend)
    mixer = fastmix.DoReMi(k, backend=backend, device="cuda", deterministic=deterministic)
    oracle = fastmix.DoReMi(k, backend="torch", device="cuda")
    loss, domain, ref, mask = make(0, (16, 300), k, per_sequence=True)
    static = [t.clone() for t in (loss, ref, domain, mask)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph (kernel compilation, workspace)
        mixer.step(*static)
    torch.cuda.current_stream().wait_stream(side)
    oracle.step(loss, ref, domain, mask)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        objective = mixer.step(*static)
    for seed in range(1, 4):
        loss, domain, ref, mask = make(seed, (16, 300), k, per_sequence=True)
        for dst, src in zip(static, (loss, ref, domain, mask), strict=True):
            dst.copy_(src)
        graph.replay()
        want = oracle.step(loss, ref, domain, mask)
        torch.testing.assert_close(objective, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mixer.weights, oracle.weights, rtol=1e-5, atol=1e-7)
    assert int(mixer.num_updates) == 4


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
def test_odm_step_in_a_cuda_graph_follows_the_step_count(backend):
    # t is a device counter: each replay must take the next step's warm-up and exploration
    # share (a host count would be frozen into the graph at its captured value).
    need(backend)
    mixer = fastmix.ODM(22, warmup_steps=2, backend=backend, device="cuda")
    oracle = fastmix.ODM(22, warmup_steps=2, backend="torch", device="cuda")
    loss, domain, _, mask = make(0, (16, 300), 22, per_sequence=True)
    static = [t.clone() for t in (loss, domain, mask)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph (kernel compilation)
        mixer.step(*static)
    torch.cuda.current_stream().wait_stream(side)
    oracle.step(loss, domain, mask)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        weights = mixer.step(*static)
    for seed in range(1, 6):  # steps 2..6: the last warm-up step, then ε_t falls
        loss, domain, _, mask = make(seed, (16, 300), 22, per_sequence=True)
        for dst, src in zip(static, (loss, domain, mask), strict=True):
            dst.copy_(src)
        torch.cuda.set_sync_debug_mode("error")
        try:
            graph.replay()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        want = oracle.step(loss, domain, mask)
        torch.testing.assert_close(weights, want, rtol=1e-5, atol=1e-7)
    # the warm-up ran one step, the capture none (it records), the replays five
    assert mixer.num_steps == oracle.num_steps == 6


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", BACKENDS)
def test_tensors_on_another_device_than_the_current_one(backend):
    # Triton launches on the current device unless told otherwise: the backends switch to the
    # tensors' device (a launch on device 0 with device-1 pointers faults or races).
    need(backend)
    other = torch.device("cuda", 1)
    with torch.cuda.device(0):
        kwargs = dict(step_size=0.8, smoothing=0.02, device=other)
        fast = fastmix.DoReMi(22, backend=backend, **kwargs)
        slow = fastmix.DoReMi(22, backend="torch", **kwargs)
        loss, domain, ref, mask = make_batch(0, (8, 257), 22, device=other)
        stats = fastmix.domain_loss_stats(loss, domain, 22, ref_loss=ref, mask=mask,
                                          backend=backend)  # fmt: skip
        expected = fastmix.domain_loss_stats(loss, domain, 22, ref_loss=ref, mask=mask,
                                             backend="torch")  # fmt: skip
        torch.testing.assert_close(stats, expected, rtol=1e-5, atol=1e-4)
        a, b = fast.step(loss, ref, domain, mask), slow.step(loss, ref, domain, mask)
        torch.cuda.synchronize(other)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast.weights, slow.weights, rtol=1e-5, atol=1e-6)
