"""ODM against a plain Python-float implementation of the released code's rule."""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest
import torch

from fastmix.mixers.odm import ODM


class PlainODM:
    """The rule written out with Python floats, one domain at a time."""

    def __init__(self, k: int, beta: float, warmup: int, init: list[float] | None = None):
        self.k, self.beta, self.warmup = k, beta, warmup
        self.init = [1.0 / k] * k if init is None else [w / sum(init) for w in init]
        self.rewards = [0.0] * k
        self.weights = list(self.init)
        self.t = 0

    def step(self, losses: list[float], domains: list[int]) -> list[float]:
        for i in range(self.k):
            mine = [x for x, d in zip(losses, domains, strict=True) if d == i]
            if mine:
                mean = sum(mine) / len(mine)
                self.rewards[i] = self.beta * self.rewards[i] + (1 - self.beta) * math.exp(mean)
        self.t += 1
        if self.t <= self.warmup:
            self.weights = list(self.init)
            return self.weights
        eps = min(1 / self.k, math.sqrt(math.log(self.k) / (self.k * self.t)))
        total = sum(self.rewards)
        self.weights = [(1 - self.k * eps) * r / total + eps for r in self.rewards]
        return self.weights


def _batches(k: int, steps: int, seed: int, unseen: set[int]):
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([d for d in range(k) if d not in unseen])
    for s in range(steps):
        n = 64
        dom = allowed[torch.randint(0, len(allowed), (n,), generator=g)]
        if s == 0:  # make the first step see only a couple of domains
            dom = allowed[torch.randint(0, min(2, len(allowed)), (n,), generator=g)]
        loss = (torch.rand(n, generator=g) * 3 + dom.float() * 0.3).float()
        yield loss, dom


@pytest.mark.parametrize("k,beta,warmup", [(5, 0.9, 3), (8, 0.5, 0), (3, 0.0, 1)])
def test_matches_plain_formula(k, beta, warmup):
    unseen = {k - 1}  # one domain never appears: only the exploration share ε_t
    odm = ODM(k, smoothing=beta, warmup_steps=warmup, init_weights=[i + 1.0 for i in range(k)])
    plain = PlainODM(k, beta, warmup, init=[i + 1.0 for i in range(k)])
    for step, (loss, dom) in enumerate(_batches(k, 12, seed=k, unseen=unseen)):
        got = odm.step(loss, dom)
        want = plain.step(loss.double().tolist(), dom.tolist())
        assert got is odm.weights
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32),
                                   rtol=2e-5, atol=1e-7, msg=f"step {step + 1}")
        torch.testing.assert_close(odm.rewards, torch.tensor(plain.rewards, dtype=torch.float32),
                                   rtol=2e-5, atol=1e-7)
        assert abs(float(got.sum()) - 1.0) < 1e-5
        if step + 1 > warmup:
            eps = min(1 / k, math.sqrt(math.log(k) / (k * (step + 1))))
            assert float(got[k - 1]) == pytest.approx(eps, rel=1e-5)
    assert odm.num_steps == 12


def test_warmup_holds_initial_weights_and_mask_drops_tokens():
    odm = ODM(3, warmup_steps=2, init_weights=[0.2, 0.3, 0.5])
    loss = torch.tensor([1.0, 2.0, 9.0, 4.0])
    dom = torch.tensor([0, 1, 2, 2])
    mask = torch.tensor([True, True, False, True])
    for _ in range(2):
        w = odm.step(loss, dom, mask)
        torch.testing.assert_close(w, torch.tensor([0.2, 0.3, 0.5]))
    # R̂ accumulated during warm-up from the unmasked tokens only (domain 2's mean is 4, not 6.5)
    beta = 0.9
    r2 = (1 - beta) * math.exp(4.0) * (1 + beta)
    assert float(odm.rewards[2]) == pytest.approx(r2, rel=1e-5)
    w = odm.step(loss, dom, mask)
    assert not torch.allclose(w, torch.tensor([0.2, 0.3, 0.5]))


def test_state_dict_round_trip_continues_identically():
    a = ODM(4, smoothing=0.8, warmup_steps=1)
    batches = list(_batches(4, 10, seed=3, unseen=set()))
    for loss, dom in batches[:5]:
        a.step(loss, dom)
    state = a.state_dict()
    b = ODM(4)
    b.load_state_dict(state)
    assert b.num_steps == 5 and b.smoothing == 0.8 and b.warmup_steps == 1
    for loss, dom in batches[5:]:
        wa, wb = a.step(loss, dom), b.step(loss, dom)
        assert torch.equal(wa, wb)
    assert torch.equal(a.rewards, b.rewards)
    state["weights"] = torch.zeros(4)  # the saved copy is independent of the live state
    assert float(a.weights.sum()) == pytest.approx(1.0)


def test_update_from_stats_and_non_finite_loss_is_skipped():
    odm = ODM(3)
    stats = torch.tensor([[2.0, 0.0, 1.0], [3.0, 0.0, float("nan")], [0.0, 0.0, 0.0]])
    w = odm.update(stats)
    assert torch.isfinite(w).all()
    assert int(odm.num_skipped) == 1
    assert float(odm.rewards[0]) == pytest.approx(0.1 * math.exp(1.5), rel=1e-6)
    assert float(odm.rewards[2]) == 0.0


def test_a_count_that_is_not_a_number_is_skipped_like_a_non_finite_loss():
    # An infinite count read as a mean loss of 0 (a reward of exp(0) = 1) and a NaN count was
    # dropped without being counted in num_skipped.
    odm = ODM(4, smoothing=0.5)
    stats = torch.tensor([[float("inf"), float("nan"), 2.0, -float("inf")],
                          [3.0, 3.0, 4.0, 1.0]])  # fmt: skip
    w = odm.update(stats)
    assert torch.isfinite(w).all()
    assert int(odm.num_skipped) == 2  # inf and nan; a count below 0 saw no token
    assert odm.rewards[[0, 1, 3]].tolist() == [0.0, 0.0, 0.0]
    assert float(odm.rewards[2]) == pytest.approx(0.5 * math.exp(2.0), rel=1e-6)


def test_no_domain_seen_gives_uniform():
    odm = ODM(4)
    w = odm.update(torch.zeros(3, 4))
    torch.testing.assert_close(w, torch.full((4,), 0.25))


def test_many_domains_near_the_loss_clamp_keep_pi_normalised():
    # K·exp(80) overflows float32 from K ≈ 6142: the plain sum of R̂ was inf, so every share was 0,
    # π collapsed to ε (hard and easy domains equal, summing to 0.86) and its own state_dict was
    # refused on load.
    k = 8192
    odm = ODM(k, smoothing=0.0)
    odm.load_state_dict(dict(odm.state_dict(), num_steps=100_000))  # a resumed long run
    loss = torch.full((k, 4), 1.0)
    loss[: k - 10] = 90.0  # above the clamp
    w = odm.step(loss, torch.arange(k))
    assert not torch.isfinite(odm.rewards.sum())  # the case: the float32 sum itself overflows
    rewards = odm.rewards.double()
    eps = odm.exploration()
    want = (1 - k * eps) * rewards / rewards.sum() + eps
    torch.testing.assert_close(w.double(), want, rtol=1e-5, atol=0)
    assert abs(float(w.double().sum()) - 1.0) < 1e-5
    assert float(w[0]) > float(w[-1])
    ODM(k).load_state_dict(odm.state_dict())


def test_subnormal_rewards_keep_their_proportions():
    # Rewards of very negative losses: their sum (~1e-39) was clamped to 1e-30 before dividing.
    odm = ODM(2, smoothing=0.0)
    odm.load_state_dict(dict(odm.state_dict(), num_steps=99))  # ε = 0.06: the shares matter
    w = odm.step(torch.tensor([-89.0, -90.0]), torch.tensor([0, 1]))
    eps = odm.exploration()
    assert eps < 0.1 and float(odm.rewards.sum()) < 1e-38
    share0 = 1 / (1 + math.exp(-1))
    torch.testing.assert_close(w, torch.tensor([(1 - 2 * eps) * share0 + eps,
                                                (1 - 2 * eps) * (1 - share0) + eps]),
                               rtol=1e-4, atol=0)


def test_numpy_numbers_are_taken():
    import numpy as np

    odm = ODM(np.int64(3), smoothing=np.float32(0.5), warmup_steps=np.int32(1))
    assert (odm.num_domains, odm.smoothing, odm.warmup_steps) == (3, 0.5, 1)
    assert type(odm.num_domains) is int and type(odm.warmup_steps) is int
    odm.step(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 1, 2]))
    ODM(3).load_state_dict(dict(odm.state_dict(), num_domains=np.int64(3)))


def test_bad_input():
    with pytest.raises(ValueError, match="num_domains"):
        ODM(0)
    with pytest.raises(TypeError, match="num_domains"):
        ODM(2.5)
    with pytest.raises(ValueError, match=r"num_domains must be <= 2\*\*31 - 1"):
        ODM(2**63)
    with pytest.raises(ValueError, match="smoothing"):
        ODM(3, smoothing=1.0)
    with pytest.raises(ValueError, match="smoothing"):
        ODM(3, smoothing=-0.1)
    with pytest.raises(ValueError, match="warmup_steps"):
        ODM(3, warmup_steps=-1)
    with pytest.raises(ValueError, match="init_weights"):
        ODM(3, init_weights=[1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="init_weights"):
        ODM(3, init_weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="init_weights is a meta tensor"):
        ODM(3, init_weights=torch.ones(3, device="meta"))
    with pytest.raises(ValueError, match="init_weights must be 1-D"):
        ODM(6, init_weights=torch.ones(2, 3))
    # 10**400 overflowed the float division; a step count is int64 in the checkpoint
    with pytest.raises(ValueError, match="t must be <= 9223372036854775807, got an int of 1329"):
        ODM(3).exploration(10**400)
    with pytest.raises(ValueError, match="t must be >= 1, got 0"):
        ODM(3).exploration(0)
    assert 0 < ODM(3).exploration(2**63 - 1) < 1e-9
    odm = ODM(3)
    with pytest.raises(ValueError, match="stats"):
        odm.update(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="domain"):
        odm.step(torch.ones(4), torch.tensor([0, 1, 2, 3]))  # id 3 is out of range
    with pytest.raises(TypeError, match="loss"):
        odm.step([1.0], torch.tensor([0]))
    with pytest.raises(ValueError, match="num_domains"):
        odm.load_state_dict(ODM(4).state_dict())
    with pytest.raises(ValueError, match="missing"):
        odm.load_state_dict({"num_domains": 3})


def test_update_detaches_statistics_that_require_grad():
    # stats of a loss that requires grad: the state must not take a grad_fn (which would keep
    # every step's autograd graph alive and make .numpy() fail)
    loss = (torch.rand(40, generator=torch.Generator().manual_seed(4)) * 3).requires_grad_(True)
    domain = torch.arange(40) % 3
    stats = torch.stack([torch.bincount(domain, minlength=3).float(),
                         torch.zeros(3).index_add(0, domain, loss)])
    assert stats.requires_grad
    odm, plain = ODM(3), ODM(3)
    for _ in range(2):
        odm.update(stats)
        plain.update(stats.detach())
    assert not odm.weights.requires_grad and not odm.rewards.requires_grad
    assert odm.weights.grad_fn is None and odm.rewards.grad_fn is None
    for value in odm.state_dict().values():
        assert not (isinstance(value, torch.Tensor) and value.requires_grad)
    assert odm.weights.numpy().shape == (3,)
    assert torch.equal(odm.weights, plain.weights) and torch.equal(odm.rewards, plain.rewards)


def _trained_odm():
    odm = ODM(3, smoothing=0.8, warmup_steps=1)
    for loss, dom in _batches(3, 4, seed=5, unseen=set()):
        odm.step(loss, dom)
    return odm


def _assert_same_state(a, b):
    for key, value in a.items():
        other = b[key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


@pytest.mark.parametrize(
    "key,value,exc,match",
    [
        ("weights", torch.tensor([float("nan"), 0.5, 0.5]), ValueError, "'weights'.*finite"),
        ("weights", torch.tensor([-0.2, 0.6, 0.6]), ValueError, "'weights'.*>= 0"),
        ("weights", torch.ones(3), ValueError, "'weights'.*normalised"),
        ("weights", torch.zeros(3), ValueError, "'weights'.*normalised"),
        ("weights", torch.ones(4) / 4, ValueError, "'weights'.*shape"),
        ("rewards", torch.tensor([1.0, -2.0, 3.0]), ValueError, "'rewards'.*>= 0"),
        ("rewards", torch.tensor([1.0, float("inf"), 3.0]), ValueError, "'rewards'.*finite"),
        ("rewards", torch.tensor([1, 2, 3]), TypeError, "'rewards'.*floating point"),
        ("init_weights", torch.tensor([0.0, 0.5, 0.5]), ValueError, "'init_weights'.*> 0"),
        ("init_weights", torch.tensor([0.5, 0.5, 0.5]), ValueError, "'init_weights'.*normalised"),
        ("init_weights", torch.tensor([float("nan"), 0.5, 0.5]), ValueError,
         "'init_weights'.*finite"),
        ("num_steps", -5, ValueError, "state\\['num_steps'\\] must be >= 0"),
        ("num_steps", 2.7, TypeError, "'num_steps'.*int"),
        ("num_steps", torch.tensor(2.7), TypeError, "'num_steps'.*integer"),
        ("warmup_steps", -1, ValueError, "'warmup_steps'.*>= 0"),
        ("num_skipped", torch.tensor(-1), ValueError, "'num_skipped'.*>= 0"),
        ("num_skipped", torch.tensor(1.5), TypeError, "'num_skipped'.*integer"),
        ("num_skipped", torch.tensor([1, 2]), ValueError, "'num_skipped'.*scalar"),
        ("num_skipped", torch.tensor(1, device="meta"), ValueError, "'num_skipped'.*meta tensor"),
        ("rewards", torch.ones(3, device="meta"), ValueError,
         "state\\['rewards'\\] is a meta tensor, which holds no values"),
        ("num_domains", "3", TypeError, "state\\['num_domains'\\] must be an int"),
        ("smoothing", 1.0, ValueError, "'smoothing'.*< 1"),
        ("smoothing", 10**400, ValueError, "'smoothing'.*finite"),
        # NumPy's "truth value of an array ... is ambiguous", naming no key
        ("version", np.array([1, 1]), TypeError, r"state\['version'\] must be an int"),
        ("version", 2, ValueError, r"state\['version'\] must be 1, got 2"),
    ],
)
def test_load_state_dict_rejects_bad_values_and_changes_nothing(key, value, exc, match):
    odm = _trained_odm()
    before = odm.state_dict()
    state = odm.state_dict()
    state[key] = value
    with pytest.raises(exc, match=match):
        odm.load_state_dict(state)
    _assert_same_state(before, odm.state_dict())


def test_counters_near_int64s_end_are_refused():
    # num_steps = 2**63 - 1 loaded, and after one step the state held 2**63, which no load took;
    # num_skipped (an int64 tensor) would wrap to -2**63.
    state = _trained_odm().state_dict()
    for key in ("num_steps", "num_skipped"):
        for value in (2**63 - 1, torch.tensor(2**62)):
            with pytest.raises(ValueError, match=rf"state\['{key}'\] must be < 2\*\*62"):
                ODM(3).load_state_dict(dict(state, **{key: value}))
    odm = ODM(3, smoothing=0.8, warmup_steps=1)
    odm.load_state_dict(dict(state, num_steps=2**62 - 1))
    odm.step(torch.ones(4), torch.tensor([0, 1, 2, 0]))
    assert odm.num_steps == 2**62 and int(odm.num_skipped) >= 0


def test_load_state_dict_round_trip_is_bit_exact():
    source = _trained_odm()
    target = ODM(3)
    target.load_state_dict(source.state_dict())
    _assert_same_state(source.state_dict(), target.state_dict())
    # a counter saved as a tensor and float64 weights are converted, not rejected
    state = source.state_dict()
    state["num_steps"] = torch.tensor(state["num_steps"])
    state["weights"] = state["weights"].double()
    other = ODM(3)
    other.load_state_dict(state)
    _assert_same_state(source.state_dict(), other.state_dict())


def test_constructor_errors_name_the_argument():
    with pytest.raises(ValueError, match="smoothing must be finite"):
        ODM(3, smoothing=10**400)
    with pytest.raises(TypeError, match="init_weights must be a sequence"):
        ODM(3, init_weights="abc")
    with pytest.raises(TypeError, match="deterministic must be True or False, got 'no'"):
        ODM(3, deterministic="no")  # taken by its truth: "no" switched it on
    with pytest.raises(TypeError, match="init_weights must hold real numbers"):
        ODM(3, init_weights=[None, 1, 1])
    with pytest.raises(ValueError, match="init_weights\\[0\\] is 0 in float32"):
        ODM(2, init_weights=[1e-46, 1.0])
    huge = ODM(2, init_weights=[1e39, 3e39]).weights  # inf if parsed through float32
    torch.testing.assert_close(huge, torch.tensor([0.25, 0.75]))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda' needs CUDA"):
            ODM(3, device="cuda")
        with pytest.raises(ValueError, match="device='cuda' needs CUDA"):
            ODM(3).to("cuda")


def test_state_follows_the_first_batch_also_after_loading():
    # ("meta" stands in for a GPU.)  A checkpoint loaded into ODM(K) on the host, then the
    # first batch on the device: the state moves there, as for a fresh ODM and for DoReMi.
    source = ODM(3)
    stats = torch.tensor([[3.0, 1.0, 2.0], [6.0, 1.5, 5.0], [0.0] * 3])
    source.update(stats)
    resumed = ODM(3)
    resumed.load_state_dict(source.state_dict())
    resumed.update(stats.to("meta"))
    # (the step count went along; a meta tensor holds no value to compare)
    assert resumed.device.type == "meta" and resumed._steps.device.type == "meta"
    with pytest.raises(ValueError, match="inputs are on cpu but the ODM state is on meta"):
        resumed.update(stats)  # after a step the state stays where it is
    with pytest.raises(ValueError, match="inputs are on meta but the ODM state is on cpu"):
        ODM(3, device="cpu").update(stats.to("meta"))


def test_update_takes_two_or_three_rows():
    odm = ODM(3)
    for rows in (1, 4, 5):
        with pytest.raises(ValueError, match="stats must be"):
            odm.update(torch.ones(rows, 3))
    odm.update(torch.ones(2, 3))
    odm.update(torch.ones(3, 3))
    assert odm.num_steps == 2
    # a sparse tensor failed inside torch with NotImplementedError, naming no argument
    with pytest.raises(TypeError, match="stats must be a dense"):
        odm.update(torch.ones(3, 3).to_sparse())
    assert odm.num_steps == 2


def test_exported_from_package():
    import fastmix

    assert fastmix.ODM is ODM


def test_update_reads_no_device_value(monkeypatch):
    """update() must not synchronise: no .item(), bool(), .tolist(), .cpu(), .numpy()."""
    odm = ODM(4, warmup_steps=1)
    stats = torch.tensor([[3.0, 0.0, 2.0, 1.0], [6.0, 0.0, 5.0, 0.5], [0.0] * 4])

    def boom(*args, **kwargs):
        raise AssertionError("host sync inside ODM.update")

    for name in ("item", "__bool__", "tolist", "cpu", "numpy", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    for _ in range(3):  # warm-up step, then two rule steps
        odm.update(stats)
    monkeypatch.undo()
    assert odm.num_steps == 3 and abs(float(odm.weights.sum()) - 1) < 1e-6



# A training script's mixer is often a module global, which dynamo specialises on (a closure's or
# a bound method's host int it makes dynamic after one recompile instead).
_GLOBAL_ODM: ODM | None = None


def test_compiled_step_follows_the_step_count_without_recompiling():
    # t was a host int bumped by every step: a constant to torch.compile, so each step
    # recompiled, and at the 9th (dynamo's recompile limit) a fullgraph=True step raised (a
    # whole compiled training step fell back to eager without it).  In a CUDA graph, each replay
    # would reuse the captured step's ε_t and warm-up.
    from torch._dynamo.testing import CompileCounter

    global _GLOBAL_ODM
    torch._dynamo.reset()  # no compiled frame of another test counts here
    eager, _GLOBAL_ODM = ODM(5, warmup_steps=3), ODM(5, warmup_steps=3)
    counter = CompileCounter()

    @torch.compile(fullgraph=True, backend=counter)
    def step(loss, dom):
        return _GLOBAL_ODM.step(loss, dom)

    try:
        for loss, dom in _batches(5, 12, seed=4, unseen=set()):
            want = eager.step(loss, dom)
            got = step(loss, dom)
            assert torch.equal(got, want)  # warm-up, then ε_t of each step, bit for bit
        assert _GLOBAL_ODM.num_steps == 12
        assert torch.equal(_GLOBAL_ODM.rewards, eager.rewards)
        assert counter.frame_count <= 2  # not one per step
    finally:
        _GLOBAL_ODM = None


def test_an_odm_pickled_with_a_host_step_count_unpickles():
    # Before t moved to the device an ODM pickled (torch.save'd whole) its step count as a
    # host int "num_steps"; such an object still loads and counts on.
    source = ODM(3, warmup_steps=1)
    source.step(torch.ones(4), torch.tensor([0, 1, 2, 0]))
    old = dict(source.__dict__)
    del old["_steps"]
    old["num_steps"] = 7
    odm = ODM.__new__(ODM)
    odm.__setstate__(old)
    assert odm.num_steps == 7
    odm.step(torch.ones(4), torch.tensor([0, 1, 2, 0]))
    assert odm.num_steps == 8
    clone = pickle.loads(pickle.dumps(odm))
    assert clone.num_steps == 8 and torch.equal(clone.weights, odm.weights)


def _inference_tensors(odm):
    return [key for key, value in vars(odm).items()
            if isinstance(value, torch.Tensor) and value.is_inference()]


def test_an_odm_made_in_inference_mode_steps_outside_it():
    # Evaluation code often builds or restores objects inside torch.inference_mode(): the state
    # was then inference tensors, and the first step outside raised "Inplace update to inference
    # tensor outside InferenceMode is not allowed".
    batches = list(_batches(5, 6, seed=7, unseen=set()))
    want = ODM(5, warmup_steps=2)
    for loss, dom in batches:
        want.step(loss, dom)
    first = ODM(5, warmup_steps=2)
    first.step(*batches[0])
    with torch.inference_mode():
        built = ODM(5, warmup_steps=2)
        loaded = ODM(5, warmup_steps=2)
        loaded.load_state_dict(first.state_dict())
        copied = copy.deepcopy(first)
        unpickled = pickle.loads(pickle.dumps(first))
        moved = ODM(5, warmup_steps=2).to("meta")  # ("meta" stands in for a GPU)
    for loss, dom in batches:
        built.step(loss, dom)
    for odm in (loaded, copied, unpickled):
        for loss, dom in batches[1:]:
            odm.step(loss, dom)
    for odm in (built, loaded, copied, unpickled):  # bit for bit as a mixer made normally
        assert odm.num_steps == 6
        assert torch.equal(odm.weights, want.weights) and torch.equal(odm.rewards, want.rewards)
    moved.update(torch.ones(3, 5, device="meta"))
    for odm in (built, loaded, copied, unpickled, moved):
        assert _inference_tensors(odm) == []
    # and made and stepped inside inference mode, then stepped outside
    with torch.inference_mode():
        inside = ODM(5, warmup_steps=2)
        for loss, dom in batches[:3]:
            inside.step(loss, dom)
    for loss, dom in batches[3:]:
        inside.step(loss, dom)
    assert torch.equal(inside.weights, want.weights) and torch.equal(inside.rewards, want.rewards)


def test_a_rejected_batch_leaves_the_state_where_it_is():
    # ("meta" stands in for a GPU.)  The state followed the loss's device before the batch was
    # checked: a rejected first batch moved it, and every later (good) batch was refused.
    odm = ODM(3)
    with pytest.raises(ValueError, match="domain is on cpu but loss is on meta"):
        odm.step(torch.rand(4, device="meta"), torch.tensor([0, 1, 2, 0]))
    assert odm.device.type == "cpu"
    odm.step(torch.ones(4), torch.tensor([0, 1, 2, 0]))
    assert odm.num_steps == 1
