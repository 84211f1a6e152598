"""Triton kernels for the per-domain statistics and the DoReMi update.

Two kernels, each beside its launcher:

``_stats_kernel``   a 2-D grid (token chunk x domain tile); each program reduces its tokens into a
                    ``[3, BLOCK_K]`` register tile through a one-hot comparison, then either adds it
                    to the output with float atomics (fast) or stores it as a per-program partial
                    (deterministic: summed later in a fixed order).
``_update_kernel``  one program: finishes the reduction, applies the DoReMi update predicated on
                    every statistic and result being finite, and writes the objective's terms.

The fused step is these two launches.  On CPU tensors the kernels run only under Triton's
interpreter (``TRITON_INTERPRET=1`` set before triton is imported), which the tests use.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch
from torch import Tensor

from fastmix.ops.reference import check_state_layout

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR: str | None = None
except Exception as exc:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

# Programs over the tokens: enough to fill a large GPU (132 SMs x 4), few enough that the
# deterministic partials (programs x 3 x K floats) stay small.
MAX_PROGRAMS = 512
# One-hot tile size, BLOCK_N x BLOCK_K elements per program step: 8192 keeps it in registers.
TILE_ELEMENTS = 8192
MAX_DOMAINS = 1024


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


if triton is not None:

    @triton.jit
    def _stats_kernel(
        loss_ptr, ref_ptr, dom_ptr, mask_ptr, out_ptr, oob_ptr,
        n_tokens, seq_len, num_domains, chunks_per_program,
        HAS_REF: tl.constexpr, HAS_MASK: tl.constexpr, PER_SEQUENCE: tl.constexpr,
        PARTIALS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        tile = tl.program_id(1)
        k_idx = tile * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = k_idx < num_domains
        acc_count = tl.zeros([BLOCK_K], dtype=tl.float32)
        acc_loss = tl.zeros([BLOCK_K], dtype=tl.float32)
        acc_excess = tl.zeros([BLOCK_K], dtype=tl.float32)
        oob = tl.zeros([BLOCK_N], dtype=tl.int32)
        start = pid * chunks_per_program * BLOCK_N
        for chunk in range(0, chunks_per_program):
            offs = start + chunk * BLOCK_N + tl.arange(0, BLOCK_N)
            inb = offs < n_tokens
            loss = tl.load(loss_ptr + offs, mask=inb, other=0.0).to(tl.float32)
            if PER_SEQUENCE:
                ids = tl.load(dom_ptr + offs // seq_len, mask=inb, other=0)
            else:
                ids = tl.load(dom_ptr + offs, mask=inb, other=0)
            valid = inb
            if HAS_MASK:
                valid = valid & (tl.load(mask_ptr + offs, mask=inb, other=0) != 0)
            in_range = (ids >= 0) & (ids < num_domains)
            keep = valid & in_range
            oob += (valid & (ids < 0)).to(tl.int32) + (valid & (ids >= num_domains)).to(tl.int32)
            hit = (ids[:, None] == k_idx[None, :]) & keep[:, None]
            acc_count += tl.sum(hit.to(tl.float32), axis=0)
            acc_loss += tl.sum(tl.where(hit, loss[:, None], 0.0), axis=0)
            if HAS_REF:
                ref = tl.load(ref_ptr + offs, mask=inb, other=0.0).to(tl.float32)
                diff = loss - ref
                # `diff < 0` keeps a NaN difference NaN so the update's finite check sees it.
                excess = tl.where(diff < 0.0, 0.0, diff)
                acc_excess += tl.sum(tl.where(hit, excess[:, None], 0.0), axis=0)
        oob_total = tl.sum(oob, axis=0)
        if PARTIALS:
            base = out_ptr + pid * 3 * num_domains
            tl.store(base + k_idx, acc_count, mask=k_ok)
            tl.store(base + num_domains + k_idx, acc_loss, mask=k_ok)
            tl.store(base + 2 * num_domains + k_idx, acc_excess, mask=k_ok)
            if tile == 0:
                tl.store(oob_ptr + pid, oob_total.to(tl.int64))
        else:
            touched = k_ok & (acc_count > 0)  # absent domains add nothing: skip their atomics
            tl.atomic_add(out_ptr + k_idx, acc_count, mask=touched)
            tl.atomic_add(out_ptr + num_domains + k_idx, acc_loss, mask=touched)
            tl.atomic_add(out_ptr + 2 * num_domains + k_idx, acc_excess, mask=touched)
            if tile == 0:
                tl.atomic_add(oob_ptr, oob_total.to(tl.int64))

    @triton.jit
    def _sum_partials_kernel(
        part_ptr, part_oob_ptr, out_ptr, oob_ptr, num_programs, num_domains,
        BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        # Fixed order over programs: the same bits every run.
        tile = tl.program_id(0)
        e_idx = tile * BLOCK_K + tl.arange(0, BLOCK_K)
        e_ok = e_idx < 3 * num_domains
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        oob = tl.zeros([1], dtype=tl.int64)
        for p in range(0, num_programs):
            acc += tl.load(part_ptr + p * 3 * num_domains + e_idx, mask=e_ok, other=0.0)
            oob += tl.load(part_oob_ptr + p + tl.arange(0, 1))
        tl.store(out_ptr + e_idx, acc, mask=e_ok)
        if tile == 0:
            tl.store(oob_ptr + tl.arange(0, 1), oob)

    @triton.jit
    def _is_finite(x):
        return (x == x) & (tl.abs(x) < float("inf"))

    @triton.jit
    def _update_kernel(
        stats_ptr, num_partials, state_ptr, counters_ptr, objective_ptr, aux_ptr,
        num_domains, step_size, keep, spread,
        ZERO_STATS: tl.constexpr, DRO: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        k = tl.arange(0, BLOCK_K)
        k_ok = k < num_domains
        if num_partials > 0:
            # deterministic: stats_ptr holds num_partials x [3, K] partials, summed in order
            count = tl.zeros([BLOCK_K], dtype=tl.float32)
            loss_sum = tl.zeros([BLOCK_K], dtype=tl.float32)
            excess_sum = tl.zeros([BLOCK_K], dtype=tl.float32)
            for p in range(0, num_partials):
                base = stats_ptr + p * 3 * num_domains
                count += tl.load(base + k, mask=k_ok, other=0.0)
                loss_sum += tl.load(base + num_domains + k, mask=k_ok, other=0.0)
                excess_sum += tl.load(base + 2 * num_domains + k, mask=k_ok, other=0.0)
        else:
            count = tl.load(stats_ptr + k, mask=k_ok, other=0.0)
            loss_sum = tl.load(stats_ptr + num_domains + k, mask=k_ok, other=0.0)
            excess_sum = tl.load(stats_ptr + 2 * num_domains + k, mask=k_ok, other=0.0)
            if ZERO_STATS:  # the accumulator is reused by the next step's atomics
                # Every thread has loaded it before any zero lands: for 33 <= K <= 64 the layout
                # gives warps 2-3 copies of warps 0-1's elements, and a copy warp that lagged
                # read zeros (all domains "absent") into the reductions it shares.
                tl.debug_barrier()
                zero = tl.zeros([BLOCK_K], dtype=tl.float32)
                tl.store(stats_ptr + k, zero, mask=k_ok)
                tl.store(stats_ptr + num_domains + k, zero, mask=k_ok)
                tl.store(stats_ptr + 2 * num_domains + k, zero, mask=k_ok)
        alpha = tl.load(state_ptr + k, mask=k_ok, other=1.0)
        excess = tl.load(state_ptr + num_domains + k, mask=k_ok, other=0.0)
        average = tl.load(state_ptr + 2 * num_domains + k, mask=k_ok, other=0.0)
        present = count > 0.0
        new_excess = tl.where(present, excess_sum / tl.maximum(count, 1.0), excess)
        logits = tl.log(alpha) + step_size * new_excess
        logits = tl.where(k_ok, logits, -float("inf"))
        shift = tl.max(logits, axis=0)
        expo = tl.where(k_ok, tl.exp(logits - shift), 0.0)
        # keep = 1 - c and spread = c / K come rounded from doubles, as torch forms them for the
        # reference (in float32 here they could differ by an ulp).
        new_alpha = keep * (expo / tl.sum(expo, axis=0)) + spread
        bad = (~_is_finite(count)) | (~_is_finite(loss_sum)) | (~_is_finite(excess_sum))
        bad = bad | (~_is_finite(new_alpha))
        num_bad = tl.sum((bad & k_ok).to(tl.int32), axis=0)
        ok = num_bad == 0
        one = tl.arange(0, 1)
        updates = tl.load(counters_ptr + one)
        skipped = tl.load(counters_ptr + 1 + one)
        # Every thread reads the count before the store: one that read it after would divide
        # its domains' running average by updates + 2 (K > 32 spans several warps).
        tl.debug_barrier()
        ok_i = tl.where(ok, 1, 0).to(tl.int64)
        tl.store(counters_ptr + one, updates + ok_i)
        tl.store(counters_ptr + 1 + one, skipped + (1 - ok_i))
        # float(updates + 1), like the reference: float(updates) + 1 stops growing at 2^24.
        denom_updates = tl.sum((updates + 1).to(tl.float32), axis=0)
        new_average = average + (new_alpha - average) / denom_updates
        used_alpha = tl.where(ok, new_alpha, alpha)
        tl.store(state_ptr + k, used_alpha, mask=k_ok)
        tl.store(state_ptr + num_domains + k, tl.where(ok, new_excess, excess), mask=k_ok)
        tl.store(state_ptr + 2 * num_domains + k, tl.where(ok, new_average, average), mask=k_ok)
        tl.store(aux_ptr + k, count, mask=k_ok)
        tl.store(aux_ptr + num_domains + k, loss_sum, mask=k_ok)
        tl.store(aux_ptr + 2 * num_domains + k, excess_sum, mask=k_ok)
        tl.store(aux_ptr + 3 * num_domains + k, used_alpha, mask=k_ok)
        if DRO:
            terms = tl.where(present & k_ok, used_alpha * loss_sum / tl.maximum(count, 1.0), 0.0)
            objective = tl.sum(terms, axis=0)
        else:
            numer = tl.sum(tl.where(k_ok, used_alpha * loss_sum, 0.0), axis=0)
            denom = tl.sum(tl.where(k_ok, used_alpha * count, 0.0), axis=0)
            objective = numer / tl.where(denom > 0.0, denom, 1.0)
        tl.store(objective_ptr + one, tl.zeros([1], dtype=tl.float32) + objective)


# ------------------------------------------------------------------------------------------------
# availability
# ------------------------------------------------------------------------------------------------
def _interpreted() -> bool:
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_stats_kernel, InterpretedFunction)


if triton is not None:

    @triton.jit
    def _interpreter_probe_kernel(out_ptr, n, BLOCK: tl.constexpr):
        # What the kernels need of the interpreter: a loop bounded by a scalar argument and a
        # block size passed as a keyword constexpr.
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        for _ in range(0, n):
            acc += 1
        tl.store(out_ptr + tl.arange(0, BLOCK), acc)


@functools.lru_cache(maxsize=1)
def _interpreter_problem() -> str | None:
    """None when Triton's interpreter runs the kernels' constructs here, else why not.

    Seen failing: triton 3.6.0's interpreter with numpy 2.4 and 2.5 (it turns a scalar loop
    bound into an int with ``int()`` of a one-element array, which that numpy refuses) and
    triton 3.0.0's (a keyword constexpr reaches ``tl.arange`` as a plain value); triton 3.9.0
    runs them.  Probed once, so the backend reports itself unavailable with the reason instead
    of failing inside every launch.
    """
    out = torch.zeros(2, dtype=torch.int32)
    try:
        _interpreter_probe_kernel[(1,)](out, 3, BLOCK=2)
    except Exception as exc:
        return (
            f"triton {triton.__version__}'s interpreter cannot run the kernels here (numpy "
            f"{np.__version__}; {type(exc).__name__}: {exc}); a newer triton can"
        )
    if out.tolist() != [3, 3]:
        return f"triton {triton.__version__}'s interpreter computed a wrong loop {out.tolist()}"
    return None


def availability() -> tuple[bool, str]:
    """(whether the kernels can run on some tensor in this process, where they run or why not).

    Like the CUDA backend's: importable is not enough, ``backend="triton"`` must work somewhere.
    """
    if triton is None:
        return False, f"triton is not importable ({_IMPORT_ERROR})"
    if _interpreted():
        problem = _interpreter_problem()
        if problem is not None:
            return False, problem
        return True, f"triton {triton.__version__} under TRITON_INTERPRET=1 (CPU tensors too)"
    if not torch.cuda.is_available():
        return False, (
            f"triton {triton.__version__} is installed but there is no CUDA device; it runs on "
            "CPU tensors only under its interpreter (TRITON_INTERPRET=1 set before triton is "
            "imported)"
        )
    return True, f"triton {triton.__version__} on CUDA"


def can_run(device: torch.device) -> tuple[bool, str]:
    """Whether the kernels can run on tensors of ``device`` (and why not)."""
    if triton is None:
        return False, f"triton is not importable ({_IMPORT_ERROR})"
    if _interpreted():
        problem = _interpreter_problem()
        return problem is None, problem or ""
    if device.type == "cuda":
        if torch.cuda.is_available():
            return True, ""
        return False, "CUDA is not available"
    return False, (
        "triton runs on CPU tensors only under its interpreter: set TRITON_INTERPRET=1 before "
        "triton is imported"
    )


# ------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------
def _layout(loss: Tensor, domain: Tensor, num_domains: int) -> tuple[int, int, int, int, int]:
    n = loss.numel()
    if n >= 2**31:
        raise ValueError(f"loss has {n} tokens; the triton kernels index with int32 (< 2**31)")
    if num_domains > MAX_DOMAINS:
        raise ValueError(f"num_domains={num_domains} exceeds the triton limit {MAX_DOMAINS}")
    block_k = min(_next_pow2(num_domains), 128)
    block_n = max(16, TILE_ELEMENTS // block_k)
    programs = max(1, min(MAX_PROGRAMS, triton.cdiv(n, block_n)))
    chunks = triton.cdiv(triton.cdiv(n, programs), block_n) if n else 0
    programs = max(1, triton.cdiv(n, chunks * block_n)) if n else 1
    return n, block_k, block_n, programs, chunks


def _launch_stats(loss, domain, mask, ref_loss, num_domains, out, oob, partials: bool) -> int:
    n, block_k, block_n, programs, chunks = _layout(loss, domain, num_domains)
    loss_c = loss.contiguous()
    per_sequence = domain.dim() == 1 and loss.dim() == 2
    seq_len = loss.shape[1] if per_sequence else 1
    dom_c = domain.contiguous()
    mask_c = mask.contiguous() if mask is not None else loss_c
    ref_c = ref_loss.contiguous() if ref_loss is not None else loss_c
    grid = (programs, triton.cdiv(num_domains, block_k))
    _stats_kernel[grid](
        loss_c, ref_c, dom_c, mask_c, out, oob,
        n, max(seq_len, 1), num_domains, chunks,
        HAS_REF=ref_loss is not None, HAS_MASK=mask is not None, PER_SEQUENCE=per_sequence,
        PARTIALS=partials, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    return programs


def _partials_buffers(loss: Tensor, num_domains: int) -> tuple[Tensor, Tensor]:
    programs = _layout(loss, loss, num_domains)[3]
    dev = loss.device
    return (
        torch.empty((programs, 3, num_domains), dtype=torch.float32, device=dev),
        torch.empty(programs, dtype=torch.int64, device=dev),
    )


def _check_state(state: Tensor, counters: Tensor, stats: Tensor | None = None) -> None:
    """The kernels index these by hand: a strided view or a wrong dtype would be misread."""
    check_state_layout(state, counters, stats)


def _on_device_of(t: Tensor) -> contextlib.AbstractContextManager:
    """Launches on ``t``'s GPU: triton takes the current device and its stream, not the tensors'."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def domain_stats(
    loss: Tensor,
    domain: Tensor,
    mask: Tensor | None,
    ref_loss: Tensor | None,
    num_domains: int,
    deterministic: bool = False,
) -> tuple[Tensor, Tensor]:
    """Triton version of :func:`fastmix.ops.reference.domain_stats`."""
    with _on_device_of(loss):
        return _domain_stats(loss, domain, mask, ref_loss, num_domains, deterministic)


def _domain_stats(
    loss: Tensor,
    domain: Tensor,
    mask: Tensor | None,
    ref_loss: Tensor | None,
    num_domains: int,
    deterministic: bool,
) -> tuple[Tensor, Tensor]:
    dev = loss.device
    if deterministic:
        part, part_oob = _partials_buffers(loss, num_domains)
        programs = _launch_stats(loss, domain, mask, ref_loss, num_domains, part, part_oob, True)
        out = torch.empty((3, num_domains), dtype=torch.float32, device=dev)
        oob = torch.empty((), dtype=torch.int64, device=dev)
        block = min(_next_pow2(3 * num_domains), 1024)
        _sum_partials_kernel[(triton.cdiv(3 * num_domains, block),)](
            part, part_oob, out, oob, programs, num_domains, BLOCK_K=block
        )
        return out, oob
    out = torch.zeros((3, num_domains), dtype=torch.float32, device=dev)
    oob = torch.zeros((), dtype=torch.int64, device=dev)
    _launch_stats(loss, domain, mask, ref_loss, num_domains, out, oob, False)
    return out, oob


def _launch_update(
    stats: Tensor, num_partials: int, zero_stats: bool, state: Tensor, counters: Tensor,
    step_size: float, smoothing: float, proxy: str,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    k = state.shape[1]
    objective = torch.empty((), dtype=torch.float32, device=state.device)
    aux = torch.empty((4, k), dtype=torch.float32, device=state.device)
    _update_kernel[(1,)](
        stats, num_partials, state, counters, objective, aux,
        k, float(step_size), float(1.0 - smoothing), float(smoothing / k),
        ZERO_STATS=zero_stats, DRO=proxy == "dro", BLOCK_K=_next_pow2(k),
    )  # fmt: skip
    return objective, aux


def doremi_update_(
    stats: Tensor, state: Tensor, counters: Tensor, step_size: float, smoothing: float, proxy: str
) -> tuple[Tensor, Tensor]:
    """Apply the update from finished ``[3, K]`` statistics (one launch)."""
    _check_state(state, counters, stats)
    with _on_device_of(state):
        return _launch_update(
            stats.contiguous(), 0, False, state, counters, step_size, smoothing, proxy
        )


def fused_workspace(num_domains: int, device: torch.device) -> Tensor:
    """Zeroed ``[3, K]`` accumulator reused by every fused step (the update re-zeroes it)."""
    return torch.zeros((3, num_domains), dtype=torch.float32, device=device)


def doremi_step_(
    loss: Tensor, domain: Tensor, mask: Tensor | None, ref_loss: Tensor, state: Tensor,
    counters: Tensor, workspace: Tensor, step_size: float, smoothing: float, proxy: str,
    deterministic: bool = False,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Statistics + update in two launches; out-of-range ids are added to ``counters[2]``."""
    _check_state(state, counters)
    if not workspace.is_contiguous():
        raise ValueError("workspace must be contiguous (from fused_workspace)")
    with _on_device_of(state):
        return _doremi_step(
            loss, domain, mask, ref_loss, state, counters, workspace, step_size, smoothing, proxy,
            deterministic,
        )  # fmt: skip


def _doremi_step(
    loss: Tensor, domain: Tensor, mask: Tensor | None, ref_loss: Tensor, state: Tensor,
    counters: Tensor, workspace: Tensor, step_size: float, smoothing: float, proxy: str,
    deterministic: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    k = state.shape[1]
    oob_slot = counters[2:]
    if deterministic:
        part, part_oob = _partials_buffers(loss, k)
        programs = _launch_stats(loss, domain, mask, ref_loss, k, part, part_oob, True)
        oob_slot.add_(part_oob.sum())
        return _launch_update(part, programs, False, state, counters, step_size, smoothing, proxy)
    if workspace.shape != (3, k) or workspace.dtype != torch.float32:
        raise ValueError(f"workspace must be a float32 [3, {k}] accumulator")
    _launch_stats(loss, domain, mask, ref_loss, k, workspace, oob_slot, False)
    return _launch_update(workspace, 0, True, state, counters, step_size, smoothing, proxy)
