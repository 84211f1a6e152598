"""ODM, Online Data Mixing (Albalak et al. 2023): domains as bandit arms, resampled online.

Each domain's reward is the exponentiated mean training loss of its tokens in the step (a domain
the model still finds hard is sampled more).  In the form of the authors' released code:

    R̂_i ← β·R̂_i + (1 − β)·exp(L_i)            for each domain i seen in step t (others keep R̂_i)
    ε_t  = min(1/K, √(ln K / (K·t)))
    π_i  = (1 − K·ε_t)·R̂_i / Σ_j R̂_j + ε_t

with R̂ = 0 at the start (so an unseen domain gets only the exploration share ε_t) and the
initial weights during the first ``warmup_steps`` steps (R̂ still accumulates then).  ``t`` is the
1-based step count, a device tensor like the rest of the state, and ε_t and the warm-up are
computed from it on the device: :meth:`ODM.step` never synchronises — no ``.item()``, no
``.cpu()``, no Python branch on a device value — and runs under ``torch.compile(fullgraph=True)``
and in CUDA graphs, where a count kept on the host would be a constant of the graph.

The statistics come from :func:`fastmix.domain_loss_stats` (token count and loss sum per domain)
and are summed over data-parallel ranks, so every rank holds the same π.  ``weights`` is a device
tensor updated in place: hand it to ``MixtureDataset.set_weights`` after each step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fastmix import _checks, distributed
from fastmix.mixers._common import (
    MAX_COUNT,
    all_reduce_with_dropped,
    allocate_state,
    check_float,
    initial_weights,
    normal_state,
    normal_tensors,
    state_device,
    state_int,
    state_vector,
    weights_tolerance,
)
from fastmix.ops import loss_stats_and_dropped

__all__ = ["ODM"]

_STATE_VERSION = 1
# exp(80) ≈ 5.5e34: far above any real loss's reward yet finite in float32, so a diverging domain
# saturates instead of turning R̂ into inf (π divides by the largest R̂ before summing, so the sum
# stays finite for any K: K·exp(80) itself overflows float32 from K ≈ 6142).
_MAX_LOSS = 80.0
# float32 values per domain in the state: the initial weights, π and R̂.
_STATE_ROWS = 3


class ODM:
    """Online Data Mixing sampling weights π, held on the device.

    Args:
        num_domains: K, at most 2**31 - 1 (and a K whose state cannot be allocated on the
            device is a ValueError).
        smoothing: β in [0, 1), the weight of the old reward (the released code used 0.9).
        warmup_steps: steps (from the first) during which π stays at ``init_weights``.
        init_weights: the initial π (K positive values, normalised); uniform by default.
        backend: "cuda", "triton" or "torch" for :func:`fastmix.domain_loss_stats`.
        device: where the state lives; by default it follows the first batch.
        process_group: sum statistics over this group (default: the world group when
            torch.distributed is initialised).
        deterministic: bitwise-reproducible statistics.

    Attributes: ``weights`` (π, ``[K]`` float32), ``rewards`` (R̂), ``num_steps`` (t, read as an
    int from the device: a synchronisation),
    ``num_skipped`` (device int64: domain-steps whose count or mean loss was not finite, ignored).

    :meth:`step` treats a domain id outside [0, K) as :func:`fastmix.domain_loss_stats` does
    (ValueError in eager mode on CPU, the token dropped elsewhere); with several ranks the
    error is raised on every rank after the step's all-reduce, nothing updated, instead of on
    the rank that saw the id alone while the others waited in the collective.
    """

    def __init__(
        self,
        num_domains: int,
        *,
        smoothing: float = 0.9,
        warmup_steps: int = 0,
        init_weights: Sequence[float] | Tensor | None = None,
        backend: str | None = None,
        device: torch.device | str | None = None,
        process_group: Any = None,
        deterministic: bool = False,
    ) -> None:
        self.num_domains = num_domains = _checks.num_domains(num_domains)
        self.smoothing = check_float("smoothing", smoothing, 0.0, 1.0)
        if self.smoothing == 1.0:
            raise ValueError("smoothing must be < 1 (β = 1 never updates the rewards)")
        self.warmup_steps = _checks.integer(warmup_steps, "warmup_steps", 0)
        if backend is not None and backend not in ("cuda", "triton", "torch"):
            raise ValueError(f"backend must be 'cuda', 'triton', 'torch' or None, got {backend!r}")
        self.backend = backend
        self.process_group = process_group
        self.deterministic = _checks.flag(deterministic, "deterministic")  # bool("no") is True
        self._device_fixed = device is not None
        dev = state_device(device)

        def make() -> tuple[Tensor, ...]:
            init = initial_weights(init_weights, num_domains).to(dev)
            return (
                init,
                init.clone(),
                torch.zeros(num_domains, dtype=torch.float32, device=dev),
                torch.zeros((), dtype=torch.int64, device=dev),
                torch.zeros((), dtype=torch.int64, device=dev),
            )

        # normal tensors also when built inside torch.inference_mode(); a K whose state cannot
        # be allocated is a ValueError naming num_domains, found before anything is allocated.
        # t (_steps) is on the device: a Python int changed by every step was a constant to
        # torch.compile (a recompile per step, then eager or, with fullgraph=True, an error after
        # 8) and to a CUDA graph (each replay reused the captured step's ε_t and warm-up).
        self._init, self._weights, self._rewards, self._skipped, self._steps = allocate_state(
            make, "ODM", num_domains, _STATE_ROWS, dev
        )
        # Not num_steps == 0: a state loaded into a new ODM should still follow the first batch.
        self._stepped = False

    # ---------------------------------------------------------------- public state
    @property
    def weights(self) -> Tensor:
        """π, the sampling weights for the next step ``[K]`` (updated in place)."""
        return self._weights

    @property
    def rewards(self) -> Tensor:
        """R̂, the smoothed exponentiated loss of each domain ``[K]``."""
        return self._rewards

    @property
    def num_skipped(self) -> Tensor:
        """Domain-steps whose count or mean loss was not finite, ignored (int64 scalar)."""
        return self._skipped

    @property
    def num_steps(self) -> int:
        """t, the steps taken so far (reads the device counter: a synchronisation)."""
        return int(self._steps)

    @property
    def device(self) -> torch.device:
        """Where the state lives."""
        return self._weights.device

    def exploration(self, t: int | None = None) -> float:
        """ε_t = min(1/K, √(ln K / (K·t))) for step ``t`` (default: the last step taken; 1/K
        before the first, the formula's limit as t → 0).

        ``t`` is at most 2**63 - 1, as the step count is in a checkpoint (10**400 overflowed the
        float division).
        """
        t = self.num_steps if t is None else _checks.integer(t, "t", 1, 2**63 - 1)
        if t < 1:
            return 1.0 / self.num_domains
        k = self.num_domains
        return min(1.0 / k, math.sqrt(math.log(k) / (k * t)))

    def to(self, device: torch.device | str) -> ODM:
        """Move the state to ``device`` (returns self)."""
        dev = state_device(device)
        if dev != self.device:  # (the same device: nothing to copy)
            self._init, self._weights, self._rewards, self._skipped, self._steps = allocate_state(
                lambda: (self._init.to(dev), self._weights.to(dev), self._rewards.to(dev),
                         self._skipped.to(dev), self._steps.to(dev)),
                "ODM", self.num_domains, _STATE_ROWS, dev,
            )  # fmt: skip
        self._device_fixed = True
        return self

    # ---------------------------------------------------------------- the step
    def step(self, loss: Tensor, domain: Tensor, mask: Tensor | None = None) -> Tensor:
        """Update π from this batch's per-token losses and return it.

        Args:
            loss: per-token training loss, ``[N]`` or ``[B, T]`` (float32/bf16/fp16; detached).
            domain: int32/int64 domain ids per token or per sequence (``[B]``).
            mask: bool, False marks a token to ignore.

        Returns:
            ``weights`` (π for the next step), the same tensor object every call.
        """
        if not isinstance(loss, Tensor):
            raise TypeError(f"loss must be a torch.Tensor, got {type(loss).__name__}")
        # With several ranks a bad domain id is counted, not raised on its rank alone (the others
        # would wait in the all-reduce until the group's timeout); the count travels with the
        # statistics and every rank raises after the reduction (eager_dropped).
        ranks = distributed.world_size(distributed.resolve_group(self.process_group))
        # update() moves the state to the statistics' device: only a batch the checks took
        stats, dropped = loss_stats_and_dropped(
            loss.detach(), domain, self.num_domains, None, mask, self.backend,
            self.deterministic, check_values=ranks == 1,
        )  # fmt: skip
        return self._update(stats, dropped if ranks > 1 else None)

    def update(self, stats: Tensor) -> Tensor:
        """Update π from per-domain statistics ``[3, K]`` (or ``[2, K]``: count, loss sum).

        Use this when the statistics are already computed (e.g. shared with DoReMi).  They are
        summed over the process group first, so pass this rank's statistics only.
        """
        return self._update(stats, None)

    def _update(self, stats: Tensor, dropped: Tensor | None) -> Tensor:
        """update(), and with ``dropped`` (step() with several ranks: this rank's count of tokens
        with a bad domain id) that count summed in the same all-reduce."""
        if not isinstance(stats, Tensor):
            raise TypeError(f"stats must be a torch.Tensor, got {type(stats).__name__}")
        # Statistics of a loss that requires grad would give the rewards and π a grad_fn, and
        # each step's graph would then stay alive through the state (as step() does, detach).
        stats = stats.detach()
        if stats.dim() != 2 or stats.shape[0] not in (2, 3) or stats.shape[1] != self.num_domains:
            raise ValueError(
                f"stats must be [3, {self.num_domains}] (count, loss sum, excess sum), got "
                f"{tuple(stats.shape)}")
        if not stats.is_floating_point():
            raise TypeError(f"stats must be floating point, got {stats.dtype}")
        if stats.layout != torch.strided:  # a sparse tensor failed in torch ("as_strided")
            raise TypeError(f"stats must be a dense (strided) tensor, got layout {stats.layout}")
        self._follow(stats.device)
        group = distributed.resolve_group(self.process_group)
        if dropped is None:
            totals = distributed.all_reduce_sum_(stats[:2].to(torch.float32).clone(), group)
        else:
            totals, _ = all_reduce_with_dropped(
                stats[:2].to(torch.float32), dropped, group, self.num_domains,
                "nothing was updated",
            )  # fmt: skip
        count, loss_sum = totals[0], totals[1]
        mean = loss_sum / count.clamp_min(1.0)
        # An infinite count made the mean 0 (a reward of 1, as for a loss of 0) and a NaN count
        # vanished unreported: neither is a count, so the domain is skipped like a NaN loss.
        finite = torch.isfinite(mean) & torch.isfinite(count)
        seen = (count > 0) & finite
        self._skipped.add_((((count > 0) | torch.isnan(count)) & ~finite).sum())
        reward = torch.exp(torch.where(finite, mean, 0.0).clamp(max=_MAX_LOSS))
        beta = self.smoothing
        self._rewards.copy_(torch.where(seen, beta * self._rewards + (1.0 - beta) * reward,
                                        self._rewards))
        self._steps.add_(1)
        k = self.num_domains
        # ε_t = min(1/K, √(ln K / (K·t))) in float64 on the device, as exploration() forms it on
        # the host (k·t is exact below 2**53 and each operation correctly rounded: the same bits).
        eps64 = torch.sqrt(math.log(k) / (k * self._steps.to(torch.float64))).clamp(max=1.0 / k)
        eps = eps64.to(torch.float32)
        keep = (1.0 - k * eps64).to(torch.float32)
        # Scaled by the largest reward first: the plain float32 sum overflows once K rewards
        # near exp(_MAX_LOSS) add up (π then collapsed to ε, summing to < 1), and a sum of
        # subnormal rewards lost its scale to a clamp.  The scaled sum lies in [1, K].
        top = self._rewards.max()
        scaled = self._rewards / torch.where(top > 0, top, 1.0)
        share = torch.where(top > 0, scaled / scaled.sum().clamp_min(1.0),
                            torch.full_like(self._rewards, 1.0 / k))
        # the initial weights during the warm-up (a device comparison: no host branch)
        # (capped: t stays below 2**62, and an int64 comparison refuses a larger Python int)
        warm = self._steps <= min(self.warmup_steps, MAX_COUNT)
        self._weights.copy_(torch.where(warm, self._init, keep * share + eps))
        return self._weights

    def _follow(self, device: torch.device) -> None:
        if device != self.device:
            if not self._device_fixed and not self._stepped:
                self.to(device)
            else:
                raise ValueError(f"inputs are on {device} but the ODM state is on {self.device}")
        self._stepped = True

    def check_ranks(self) -> None:
        """Raise ValueError on every rank unless all ranks of the process group built this ODM the
        same way and hold the same state (K, smoothing, warm-up, backend, step count, initial
        weights, π, R̂ and the skipped count), naming what differs.

        A collective (every rank must call it) that synchronises with the host: call it once
        before training, e.g. after loading a checkpoint.  Ranks that differ would otherwise
        sample from different π without an error or, with different K, abort or hang in the
        first all-reduce.  Nothing to check in a single process.
        """
        group = distributed.resolve_group(self.process_group)
        if distributed.world_size(group) == 1:
            return
        fields = {
            "num_domains": self.num_domains,
            "smoothing": self.smoothing,
            "warmup_steps": self.warmup_steps,
            "backend": self.backend,
            "num_steps": self._steps,
            "init_weights": self._init,
            "weights": self._weights,
            "rewards": self._rewards,
            "num_skipped": self._skipped,
        }
        distributed.check_ranks_agree("ODM", fields, group, device=self.device)

    # ---------------------------------------------------------------- checkpointing
    # A process group cannot be pickled: a pickled copy asks for it again before it reduces;
    # a deep copy shares it.
    def __getstate__(self) -> dict[str, Any]:
        return distributed.state_without_group(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # An ODM pickled when t was a host int ("num_steps" in its __dict__) gets its counter.
        state = dict(state)
        if "_steps" not in state:
            steps = state.pop("num_steps", 0)
            state["_steps"] = torch.tensor(steps, dtype=torch.int64,
                                           device=state["_weights"].device)
        # unpickled inside torch.inference_mode(), the tensors are inference tensors
        self.__dict__.update(normal_state(state))

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        with normal_tensors():  # a copy made inside torch.inference_mode() must step outside it
            return distributed.deepcopy_sharing_group(self, memo)

    def state_dict(self) -> dict[str, Any]:
        """The full state (tensors cloned, on the state's device) and hyperparameters."""
        return {
            "version": _STATE_VERSION,
            "num_domains": self.num_domains,
            "smoothing": self.smoothing,
            "warmup_steps": self.warmup_steps,
            "num_steps": self.num_steps,
            "init_weights": self._init.clone(),
            "weights": self._weights.clone(),
            "rewards": self._rewards.clone(),
            "num_skipped": self._skipped.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output.

        Validated before anything changes (a rejected state leaves this ODM as it was): K, the
        hyperparameters, shapes, counters (integers in [0, 2**62)), R̂ (finite, >= 0), π (finite,
        >= 0, summing to 1) and the initial weights (finite, > 0, summing to 1).  Raises
        TypeError/ValueError naming the state key.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        missing = [k for k in ("num_domains", "weights", "rewards", "num_steps") if k not in state]
        if missing:
            raise ValueError(f"state is missing {missing}")
        _checks.state_version(state.get("version", _STATE_VERSION), _STATE_VERSION)
        num_domains = _checks.integer(state["num_domains"], "state['num_domains']")
        if num_domains != self.num_domains:
            raise ValueError(f"state has num_domains={num_domains}, this ODM has "
                             f"{self.num_domains}")
        k, dev = self.num_domains, self.device
        tol = weights_tolerance(k)
        weights = state_vector(state, "weights", k, dev, sum_tolerance=tol)
        rewards = state_vector(state, "rewards", k, dev)
        # the constructor's rule: a zero initial weight would stay zero through the warm-up
        init = state_vector(state, "init_weights", k, dev, default=self._init, positive=True,
                            sum_tolerance=tol)
        smoothing = check_float("state['smoothing']", state.get("smoothing", self.smoothing),
                                0.0, 1.0)
        if smoothing == 1.0:
            raise ValueError("state['smoothing'] must be < 1")
        warmup = state_int(state, "warmup_steps", self.warmup_steps)
        steps = state_int(state, "num_steps", high=MAX_COUNT)
        skipped = state_int(state, "num_skipped", 0, high=MAX_COUNT)
        # everything is checked: only now change the object
        self._weights.copy_(weights)
        self._rewards.copy_(rewards)
        self._init.copy_(init)
        self._skipped.fill_(skipped)
        self._steps.fill_(steps)
        self.smoothing, self.warmup_steps = smoothing, warmup

    def __repr__(self) -> str:
        return (f"ODM(num_domains={self.num_domains}, smoothing={self.smoothing}, "
                f"warmup_steps={self.warmup_steps}, num_steps={self.num_steps}, "
                f"device={self.device})")
