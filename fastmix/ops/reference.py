"""Plain-torch implementations of the domain-statistics ops: the CPU path and the oracle.

Every other backend (Triton, CUDA) is tested against these functions.  They take already
validated tensors (see :func:`fastmix.ops.validate_inputs`) and never synchronise with the host:
no ``.item()``, no data-dependent shapes, no Python branches on device values.

Layout shared by all backends
-----------------------------
``stats``    float32 ``[3, K]``: token count, sum of loss, sum of max(loss - ref_loss, 0).
``state``    float32 ``[3, K]``: α (weights), λ (last excess per domain), running average of α.
``counters`` int64 ``[3]``: updates applied, updates skipped (non-finite), out-of-range ids.
``aux``      float32 ``[4, K]``: the step's statistics (rows 0-2) and the α the objective used.
"""

from __future__ import annotations

import torch
from torch import Tensor

PROXY_LOSSES = ("dro", "reweighted")


def expand_domain(domain: Tensor, loss: Tensor) -> Tensor:
    """Per-token domain ids, flattened: a per-sequence ``[B]`` id is repeated over ``T`` tokens."""
    if domain.dim() == 1 and loss.dim() == 2:
        return domain.reshape(-1, 1).expand(loss.shape).reshape(-1)
    return domain.reshape(-1)


def domain_stats(
    loss: Tensor,
    domain: Tensor,
    mask: Tensor | None,
    ref_loss: Tensor | None,
    num_domains: int,
    deterministic: bool = False,
) -> tuple[Tensor, Tensor]:
    """Per-domain ``[3, K]`` statistics and the number of unmasked tokens with an id outside [0, K).

    Accumulates in float32 whatever the loss dtype.  Masked tokens contribute nothing, even when
    their loss is NaN (padding often is).  Out-of-range ids are dropped into a spare bin ``K``
    and counted, never written out of bounds.
    """
    k = num_domains
    flat_loss = loss.reshape(-1).float()
    ids = expand_domain(domain, loss).long()
    valid = (
        mask.reshape(-1)
        if mask is not None
        else torch.ones_like(flat_loss, dtype=torch.bool)
    )
    in_range = (ids >= 0) & (ids < k)
    keep = valid & in_range
    out_of_range = (valid & ~in_range).sum(dtype=torch.int64)
    bins = torch.where(keep, ids, torch.full_like(ids, k))
    zero = torch.zeros((), dtype=torch.float32, device=loss.device)
    rows = [keep.float(), torch.where(keep, flat_loss, zero)]
    if ref_loss is not None:
        diff = flat_loss - ref_loss.reshape(-1).float()
        # `diff < 0` (not `diff > 0`) keeps a NaN difference NaN, so it reaches the finite check.
        excess = torch.where(diff < 0, zero, diff)
        rows.append(torch.where(keep, excess, zero))
    else:
        rows.append(torch.zeros_like(flat_loss))
    values = torch.stack(rows)  # [3, N]
    if deterministic and loss.device.type == "cuda":
        # index_add_ uses float atomics on CUDA (order-dependent bits); on CPU it is sequential.
        return ordered_bin_sums(bins, values, k), out_of_range
    out = torch.zeros((3, k + 1), dtype=torch.float32, device=loss.device)
    out.index_add_(1, bins, values)
    return out[:, :k].contiguous(), out_of_range


def ordered_bin_sums(bins: Tensor, values: Tensor, k: int) -> Tensor:
    """Per-bin sums of ``values`` ``[R, N]`` for bins 0..k-1 (bin k dropped), bitwise
    reproducible on any device and sync-free: a stable sort by bin, then a segmented scan in
    float64 (a fixed tree of elementwise adds, no atomics) whose last entry in each bin is the
    bin's sum.

    Each bin is summed on its own: a running sum across bins (a prefix sum differenced at the bin
    boundaries) lost every later bin to cancellation after one large value (a loss of 1e30 in
    domain 0 left 0 for the others).  For the same reason a NaN or inf stays in its bin.
    """
    rows, n = values.shape
    dev = values.device
    if n == 0:
        return torch.zeros((rows, k), dtype=torch.float32, device=dev)
    order = torch.argsort(bins, stable=True)
    sorted_bins = bins[order]
    acc = values[:, order].double()
    # Hillis-Steele: after the round with shift d, entry i holds the sum of its bin's entries in
    # (i - 2d, i]; the bins are sorted, so equal ids d apart mean one bin in between.
    shift = 1
    while shift < n:
        same = sorted_bins[shift:] == sorted_bins[:-shift]
        acc[:, shift:] += torch.where(same, acc[:, :-shift], 0.0)
        shift *= 2
    wanted = torch.arange(k, device=dev, dtype=bins.dtype)
    starts = torch.searchsorted(sorted_bins, wanted)
    ends = torch.searchsorted(sorted_bins, wanted, right=True)
    last = acc[:, (ends - 1).clamp(min=0)]
    return torch.where(ends > starts, last, 0.0).float()


def check_state_layout(state: Tensor, counters: Tensor, stats: Tensor | None = None) -> None:
    """The mixer state as the compiled backends (cuda, triton) index it by hand: a strided view,
    another dtype or shape would be read (or written) as garbage there."""
    if (
        state.dtype != torch.float32
        or state.dim() != 2
        or state.shape[0] != 3
        or not state.is_contiguous()
    ):
        raise ValueError(
            f"state must be a contiguous float32 [3, K] tensor, got {state.dtype} "
            f"{tuple(state.shape)}"
        )
    if counters.dtype != torch.int64 or counters.shape != (3,) or not counters.is_contiguous():
        raise ValueError("counters must be a contiguous int64 [3] tensor")
    if counters.device != state.device:
        raise ValueError(f"counters are on {counters.device}, the state on {state.device}")
    if stats is not None:
        if stats.dtype != torch.float32 or stats.shape != (3, state.shape[1]):
            raise ValueError(
                f"stats must be float32 [3, {state.shape[1]}], got {stats.dtype} "
                f"{tuple(stats.shape)}"
            )
        if stats.device != state.device:
            raise ValueError(f"stats are on {stats.device}, the state on {state.device}")


def updated_state(
    stats: Tensor, state: Tensor, counters: Tensor, step_size: float, smoothing: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The DoReMi update as new tensors: (new state, new counters, ok flag).

    λ_i = excess_i / n_i where n_i > 0, else the previous λ_i;
    α' = softmax(log α + η λ) in log space; α ← (1 − c) α' + c / K;
    average ← average + (α − average) / (updates + 1)  (the initial α is not part of the mean).
    A non-finite statistic or result leaves everything unchanged and counts a skipped update.
    """
    k = stats.shape[1]
    alpha, excess, average = state[0], state[1], state[2]
    count, excess_sum = stats[0], stats[2]
    present = count > 0
    new_excess = torch.where(present, excess_sum / count.clamp_min(1.0), excess)
    logits = torch.log(alpha) + step_size * new_excess
    new_alpha = (1.0 - smoothing) * torch.softmax(logits, dim=0) + smoothing / k
    ok = torch.isfinite(stats).all() & torch.isfinite(new_alpha).all()
    num_updates = counters[0]
    new_average = average + (new_alpha - average) / (num_updates + 1).to(torch.float32)
    candidate = torch.stack([new_alpha, new_excess, new_average])
    new_state = torch.where(ok, candidate, state)
    step = torch.stack([ok, ~ok, torch.zeros_like(ok)]).to(torch.int64)
    return new_state, counters + step, ok


def objective_from(aux: Tensor, proxy: str) -> Tensor:
    """The proxy objective from the step's statistics and the α it used (rows of ``aux``).

    "dro":        Σ_i α_i · loss_i / n_i over the domains present;
    "reweighted": Σ_i α_i · loss_i / Σ_i α_i · n_i  (= Σ_t α_d(t) ℓ_t / Σ_t α_d(t)); 0 if empty.
    """
    count, loss_sum, alpha = aux[0], aux[1], aux[3]
    if proxy == "dro":
        per_domain = torch.where(count > 0, alpha * loss_sum / count.clamp_min(1.0), 0.0)
        return per_domain.sum()
    denom = (alpha * count).sum()
    return (alpha * loss_sum).sum() / torch.where(denom > 0, denom, 1.0)


def objective_coefficients(aux: Tensor, proxy: str) -> Tensor:
    """∂ objective / ∂ loss_t for a token of each domain: α_i / n_i ("dro") or α_i / Σ α n."""
    count, alpha = aux[0], aux[3]
    if proxy == "dro":
        return torch.where(count > 0, alpha / count.clamp_min(1.0), 0.0)
    denom = (alpha * count).sum()
    return alpha / torch.where(denom > 0, denom, 1.0)


def doremi_update_(
    stats: Tensor,
    state: Tensor,
    counters: Tensor,
    step_size: float,
    smoothing: float,
    proxy: str,
) -> tuple[Tensor, Tensor]:
    """Apply the DoReMi update to ``state``/``counters`` in place; return (objective, aux)."""
    new_state, new_counters, _ = updated_state(stats, state, counters, step_size, smoothing)
    state.copy_(new_state)
    counters[:2].copy_(new_counters[:2])
    aux = torch.cat([stats, new_state[0:1]])
    return objective_from(aux, proxy), aux


def doremi_step_(
    loss: Tensor,
    domain: Tensor,
    mask: Tensor | None,
    ref_loss: Tensor,
    state: Tensor,
    counters: Tensor,
    step_size: float,
    smoothing: float,
    proxy: str,
    deterministic: bool = False,
) -> tuple[Tensor, Tensor]:
    """Statistics of one batch, then the update, in place; return (objective, aux)."""
    stats, out_of_range = domain_stats(
        loss, domain, mask, ref_loss, state.shape[1], deterministic
    )
    counters[2:3].add_(out_of_range)
    return doremi_update_(stats, state, counters, step_size, smoothing, proxy)


def objective_grad(
    grad: Tensor, loss: Tensor, domain: Tensor, mask: Tensor | None, aux: Tensor, proxy: str
) -> Tensor:
    """Gradient of the proxy objective w.r.t. each token's loss (zero for dropped tokens)."""
    k = aux.shape[1]
    coef = objective_coefficients(aux, proxy)
    ids = expand_domain(domain, loss).long()
    keep = (ids >= 0) & (ids < k)
    if mask is not None:
        keep = keep & mask.reshape(-1)
    per_token = torch.where(keep, coef[ids.clamp(0, k - 1)], 0.0)
    return (grad * per_token).reshape(loss.shape).to(loss.dtype)


def excess_active(loss: Tensor, ref_loss: Tensor) -> Tensor:
    """Flat bool: where ``max(loss - ref_loss, 0)`` has slope 1 (``loss - ref_loss > 0``).

    All the backward of ``domain_stats`` needs from ``ref_loss``; a NaN difference gives False.
    Compared in the inputs' own dtype, which for IEEE floats (gradual underflow) is the same as
    the forward's float32 ``loss - ref_loss > 0``, and avoids a no-op ``.float()`` that would
    return its input (not allowed below autograd, where setup_context runs).
    """
    return torch.gt(loss, ref_loss).reshape(-1)


def stats_grad(
    grad_stats: Tensor,
    loss: Tensor,
    domain: Tensor,
    mask: Tensor | None,
    active: Tensor | None,
    ref_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor | None]:
    """Gradients of ``domain_stats`` w.r.t. loss and ref_loss (the count row has none).

    ``active`` is :func:`excess_active` of the forward's loss and ref_loss (None without a
    ref_loss) and ``ref_dtype`` the ref_loss's dtype; ref_loss has loss's shape.
    """
    k = grad_stats.shape[1]
    ids = expand_domain(domain, loss).long()
    keep = (ids >= 0) & (ids < k)
    if mask is not None:
        keep = keep & mask.reshape(-1)
    safe = ids.clamp(0, k - 1)
    zero = torch.zeros((), dtype=torch.float32, device=loss.device)
    g_loss = torch.where(keep, grad_stats[1][safe], zero)
    g_ref = None
    if active is not None:
        g_excess = torch.where(keep & active, grad_stats[2][safe], zero)
        g_loss = g_loss + g_excess
        g_ref = (-g_excess).reshape(loss.shape).to(ref_dtype)
    return g_loss.reshape(loss.shape).to(loss.dtype), g_ref
