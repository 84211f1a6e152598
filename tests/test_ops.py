"""fastmix.domain_loss_stats (torch backend) against a float64 oracle; validation; custom ops."""

from __future__ import annotations

import gc
import itertools
import re
import sys
import weakref

import numpy as np
import pytest
import torch
from ops_helpers import make_batch, run_with_capped_memory

import fastmix
from fastmix.ops import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def oracle_stats(loss, domain, k, ref_loss=None, mask=None):
    """Straightforward float64 statistics, one domain at a time."""
    flat = loss.detach().double().reshape(-1)
    ids = domain.reshape(-1, 1).expand(loss.shape) if domain.dim() < loss.dim() else domain
    ids = ids.reshape(-1).long()
    valid = torch.ones_like(flat, dtype=torch.bool) if mask is None else mask.reshape(-1)
    excess = (
        torch.zeros_like(flat)
        if ref_loss is None
        else (flat - ref_loss.double().reshape(-1)).clamp_min(0.0)
    )
    out = torch.zeros(3, k, dtype=torch.float64)
    for d in range(k):
        sel = valid & (ids == d)
        out[0, d] = sel.sum()
        out[1, d] = flat[sel].sum()
        out[2, d] = excess[sel].sum()
    return out


CASES = [
    # (shape, k, per_sequence)
    ((1,), 1, False),
    ((37,), 1, False),
    ((1001,), 3, False),
    ((5, 13), 22, False),
    ((7, 129), 22, True),
    ((3, 1), 8, True),
    ((2049,), 256, False),
    ((9, 255), 256, True),
]


@pytest.mark.parametrize("shape,k,per_sequence", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_backend_matches_float64_oracle(shape, k, per_sequence, dtype):
    for seed, (with_mask, with_ref, id_dtype) in enumerate(
        [(True, True, torch.int64), (False, True, torch.int32), (True, False, torch.int32)]
    ):
        loss, domain, ref, mask = make_batch(
            seed, shape, k, dtype, per_sequence, id_dtype, with_mask, with_ref
        )
        got = fastmix.domain_loss_stats(loss, domain, k, ref_loss=ref, mask=mask, backend="torch")
        want = oracle_stats(loss, domain, k, ref, mask)
        assert got.dtype == torch.float32 and got.shape == (3, k)
        assert torch.equal(got[0].double(), want[0])  # counts are exact
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_empty_domains_and_fully_masked_batch():
    loss, domain, ref, _ = make_batch(0, (6, 50), 10, used=3)
    got = fastmix.domain_loss_stats(loss, domain, 10, ref_loss=ref)
    assert torch.all(got[:, 3:] == 0) and torch.all(got[0, :3] > 0)
    mask = torch.zeros(6, 50, dtype=torch.bool)
    assert torch.all(fastmix.domain_loss_stats(loss, domain, 10, ref_loss=ref, mask=mask) == 0)
    empty = fastmix.domain_loss_stats(torch.empty(0), torch.empty(0, dtype=torch.int64), 4)
    assert empty.shape == (3, 4) and torch.all(empty == 0)


def test_masked_nan_is_ignored_and_unmasked_nan_propagates():
    loss = torch.tensor([1.0, float("nan"), 2.0, float("inf")])
    domain = torch.tensor([0, 0, 1, 1])
    mask = torch.tensor([True, False, True, False])
    ref = torch.zeros(4)
    got = fastmix.domain_loss_stats(loss, domain, 2, ref_loss=ref, mask=mask)
    torch.testing.assert_close(got, torch.tensor([[1.0, 1.0], [1.0, 2.0], [1.0, 2.0]]))
    got = fastmix.domain_loss_stats(loss, domain, 2, ref_loss=ref)
    assert torch.isnan(got[1, 0]) and torch.isnan(got[2, 0]) and torch.isinf(got[1, 1])


def test_reference_counts_out_of_range_ids_without_writing():
    loss = torch.ones(6)
    domain = torch.tensor([0, -1, 3, 2, 7, 1])
    mask = torch.tensor([True, True, True, True, False, True])
    stats, out_of_range = reference.domain_stats(loss, domain, mask, None, 3)
    assert int(out_of_range) == 2  # -1 and 3; the masked 7 is ignored
    torch.testing.assert_close(stats[0], torch.tensor([1.0, 1.0, 1.0]))


def test_out_of_range_ids_raise_on_cpu():
    with pytest.raises(ValueError, match="domain ids must be in"):
        fastmix.domain_loss_stats(torch.ones(4), torch.tensor([0, 1, 4, 2]), 4)
    with pytest.raises(ValueError, match="domain ids"):
        fastmix.domain_loss_stats(torch.ones(4), torch.tensor([0, -1, 1, 2]), 4)
    # a masked token may carry any id (padding with -1 is common)
    mask = torch.tensor([True, False, True, True])
    got = fastmix.domain_loss_stats(torch.ones(4), torch.tensor([0, -1, 1, 2]), 4, mask=mask)
    torch.testing.assert_close(got[0], torch.tensor([1.0, 1.0, 1.0, 0.0]))


BAD = [
    (dict(loss=[1.0, 2.0]), TypeError, "loss must be a torch.Tensor"),
    (dict(loss=torch.ones(4, dtype=torch.float64)), TypeError, "loss must be float32"),
    (dict(loss=torch.ones(2, 2, 2)), ValueError, "loss must be"),
    (dict(domain=torch.zeros(4)), TypeError, "domain must be int32 or int64"),
    (dict(domain=torch.zeros(5, dtype=torch.int64)), ValueError, "domain must have"),
    (dict(domain=[0, 1, 2, 3]), TypeError, "domain must be a torch.Tensor"),
    (dict(num_domains=0), ValueError, "num_domains must be >= 1"),
    (dict(num_domains=2.0), TypeError, "num_domains must be an int"),
    (dict(num_domains=True), TypeError, "num_domains must be an int"),
    # ids are int32 in the sampler and the kernels; 2**63 blamed the valid id 0, 2**64 raised a
    # bare OverflowError and 2**31 torch's allocator error
    (dict(num_domains=2**31), ValueError, r"num_domains must be <= 2\*\*31 - 1 .*got 2147483648"),
    (dict(num_domains=2**63), ValueError, r"num_domains must be <= 2\*\*31 - 1"),
    (dict(num_domains=2**64), ValueError, r"num_domains must be <= 2\*\*31 - 1"),
    (dict(ref_loss=torch.ones(5)), ValueError, "ref_loss must have loss's shape"),
    (dict(ref_loss=torch.ones(4, dtype=torch.float16)), TypeError, "ref_loss must have"),
    (dict(mask=torch.ones(4)), TypeError, "mask must be bool"),
    (dict(mask=torch.ones(3, dtype=torch.bool)), ValueError, "mask must have"),
    (dict(backend="jax"), ValueError, "backend must be one of"),
    (dict(backend="cuda"), RuntimeError, "backend='cuda' cannot run on cpu"),
    (dict(domain=torch.zeros(4, dtype=torch.int64, device="meta")), ValueError, "domain is on"),
    # sparse and mkldnn layouts failed inside torch, naming no argument
    (dict(loss=torch.ones(4).to_sparse()), TypeError, "loss must be a dense .*sparse_coo"),
    (dict(loss=torch.ones(4).to_mkldnn()), TypeError, "loss must be a dense .*mkldnn"),
    (dict(domain=torch.zeros(4, dtype=torch.int64).to_sparse()), TypeError,
     "domain must be a dense"),
    (dict(ref_loss=torch.ones(4).to_sparse()), TypeError, "ref_loss must be a dense"),
    (dict(mask=torch.ones(4, dtype=torch.bool).to_sparse()), TypeError, "mask must be a dense"),
]


@pytest.mark.parametrize("override,exc,match", BAD)
def test_bad_input_names_the_argument(override, exc, match):
    args = dict(loss=torch.ones(4), domain=torch.zeros(4, dtype=torch.int64), num_domains=3)
    args.update(override)
    kwargs = {key: args.pop(key) for key in ("ref_loss", "mask", "backend") if key in args}
    with pytest.raises(exc, match=match):
        fastmix.domain_loss_stats(args["loss"], args["domain"], args["num_domains"], **kwargs)


def test_resolve_backend_takes_a_device_name():
    from fastmix.ops import resolve_backend

    # a str device raised AttributeError: 'str' object has no attribute 'type'
    assert resolve_backend(None, "cpu") == resolve_backend(None, torch.device("cpu")) == "torch"
    assert resolve_backend("torch", "cpu", 3) == "torch"
    with pytest.raises(TypeError, match="device must be a torch.device or str, got NoneType"):
        resolve_backend(None, None)
    with pytest.raises(ValueError, match="device 'gpu0' is not a valid torch device"):
        resolve_backend(None, "gpu0")
    with pytest.raises(TypeError, match="num_domains must be an int, got str"):
        resolve_backend("torch", torch.device("cpu"), "x")


def test_num_domains_may_be_a_numpy_int():
    import numpy as np

    loss, domain = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0, 2, 2])
    want = fastmix.domain_loss_stats(loss, domain, 3)
    for k in (np.int64(3), np.int32(3), np.uint16(3)):
        torch.testing.assert_close(fastmix.domain_loss_stats(loss, domain, k), want)
        # with autograd the op goes through the dispatcher, whose schema takes a Python int
        got = fastmix.domain_loss_stats(loss.clone().requires_grad_(), domain, k)
        torch.testing.assert_close(got.detach(), want)
    with pytest.raises(TypeError, match="num_domains must be an int, got bool"):
        fastmix.domain_loss_stats(loss, domain, np.bool_(True))


def test_per_sequence_domain_requires_batch_length():
    with pytest.raises(ValueError, match="domain must have"):
        fastmix.domain_loss_stats(torch.ones(3, 4), torch.zeros(4, dtype=torch.int64), 2)


def test_backends_report(monkeypatch):
    report = fastmix.backends()
    assert list(report) == ["cuda", "triton", "torch"]
    assert report["torch"]["available"] is True
    for name, entry in report.items():
        assert isinstance(entry["available"], bool) and entry["reason"], name
    loss, domain = torch.ones(4), torch.zeros(4, dtype=torch.int64)
    # Available means runnable: triton without a GPU or its interpreter cannot run anything.
    from fastmix.ops import triton as triton_ops

    if triton_ops.triton is not None:
        monkeypatch.setattr(triton_ops, "_interpreted", lambda: False)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        entry = fastmix.backends()["triton"]
        assert entry["available"] is False and "TRITON_INTERPRET=1" in entry["reason"]
        monkeypatch.undo()
    monkeypatch.setenv("FASTMIX_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTMIX_BACKEND must be one of"):
        fastmix.domain_loss_stats(loss, domain, 2)
    monkeypatch.setenv("FASTMIX_BACKEND", "torch")
    assert fastmix.domain_loss_stats(loss, domain, 2)[0, 0] == 4


def test_a_broken_triton_interpreter_is_reported_not_run(monkeypatch):
    triton_ops = pytest.importorskip("fastmix.ops.triton")
    if triton_ops.triton is None or not triton_ops._interpreted():
        pytest.skip("needs triton under TRITON_INTERPRET=1")
    # What a release whose interpreter cannot turn a scalar loop bound into an int would say.
    broken = "triton 0.0's interpreter cannot run the kernels with numpy 9.9 (TypeError: x)"
    monkeypatch.setattr(triton_ops, "_interpreter_problem", lambda: broken)
    entry = fastmix.backends()["triton"]
    assert entry == {"available": False, "reason": broken}
    loss, domain = torch.ones(4), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="interpreter cannot run the kernels"):
        fastmix.domain_loss_stats(loss, domain, 2, backend="triton")
    # the automatic choice is unaffected on CPU (torch)
    assert fastmix.domain_loss_stats(loss, domain, 2)[0, 0] == 4


def test_gradients_match_plain_autograd():
    loss, domain, ref, mask = make_batch(3, (4, 33), 5, per_sequence=True)
    loss.requires_grad_(True)
    ref.requires_grad_(True)
    weight = torch.randn(3, 5, generator=torch.Generator().manual_seed(3))
    got = fastmix.domain_loss_stats(loss, domain, 5, ref_loss=ref, mask=mask)
    g_loss, g_ref = torch.autograd.grad((got * weight).sum(), (loss, ref))
    # the plain formula, differentiated by autograd
    ids = domain.reshape(-1, 1).expand(4, 33)
    onehot = torch.nn.functional.one_hot(ids, 5).double() * mask[..., None]
    plain_loss = (onehot * loss.double()[..., None]).sum((0, 1))
    plain_excess = (onehot * (loss.double() - ref.double()).clamp_min(0)[..., None]).sum((0, 1))
    objective = (plain_loss * weight[1].double()).sum() + (plain_excess * weight[2].double()).sum()
    w_loss, w_ref = torch.autograd.grad(objective, (loss, ref))
    torch.testing.assert_close(g_loss, w_loss.float())
    torch.testing.assert_close(g_ref, w_ref.float())


def _plain_grads(loss, ref, domain, mask, weight, k, wrt):
    """Gradients of Σ weight·stats by plain autograd (the formula of the test above)."""
    ids = domain.reshape(-1, 1).expand(loss.shape) if domain.dim() < loss.dim() else domain
    onehot = torch.nn.functional.one_hot(ids.long(), k).double() * mask[..., None]
    plain_loss = (onehot * loss.double()[..., None]).sum((0, 1))
    plain_excess = (onehot * (loss.double() - ref.double()).clamp_min(0)[..., None]).sum((0, 1))
    objective = (plain_loss * weight[1].double()).sum() + (plain_excess * weight[2].double()).sum()
    return torch.autograd.grad(objective, wrt)


def test_gradients_with_ref_domain_and_mask_from_inference_mode():
    # a reference model run under torch.inference_mode() gives inference tensors, which autograd
    # refuses to save for backward; the op must not try to
    base_loss, base_domain, base_ref, base_mask = make_batch(8, (3, 29), 4, per_sequence=True)
    with torch.inference_mode():
        ref, domain, mask = base_ref.clone(), base_domain.clone(), base_mask.clone()
    assert ref.is_inference() and domain.is_inference() and mask.is_inference()
    loss = base_loss.clone().requires_grad_(True)
    weight = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    got = fastmix.domain_loss_stats(loss, domain, 4, ref_loss=ref, mask=mask)
    (g_loss,) = torch.autograd.grad((got * weight).sum(), loss)
    (w_loss,) = _plain_grads(loss, base_ref, base_domain, base_mask, weight, 4, (loss,))
    torch.testing.assert_close(g_loss, w_loss.float())
    assert bool((g_loss != weight[1][base_domain][:, None] * base_mask).any())  # excess counted

    # and the other way round: the loss from inference mode, the gradient to ref_loss
    with torch.inference_mode():
        frozen_loss = base_loss.clone()
    ref_grad = base_ref.clone().requires_grad_(True)
    got = fastmix.domain_loss_stats(frozen_loss, domain, 4, ref_loss=ref_grad, mask=mask)
    (g_ref,) = torch.autograd.grad((got * weight).sum(), ref_grad)
    (w_ref,) = _plain_grads(base_loss, ref_grad, base_domain, base_mask, weight, 4, (ref_grad,))
    torch.testing.assert_close(g_ref, w_ref.float())


def test_backward_does_not_keep_ref_loss_alive():
    # only where the excess is positive is saved for backward, not the reference loss itself
    loss, domain, ref, mask = make_batch(9, (4, 16), 3)
    loss.requires_grad_(True)
    stats = fastmix.domain_loss_stats(loss, domain, 3, ref_loss=ref, mask=mask)
    alive = weakref.ref(ref)
    del ref
    gc.collect()
    assert alive() is None
    stats[2].sum().backward()
    assert loss.grad is not None and bool((loss.grad != 0).any())


def test_bfloat16_ref_gradient_keeps_its_dtype():
    loss, domain, ref, mask = make_batch(10, (2, 21), 3, dtype=torch.bfloat16)
    loss.requires_grad_(True)
    ref.requires_grad_(True)
    stats = fastmix.domain_loss_stats(loss, domain, 3, ref_loss=ref, mask=mask)
    g_loss, g_ref = torch.autograd.grad(stats[2].sum(), (loss, ref))
    assert g_loss.dtype == g_ref.dtype == torch.bfloat16
    active = mask & (loss.float() > ref.float())
    torch.testing.assert_close(g_ref, -active.to(torch.bfloat16))
    torch.testing.assert_close(g_loss, active.to(torch.bfloat16))


def test_compiled_stats_drop_out_of_range_ids_silently():
    # documented: the CPU value check is eager-only (it would break the graph); compiled, a bad
    # id is dropped and shows only as a token count below the number of unmasked tokens
    loss, _, ref, _ = make_batch(11, (6,), 3, with_mask=False)
    domain = torch.tensor([0, 1, 2, 3, -1, 1])
    with pytest.raises(ValueError, match="domain ids must be in"):
        fastmix.domain_loss_stats(loss, domain, 3, ref_loss=ref)

    def stats(loss, domain, ref):
        return fastmix.domain_loss_stats(loss, domain, 3, ref_loss=ref)

    got = torch.compile(stats, fullgraph=True, backend="eager")(loss, domain, ref)
    assert got[0].tolist() == [1.0, 2.0, 1.0]
    assert float(got[0].sum()) < loss.numel()
    keep = torch.tensor([True, True, True, False, False, True])
    want = oracle_stats(loss[keep], domain[keep], 3, ref[keep])
    torch.testing.assert_close(got, want.float())


@pytest.mark.parametrize("per_sequence", [False, True])
def test_opcheck_domain_stats(per_sequence):
    loss, domain, ref, mask = make_batch(1, (3, 17), 4, per_sequence=per_sequence)
    loss.requires_grad_(True)
    op = torch.ops.fastmix.domain_stats.default
    torch.library.opcheck(op, (loss, domain, mask, ref, 4, "torch", False))
    torch.library.opcheck(op, (loss, domain, None, None, 4, "torch", True))
    # with the gradient to ref_loss too (its backward uses only the saved `loss > ref` mask)
    ref = ref.clone().requires_grad_(True)
    torch.library.opcheck(op, (loss, domain, mask, ref, 4, "torch", False))


def test_opcheck_update_step_and_grad():
    loss, domain, ref, mask = make_batch(2, (40,), 3)
    state = torch.stack([torch.full((3,), 1 / 3), torch.zeros(3), torch.full((3,), 1 / 3)])
    counters = torch.zeros(3, dtype=torch.int64)
    workspace = torch.empty(0, dtype=torch.int32)
    torch.library.opcheck(
        torch.ops.fastmix.doremi_step_.default,
        (loss, domain, mask, ref, state, counters, workspace, 1.0, 1e-3, "dro", "torch", False),
    )
    stats, _ = reference.domain_stats(loss, domain, mask, ref, 3)
    torch.library.opcheck(
        torch.ops.fastmix.doremi_update_.default,
        (stats, state.clone(), counters.clone(), 0.5, 0.0, "reweighted", "torch"),
    )
    aux = torch.cat([stats, state[0:1]])
    torch.library.opcheck(
        torch.ops.fastmix.objective_grad.default,
        (torch.tensor(1.0), loss, domain, mask, aux, "dro"),
    )
    # A [T, B] loss seen as [B, T] (a sequence-first model): dense but not row-major.
    loss_tb, domain_tb, _, mask_tb = make_batch(3, (5, 8), 3, per_sequence=True)
    loss_tb = loss_tb.t().contiguous().t()
    for proxy, mask_or_none in itertools.product(("dro", "reweighted"), (mask_tb, None)):
        torch.library.opcheck(
            torch.ops.fastmix.objective_grad.default,
            (torch.tensor(1.0), loss_tb, domain_tb, mask_or_none, aux, proxy),
        )


def test_direct_op_calls_check_what_the_kernels_would_index():
    # torch.ops.fastmix.* skip domain_loss_stats' and DoReMi's checks; the kernels read (and
    # write) what the shapes say, so the ops check the metadata themselves.
    loss, domain = torch.rand(4096), torch.zeros(8, dtype=torch.int64)
    with pytest.raises(ValueError, match="domain must have loss's shape"):
        torch.ops.fastmix.domain_stats(loss, domain, None, None, 4, "torch", False)
    with pytest.raises(ValueError, match="backend must be one of"):
        torch.ops.fastmix.domain_stats(loss, domain[:1].expand(4096), None, None, 4, "os", False)
    state = torch.full((2, 3), 1 / 3)  # [2, K]: the average row would be written past the end
    counters = torch.zeros(3, dtype=torch.int64)
    ids = torch.zeros(4096, dtype=torch.int64)
    with pytest.raises(ValueError, match="state must be a contiguous float32 \\[3, K\\]"):
        torch.ops.fastmix.doremi_step_(loss, ids, None, loss, state, counters,
                                       torch.empty(0), 1.0, 0.0, "dro", "torch", False)
    good = torch.full((3, 3), 1 / 3)
    with pytest.raises(ValueError, match="ref_loss must have loss's shape"):
        torch.ops.fastmix.doremi_step_(loss, ids, None, loss[:10], good, counters,
                                       torch.empty(0), 1.0, 0.0, "dro", "torch", False)
    with pytest.raises(ValueError, match="proxy must be one of"):
        torch.ops.fastmix.doremi_step_(loss, ids, None, loss, good, counters,
                                       torch.empty(0), 1.0, 0.0, "mse", "torch", False)
    for stats in (torch.zeros(2, 3), torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3, 4)):
        with pytest.raises(ValueError, match="stats must be float32 \\[3, 3\\]"):
            torch.ops.fastmix.doremi_update_(stats, good, counters, 1.0, 0.0, "dro", "torch")
    with pytest.raises(ValueError, match="aux must be"):
        torch.ops.fastmix.objective_grad(torch.tensor(1.0), loss, ids, None, good, "dro")
    assert int(counters.sum()) == 0 and torch.equal(good, torch.full((3, 3), 1 / 3))


def test_direct_op_call_checks_the_workspace_device():
    # DoReMi allocates its workspace on the state's device; a direct torch.ops.fastmix call with
    # one elsewhere was not checked (the kernels write through its pointer).  "meta" stands in
    # for another device: with a meta tensor among the arguments the dispatcher would pick the
    # fake kernel, so the call is sent to the op's CPU kernel, as a GPU's would be to its CUDA one.
    op = torch.ops.fastmix.doremi_step_.default
    cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    loss, ids = torch.rand(64), torch.zeros(64, dtype=torch.int64)
    state, counters = torch.full((3, 3), 1 / 3), torch.zeros(3, dtype=torch.int64)

    def step(workspace, counters=counters):
        return op.redispatch(cpu, loss, ids, None, loss, state, counters, workspace, 1.0, 0.0,
                             "dro", "torch", False)  # fmt: skip

    with pytest.raises(ValueError, match="counters are on meta, the state on cpu"):
        step(torch.empty(0), counters.to("meta"))  # as the other arguments are checked
    with pytest.raises(ValueError, match="workspace is on meta, the state on cpu"):
        step(torch.empty(0, device="meta"))
    with pytest.raises((TypeError, NotImplementedError)) as info:
        step(torch.zeros(4).to_sparse())
    if info.type is TypeError:
        assert re.search("workspace must be a dense .*sparse_coo", str(info.value))
    else:  # torch 2.4's custom-op wrapper reads each tensor's storage before any kernel runs
        assert "Cannot access storage of SparseTensorImpl" in str(info.value)
    assert int(counters.sum()) == 0 and torch.equal(state, torch.full((3, 3), 1 / 3))
    step(torch.empty(0))  # on the state's device: the step runs
    assert int(counters[0]) == 1


def test_compiled_matches_eager():
    loss, domain, ref, mask = make_batch(4, (6, 31), 7, per_sequence=True)

    def stats(loss, domain, ref, mask):
        return fastmix.domain_loss_stats(loss, domain, 7, ref_loss=ref, mask=mask) * 2

    compiled = torch.compile(stats, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(loss, domain, ref, mask), stats(loss, domain, ref, mask))


def test_deterministic_reaches_the_backend(monkeypatch):
    # On CPU the reference's index_add_ is sequential anyway (the fixed-order path runs on CUDA,
    # checked on GPU); here: the flag must arrive, and the fixed-order sums match the fast ones.
    loss, domain, ref, mask = make_batch(5, (20000,), 22)
    seen = []
    real = reference.domain_stats

    def spy(*args):
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(reference, "domain_stats", spy)
    first = fastmix.domain_loss_stats(loss, domain, 22, ref_loss=ref, mask=mask, deterministic=True)
    fastmix.domain_loss_stats(loss, domain, 22, ref_loss=ref, mask=mask)
    assert seen == [True, False]
    ordered = reference.ordered_bin_sums(
        reference.expand_domain(domain, loss).long().masked_fill(~mask, 22),
        torch.stack([mask.float(), torch.where(mask, loss, 0.0),
                     torch.where(mask, (loss - ref).clamp_min(0.0), 0.0)]), 22,
    )  # fmt: skip
    torch.testing.assert_close(ordered, first, rtol=1e-5, atol=1e-3)
    # bool("no") is True: only real bools (a NumPy one too) are taken
    for bad in ("no", 0, None, torch.tensor(True)):
        with pytest.raises(TypeError, match="deterministic must be True or False"):
            fastmix.domain_loss_stats(loss, domain, 22, deterministic=bad)
    fastmix.domain_loss_stats(loss, domain, 22, deterministic=np.bool_(True))
    assert seen[-1] is True


def test_ordered_bin_sums_match_index_add_with_special_values():
    # the deterministic path the torch backend takes on CUDA, checked here on CPU
    g = torch.Generator().manual_seed(9)
    values = torch.rand(3, 5000, generator=g) * 3
    bins = torch.randint(0, 8, (5000,), generator=g)  # bin 7 is the dropped spare bin
    values[1, 10], bins[10] = float("nan"), 2
    values[2, 11], bins[11] = float("inf"), 3
    values[2, 12], bins[12] = float("inf"), 4
    values[2, 13], bins[13] = float("-inf"), 4
    values[0, 14], bins[14] = float("nan"), 7  # dropped: must not spill anywhere
    got = reference.ordered_bin_sums(bins, values, 7)
    want = torch.zeros(3, 8).index_add_(1, bins, values)[:, :7]
    torch.testing.assert_close(got, want, equal_nan=True)
    assert torch.isnan(got[1, 2]) and got[2, 3] == float("inf") and torch.isnan(got[2, 4])
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1, 3:]).all()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_statistics_too_large_to_allocate_are_an_error_naming_num_domains():
    # K = 2**31 - 1 is valid but its statistics take tens of GiB: torch's allocator error named
    # no argument (or, where the memory was promised, the process was killed while zeroing it).
    # The address space is capped a little above what the process holds, so any machine refuses.
    out = run_with_capped_memory(
        "import torch, fastmix",
        "try:\n"
        "    fastmix.domain_loss_stats(torch.ones(2), torch.tensor([0, 1]), 2**31 - 1)\n"
        "except ValueError as exc:\n"
        "    print(exc)\n",
    )
    assert out.stdout.strip() == (
        "num_domains=2147483647: the per-domain statistics (6 x 2,147,483,648 float32 values, "
        "48.0 GiB) are more than can be allocated on cpu"
    ), out.stdout + out.stderr


def test_ordered_bin_sums_keep_each_bin_apart_from_a_huge_one():
    # A running sum across bins lost every bin after one holding 1e30 (they came out 0) and a
    # bin after +1e20 and -1e20 to cancellation; index_add_ keeps them.
    values = torch.tensor([[1e30, 1.5, 2.5, 3.0, 1e20, -1e20, 0.25, 7.0]])
    bins = torch.tensor([0, 1, 1, 2, 3, 3, 4, 5])
    got = reference.ordered_bin_sums(bins, values, 5)
    want = torch.zeros(1, 6).index_add_(1, bins, values)[:, :5]
    assert torch.equal(got, want), got
    assert reference.ordered_bin_sums(bins[:0], values[:, :0], 3).tolist() == [[0.0] * 3]


def test_op_schemas_are_what_torch_infers():
    # The ops declare their schemas as strings (older torch cannot infer them from this module's
    # string annotations); they must stay what the signatures say.
    infer_schema = getattr(torch.library, "infer_schema", None)
    if infer_schema is None:
        pytest.skip("torch.library.infer_schema needs a newer torch")
    from fastmix import ops

    functions = {
        "domain_stats": (ops._domain_stats_op._init_fn, ()),
        "doremi_step_": (ops._doremi_step_checked, ("state", "counters", "workspace")),
        "doremi_update_": (ops._doremi_update_checked, ("state", "counters")),
        "objective_grad": (ops._objective_grad_op._init_fn, ()),
    }
    for name, (fn, mutates) in functions.items():
        assert infer_schema(fn, mutates_args=mutates) == ops._SCHEMAS[name], name


def test_more_domains_than_the_kernels_take(monkeypatch):
    from fastmix import ops

    limit = ops.MAX_KERNEL_DOMAINS
    k = limit + 1
    loss, domain = torch.ones(6), torch.tensor([0, 1, k - 1, 5, 5, 0])
    # a forced kernel backend says so (checked before anything runs, so any device will do)
    monkeypatch.setattr(ops, "_can_run", lambda name, device: (True, ""))
    for forced in ("cuda", "triton"):
        with pytest.raises(ValueError, match=f"num_domains={k} exceeds the {forced} kernels'"):
            fastmix.domain_loss_stats(loss, domain, k, backend=forced)
        with pytest.raises(ValueError, match=f"num_domains={k} exceeds"):
            fastmix.DoReMi(k, backend=forced).step(loss, loss, domain)
        monkeypatch.setenv("FASTMIX_BACKEND", forced)
        with pytest.raises(ValueError, match=f"num_domains={k} exceeds"):
            fastmix.domain_loss_stats(loss, domain, k)
        monkeypatch.delenv("FASTMIX_BACKEND")
    # the automatic choice falls back to torch, also where the kernels could run (cuda tensors)
    assert ops.resolve_backend(None, torch.device("cuda"), k) == "torch"
    assert ops.resolve_backend(None, torch.device("cuda"), limit) == "cuda"
    # triton indexes tokens with int32: the automatic choice skips it from 2**31 tokens
    monkeypatch.setattr(ops, "_can_run", lambda name, device: (name != "cuda", ""))
    assert ops.resolve_backend(None, torch.device("cuda"), 8, 2**31 - 1) == "triton"
    assert ops.resolve_backend(None, torch.device("cuda"), 8, 2**31) == "torch"
    monkeypatch.setattr(ops, "_can_run", lambda name, device: (True, ""))
    stats = fastmix.domain_loss_stats(loss, domain, k)
    assert stats[0, k - 1] == 1 and stats[0, 0] == 2 and stats[0].sum() == 6


def test_importing_the_ops_does_not_import_the_compiler():
    # torch.compiler.assume_constant_result imports torch._dynamo (and with it triton): ~1.3 s
    # added to every import of fastmix.ops, also in jobs that never compile.
    import subprocess
    import sys

    code = "import sys, fastmix.ops, fastmix.mixers; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_constant_mark_is_the_one_torch_compile_reads():
    from fastmix.ops import _assume_constant_result

    def ours():
        return 0

    def torchs():
        return 0

    assert _assume_constant_result(ours) is ours
    torch.compiler.assume_constant_result(torchs)
    assert vars(ours) == vars(torchs) == {"_dynamo_marked_constant": True}
