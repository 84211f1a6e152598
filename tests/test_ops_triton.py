"""Triton kernels against the torch backend (on CPU through TRITON_INTERPRET=1, see conftest)."""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial

import pytest
import torch
from ops_helpers import make_batch

import fastmix
from fastmix.ops import reference

pytest.importorskip("triton")
from fastmix.ops import triton as triton_ops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_runs, _why_not = triton_ops.can_run(torch.device(DEVICE))
if not _runs:
    pytest.skip(f"triton cannot run here: {_why_not}", allow_module_level=True)

make = partial(make_batch, device=DEVICE)


SHAPES = [((1,), 1, False), ((999,), 3, False), ((7, 129), 22, True), ((5, 67), 8, False),
          ((2049,), 256, False), ((3, 301), 200, True), ((0,), 5, False)]  # fmt: skip


@pytest.mark.parametrize("shape,k,per_sequence", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("deterministic", [False, True])
def test_stats_match_torch(shape, k, per_sequence, dtype, deterministic):
    for seed, (with_mask, with_ref, id_dtype) in enumerate(
        [(True, True, torch.int64), (False, False, torch.int32)]
    ):
        loss, domain, ref, mask = make(seed, shape, k, dtype, per_sequence, id_dtype, with_mask,
                                       with_ref)  # fmt: skip
        got = fastmix.domain_loss_stats(
            loss, domain, k, ref_loss=ref, mask=mask, backend="triton", deterministic=deterministic
        )
        want = fastmix.domain_loss_stats(loss, domain, k, ref_loss=ref, mask=mask, backend="torch")
        assert torch.equal(got[0], want[0])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_deterministic_stats_are_bitwise_repeatable():
    loss, domain, ref, mask = make(3, (3001,), 7)
    runs = [
        triton_ops.domain_stats(loss, domain, mask, ref, 7, deterministic=True)[0]
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])


def test_out_of_range_ids_are_counted_not_written():
    loss = torch.ones(300, device=DEVICE)
    domain = torch.arange(300, device=DEVICE) % 7 - 2  # ids -2 .. 4 with K = 3
    mask = torch.ones(300, dtype=torch.bool, device=DEVICE)
    mask[:7] = False
    for deterministic in (False, True):
        stats, oob = triton_ops.domain_stats(loss, domain, mask, None, 3, deterministic)
        want_stats, want_oob = reference.domain_stats(loss, domain, mask, None, 3)
        assert int(oob) == int(want_oob) == 167  # 4 of every 7 ids, first 7 masked
        torch.testing.assert_close(stats, want_stats)


def test_nan_follows_the_torch_backend():
    loss = torch.tensor([1.0, float("nan"), 2.0, float("inf"), 3.0], device=DEVICE)
    domain = torch.tensor([0, 0, 1, 1, 2], device=DEVICE)
    mask = torch.tensor([True, False, True, True, True], device=DEVICE)
    ref = torch.zeros(5, device=DEVICE)
    got = fastmix.domain_loss_stats(loss, domain, 3, ref_loss=ref, mask=mask, backend="triton")
    want = fastmix.domain_loss_stats(loss, domain, 3, ref_loss=ref, mask=mask, backend="torch")
    torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # the skipped NaN batch, K = 1
@pytest.mark.parametrize("proxy", ["dro", "reweighted"])
@pytest.mark.parametrize("k,deterministic", [(1, False), (5, True), (22, False), (256, True)])
def test_doremi_matches_torch_backend(proxy, k, deterministic):
    kwargs = dict(step_size=0.8, smoothing=0.02, proxy_loss=proxy, deterministic=deterministic)
    fast = fastmix.DoReMi(k, backend="triton", device=DEVICE, **kwargs)
    slow = fastmix.DoReMi(k, backend="torch", device=DEVICE, **kwargs)
    for seed in range(4):
        loss, domain, ref, mask = make(seed, (6, 77), k, per_sequence=seed % 2 == 1)
        if seed == 2:  # a poisoned batch: skipped and counted on both
            loss[0, 0], mask[0, 0] = float("nan"), True
        a_loss = loss.clone().requires_grad_(True)
        b_loss = loss.clone().requires_grad_(True)
        a = fast.step(a_loss, ref, domain, mask)
        b = slow.step(b_loss, ref, domain, mask)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)
        a.backward()
        b.backward()
        torch.testing.assert_close(a_loss.grad, b_loss.grad, rtol=1e-5, atol=1e-8)
        for name in ("weights", "excess", "average_weights"):
            torch.testing.assert_close(getattr(fast, name), getattr(slow, name), rtol=1e-5,
                                       atol=1e-7)  # fmt: skip
    assert int(fast.num_skipped) == int(slow.num_skipped) == 1
    assert int(fast.num_updates) == int(slow.num_updates) == 3


def test_fused_step_counts_out_of_range_and_reuses_its_workspace():
    k = 4
    mixer = fastmix.DoReMi(k, backend="triton", device=DEVICE)
    loss, domain, ref, _ = make(0, (500,), k)
    domain[::10] = 9  # 50 bad ids, bypassing the CPU check to exercise the kernel's counter
    state = mixer._state
    torch.ops.fastmix.doremi_step_(loss, domain, None, ref, state, mixer._counters,
                                   mixer._get_workspace("triton"), 1.0, 1e-3, "dro", "triton",
                                   False)  # fmt: skip
    assert int(mixer.num_out_of_range) == 50
    assert torch.all(mixer._get_workspace("triton") == 0)  # re-zeroed for the next step
    want = fastmix.DoReMi(k, backend="torch")
    keep = domain < k
    want.step(loss[keep], ref[keep], domain[keep])
    torch.testing.assert_close(mixer.weights, want.weights)


def test_update_from_accumulated_stats_matches_torch():
    k = 9
    fast = fastmix.DoReMi(k, backend="triton", device=DEVICE, proxy_loss="reweighted")
    slow = fastmix.DoReMi(k, backend="torch", device=DEVICE, proxy_loss="reweighted")
    for seed in range(3):
        batch = make(seed, (4, 50), k, per_sequence=True)
        loss, domain, ref, mask = batch
        fast.accumulate(loss, ref, domain, mask)
        slow.accumulate(loss, ref, domain, mask)
    fast.update()
    slow.update()
    torch.testing.assert_close(fast.weights, slow.weights)
    torch.testing.assert_close(fast.excess, slow.excess)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-without-interpreter error")
def test_forcing_triton_on_cpu_without_interpreter_raises():
    code = (
        "import torch, fastmix\n"
        "try:\n"
        "    fastmix.domain_loss_stats(torch.ones(3), torch.zeros(3, dtype=torch.int64), 2,"
        " backend='triton')\n"
        "except RuntimeError as exc:\n"
        "    print('RAISED', exc)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert "RAISED" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stderr


def test_opcheck_with_the_triton_backend():
    loss, domain, ref, mask = make(6, (4, 37), 5, per_sequence=True)
    loss.requires_grad_(True)
    torch.library.opcheck(
        torch.ops.fastmix.domain_stats.default, (loss, domain, mask, ref, 5, "triton", False)
    )
    mixer = fastmix.DoReMi(5, backend="triton", device=DEVICE)
    workspace = mixer._get_workspace("triton")
    torch.library.opcheck(
        torch.ops.fastmix.doremi_step_.default,
        (loss.detach(), domain, mask, ref, mixer._state, mixer._counters, workspace, 1.0, 1e-3,
         "dro", "triton", False),
    )  # fmt: skip
    stats = fastmix.domain_loss_stats(loss.detach(), domain, 5, ref_loss=ref, mask=mask)
    torch.library.opcheck(
        torch.ops.fastmix.doremi_update_.default,
        (stats, mixer._state, mixer._counters, 0.5, 0.01, "reweighted", "triton"),
    )


def test_gradients_from_inference_mode_tensors_match_torch():
    # ref_loss, ids and mask made under torch.inference_mode() cannot be saved for backward:
    # the op saves a `loss > ref_loss` mask (and normal copies of ids/mask) instead
    loss, domain, ref, mask = make(12, (3, 45), 6, per_sequence=True)
    with torch.inference_mode():
        i_ref, i_domain, i_mask = ref.clone(), domain.clone(), mask.clone()
    weight = torch.randn(3, 6, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    grads = []
    for backend, args in (("triton", (i_domain, i_ref, i_mask)), ("torch", (domain, ref, mask))):
        x = loss.clone().requires_grad_(True)
        stats = fastmix.domain_loss_stats(x, args[0], 6, ref_loss=args[1], mask=args[2],
                                          backend=backend)  # fmt: skip
        grads.append(torch.autograd.grad((stats * weight).sum(), x)[0])
    torch.testing.assert_close(grads[0], grads[1])
    assert bool((grads[0] != 0).any())


def test_compiled_step_with_a_forced_backend_matches_eager():
    # A forced (or automatically chosen GPU) backend is probed through importlib and the compiled
    # modules; under torch.compile(fullgraph=True) that probe must not break the graph.
    kwargs = dict(backend="triton", device=DEVICE, proxy_loss="reweighted")
    eager, compiled = fastmix.DoReMi(4, **kwargs), fastmix.DoReMi(4, **kwargs)
    step = torch.compile(compiled.step, fullgraph=True, backend="aot_eager")
    for seed in range(2):  # the first compiled call also allocates the workspace while tracing
        loss, domain, ref, mask = make(seed, (3, 40), 4, per_sequence=True)
        a_loss = loss.clone().requires_grad_(True)
        b_loss = loss.clone().requires_grad_(True)
        eager.step(a_loss, ref, domain, mask).backward()
        step(b_loss, ref, domain, mask).backward()
        torch.testing.assert_close(b_loss.grad, a_loss.grad)
    torch.testing.assert_close(compiled.weights, eager.weights)
    assert int(compiled.num_updates) == 2


def test_state_layout_is_checked_before_any_launch():
    # The kernels index state, counters and statistics by hand: strided views or other dtypes
    # would be read as garbage, so the launchers refuse them (as the CUDA backend does).
    k = 4
    state = torch.zeros(3, k, device=DEVICE)
    counters = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    stats = torch.ones(3, k, device=DEVICE)
    cases = [
        (torch.zeros(k, 3, device=DEVICE).t(), counters, stats, "state must be a contiguous"),
        (state.double(), counters, stats, "state must be a contiguous float32"),
        (state, torch.zeros(6, dtype=torch.int64, device=DEVICE)[::2], stats, "counters"),
        (state, counters, stats.double(), "stats must be float32"),
        (state, counters, torch.ones(3, k + 1, device=DEVICE), "stats must be float32"),
    ]
    for st, ct, sx, match in cases:
        with pytest.raises(ValueError, match=match):
            triton_ops.doremi_update_(sx, st, ct, 1.0, 0.01, "dro")
    assert torch.equal(state, torch.zeros(3, k, device=DEVICE))  # nothing was written
