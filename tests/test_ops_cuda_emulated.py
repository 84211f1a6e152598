"""The CUDA kernels of csrc/cuda/kernels.cu, run on the CPU through a small emulation of the CUDA
features they use (csrc/cuda/emulation/), against the torch backend.

Every CUDA thread is an OS thread and warp shuffles really exchange values between 32 threads, so
this checks the kernels' logic (warp aggregation, block partials, the last-block finisher, the
self-cleaning workspace, the predicated update) where no GPU exists.  It cannot check timing,
memory-model or compiler behaviour; the GPU tests do that.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from fastmix.ops import reference

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "csrc" / "cuda" / "emulation" / "harness.cpp"
CXX = shutil.which("g++") or shutil.which("c++")
pytestmark = pytest.mark.skipif(CXX is None or not HARNESS.exists(), reason="needs g++")

LOSS_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    exe = tmp_path_factory.mktemp("emulation") / "harness"
    subprocess.run(
        [CXX, "-std=c++17", "-O1", "-pthread", "-Wno-unknown-pragmas", str(HARNESS), "-o",
         str(exe)],
        check=True, timeout=300,
    )  # fmt: skip
    return exe


def raw(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def run(exe, tmp_path, mode, loss, domain, k, *, ref=None, mask=None, state=None,
        counters=None, stats=None, deterministic=False, repeats=1, step_size=1.0,
        smoothing=1e-3, dro=True):  # fmt: skip
    n = loss.numel()
    seq_len = loss.shape[1] if (domain.dim() == 1 and loss.dim() == 2) else 1
    if state is None:
        alpha = torch.full((k,), 1.0 / k)
        state = torch.stack([alpha, torch.zeros(k), alpha])
    counters = torch.zeros(3, dtype=torch.int64) if counters is None else counters
    header = np.array(
        [mode, n, max(seq_len, 1), k, LOSS_CODE[loss.dtype], 0 if domain.dtype == torch.int32
         else 1, ref is not None, mask is not None, deterministic, repeats], dtype=np.int64,
    )  # fmt: skip
    parts = [header.tobytes(), np.array([step_size, smoothing, float(dro)]).tobytes(), raw(loss)]
    parts += [raw(ref) if ref is not None else b"", raw(domain)]
    parts += [raw(mask.to(torch.uint8)) if mask is not None else b"", raw(state), raw(counters)]
    parts += [raw(stats) if stats is not None else b""]
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(b"".join(parts))
    subprocess.run([str(exe), str(src), str(dst)], check=True, timeout=300)
    data = dst.read_bytes()
    out, at = [], 0

    def take(dtype, count):
        nonlocal at
        arr = np.frombuffer(data, dtype=dtype, count=count, offset=at).copy()
        at += arr.nbytes
        return torch.from_numpy(arr)

    for _ in range(repeats):
        if mode == 0:
            out.append((take(np.float32, 3 * k).reshape(3, k), int(take(np.int64, 1)[0])))
        else:
            objective = take(np.float32, 1)[0]
            aux = take(np.float32, 4 * k).reshape(4, k)
            new_state = take(np.float32, 3 * k).reshape(3, k)
            out.append((objective, aux, new_state, take(np.int64, 3)))
    assert at == len(data)
    return out


def batch(seed, shape, k, dtype=torch.float32, per_sequence=False, id_dtype=torch.int64,
          bad_ids=0):  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    loss = (torch.rand(shape, generator=g) * 5).to(dtype)
    ref = (torch.rand(shape, generator=g) * 5).to(dtype)
    domain = torch.randint(0, k, shape[:1] if per_sequence else shape, generator=g)
    if bad_ids:
        domain.view(-1)[torch.randperm(domain.numel(), generator=g)[:bad_ids]] = k + 3
    mask = torch.rand(shape, generator=g) > 0.25
    return loss, domain.to(id_dtype), ref, mask


@pytest.mark.parametrize("deterministic", [False, True])
def test_stats_per_token_ids_with_bad_ids(harness, tmp_path, deterministic):
    loss, domain, ref, mask = batch(0, (2600,), 5, bad_ids=40)  # 2 blocks
    results = run(harness, tmp_path, 0, loss, domain, 5, ref=ref, mask=mask,
                  deterministic=deterministic, repeats=2)  # fmt: skip
    want, want_oob = reference.domain_stats(loss, domain, mask, ref, 5)
    for stats, oob in results:  # the second launch finds the workspace clean
        assert oob == int(want_oob) > 0
        assert torch.equal(stats[0], want[0])
        torch.testing.assert_close(stats, want, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize(
    "dtype,id_dtype,k", [(torch.bfloat16, torch.int32, 22), (torch.float16, torch.int64, 3)]
)
def test_stats_per_sequence_ids_half_precision(harness, tmp_path, dtype, id_dtype, k):
    loss, domain, ref, mask = batch(1, (13, 301), k, dtype, per_sequence=True, id_dtype=id_dtype)
    (stats, oob), = run(harness, tmp_path, 0, loss, domain, k, ref=ref, mask=mask,
                        deterministic=True)  # fmt: skip
    want, _ = reference.domain_stats(loss, domain, mask, ref, k)
    assert oob == 0 and torch.equal(stats[0], want[0])
    torch.testing.assert_close(stats, want, rtol=1e-5, atol=1e-3)


def test_stats_without_ref_or_mask_and_empty(harness, tmp_path):
    loss, domain, _, _ = batch(2, (777,), 1)
    loss[5] = float("inf")
    (stats, _), = run(harness, tmp_path, 0, loss, domain, 1)
    want, _ = reference.domain_stats(loss, domain, None, None, 1)
    torch.testing.assert_close(stats, want)
    assert stats[2, 0] == 0  # no ref: excess stays 0 even next to an inf loss
    (stats, oob), = run(harness, tmp_path, 0, torch.empty(0), torch.empty(0, dtype=torch.int64), 4)
    assert oob == 0 and torch.all(stats == 0)


@pytest.mark.parametrize("dro,deterministic", [(True, False), (False, True)])
def test_fused_steps_match_torch(harness, tmp_path, dro, deterministic):
    k = 7
    loss, domain, ref, mask = batch(3, (5, 411), k, per_sequence=True)  # 2 blocks
    domain[domain == 6] = 5  # domain 6 absent: keeps its excess
    results = run(harness, tmp_path, 1, loss, domain, k, ref=ref, mask=mask, repeats=2,
                  deterministic=deterministic, step_size=0.9, smoothing=0.05, dro=dro)  # fmt: skip
    alpha = torch.full((k,), 1.0 / k)
    state = torch.stack([alpha, torch.full((k,), 0.25), alpha])
    state[1] = 0.0
    counters = torch.zeros(3, dtype=torch.int64)
    proxy = "dro" if dro else "reweighted"
    for objective, aux, got_state, got_counters in results:
        want_obj, want_aux = reference.doremi_step_(loss, domain, mask, ref, state, counters, 0.9,
                                                    0.05, proxy)  # fmt: skip
        torch.testing.assert_close(objective, want_obj, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(aux, want_aux, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(got_state, state, rtol=1e-5, atol=1e-7)
        assert torch.equal(got_counters, counters)
    assert int(counters[0]) == 2 and float(state[1, 6]) == 0.0


def test_fused_step_skips_non_finite_and_counts(harness, tmp_path):
    k = 4
    loss, domain, ref, mask = batch(4, (1000,), k, bad_ids=11)
    loss[100], mask[100] = float("nan"), True
    loss[200], mask[200] = float("nan"), False  # masked: ignored
    (objective, aux, state, counters), = run(harness, tmp_path, 1, loss, domain, k, ref=ref,
                                              mask=mask)  # fmt: skip
    alpha = torch.full((k,), 1.0 / k)
    assert torch.equal(state, torch.stack([alpha, torch.zeros(k), alpha]))
    want_oob = int(reference.domain_stats(loss, domain, mask, ref, k)[1])
    assert counters.tolist() == [0, 1, want_oob] and want_oob > 0
    assert torch.isnan(objective) and torch.equal(aux[3], alpha)


def test_update_kernel_matches_torch(harness, tmp_path):
    k = 300  # more domains than threads: each thread owns two
    g = torch.Generator().manual_seed(5)
    stats = torch.stack([torch.randint(0, 3, (k,), generator=g).float(),
                         torch.rand(k, generator=g) * 9, torch.rand(k, generator=g) * 4])
    stats[1:, stats[0] == 0] = 0.0
    alpha = torch.softmax(torch.randn(k, generator=g), 0)
    state = torch.stack([alpha, torch.rand(k, generator=g), alpha])
    counters = torch.tensor([5, 1, 2])
    dummy = torch.zeros(1)
    (objective, aux, got_state, got_counters), = run(
        harness, tmp_path, 2, dummy, torch.zeros(1, dtype=torch.int64), k, state=state.clone(),
        counters=counters.clone(), stats=stats, step_size=2.0, smoothing=0.01, dro=False,
    )  # fmt: skip
    want_obj, want_aux = reference.doremi_update_(stats, state, counters, 2.0, 0.01, "reweighted")
    torch.testing.assert_close(objective, want_obj, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux, want_aux, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_state, state, rtol=1e-5, atol=1e-8)
    assert got_counters.tolist() == [6, 1, 2]


def test_int64_ids_beyond_int32_are_out_of_range_not_wrapped(harness, tmp_path):
    # 2**32 + 2 would become the valid id 2 if narrowed to int before the range check
    loss, domain, ref, mask = batch(6, (700,), 5)
    domain[:40] = 2**32 + 2
    domain[40:60] = -(2**32) + 1
    (stats, oob), = run(harness, tmp_path, 0, loss, domain, 5, ref=ref, mask=mask,
                        deterministic=True)  # fmt: skip
    want, want_oob = reference.domain_stats(loss, domain, mask, ref, 5)
    assert oob == int(want_oob) == int(mask[:60].sum())
    assert torch.equal(stats[0], want[0])
    torch.testing.assert_close(stats, want, rtol=1e-5, atol=1e-3)


def test_fused_step_at_the_domain_limit(harness, tmp_path):
    # K = 1024: 8 x 3 x K floats of shared accumulators (96 KiB), reused by the finisher for the
    # [3, K] statistics and the 2K-float update scratch; 4 domains per thread in the update.
    k = 1024
    # 2 blocks; per-sequence ids keep the emulated warp rounds few; most domains absent
    loss, domain, ref, mask = batch(7, (13, 200), k, per_sequence=True)
    results = run(harness, tmp_path, 1, loss, domain, k, ref=ref, mask=mask, repeats=2,
                  deterministic=True, step_size=0.5, smoothing=0.01)  # fmt: skip
    alpha = torch.full((k,), 1.0 / k)
    state = torch.stack([alpha, torch.zeros(k), alpha])
    counters = torch.zeros(3, dtype=torch.int64)
    for objective, aux, got_state, got_counters in results:
        want_obj, want_aux = reference.doremi_step_(loss, domain, mask, ref, state, counters, 0.5,
                                                    0.01, "dro")  # fmt: skip
        torch.testing.assert_close(objective, want_obj, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(aux, want_aux, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(got_state, state, rtol=1e-5, atol=1e-8)
        assert torch.equal(got_counters, counters)
