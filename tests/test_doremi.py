"""DoReMi (torch backend) against a float64 implementation of Algorithm 1; state; bad input."""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest
import torch

import fastmix
from fastmix.mixers.doremi import DoReMi


def oracle_stats(loss, domain, k, ref_loss, mask=None):
    flat = loss.detach().double().reshape(-1)
    ids = domain.reshape(-1, 1).expand(loss.shape) if domain.dim() < loss.dim() else domain
    ids = ids.reshape(-1).long()
    valid = torch.ones_like(flat, dtype=torch.bool) if mask is None else mask.reshape(-1)
    excess = (flat - ref_loss.double().reshape(-1)).clamp_min(0.0)
    out = torch.zeros(3, k, dtype=torch.float64)
    for d in range(k):
        sel = valid & (ids == d)
        out[0, d], out[1, d], out[2, d] = sel.sum(), flat[sel].sum(), excess[sel].sum()
    return out


class Oracle:
    """Algorithm 1 of DoReMi in float64, written from the formulas."""

    def __init__(self, k, step_size, smoothing, init=None):
        self.k, self.eta, self.c = k, step_size, smoothing
        self.alpha = torch.full((k,), 1.0 / k, dtype=torch.float64) if init is None else init
        self.excess = torch.zeros(k, dtype=torch.float64)
        self.history = []

    def update(self, stats):
        if not torch.isfinite(stats).all():
            return
        present = stats[0] > 0
        self.excess = torch.where(present, stats[2] / stats[0].clamp_min(1), self.excess)
        logits = torch.log(self.alpha) + self.eta * self.excess
        new = torch.exp(logits - torch.logsumexp(logits, 0))
        self.alpha = (1 - self.c) * new + self.c / self.k
        self.history.append(self.alpha)

    @property
    def average(self):
        return torch.stack(self.history).mean(0)


def batch(seed, shape=(6, 41), k=5, used=None, per_sequence=True, dtype=torch.float32,
          with_mask=True):  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    loss = (torch.rand(shape, generator=g) * 4).to(dtype)
    ref = (torch.rand(shape, generator=g) * 4).to(dtype)
    domain = torch.randint(0, used or k, shape[:1] if per_sequence else shape, generator=g)
    mask = torch.rand(shape, generator=g) > 0.2 if with_mask else None
    return loss, ref, domain, mask


@pytest.mark.parametrize("k", [1, 5, 22, 256])
@pytest.mark.parametrize("proxy", ["dro", "reweighted"])
def test_weights_follow_algorithm_1(k, proxy):
    eta, c = 0.7, 0.05
    mixer = DoReMi(k, step_size=eta, smoothing=c, proxy_loss=proxy)
    oracle = Oracle(k, eta, c)
    for seed in range(4):
        loss, ref, domain, mask = batch(seed, shape=(12, 33), k=k, per_sequence=seed % 2 == 0)
        mixer.step(loss, ref, domain, mask)
        oracle.update(oracle_stats(loss, domain, k, ref, mask))
        torch.testing.assert_close(mixer.weights.double(), oracle.alpha, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(mixer.excess.double(), oracle.excess, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixer.average_weights.double(), oracle.average, rtol=1e-5, atol=1e-7)
    assert int(mixer.num_updates) == 4 and int(mixer.num_skipped) == 0
    assert math.isclose(float(mixer.weights.sum()), 1.0, rel_tol=1e-5)


def test_softmax_is_taken_in_log_space():
    # η·λ of 1e4 overflows exp() in float32; in log space it is just a very peaked softmax.
    mixer = DoReMi(3, step_size=1e4, smoothing=0.0)
    loss = torch.tensor([3.0, 1.0, 1.0])
    ref = torch.tensor([0.0, 1.0, 1.0])
    mixer.step(loss, ref, torch.tensor([0, 1, 2]))
    torch.testing.assert_close(mixer.weights, torch.tensor([1.0, 0.0, 0.0]))
    assert int(mixer.num_skipped) == 0


def test_smoothing_and_init_weights():
    init = torch.tensor([1.0, 2.0, 5.0])  # normalised to sum 1
    mixer = DoReMi(3, step_size=0.0, smoothing=0.25, init_weights=init)
    torch.testing.assert_close(mixer.weights, init / init.sum())
    mixer.step(torch.ones(3), torch.zeros(3), torch.tensor([0, 1, 2]))
    # η = 0: α' = α, then α ← 0.75 α + 0.25 / 3
    torch.testing.assert_close(mixer.weights, 0.75 * init / init.sum() + 0.25 / 3)


def test_average_excludes_the_initial_weights():
    mixer = DoReMi(2, step_size=1.0, smoothing=0.0)
    seen = []
    for seed in range(3):
        loss, ref, domain, mask = batch(seed, k=2)
        mixer.step(loss, ref, domain, mask)
        seen.append(mixer.weights.clone())
    torch.testing.assert_close(mixer.average_weights, torch.stack(seen).mean(0))


def test_absent_domains_keep_their_excess():
    mixer = DoReMi(3, step_size=1.0, smoothing=0.0)
    mixer.step(torch.tensor([2.0, 5.0, 1.0]), torch.zeros(3), torch.tensor([0, 1, 2]))
    torch.testing.assert_close(mixer.excess, torch.tensor([2.0, 5.0, 1.0]))
    mixer.step(torch.tensor([4.0, 4.0]), torch.tensor([3.0, 3.0]), torch.tensor([1, 1]))
    torch.testing.assert_close(mixer.excess, torch.tensor([2.0, 1.0, 1.0]))
    # a fully masked batch changes no λ, but α still moves by η·λ
    before = mixer.weights.clone()
    mixer.step(torch.ones(2), torch.zeros(2), torch.tensor([0, 2]), torch.zeros(2, dtype=bool))
    torch.testing.assert_close(mixer.excess, torch.tensor([2.0, 1.0, 1.0]))
    expected = torch.softmax(torch.log(before) + torch.tensor([2.0, 1.0, 1.0]), 0)
    torch.testing.assert_close(mixer.weights, expected)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_update_is_skipped_and_counted(bad):
    mixer = DoReMi(4, step_size=0.5)
    oracle = Oracle(4, 0.5, 1e-3)
    loss, ref, domain, mask = batch(0, k=4)
    mixer.step(loss, ref, domain, mask)
    oracle.update(oracle_stats(loss, domain, 4, ref, mask))
    state = mixer.state_dict()
    poisoned = loss.clone()
    poisoned[0, 0] = bad
    mask[0, 0] = True
    objective = mixer.step(poisoned, ref, domain, mask)
    assert not torch.isfinite(objective)  # the user's loss is non-finite; α is not
    for key in ("weights", "excess", "average_weights", "num_updates"):
        assert torch.equal(mixer.state_dict()[key], state[key]), key
    assert int(mixer.num_skipped) == 1 and int(mixer.num_updates) == 1
    loss, ref, domain, mask = batch(1, k=4)
    mixer.step(loss, ref, domain, mask)
    oracle.update(oracle_stats(loss, domain, 4, ref, mask))
    torch.testing.assert_close(mixer.weights.double(), oracle.alpha, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(mixer.average_weights.double(), oracle.average, rtol=1e-5, atol=1e-7)
    # a NaN on a masked token is ignored altogether
    loss[0, 0], mask[0, 0] = float("nan"), False
    mixer.step(loss, ref, domain, mask)
    assert int(mixer.num_skipped) == 1 and int(mixer.num_updates) == 3


@pytest.mark.parametrize("proxy", ["dro", "reweighted"])
def test_objective_and_its_gradient(proxy):
    k = 4
    mixer = DoReMi(k, step_size=0.3, proxy_loss=proxy)
    loss, ref, domain, mask = batch(7, shape=(8, 19), k=k, used=3)
    loss.requires_grad_(True)
    objective = mixer.step(loss, ref, domain, mask)
    objective.backward()
    alpha = mixer.weights.double()  # the α just updated
    stats = oracle_stats(loss, domain, k, ref, mask)
    count, loss_sum = stats[0], stats[1]
    ids = domain.reshape(-1, 1).expand(8, 19)
    if proxy == "dro":
        present = count > 0
        want = (alpha[present] * loss_sum[present] / count[present]).sum()
        coef = torch.where(present, alpha / count.clamp_min(1), 0.0)
    else:
        denom = (alpha * count).sum()
        want = (alpha * loss_sum).sum() / denom
        coef = alpha / denom
    torch.testing.assert_close(objective.double(), want, rtol=1e-5, atol=1e-6)
    want_grad = torch.where(mask, coef[ids], 0.0)
    torch.testing.assert_close(loss.grad.double(), want_grad, rtol=1e-5, atol=1e-8)


def test_objective_with_bfloat16_loss_gives_bfloat16_grad():
    mixer = DoReMi(3)
    loss, ref, domain, mask = batch(3, k=3, dtype=torch.bfloat16)
    loss.requires_grad_(True)
    objective = mixer.step(loss, ref, domain, mask)
    assert objective.dtype == torch.float32
    objective.backward()
    assert loss.grad.dtype == torch.bfloat16 and torch.all(loss.grad[~mask] == 0)


def test_accumulate_then_update_equals_one_big_step():
    k = 6
    parts = [batch(seed, shape=(4, 29), k=k) for seed in range(3)]
    whole = [torch.cat([p[i] for p in parts]) for i in range(4)]
    big = DoReMi(k, step_size=0.8)
    big.step(*whole)
    accumulated = DoReMi(k, step_size=0.8)
    before = accumulated.weights.clone()
    for loss, ref, domain, mask in parts:
        loss = loss.clone().requires_grad_(True)
        objective = accumulated.accumulate(loss, ref, domain, mask)
        objective.backward()  # uses the α before the update
        stats = oracle_stats(loss, domain, k, ref, mask)
        present = stats[0] > 0
        want = (before.double()[present] * stats[1][present] / stats[0][present]).sum()
        torch.testing.assert_close(objective.double(), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(accumulated.weights, before)
    accumulated.update()
    torch.testing.assert_close(accumulated.weights, big.weights, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(accumulated.excess, big.excess, rtol=1e-6, atol=1e-6)
    assert int(accumulated.num_updates) == 1


def test_accumulate_update_misuse_raises():
    mixer = DoReMi(2)
    with pytest.raises(RuntimeError, match="update\\(\\) needs"):
        mixer.update()
    loss, ref, domain, mask = batch(0, k=2)
    mixer.accumulate(loss, ref, domain, mask)
    with pytest.raises(RuntimeError, match="call update\\(\\) before step"):
        mixer.step(loss, ref, domain, mask)
    with pytest.raises(RuntimeError, match="call update\\(\\) before state_dict"):
        mixer.state_dict()


def test_state_dict_round_trip_gives_identical_weights():
    first = DoReMi(5, step_size=0.9, smoothing=0.01, proxy_loss="reweighted")
    for seed in range(3):
        first.step(*batch(seed))
    second = DoReMi(5)
    second.load_state_dict(first.state_dict())
    assert second.proxy_loss == "reweighted" and second.step_size == 0.9
    for seed in range(3, 6):
        a = first.step(*batch(seed))
        b = second.step(*batch(seed))
        assert torch.equal(a, b)
    for key, value in first.state_dict().items():
        other = second.state_dict()[key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


def test_load_state_dict_validates():
    mixer = DoReMi(3)
    state = DoReMi(4).state_dict()
    with pytest.raises(ValueError, match="num_domains=4"):
        mixer.load_state_dict(state)
    state = mixer.state_dict()
    state["weights"] = torch.ones(2)
    with pytest.raises(ValueError, match="state\\['weights'\\] must have shape"):
        mixer.load_state_dict(state)
    state = mixer.state_dict()
    del state["excess"]
    with pytest.raises(ValueError, match="missing"):
        mixer.load_state_dict(state)
    with pytest.raises(TypeError, match="state must be a dict"):
        mixer.load_state_dict([1, 2])


def _trained(**kwargs):
    mixer = DoReMi(3, step_size=0.8, **kwargs)
    for seed in range(3):
        mixer.step(*batch(seed, k=3))
    return mixer


def _assert_same_state(a, b):
    for key, value in a.items():
        other = b[key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


NAN3 = torch.tensor([float("nan"), 0.5, 0.5])


@pytest.mark.parametrize(
    "key,value,exc,match",
    [
        ("weights", NAN3, ValueError, "state\\['weights'\\] must be finite"),
        ("weights", torch.tensor([-0.1, 0.6, 0.5]), ValueError, "'weights'\\] must be >= 0"),
        ("weights", torch.ones(3), ValueError, "state\\['weights'\\] must be normalised"),
        ("weights", torch.tensor([0.0, 0.0, 0.0]), ValueError, "'weights'.*normalised"),
        ("weights", torch.tensor([1e39, 0.0, 0.0], dtype=torch.float64), ValueError,
         "'weights'.*finite"),
        ("weights", [0.2, 0.3, 0.5j], TypeError, "'weights'.*floating point"),
        ("average_weights", NAN3, ValueError, "'average_weights'.*finite"),
        ("average_weights", torch.tensor([0.5, 0.6, -0.1]), ValueError, "'average_weights'.*>= 0"),
        ("average_weights", torch.tensor([0.5, 0.5, 0.5]), ValueError,
         "'average_weights'.*normalised"),
        ("excess", torch.tensor([0.1, float("inf"), 0.0]), ValueError, "'excess'.*finite"),
        ("excess", torch.tensor([0.1, -1.0, 0.0]), ValueError, "'excess'.*>= 0"),
        ("excess", torch.tensor([1, 0, 0]), TypeError, "'excess'.*floating point"),
        ("num_updates", -5, ValueError, "state\\['num_updates'\\] must be >= 0"),
        ("num_updates", torch.tensor(-5), ValueError, "'num_updates'.*>= 0"),
        ("num_updates", 2.7, TypeError, "'num_updates'.*must be an int"),
        ("num_updates", torch.tensor(2.7), TypeError, "'num_updates'.*integer"),
        ("num_updates", torch.tensor([1, 2]), ValueError, "'num_updates'.*scalar"),
        ("num_updates", torch.tensor(2, device="meta"), ValueError,
         "state\\['num_updates'\\] is a meta tensor, which holds no values"),
        ("weights", torch.ones(3, device="meta") / 3, ValueError,
         "state\\['weights'\\] is a meta tensor, which holds no values"),
        ("num_skipped", torch.tensor(-1), ValueError, "'num_skipped'.*>= 0"),
        ("num_out_of_range", True, TypeError, "'num_out_of_range'.*bool"),
        ("num_out_of_range", "3", TypeError, "'num_out_of_range'.*int"),
        ("num_domains", "3", TypeError, "state\\['num_domains'\\] must be an int"),
        ("num_domains", 3.0, TypeError, "'num_domains'.*int"),
        ("step_size", 10**400, ValueError, "state\\['step_size'\\] must be finite"),
        ("step_size", -1.0, ValueError, "'step_size'"),
        ("step_size", 1e39, ValueError, "state\\['step_size'\\] must be at most 3.403e\\+38"),
        ("smoothing", 2.0, ValueError, "'smoothing'"),
        ("proxy_loss", ["dro"], ValueError, "'proxy_loss'"),
        # torch's "Boolean value of Tensor ... is ambiguous", naming no key
        ("version", torch.tensor([1, 1]), TypeError, r"state\['version'\] must be an int"),
        ("version", "1", TypeError, r"state\['version'\] must be an int, got str"),
        ("version", 2, ValueError, r"state\['version'\] must be 1, got 2"),
    ],
)
def test_load_state_dict_rejects_bad_values_and_changes_nothing(key, value, exc, match):
    mixer = _trained()
    before = mixer.state_dict()
    state = mixer.state_dict()
    state[key] = value
    with pytest.raises(exc, match=match):
        mixer.load_state_dict(state)
    _assert_same_state(before, mixer.state_dict())
    assert (mixer.step_size, mixer.smoothing, mixer.proxy_loss) == (0.8, 1e-3, "dro")


def test_load_state_dict_accepts_real_states_bit_exactly():
    # zero weights come from a float32 softmax underflow with smoothing 0 (a legitimate state)
    source = DoReMi(3, step_size=1e4, smoothing=0.0)
    loss, ref = torch.tensor([3.0, 1.0, 1.0]), torch.tensor([0.0, 1.0, 1.0])
    source.step(loss, ref, torch.tensor([0, 1, 2]))
    assert float(source.weights.min()) == 0.0
    target = DoReMi(3)
    target.load_state_dict(source.state_dict())
    _assert_same_state(source.state_dict(), target.state_dict())
    # float64 tensors and Python ints are accepted (converted to the state's dtypes)
    state = _trained().state_dict()
    state64 = dict(state, weights=state["weights"].double(), num_updates=3, num_skipped=0)
    target.load_state_dict(state64)
    _assert_same_state(state, target.state_dict())


def test_average_weights_tolerance_grows_with_the_number_of_updates():
    # the running mean is updated in float32, so its sum drifts a little with every update
    state = DoReMi(3).state_dict()
    state["average_weights"] = torch.tensor([0.5, 0.25, 0.2505])  # sum 1.0005
    with pytest.raises(ValueError, match="'average_weights'.*normalised"):
        DoReMi(3).load_state_dict(state)
    state["num_updates"] = torch.tensor(100_000)
    mixer = DoReMi(3)
    mixer.load_state_dict(state)
    assert torch.equal(mixer.average_weights, state["average_weights"])
    assert int(mixer.num_updates) == 100_000


def test_average_weights_tolerance_is_capped():
    # 1.2e-7 per update without a cap: from 8.4M updates an all-zero average loaded.
    state = DoReMi(3).state_dict()
    for n, average in ((9_000_000, [0.0, 0.0, 0.0]), (10**12, [0.3, 0.3, 0.25]),
                       (10**12, [0.5, 0.5, 0.11])):
        state.update(num_updates=torch.tensor(n), average_weights=torch.tensor(average))
        with pytest.raises(ValueError, match="'average_weights'.*normalised"):
            DoReMi(3).load_state_dict(state)
    # the drift a long run can really have (measured: ~5e-2 after 1e7 updates) still loads
    state.update(num_updates=torch.tensor(10**7), average_weights=torch.tensor([0.3, 0.3, 0.35]))
    DoReMi(3).load_state_dict(state)


@pytest.mark.parametrize("key", ["num_updates", "num_skipped", "num_out_of_range"])
def test_counters_near_int64s_end_are_refused(key):
    # 2**63 - 1 loaded, and the next update wrapped the counter to -2**63.
    state = _trained().state_dict()
    for value in (2**63 - 1, torch.tensor(2**62)):
        with pytest.raises(ValueError, match=rf"state\['{key}'\] must be < 2\*\*62 .*got "):
            DoReMi(3).load_state_dict(dict(state, **{key: value}))
    mixer = DoReMi(3, step_size=0.8)
    mixer.load_state_dict(dict(state, **{key: 2**62 - 1}))
    mixer.step(*batch(7, k=3))
    assert int(mixer.state_dict()[key]) >= 2**62 - 1


@pytest.mark.parametrize(
    "init,exc,match",
    [
        ("abc", TypeError, "init_weights must be a sequence"),
        (bytearray(b"\x01\x02\x03"), TypeError, "got bytearray"),  # was the weights [1, 2, 3]
        ([None, 1, 1], TypeError, "init_weights must hold real numbers, got NoneType"),
        ([1 + 1j, 1, 1], TypeError, "init_weights must hold real numbers, got complex"),
        ([True, 1, 1], TypeError, "init_weights must hold real numbers, got bool"),
        ([[1.0], 2.0, 3.0], TypeError, "init_weights must hold real numbers, got list"),
        (torch.tensor([1 + 1j, 1, 1]), TypeError, "init_weights must be real"),
        (torch.tensor([True, True, True]), TypeError, "init_weights must be real"),
        # ... also as the elements of a list (True was taken as 1.0)
        ([torch.tensor(True), torch.tensor(1.0), torch.tensor(2.0)], TypeError,
         "init_weights must hold real numbers, got a torch.bool tensor"),
        ([torch.tensor(1 + 1j), 1.0, 2.0], TypeError,
         "init_weights must hold real numbers, got a torch.complex64 tensor"),
        ({1.0, 2.0, 3.0}, TypeError, "init_weights must be a sequence"),
        ([10**400, 1, 1], ValueError, "init_weights must be finite"),
        ([1.0, float("inf"), 1.0], ValueError, "init_weights must be finite"),
        # positive, but below float32's smallest subnormal once normalised: it would be 0
        ([1e-46, 1.0, 1.0], ValueError, "init_weights\\[0\\] is 0 in float32"),
        (torch.tensor([1.0, 1e-300, 1.0], dtype=torch.float64), ValueError,
         "init_weights\\[1\\] is 0 in float32"),
        ([1e308, 1e308, 1.0], ValueError, "init_weights\\[2\\] is 0 in float32"),
    ],
)
def test_init_weights_errors_name_the_argument(init, exc, match):
    with pytest.raises(exc, match=match):
        DoReMi(3, init_weights=init)


@pytest.mark.parametrize(
    "init,want",
    [
        # parsed in float64: a float32 detour would make 1e39 inf and 1e-40 a subnormal's 0
        ([1e39, 1e39, 2e39], [0.25, 0.25, 0.5]),
        ([1e308, 1e308, 1e308], [1 / 3, 1 / 3, 1 / 3]),  # the float64 sum overflows: rescaled
        ([1e-40, 1.0, 1.0], [5e-41, 0.5, 0.5]),
        ((1, 2, 5), [1 / 8, 2 / 8, 5 / 8]),
    ],
)
def test_init_weights_extreme_but_valid_values(init, want):
    weights = DoReMi(3, init_weights=init).weights
    torch.testing.assert_close(weights, torch.tensor(want), rtol=1e-6, atol=0)
    assert bool((weights > 0).all())


def test_init_weights_from_numpy_keeps_float64_precision():
    np = pytest.importorskip("numpy")
    weights = DoReMi(2, init_weights=np.array([1e-40, 1.0])).weights
    assert float(weights[0]) > 0
    with pytest.raises(ValueError, match="init_weights\\[0\\] is 0 in float32"):
        DoReMi(2, init_weights=np.array([1e-300, 1.0]))
    with pytest.raises(TypeError, match="init_weights"):
        DoReMi(2, init_weights=np.array([1 + 1j, 1]))


def test_init_weights_refuse_masked_entries():
    # The masked 9 was the weight used (load_weights and the sampler refuse it already).
    np = pytest.importorskip("numpy")
    with pytest.raises(TypeError, match="init_weights has masked entries"):
        DoReMi(2, init_weights=np.ma.array([1.0, 9.0], mask=[0, 1]))
    with pytest.raises(TypeError, match="init_weights has masked entries"):
        fastmix.ODM(2, init_weights=np.ma.array([1.0, 9.0], mask=[0, 1]))
    unmasked = DoReMi(2, init_weights=np.ma.array([1.0, 3.0], mask=[0, 0])).weights
    assert unmasked.tolist() == [0.25, 0.75]


def test_init_weights_and_state_from_byte_swapped_numpy():
    # A '>f8' array (saved on another machine, read with np.load) holds real numbers: torch
    # refuses byte-swapped arrays, and the error said "init_weights must hold real numbers".
    np = pytest.importorskip("numpy")
    for dtype in (">f8", ">f4", ">i8"):
        init = np.array([1, 2, 5], dtype=dtype)
        weights = DoReMi(3, init_weights=init).weights
        torch.testing.assert_close(weights, torch.tensor([1 / 8, 2 / 8, 5 / 8]))
    state = DoReMi(3).state_dict()
    state["weights"] = np.array([0.25, 0.25, 0.5], dtype=">f8")
    mixer = DoReMi(3)
    mixer.load_state_dict(state)
    assert mixer.weights.tolist() == [0.25, 0.25, 0.5]


def test_device_errors_name_the_argument():
    with pytest.raises(ValueError, match="device 'gpu0' is not a valid torch device"):
        DoReMi(3, device="gpu0")
    with pytest.raises(TypeError, match="device must be a str or torch.device"):
        DoReMi(3, device=1.5)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda:999'"):
            DoReMi(3, device="cuda:999")
    else:
        with pytest.raises(ValueError, match="device='cuda' needs CUDA"):
            DoReMi(3, device="cuda")
        with pytest.raises(ValueError, match="device='cuda' needs CUDA"):
            DoReMi(3).to("cuda")


def test_one_domain_takes_a_scalar_init_weight():
    assert DoReMi(1, init_weights=torch.tensor(1.0)).weights.tolist() == [1.0]


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(num_domains=0), ValueError, "num_domains must be >= 1"),
        (dict(num_domains=2.5), TypeError, "num_domains must be an int"),
        (dict(num_domains=2**63), ValueError, r"num_domains must be <= 2\*\*31 - 1"),
        (dict(num_domains=2**31), ValueError, r"num_domains must be <= 2\*\*31 - 1"),
        (dict(step_size=-1.0), ValueError, "step_size"),
        (dict(step_size=float("nan")), ValueError, "step_size"),
        (dict(step_size="1"), TypeError, "step_size"),
        (dict(smoothing=1.5), ValueError, "smoothing"),
        (dict(step_size=10**400), ValueError, "step_size must be finite"),
        # inf in the float32 update: every update was skipped and α never moved
        (dict(step_size=1e39), ValueError,
         r"step_size must be at most 3.403e\+38 \(the update runs in float32"),
        (dict(smoothing=10**400), ValueError, "smoothing must be finite"),
        (dict(proxy_loss="mean"), ValueError, "proxy_loss"),
        (dict(init_weights=[1.0, 2.0]), ValueError, "init_weights must have 3"),
        (dict(init_weights=[1.0, 0.0, 2.0]), ValueError, "init_weights must be finite and > 0"),
        # a meta tensor raised NotImplementedError; a [1, 3] one was flattened silently
        (dict(init_weights=torch.ones(3, device="meta")), ValueError,
         "init_weights is a meta tensor, which holds no values"),
        (dict(init_weights=torch.ones(1, 3)), ValueError,
         r"init_weights must be 1-D \(K values\), got shape \(1, 3\)"),
        (dict(init_weights=torch.tensor(1.0)), ValueError, "init_weights must have 3"),
        (dict(backend="tpu"), ValueError, "backend"),
        # taken by their truth: "no" switched them on
        (dict(deterministic="no"), TypeError, "deterministic must be True or False, got 'no'"),
        (dict(debug=1), TypeError, "debug must be True or False, got 1"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, exc, match):
    args = dict(num_domains=3)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        DoReMi(args.pop("num_domains"), **args)


def test_numpy_numbers_are_taken():

    m = DoReMi(np.int64(3), step_size=np.float32(0.5), smoothing=np.float64(1e-3))
    assert (m.num_domains, m.step_size, m.smoothing) == (3, 0.5, 1e-3)
    assert type(m.num_domains) is int and type(m.step_size) is float
    want = DoReMi(3, step_size=0.5)
    loss, ref, dom = torch.tensor([2.0, 1.0, 3.0]), torch.tensor([1.0, 1.0, 1.0]), torch.tensor(
        [0, 1, 2])
    m.step(loss, ref, dom)
    want.step(loss, ref, dom)
    assert torch.equal(m.weights, want.weights)
    m.load_state_dict(dict(want.state_dict(), num_domains=np.int64(3), step_size=np.float32(2)))
    assert m.step_size == 2.0
    with pytest.raises(TypeError, match="step_size"):
        DoReMi(3, step_size=np.bool_(True))
    with pytest.raises(TypeError, match="step_size"):
        DoReMi(3, step_size=np.complex64(1))


def test_step_rejects_bad_input():
    mixer = DoReMi(3, device="cpu")
    loss, ref, domain, mask = batch(0, k=3)
    with pytest.raises(TypeError, match="ref_loss is required"):
        mixer.step(loss, None, domain, mask)
    with pytest.raises(ValueError, match="ref_loss must have loss's shape"):
        mixer.step(loss, ref[:, :-1], domain, mask)
    with pytest.raises(ValueError, match="domain ids must be in"):
        mixer.step(loss, ref, domain + 3, mask)
    with pytest.raises(ValueError, match="but the DoReMi state is on cpu"):
        mixer.step(loss.to("meta"), ref.to("meta"), domain.to("meta"), mask.to("meta"))
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run"):
        DoReMi(3, backend="cuda").step(loss, ref, domain, mask)
    assert int(mixer.num_updates) == 0


def test_out_of_range_counter_and_debug_check():
    mixer = DoReMi(3, debug=True)
    loss, ref, _, _ = batch(0, shape=(5,), k=3, per_sequence=False)
    domain = torch.tensor([0, 1, 9, -2, 2])
    # bypass the CPU value check to exercise the device-side counter (the GPU path)
    torch.ops.fastmix.doremi_step_(
        loss, domain, None, ref, mixer._state, mixer._counters,
        torch.empty(0, dtype=torch.int32), 1.0, 1e-3, "dro", "torch", False,
    )  # fmt: skip
    assert int(mixer.num_out_of_range) == 2 and int(mixer.num_updates) == 1
    with pytest.raises(ValueError, match="2 token\\(s\\) had a domain id outside"):
        mixer.check()


def test_compiled_step_matches_eager():
    eager, compiled = DoReMi(4, step_size=0.6), DoReMi(4, step_size=0.6)
    step = torch.compile(compiled.step, fullgraph=True, backend="aot_eager")
    for seed in range(3):
        loss, ref, domain, mask = batch(seed, k=4)
        a_loss = loss.clone().requires_grad_(True)
        b_loss = loss.clone().requires_grad_(True)
        eager.step(a_loss, ref, domain, mask).backward()
        step(b_loss, ref, domain, mask).backward()
        torch.testing.assert_close(b_loss.grad, a_loss.grad)
    torch.testing.assert_close(compiled.weights, eager.weights)
    torch.testing.assert_close(compiled.average_weights, eager.average_weights)
    assert int(compiled.num_updates) == 3



# A training script's mixer is often a module global, which dynamo specialises on.
_GLOBAL_DOREMI: DoReMi | None = None


def test_compiled_accumulate_does_not_recompile_per_micro_batch():
    # accumulate() counted its micro-batches in a host int: a constant to torch.compile, so each
    # micro-batch recompiled, and at the 9th (dynamo's recompile limit) fullgraph=True raised.
    from torch._dynamo.testing import CompileCounter

    global _GLOBAL_DOREMI
    torch._dynamo.reset()  # no compiled frame of another test counts here
    eager, _GLOBAL_DOREMI = DoReMi(4, step_size=0.6), DoReMi(4, step_size=0.6)
    counter = CompileCounter()

    @torch.compile(fullgraph=True, backend=counter)
    def accumulate(loss, ref, domain, mask):
        return _GLOBAL_DOREMI.accumulate(loss, ref, domain, mask)

    try:
        for update in range(2):
            for seed in range(10):
                loss, ref, domain, mask = batch(10 * update + seed, k=4)
                a_loss = loss.clone().requires_grad_(True)
                b_loss = loss.clone().requires_grad_(True)
                eager.accumulate(a_loss, ref, domain, mask).backward()
                accumulate(b_loss, ref, domain, mask).backward()
                assert torch.equal(b_loss.grad, a_loss.grad)
            eager.update()
            _GLOBAL_DOREMI.update()
            assert torch.equal(_GLOBAL_DOREMI.weights, eager.weights)
        assert int(_GLOBAL_DOREMI.num_updates) == 2
        assert counter.frame_count <= 2  # not one per micro-batch
        with pytest.raises(RuntimeError, match="update\\(\\) needs"):
            _GLOBAL_DOREMI.update()  # the flag is cleared by update()
    finally:
        _GLOBAL_DOREMI = None


def test_a_doremi_pickled_with_a_pending_count_unpickles():
    # Before the pending micro-batches became a flag, a pickled DoReMi held their count.
    source = DoReMi(2)
    old = dict(source.__dict__)
    del old["_has_pending"]
    old["_num_pending"] = 3
    mixer = DoReMi.__new__(DoReMi)
    mixer.__setstate__(old)
    with pytest.raises(RuntimeError, match="call update\\(\\) before step"):
        mixer.step(*batch(0, k=2))
    mixer.update()
    assert int(mixer.num_updates) == 1

def test_a_doremi_pickled_with_a_3_by_k_pending_buffer_unpickles():
    # Before the pending buffer carried the ranks' dropped-token count in a last slot it was
    # [3, K]: such a pickle still applies its pending statistics.
    fresh = DoReMi(3, step_size=0.7)
    fresh.accumulate(*batch(0, k=3))
    old = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in fresh.__dict__.items()}
    old["_pending"] = fresh._pending[:-1].view(3, 3).clone()
    mixer = DoReMi.__new__(DoReMi)
    mixer.__setstate__(old)
    mixer.update()
    fresh.update()
    assert torch.equal(mixer.weights, fresh.weights) and int(mixer.num_updates) == 1
    assert float((mixer.weights - 1 / 3).abs().max()) > 1e-4  # the statistics moved α


def test_inductor_step_with_a_transposed_loss(monkeypatch):
    # A sequence-first model's [T, B] loss seen as [B, T]: inductor checks the gradient op's real
    # output strides against its fake ones (they differed: a crash in backward).
    import torch._inductor.config as inductor_config

    # A cached graph from another fastmix version would hide a changed fake kernel.
    monkeypatch.setattr(inductor_config, "force_disable_caches", True)
    eager, compiled = DoReMi(4, step_size=0.6), DoReMi(4, step_size=0.6)
    step = torch.compile(compiled.step, fullgraph=True)
    g = torch.Generator().manual_seed(3)
    loss_tb = torch.rand(8, 6, generator=g) * 5
    ref, domain = torch.rand(6, 8, generator=g) * 5, torch.randint(0, 4, (6,), generator=g)
    a_loss = loss_tb.clone().requires_grad_(True)
    b_loss = loss_tb.clone().requires_grad_(True)
    eager.step(a_loss.t(), ref, domain).backward()
    step(b_loss.t(), ref, domain).backward()
    torch.testing.assert_close(b_loss.grad, a_loss.grad)
    torch.testing.assert_close(compiled.weights, eager.weights)



def test_a_rejected_batch_leaves_the_state_where_it_is():
    # ("meta" stands in for a GPU.)  The state followed the batch before the forced backend was
    # checked: the RuntimeError left it moved, and a batch on the first device was then refused.
    mixer = DoReMi(3, backend="cuda")
    loss = torch.rand(2, 4, device="meta")
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run on meta"):
        mixer.step(loss, loss, torch.zeros(2, dtype=torch.int64, device="meta"))
    assert mixer.device.type == "cpu"
    mixer.backend = "torch"
    mixer.step(*batch(0, k=3))
    assert int(mixer.num_updates) == 1

def _inference_tensors(mixer):
    return [key for key, value in vars(mixer).items()
            if isinstance(value, torch.Tensor) and value.is_inference()]


def test_a_doremi_made_in_inference_mode_steps_outside_it():
    # Evaluation code often builds or restores objects inside torch.inference_mode(): the state
    # (and the workspace of a first step taken there) was then inference tensors, and the first
    # step outside raised "Inplace update to inference tensor outside InferenceMode is not
    # allowed".
    batches = [batch(seed, k=4) for seed in range(4)]
    want = DoReMi(4, step_size=0.6)
    objectives = [want.step(*b) for b in batches]
    first = DoReMi(4, step_size=0.6)
    first.step(*batches[0])
    with torch.inference_mode():
        built = DoReMi(4, step_size=0.6)
        loaded = DoReMi(4)
        loaded.load_state_dict(first.state_dict())
        copied = copy.deepcopy(first)
        unpickled = pickle.loads(pickle.dumps(first))
        moved = DoReMi(4).to("meta")  # ("meta" stands in for a GPU)
        stepped = DoReMi(4, step_size=0.6)
        stepped.step(*batches[0])  # allocates the workspace
    for mixer, start in ((built, 0), (loaded, 1), (copied, 1), (unpickled, 1), (stepped, 1)):
        for b, objective in zip(batches[start:], objectives[start:], strict=True):
            assert torch.equal(mixer.step(*b), objective)
    for mixer in (built, loaded, copied, unpickled, stepped):  # bit for bit
        for key, value in want.state_dict().items():
            other = mixer.state_dict()[key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
    loss = torch.rand(2, 4, device="meta")
    moved.step(loss, loss, torch.zeros(2, dtype=torch.int64, device="meta"))
    for mixer in (built, loaded, copied, unpickled, moved, stepped):
        assert _inference_tensors(mixer) == []


def test_public_export():
    assert fastmix.DoReMi is DoReMi
