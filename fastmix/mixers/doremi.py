"""DoReMi (Xie et al. 2023, Algorithm 1): mixture weights from excess loss, on the device.

A small proxy model trains on batches drawn from a reference mixture (e.g. uniform); each step the
per-domain clipped excess loss over a reference model, λ, moves the weights α by exponentiated
gradient ascent, and α reweights the proxy's loss.  The running average of α over the updates is
the mixture a user takes to the main run (``average_weights``).

Everything in :meth:`DoReMi.step` stays on the device: no ``.item()``, no ``.cpu()``, no Python
branch on a device value, so it runs under ``torch.compile(fullgraph=True)`` and in CUDA graphs.
"""

from __future__ import annotations

import sys
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
    dropped_error,
    eager_dropped,
    initial_weights,
    normal_state,
    normal_tensors,
    state_device,
    state_int,
    state_vector,
    weights_tolerance,
)
from fastmix.ops import (
    domain_stats_detached,
    doremi_step_,
    doremi_update_,
    proxy_objective,
    reference,
    resolve_backend,
    validate_inputs,
)

__all__ = ["DoReMi"]

_STATE_VERSION = 1
# The most the sum of a loaded average_weights may differ from 1 (see load_state_dict).
_MAX_AVERAGE_DRIFT = 0.1
# float32 values per domain in the state: α, λ, the average α, and the pending statistics.
_STATE_ROWS = 6
# The update takes η as a float32: a larger one is inf there, and inf·λ (NaN where λ = 0) made
# every update non-finite, so each was skipped and α never moved.
_MAX_STEP_SIZE = float(torch.finfo(torch.float32).max)


def _check_step_size(name: str, value: Any) -> float:
    value = check_float(name, value, 0.0)
    if value > _MAX_STEP_SIZE:
        raise ValueError(
            f"{name} must be at most {_MAX_STEP_SIZE:.4g} (the update runs in float32, where "
            f"it would be inf and every update skipped), got {value!r}"
        )
    return value


class DoReMi:
    """Online DoReMi mixture weights, held on the device.

    Args:
        num_domains: K, at most 2**31 - 1 (and a K whose state cannot be allocated on the
            device is a ValueError).
        step_size: η, the exponentiated-gradient step (>= 0, at most float32's largest value).
        smoothing: c in [0, 1]; α ← (1 − c)·softmax(log α + η λ) + c / K.
        init_weights: the initial α (K positive values, normalised to sum 1); uniform by default.
        proxy_loss: "dro" (Σ_i α_i · mean loss of domain i) or "reweighted"
            (Σ_t α_d(t) ℓ_t / Σ_t α_d(t), the form of the authors' released code).
        backend: "cuda", "triton" or "torch" to force one (also ``FASTMIX_BACKEND``).
        device: where the state lives; by default it follows the first batch.
        process_group: reduce statistics over this group (default: the world group when
            torch.distributed is initialised).
        deterministic: bitwise-reproducible statistics (no order-dependent float atomics).
        debug: after each update, raise if any domain id was out of range (a host sync); with
            several ranks, also run :meth:`check_ranks` before the first reduction.

    Attributes (device tensors, updated in place): ``weights`` (α), ``excess`` (λ),
    ``average_weights`` (the mean of α over the updates; the initial α until the first update),
    ``num_updates``, ``num_skipped`` (non-finite updates skipped), ``num_out_of_range`` (tokens
    whose domain id was outside [0, K), dropped).

    Bad domain ids raise ValueError in eager mode on CPU.  With several ranks that error is
    raised on every rank at once, after the update's all-reduce (which carries each rank's count
    of such tokens with the statistics), with nothing updated: raised on its rank alone, it left
    the others waiting in the next collective until the group's timeout.  Elsewhere the tokens
    are dropped and counted in ``num_out_of_range``, summed over the ranks (the same on every
    rank), so ``debug=True`` raises on all of them at the same update.
    """

    def __init__(
        self,
        num_domains: int,
        *,
        step_size: float = 1.0,
        smoothing: float = 1e-3,
        init_weights: Sequence[float] | Tensor | None = None,
        proxy_loss: str = "dro",
        backend: str | None = None,
        device: torch.device | str | None = None,
        process_group: Any = None,
        deterministic: bool = False,
        debug: bool = False,
    ) -> None:
        num_domains = _checks.num_domains(num_domains)
        if proxy_loss not in reference.PROXY_LOSSES:
            raise ValueError(
                f"proxy_loss must be one of {reference.PROXY_LOSSES}, got {proxy_loss!r}"
            )
        if backend is not None and backend not in ("cuda", "triton", "torch"):
            raise ValueError(f"backend must be 'cuda', 'triton', 'torch' or None, got {backend!r}")
        self.num_domains = num_domains
        self.step_size = _check_step_size("step_size", step_size)
        self.smoothing = check_float("smoothing", smoothing, 0.0, 1.0)
        self.proxy_loss = proxy_loss
        self.backend = backend
        self.process_group = process_group
        # bool("no") is True: any value switched these on
        self.deterministic = _checks.flag(deterministic, "deterministic")
        self.debug = _checks.flag(debug, "debug")
        self._device_fixed = device is not None
        dev = state_device(device)

        def make() -> tuple[Tensor, Tensor, Tensor]:
            alpha = initial_weights(init_weights, num_domains).to(dev)
            return (
                torch.stack([alpha, torch.zeros_like(alpha), alpha]),
                torch.zeros(3, dtype=torch.int64, device=dev),
                torch.zeros(3 * num_domains + 1, dtype=torch.float32, device=dev),
            )

        # normal tensors also when built inside torch.inference_mode(); a K whose state cannot
        # be allocated is a ValueError naming num_domains, found before anything is allocated
        self._state, self._counters, self._pending = allocate_state(
            make, "DoReMi", num_domains, _STATE_ROWS, dev
        )
        # Whether micro-batches were accumulated since the last update (host-side).  A flag, not
        # a count: torch.compile specialises on a host int that every accumulate() changed (a
        # recompile per micro-batch; with fullgraph=True an error from the 9th).
        self._has_pending = False
        self._workspace: Tensor | None = None
        self._workspace_key: tuple[str, torch.device] | None = None
        self._stepped = False
        self._ranks_checked = False

    # ---------------------------------------------------------------- public state
    @property
    def weights(self) -> Tensor:
        """α, the current training weights ``[K]``."""
        return self._state[0]

    @property
    def excess(self) -> Tensor:
        """λ, the last per-domain clipped excess loss ``[K]``."""
        return self._state[1]

    @property
    def average_weights(self) -> Tensor:
        """Mean of α over the updates so far ``[K]`` (the mixture for the main run)."""
        return self._state[2]

    @property
    def num_updates(self) -> Tensor:
        """Updates applied so far (int64 scalar on the device)."""
        return self._counters[0]

    @property
    def num_skipped(self) -> Tensor:
        """Updates skipped because their statistics were not finite (int64 scalar)."""
        return self._counters[1]

    @property
    def num_out_of_range(self) -> Tensor:
        """Unmasked tokens dropped for a domain id outside [0, K), over all ranks (int64)."""
        return self._counters[2]

    @property
    def device(self) -> torch.device:
        """Where the state lives."""
        return self._state.device

    def to(self, device: torch.device | str) -> DoReMi:
        """Move the state to ``device`` (returns self)."""
        dev = state_device(device)
        if dev != self._state.device:  # (the same device: nothing to copy)
            self._state, self._counters, self._pending = allocate_state(
                lambda: (self._state.to(dev), self._counters.to(dev), self._pending.to(dev)),
                "DoReMi", self.num_domains, _STATE_ROWS, dev,
            )  # fmt: skip
        self._workspace = None
        self._workspace_key = None
        self._device_fixed = True
        return self

    # ---------------------------------------------------------------- internals
    def _prepare(
        self, loss: Tensor, ref_loss: Any, domain: Tensor, mask: Tensor | None, ranks: int
    ) -> str:
        # With several ranks a bad id is not raised here, on its rank alone (the others would
        # wait in the next all-reduce until the group's timeout): it is counted, the count
        # travels with the statistics, and every rank raises after the reduction
        # (eager_dropped).
        validate_inputs(
            loss, domain, self.num_domains, ref_loss, mask, ref_required=True,
            check_values=ranks == 1,
        )  # fmt: skip
        # before the state follows the batch: a backend that cannot run there leaves it in place
        backend = resolve_backend(self.backend, loss.device, self.num_domains, loss.numel())
        if loss.device != self._state.device:
            if not self._device_fixed and not self._stepped:
                self.to(loss.device)
            else:
                raise ValueError(
                    f"loss is on {loss.device} but the DoReMi state is on {self._state.device}"
                )
        self._stepped = True
        return backend

    def _get_workspace(self, backend: str) -> Tensor:
        key = (backend, self._state.device)
        if self._workspace is None or self._workspace_key != key:
            if backend == "torch":
                module = None
            else:
                import importlib

                # resolve_backend imported it already; sys.modules keeps torch.compile tracing
                # (importlib is a graph break)
                name = f"fastmix.ops.{backend}"
                module = sys.modules.get(name) or importlib.import_module(name)
            with normal_tensors():  # a first step inside torch.inference_mode() allocates it
                self._workspace = (
                    torch.empty(0, dtype=torch.int32, device=self._state.device)
                    if module is None
                    else module.fused_workspace(self.num_domains, self._state.device)
                )
            self._workspace_key = key
        return self._workspace

    def _after_update(self) -> None:
        if self.debug:
            self.check()

    def _group(self) -> Any:
        """The process group to reduce over; in debug mode, checked once against the other ranks
        (before the first reduction, which would abort or hang if K differed)."""
        group = distributed.resolve_group(self.process_group)
        if (
            self.debug
            and not self._ranks_checked
            and distributed.world_size(group) > 1
            and not torch.compiler.is_compiling()
        ):
            self.check_ranks()
        return group

    # ---------------------------------------------------------------- the step
    def step(
        self, loss: Tensor, ref_loss: Tensor, domain: Tensor, mask: Tensor | None = None
    ) -> Tensor:
        """Update α from this batch, then return the proxy objective weighted by the new α.

        Args:
            loss: the proxy's per-token loss, ``[N]`` or ``[B, T]`` (float32/bf16/fp16).
            ref_loss: the reference model's per-token loss, same shape and dtype.
            domain: int32/int64 domain ids, per token or per sequence (``[B]``).
            mask: bool, False marks a token to ignore.

        Returns:
            A float32 scalar with autograd to ``loss`` (∂/∂ℓ_t = α_d / n_d for "dro",
            α_d / Σ_t' α_d(t') for "reweighted"; α is detached).  With several ranks the
            statistics are summed across ranks before the update (every rank holds the same α)
            and the objective is each rank's own batch.
        """
        if self._has_pending:
            raise RuntimeError(
                "accumulate() was called since the last update(); call update() before step()"
            )
        ranks = self._ranks()
        backend = self._prepare(loss, ref_loss, domain, mask, ranks)
        group = self._group()
        if ranks == 1:
            objective, aux = doremi_step_(
                loss.detach(), domain, mask, ref_loss.detach(), self._state, self._counters,
                self._get_workspace(backend), self.step_size, self.smoothing, self.proxy_loss,
                backend, self.deterministic,
            )  # fmt: skip
        else:
            stats, out_of_range = domain_stats_detached(
                loss.detach(), domain, mask, ref_loss.detach(), self.num_domains, backend,
                self.deterministic,
            )  # fmt: skip
            # one collective for the statistics and the dropped-token count (float32: exact up
            # to 2**24 tokens per update, and nonzero exactly when some rank dropped one)
            total, dropped = all_reduce_with_dropped(
                stats, out_of_range, group, self.num_domains, "nothing was updated"
            )
            self._counters[2:].add_(dropped)
            doremi_update_(
                total, self._state, self._counters, self.step_size, self.smoothing,
                self.proxy_loss, backend,
            )  # fmt: skip
            aux = torch.cat([stats, self._state[0:1]])
            objective = reference.objective_from(aux, self.proxy_loss)
        self._after_update()
        return proxy_objective(loss, objective, aux, domain, mask, self.proxy_loss)

    def accumulate(
        self, loss: Tensor, ref_loss: Tensor, domain: Tensor, mask: Tensor | None = None
    ) -> Tensor:
        """Add one micro-batch's statistics to the next :meth:`update` (gradient accumulation).

        Returns this micro-batch's proxy objective weighted by the current α (the update comes
        after all micro-batches), with the same autograd as :meth:`step`.
        """
        ranks = self._ranks()
        backend = self._prepare(loss, ref_loss, domain, mask, ranks)
        stats, out_of_range = domain_stats_detached(
            loss.detach(), domain, mask, ref_loss.detach(), self.num_domains, backend,
            self.deterministic,
        )  # fmt: skip
        self._pending[:-1].view_as(stats).add_(stats)
        if ranks == 1:
            self._counters[2:].add_(out_of_range)
        else:  # summed over the ranks with the statistics at update()
            self._pending[-1:].add_(out_of_range.reshape(1))
        self._has_pending = True
        aux = torch.cat([stats, self._state[0:1]])
        objective = reference.objective_from(aux, self.proxy_loss)
        return proxy_objective(loss, objective, aux, domain, mask, self.proxy_loss)

    def update(self) -> None:
        """Update α from the statistics accumulated since the last update (all ranks summed)."""
        if not self._has_pending:
            raise RuntimeError("update() needs at least one accumulate() since the last update")
        backend = resolve_backend(self.backend, self._state.device, self.num_domains)
        group = self._group()
        distributed.all_reduce_sum_(self._pending, group)
        ranks = distributed.world_size(group)
        if ranks > 1:
            dropped = self._pending[-1:]
            bad = eager_dropped(dropped)
            if bad:
                self._pending.zero_()
                self._has_pending = False
                raise dropped_error(
                    self.num_domains, bad, ranks, "the pending micro-batches were discarded"
                )
            self._counters[2:].add_(dropped.to(torch.int64))
        doremi_update_(
            self._pending[:-1].view(3, self.num_domains), self._state, self._counters,
            self.step_size, self.smoothing, self.proxy_loss, backend,
        )  # fmt: skip
        self._pending.zero_()
        self._has_pending = False
        self._after_update()

    def _ranks(self) -> int:
        """How many ranks the statistics are summed over (the group is checked as _group does,
        without debug mode's collective)."""
        return distributed.world_size(distributed.resolve_group(self.process_group))

    def check(self) -> None:
        """Raise if any unmasked token had a domain id outside [0, K) (synchronises)."""
        bad = int(self._counters[2])
        if bad:
            raise ValueError(
                f"{bad} token(s) had a domain id outside [0, num_domains={self.num_domains}); "
                "they were dropped from the statistics"
            )

    def check_ranks(self) -> None:
        """Raise ValueError on every rank unless all ranks of the process group built this DoReMi
        the same way and hold the same state (K, step size, smoothing, proxy loss, backend, α,
        λ, the average α and the update counts), naming what differs.

        A collective (every rank must call it) that synchronises with the host: call it once
        before training, e.g. after loading a checkpoint.  Ranks that differ would otherwise
        drift apart silently (different α from the same statistics) or, with different K, abort
        or hang in the first all-reduce.  ``debug=True`` runs it before the first reduction.
        Nothing to check in a single process.
        """
        group = distributed.resolve_group(self.process_group)
        if distributed.world_size(group) > 1:
            fields = {
                "num_domains": self.num_domains,
                "step_size": self.step_size,
                "smoothing": self.smoothing,
                "proxy_loss": self.proxy_loss,
                "backend": self.backend,
                "weights": self.weights,
                "excess": self.excess,
                "average_weights": self.average_weights,
                "update counters": self._counters[:2],
            }
            distributed.check_ranks_agree("DoReMi", fields, group, device=self.device)
        self._ranks_checked = True

    # ---------------------------------------------------------------- checkpointing
    # A process group cannot be pickled: a pickled copy asks for it again before it reduces;
    # a deep copy shares it.
    def __getstate__(self) -> dict[str, Any]:
        return distributed.state_without_group(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A DoReMi pickled when the pending micro-batches were counted ("_num_pending").
        state = dict(state)
        if "_has_pending" not in state:
            state["_has_pending"] = bool(state.pop("_num_pending", 0))
        pending = state.get("_pending")
        if isinstance(pending, Tensor) and pending.dim() == 2:  # before the dropped-token slot
            state["_pending"] = torch.cat([pending.reshape(-1), pending.new_zeros(1)])
        # unpickled inside torch.inference_mode(), the tensors are inference tensors
        self.__dict__.update(normal_state(state))

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        with normal_tensors():  # a copy made inside torch.inference_mode() must step outside it
            return distributed.deepcopy_sharing_group(self, memo)

    def state_dict(self) -> dict[str, Any]:
        """The full state (tensors cloned, on the state's device) and hyperparameters."""
        if self._has_pending:
            raise RuntimeError("call update() before state_dict(): micro-batches are pending")
        return {
            "version": _STATE_VERSION,
            "num_domains": self.num_domains,
            "step_size": self.step_size,
            "smoothing": self.smoothing,
            "proxy_loss": self.proxy_loss,
            "weights": self.weights.clone(),
            "excess": self.excess.clone(),
            "average_weights": self.average_weights.clone(),
            "num_updates": self.num_updates.clone(),
            "num_skipped": self.num_skipped.clone(),
            "num_out_of_range": self.num_out_of_range.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output.

        Validated before anything changes (a rejected state leaves this DoReMi as it was): K, the
        hyperparameters, shapes, counters (integers in [0, 2**62)), λ (finite, >= 0), α and its
        average (finite, >= 0, summing to 1; the average within 0.1 after many updates).  Raises
        TypeError/ValueError naming the state key.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        missing = [
            key
            for key in ("num_domains", "weights", "excess", "average_weights", "num_updates")
            if key not in state
        ]
        if missing:
            raise ValueError(f"state is missing {missing}")
        _checks.state_version(state.get("version", _STATE_VERSION), _STATE_VERSION)
        num_domains = _checks.integer(state["num_domains"], "state['num_domains']")
        if num_domains != self.num_domains:
            raise ValueError(
                f"state has num_domains={num_domains}, this DoReMi has {self.num_domains}"
            )
        k, dev = self.num_domains, self._state.device
        counts = [
            state_int(state, key, high=MAX_COUNT)
            for key in ("num_updates", "num_skipped", "num_out_of_range")
        ]
        tol = weights_tolerance(k)
        # α may hold exact zeros: with smoothing 0 a float32 softmax can underflow (and a zero
        # then stays zero, as the rule says), so only >= 0 is required of the saved weights.
        weights = state_vector(state, "weights", k, dev, sum_tolerance=tol)
        excess = state_vector(state, "excess", k, dev)
        # The running mean is updated incrementally in float32; each update can move its sum
        # by about half an ulp of each entry (~6e-8 in total), so the drift grows with the
        # number of updates (measured: 1e-4 after 20k updates for K = 3).  That is the worst
        # case; with α moving at every update the drift measured 1e-9 to 5e-9 per update (K = 3
        # and 8: 2e-3 to 5e-3 after 1e6 updates, 5e-2 after 1e7).  Uncapped, the allowance
        # reached 1 at 8.4M updates and an all-zero average loaded; capped at 0.1 it keeps such
        # long runs loadable and still refuses a vector that is no mixture.
        average = state_vector(
            state, "average_weights", k, dev,
            sum_tolerance=tol + min(1.2e-7 * counts[0], _MAX_AVERAGE_DRIFT),
        )
        step_size = _check_step_size("state['step_size']", state.get("step_size", self.step_size))
        smoothing = check_float(
            "state['smoothing']", state.get("smoothing", self.smoothing), 0.0, 1.0
        )
        proxy = state.get("proxy_loss", self.proxy_loss)
        if not isinstance(proxy, str) or proxy not in reference.PROXY_LOSSES:
            raise ValueError(
                f"state['proxy_loss'] must be one of {reference.PROXY_LOSSES}, got {proxy!r}"
            )
        # everything is checked: only now change the object
        self._state.copy_(torch.stack([weights, excess, average]))
        self._counters.copy_(torch.tensor(counts, dtype=torch.int64, device=dev))
        self._pending.zero_()
        self._has_pending = False
        self.step_size, self.smoothing, self.proxy_loss = step_size, smoothing, proxy
        self._ranks_checked = False  # debug mode checks the loaded state against the other ranks

    def __repr__(self) -> str:
        return (
            f"DoReMi(num_domains={self.num_domains}, step_size={self.step_size}, "
            f"smoothing={self.smoothing}, proxy_loss={self.proxy_loss!r}, "
            f"device={self._state.device})"
        )
