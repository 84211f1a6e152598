"""Per-domain loss statistics and the DoReMi update: validation, backend choice, torch.library ops.

Three backends compute the same thing:

``"torch"``   plain torch (:mod:`fastmix.ops.reference`), the CPU path and the oracle;
``"triton"``  Triton kernels (:mod:`fastmix.ops.triton`), on CUDA tensors, or on CPU tensors when
              the Triton interpreter is on (``TRITON_INTERPRET=1`` set before triton is imported);
``"cuda"``    the compiled ``fastmix._cuda`` module (:mod:`fastmix.ops.cuda`), CUDA tensors only.

The automatic choice is cuda when built and the tensors are on a GPU, else triton when importable
and the tensors are on a GPU, else torch.  ``backend=`` or the environment variable
``FASTMIX_BACKEND`` (read at every eager call; under torch.compile, when the graph is traced)
forces one; forcing one that cannot run raises.

Each op is a ``torch.library`` custom op (namespace ``fastmix``) with a fake implementation, so it
traces under ``torch.compile(fullgraph=True)`` and records into CUDA graphs.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastmix import _checks
from fastmix.ops import reference

__all__ = ["domain_loss_stats", "backends", "resolve_backend", "validate_inputs"]

BACKENDS = ("cuda", "triton", "torch")
LOSS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ID_DTYPES = (torch.int32, torch.int64)
# Largest K the kernels hold in on-chip memory (the CUDA kernel keeps 8 warps x 3 x K floats).
MAX_KERNEL_DOMAINS = 1024
# The triton kernels index tokens with int32.
TRITON_MAX_TOKENS = 2**31


# --------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------
def _backend_module(name: str) -> Any:
    return importlib.import_module(f"fastmix.ops.{name}")


def backends() -> dict[str, dict[str, Any]]:
    """What each backend can do here: ``{name: {"available": bool, "reason": str}}``.

    ``reason`` says why a backend is unavailable (or, when available, where it runs).
    """
    report: dict[str, dict[str, Any]] = {
        "torch": {"available": True, "reason": "plain torch, every device"}
    }
    for name in ("triton", "cuda"):
        try:
            ok, reason = _backend_module(name).availability()
        except Exception as exc:  # an import error is itself the reason
            ok, reason = False, f"{type(exc).__name__}: {exc}"
        report[name] = {"available": ok, "reason": reason}
    return {name: report[name] for name in BACKENDS}


def _assume_constant_result(fn: Any) -> Any:
    """``torch.compiler.assume_constant_result`` without importing torch._dynamo: that import
    costs ~1.3 s (here, torch 2.13) on every ``import fastmix.ops`` of a job that never compiles,
    for a decorator that only sets this mark (the same attribute in torch 2.4 to 2.13; a test
    checks that the two agree)."""
    fn._dynamo_marked_constant = True
    return fn


# Evaluated eagerly even while torch.compile traces (the answer is a constant per process): the
# availability probes call into importlib and the compiled modules, which would break the graph.
@_assume_constant_result
def _can_run(name: str, device: torch.device) -> tuple[bool, str]:
    if name == "torch":
        return True, ""
    try:
        module = _backend_module(name)
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return module.can_run(device)


# Read at each eager call; while torch.compile traces, once per trace (older dynamo cannot trace
# os.environ.get at all).
@_assume_constant_result
def _env_backend() -> str | None:
    return os.environ.get("FASTMIX_BACKEND") or None


def resolve_backend(
    backend: str | None,
    device: torch.device | str,
    num_domains: int | None = None,
    num_tokens: int | None = None,
) -> str:
    """The backend to use for tensors on ``device``; ``backend`` or FASTMIX_BACKEND forces one.

    ``device`` is a torch.device or a str naming one ("cpu", "cuda:0").  With ``num_domains``
    above the kernels' limit the automatic choice is torch, and a forced kernel backend is a
    ValueError.  The automatic choice skips triton from 2**31 tokens (its kernels index with
    int32; a forced triton raises there).
    """
    if not isinstance(device, torch.device):
        # a str was read as a device object (AttributeError: 'str' object has no attribute 'type')
        if not isinstance(device, str):
            raise TypeError(f"device must be a torch.device or str, got {type(device).__name__}")
        try:
            device = torch.device(device)
        except RuntimeError as exc:
            raise ValueError(f"device {device!r} is not a valid torch device: {exc}") from None
    if num_domains is not None:
        num_domains = _check_num_domains(num_domains)
    forced = backend if backend is not None else _env_backend()
    if forced is not None:
        source = "backend" if backend is not None else "FASTMIX_BACKEND"
        if forced not in BACKENDS:
            raise ValueError(f"{source} must be one of {BACKENDS}, got {forced!r}")
        ok, why = _can_run(forced, device)
        if not ok:
            raise RuntimeError(
                f"{source}={forced!r} cannot run on {device.type} tensors here: {why}"
            )
        if forced != "torch" and num_domains is not None and num_domains > MAX_KERNEL_DOMAINS:
            raise ValueError(
                f"num_domains={num_domains} exceeds the {forced} kernels' limit "
                f"{MAX_KERNEL_DOMAINS}; use backend='torch'"
            )
        return forced
    if device.type == "cuda" and (num_domains is None or num_domains <= MAX_KERNEL_DOMAINS):
        for name in ("cuda", "triton"):
            if name == "triton" and num_tokens is not None and num_tokens >= TRITON_MAX_TOKENS:
                continue
            if _can_run(name, device)[0]:
                return name
    return "torch"


# --------------------------------------------------------------------------------------------
# validation (metadata only on GPU; value checks on CPU where they cost no sync)
# --------------------------------------------------------------------------------------------
def _check_num_domains(num_domains: Any) -> int:
    """K as a Python int in [1, 2**31 - 1] (a NumPy int is taken too)."""
    return _checks.num_domains(num_domains)


def _check_dense(t: Tensor, name: str) -> None:
    # A sparse or mkldnn tensor failed deep inside torch ("reshape is not implemented for sparse
    # tensors", or on the kernels' path "do not have is_contiguous"), naming no argument.
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")


def validate_inputs(
    loss: Any,
    domain: Any,
    num_domains: Any,
    ref_loss: Any = None,
    mask: Any = None,
    *,
    ref_required: bool = False,
    check_values: bool = True,
) -> None:
    """Check shapes, dtypes and devices, raising TypeError/ValueError that name the argument.

    On CPU tensors (where it costs no device sync) also checks that every unmasked domain id is
    in [0, num_domains); on GPU, out-of-range ids are counted on the device instead.
    """
    num_domains = _check_num_domains(num_domains)
    if not isinstance(loss, Tensor):
        raise TypeError(f"loss must be a torch.Tensor, got {type(loss).__name__}")
    if loss.dtype not in LOSS_DTYPES:
        raise TypeError(f"loss must be float32, bfloat16 or float16, got {loss.dtype}")
    _check_dense(loss, "loss")
    if loss.dim() not in (1, 2):
        raise ValueError(f"loss must be [N] or [B, T], got shape {tuple(loss.shape)}")
    if not isinstance(domain, Tensor):
        raise TypeError(f"domain must be a torch.Tensor, got {type(domain).__name__}")
    if domain.dtype not in ID_DTYPES:
        raise TypeError(f"domain must be int32 or int64, got {domain.dtype}")
    _check_dense(domain, "domain")
    per_sequence = loss.dim() == 2 and domain.shape == loss.shape[:1]
    if domain.shape != loss.shape and not per_sequence:
        expected = f"{tuple(loss.shape)}" + (
            f" or [B] = ({loss.shape[0]},)" if loss.dim() == 2 else ""
        )
        raise ValueError(
            f"domain must have loss's shape {expected}, got {tuple(domain.shape)}"
        )
    if domain.device != loss.device:
        raise ValueError(f"domain is on {domain.device} but loss is on {loss.device}")
    if ref_loss is None:
        if ref_required:
            raise TypeError("ref_loss is required")
    else:
        if not isinstance(ref_loss, Tensor):
            raise TypeError(f"ref_loss must be a torch.Tensor, got {type(ref_loss).__name__}")
        if ref_loss.dtype != loss.dtype:
            raise TypeError(f"ref_loss must have loss's dtype {loss.dtype}, got {ref_loss.dtype}")
        _check_dense(ref_loss, "ref_loss")
        if ref_loss.shape != loss.shape:
            raise ValueError(
                f"ref_loss must have loss's shape {tuple(loss.shape)}, "
                f"got {tuple(ref_loss.shape)}"
            )
        if ref_loss.device != loss.device:
            raise ValueError(f"ref_loss is on {ref_loss.device} but loss is on {loss.device}")
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be bool, got {mask.dtype}")
        _check_dense(mask, "mask")
        if mask.shape != loss.shape:
            raise ValueError(
                f"mask must have loss's shape {tuple(loss.shape)}, got {tuple(mask.shape)}"
            )
        if mask.device != loss.device:
            raise ValueError(f"mask is on {mask.device} but loss is on {loss.device}")
    if (
        check_values
        and loss.device.type == "cpu"
        and domain.numel() > 0
        and not torch.compiler.is_compiling()
    ):
        ids = reference.expand_domain(domain, loss)
        bad = (ids < 0) | (ids >= num_domains)
        if mask is not None:
            bad &= mask.reshape(-1)
        if bool(bad.any()):
            first = int(ids[bad][0])
            raise ValueError(
                f"domain ids must be in [0, num_domains={num_domains}) on unmasked tokens; "
                f"found {int(bad.sum())} outside, e.g. {first}"
            )


# --------------------------------------------------------------------------------------------
# torch.library custom ops
# --------------------------------------------------------------------------------------------
def _impl(backend: str) -> Any:
    return reference if backend == "torch" else _backend_module(backend)


def _check_backend_name(backend: Any) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _check_proxy(proxy: Any) -> None:
    if proxy not in reference.PROXY_LOSSES:
        raise ValueError(f"proxy must be one of {reference.PROXY_LOSSES}, got {proxy!r}")


# The ops' schemas, written out rather than inferred from the annotations: inference needs
# evaluated annotations (this module's are strings) and its rules vary between torch releases.
# These are exactly what torch 2.13 infers from the signatures below (test_ops checks it).
_SCHEMAS = {
    "domain_stats": "(Tensor loss, Tensor domain, Tensor? mask, Tensor? ref_loss, "
    "SymInt num_domains, str backend, bool deterministic) -> (Tensor, Tensor)",
    "doremi_step_": "(Tensor loss, Tensor domain, Tensor? mask, Tensor ref_loss, "
    "Tensor(a4!) state, Tensor(a5!) counters, Tensor(a6!) workspace, float step_size, "
    "float smoothing, str proxy, str backend, bool deterministic) -> (Tensor, Tensor)",
    "doremi_update_": "(Tensor stats, Tensor(a1!) state, Tensor(a2!) counters, float step_size, "
    "float smoothing, str proxy, str backend) -> (Tensor, Tensor)",
    "objective_grad": "(Tensor grad, Tensor loss, Tensor domain, Tensor? mask, Tensor aux, "
    "str proxy) -> Tensor",
}


@torch.library.custom_op(
    "fastmix::domain_stats", mutates_args=(), schema=_SCHEMAS["domain_stats"]
)
def _domain_stats_op(
    loss: Tensor,
    domain: Tensor,
    mask: Tensor | None,
    ref_loss: Tensor | None,
    num_domains: int,
    backend: str,
    deterministic: bool,
) -> tuple[Tensor, Tensor]:
    # A direct torch.ops.fastmix call skips domain_loss_stats' checks, and the kernels read what
    # their shapes say: check the metadata (no value, so no sync) here too.
    _check_backend_name(backend)
    validate_inputs(loss, domain, num_domains, ref_loss, mask, check_values=False)
    stats, out_of_range = _impl(backend).domain_stats(
        loss, domain, mask, ref_loss, num_domains, deterministic
    )
    return stats, out_of_range


@_domain_stats_op.register_fake
def _(loss, domain, mask, ref_loss, num_domains, backend, deterministic):
    return (
        loss.new_empty((3, num_domains), dtype=torch.float32),
        loss.new_empty((), dtype=torch.int64),
    )


def _saveable(t: Tensor) -> Tensor:
    """``t``, or a normal copy of it when it is an inference tensor.

    Ids, masks and reference losses are often made under ``torch.inference_mode()``; autograd
    refuses to save such tensors ("Inference tensors cannot be saved for backward").  Dynamo
    cannot trace ``is_inference()``, so traced code skips the check: there the compiled graph
    decides what it saves, and inference-tensor inputs still fail (torch's advice for compiled
    code is ``torch.no_grad()`` instead of ``torch.inference_mode()``).
    """
    if torch.compiler.is_compiling():
        return t
    return t.clone() if t.is_inference() else t


def _stats_setup_context(ctx, inputs, output):
    loss, domain, mask, ref_loss, _, _, _ = inputs
    ctx.has_mask = mask is not None
    ctx.ref_dtype = None if ref_loss is None else ref_loss.dtype
    # The backward needs only where the clipped excess has slope 1, not ref_loss itself: saving
    # that bool mask keeps no (possibly inference, possibly large) reference loss alive.
    active = (
        reference.excess_active(loss, ref_loss)
        if ref_loss is not None
        else loss.new_empty(0, dtype=torch.bool)
    )
    ctx.save_for_backward(
        _saveable(loss),
        _saveable(domain),
        _saveable(mask) if mask is not None else loss.new_empty(0, dtype=torch.bool),
        active,
    )


def _stats_backward(ctx, grad_stats, _grad_oob):
    loss, domain, mask, active = ctx.saved_tensors
    g_loss, g_ref = reference.stats_grad(
        grad_stats,
        loss,
        domain,
        mask if ctx.has_mask else None,
        active if ctx.ref_dtype is not None else None,
        ctx.ref_dtype,
    )
    return g_loss, None, None, g_ref, None, None, None


_domain_stats_op.register_autograd(_stats_backward, setup_context=_stats_setup_context)


def _doremi_step_impl(
    loss: Tensor,
    domain: Tensor,
    mask: Tensor | None,
    ref_loss: Tensor,
    state: Tensor,
    counters: Tensor,
    workspace: Tensor,
    step_size: float,
    smoothing: float,
    proxy: str,
    backend: str,
    deterministic: bool,
) -> tuple[Tensor, Tensor]:
    if backend == "torch":
        return reference.doremi_step_(
            loss, domain, mask, ref_loss, state, counters, step_size, smoothing, proxy,
            deterministic,
        )  # fmt: skip
    return _backend_module(backend).doremi_step_(
        loss, domain, mask, ref_loss, state, counters, workspace, step_size, smoothing, proxy,
        deterministic,
    )  # fmt: skip


def _doremi_step_checked(
    loss: Tensor, domain: Tensor, mask: Tensor | None, ref_loss: Tensor, state: Tensor,
    counters: Tensor, workspace: Tensor, step_size: float, smoothing: float, proxy: str,
    backend: str, deterministic: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The registered op: the metadata checks DoReMi makes before its eager fast path."""
    _check_backend_name(backend)
    _check_proxy(proxy)
    reference.check_state_layout(state, counters)
    validate_inputs(loss, domain, state.shape[1], ref_loss, mask, ref_required=True,
                    check_values=False)  # fmt: skip
    if state.device != loss.device:
        raise ValueError(f"loss is on {loss.device} but the state is on {state.device}")
    # DoReMi allocates it on the state's device; the kernels write through its pointer
    _check_dense(workspace, "workspace")
    if workspace.device != state.device:
        raise ValueError(f"workspace is on {workspace.device}, the state on {state.device}")
    return _doremi_step_impl(
        loss, domain, mask, ref_loss, state, counters, workspace, step_size, smoothing, proxy,
        backend, deterministic,
    )  # fmt: skip


_doremi_step_op = torch.library.custom_op(
    "fastmix::doremi_step_",
    mutates_args=("state", "counters", "workspace"),
    schema=_SCHEMAS["doremi_step_"],
)(_doremi_step_checked)


@_doremi_step_op.register_fake
def _(loss, domain, mask, ref_loss, state, counters, workspace, step_size, smoothing, proxy,
      backend, deterministic):  # fmt: skip
    return state.new_empty(()), state.new_empty((4, state.shape[1]))


def _doremi_update_checked(
    stats: Tensor,
    state: Tensor,
    counters: Tensor,
    step_size: float,
    smoothing: float,
    proxy: str,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """The registered op, with the layout checks a direct call needs."""
    _check_backend_name(backend)
    _check_proxy(proxy)
    reference.check_state_layout(state, counters, stats)
    return _impl(backend).doremi_update_(stats, state, counters, step_size, smoothing, proxy)


_doremi_update_op = torch.library.custom_op(
    "fastmix::doremi_update_", mutates_args=("state", "counters"), schema=_SCHEMAS["doremi_update_"]
)(_doremi_update_checked)


@_doremi_update_op.register_fake
def _(stats, state, counters, step_size, smoothing, proxy, backend):
    return state.new_empty(()), state.new_empty((4, state.shape[1]))


@torch.library.custom_op(
    "fastmix::objective_grad", mutates_args=(), schema=_SCHEMAS["objective_grad"]
)
def _objective_grad_op(
    grad: Tensor, loss: Tensor, domain: Tensor, mask: Tensor | None, aux: Tensor, proxy: str
) -> Tensor:
    _check_proxy(proxy)
    if aux.dim() != 2 or aux.shape[0] != 4:
        raise ValueError(f"aux must be [4, K], got {tuple(aux.shape)}")
    validate_inputs(loss, domain, aux.shape[1], None, mask, check_values=False)
    # Always row-major, whatever the loss's layout (elementwise ops would follow a transposed
    # loss's strides): the fake below promises it.
    return reference.objective_grad(grad, loss, domain, mask, aux, proxy).contiguous()


@_objective_grad_op.register_fake
def _(grad, loss, domain, mask, aux, proxy):
    # Contiguous, as the real op returns it: empty_like would keep a transposed loss's strides,
    # and inductor asserts the real output's strides against the fake's.
    return loss.new_empty(loss.shape)


def _mutated(*tensors: Tensor) -> None:
    """Tell autograd these tensors changed in place, as the dispatcher would for the ops' (a!)
    arguments (one tensor per call: torch before 2.6 takes no tuple)."""
    for t in tensors:
        torch.autograd.graph.increment_version(t)


# Eager calls skip the torch.library dispatcher: it costs ~50 µs per call on CPU (measured:
# 153 µs through torch.ops vs 106 µs direct for a 64-token step), more than the fused CUDA kernel
# itself.  Under torch.compile the registered ops are used, so graphs stay traceable.
def doremi_step_(
    loss: Tensor, domain: Tensor, mask: Tensor | None, ref_loss: Tensor, state: Tensor,
    counters: Tensor, workspace: Tensor, step_size: float, smoothing: float, proxy: str,
    backend: str, deterministic: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``torch.ops.fastmix.doremi_step_`` (statistics + update in place + objective), with the
    dispatcher skipped in eager mode.  Inputs must not require grad."""
    args = (loss, domain, mask, ref_loss, state, counters, workspace, step_size, smoothing, proxy,
            backend, deterministic)  # fmt: skip
    if torch.compiler.is_compiling():
        return torch.ops.fastmix.doremi_step_(*args)
    out = _doremi_step_impl(*args)
    _mutated(state, counters, workspace)
    return out


def doremi_update_(
    stats: Tensor, state: Tensor, counters: Tensor, step_size: float, smoothing: float,
    proxy: str, backend: str,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``torch.ops.fastmix.doremi_update_``, with the dispatcher skipped in eager mode."""
    args = (stats, state, counters, step_size, smoothing, proxy, backend)
    if torch.compiler.is_compiling():
        return torch.ops.fastmix.doremi_update_(*args)
    out = _impl(backend).doremi_update_(*args[:-1])
    _mutated(state, counters)
    return out


def domain_stats_detached(
    loss: Tensor, domain: Tensor, mask: Tensor | None, ref_loss: Tensor | None,
    num_domains: int, backend: str, deterministic: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``torch.ops.fastmix.domain_stats`` on inputs that need no gradient (stats, out-of-range
    count), with the dispatcher skipped in eager mode."""
    args = (loss, domain, mask, ref_loss, num_domains, backend, deterministic)
    if torch.compiler.is_compiling():
        return torch.ops.fastmix.domain_stats(*args)
    return _impl(backend).domain_stats(*args[:5], deterministic)


class _ProxyObjective(torch.autograd.Function):
    """Attaches ∂objective/∂ℓ_t = coefficient(domain of t) to an objective computed by a kernel.

    The kernel that updates α also computes the objective (one launch); this function only adds
    the backward, so the forward costs nothing more.  α is detached (it is read from ``aux``).
    """

    @staticmethod
    def forward(ctx, loss, objective, aux, domain, mask, proxy):  # type: ignore[override]
        ctx.proxy = proxy
        ctx.has_mask = mask is not None
        ctx.save_for_backward(
            _saveable(loss),
            _saveable(domain),
            aux,
            _saveable(mask) if mask is not None else loss.new_empty(0, dtype=torch.bool),
        )
        return objective.view_as(objective)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        loss, domain, aux, mask = ctx.saved_tensors
        g = torch.ops.fastmix.objective_grad(
            grad, loss, domain, mask if ctx.has_mask else None, aux, ctx.proxy
        )
        return g, None, None, None, None, None


def proxy_objective(
    loss: Tensor, objective: Tensor, aux: Tensor, domain: Tensor, mask: Tensor | None, proxy: str
) -> Tensor:
    """``objective`` with autograd to ``loss`` (see :class:`_ProxyObjective`)."""
    return _ProxyObjective.apply(loss, objective, aux, domain, mask, proxy)


# --------------------------------------------------------------------------------------------
# public op
# --------------------------------------------------------------------------------------------
# The torch backend holds the [3, K + 1] sums and the [3, K] result at once.
_STATS_ROWS = 6


def _check_stats_allocatable(num_domains: int, device: torch.device) -> None:
    """A K whose statistics cannot be allocated on the host is a ValueError naming it.

    K may be up to 2**31 - 1, and its statistics then take tens of GiB: torch's allocator error
    named no argument, or the process was killed for memory while the sums were zeroed.  Probed
    as the mixers probe their state (an mmap that touches no page); eager calls on CPU only.
    """
    if device.type != "cpu" or torch.compiler.is_compiling():
        return
    if not _checks.allocatable((_STATS_ROWS, num_domains + 1), np.float32):
        gib = 4 * _STATS_ROWS * (num_domains + 1) / 2**30
        raise ValueError(
            f"num_domains={num_domains}: the per-domain statistics ({_STATS_ROWS} x "
            f"{num_domains + 1:,} float32 values, {gib:,.1f} GiB) are more than can be "
            f"allocated on cpu"
        )


def domain_loss_stats(
    loss: Tensor,
    domain: Tensor,
    num_domains: int,
    *,
    ref_loss: Tensor | None = None,
    mask: Tensor | None = None,
    backend: str | None = None,
    deterministic: bool = False,
) -> Tensor:
    """Per-domain statistics of per-token losses: float32 ``[3, num_domains]``.

    Row 0 is the number of unmasked tokens of each domain, row 1 the sum of their loss, row 2 the
    sum of their clipped excess ``max(loss - ref_loss, 0)`` (zeros without ``ref_loss``).

    Args:
        loss: ``[N]`` or ``[B, T]``, float32, bfloat16 or float16 (accumulated in float32).
        domain: int32/int64 ids, per token (loss's shape) or per sequence (``[B]``).
        num_domains: K, an int in [1, 2**31 - 1] (domain ids are int32 in the sampler and the
            kernels; the kernels themselves take K <= 1024, larger K runs on torch).
        ref_loss: the reference model's per-token loss, loss's shape and dtype.
        mask: bool, loss's shape; False marks a token to ignore (padding, ignore_index).
        backend: "cuda", "triton" or "torch" to force one (also ``FASTMIX_BACKEND``).
        deterministic: bitwise-reproducible sums (no order-dependent float atomics).

    Ids outside [0, K) on unmasked tokens raise ValueError only in eager mode on CPU, where the
    check costs no device sync.  On GPU, and on any device under ``torch.compile`` or in a CUDA
    graph (a data-dependent check would break the graph), such tokens are silently dropped: they
    add to no domain's statistics.  To detect them, compare the counted tokens with the
    unmasked ones, e.g. ``stats[0].sum() < mask.sum()`` (``loss.numel()`` without a mask), or
    use :class:`fastmix.DoReMi`, which counts them in ``num_out_of_range`` (``debug=True`` or
    ``check()`` raises).  Gradients flow to ``loss`` and ``ref_loss``.
    """
    return loss_stats_and_dropped(loss, domain, num_domains, ref_loss, mask, backend,
                                  deterministic)[0]  # fmt: skip


def loss_stats_and_dropped(
    loss: Tensor, domain: Tensor, num_domains: int, ref_loss: Tensor | None, mask: Tensor | None,
    backend: str | None, deterministic: bool, check_values: bool = True,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """:func:`domain_loss_stats` and the number of unmasked tokens it dropped for an id outside
    [0, K); ``check_values=False`` drops and counts them in eager mode on CPU too, instead of
    raising (mixers with several ranks: see ``fastmix.mixers._common.eager_dropped``)."""
    # a NumPy int becomes the Python int the op schema's SymInt takes
    num_domains = _check_num_domains(num_domains)
    validate_inputs(loss, domain, num_domains, ref_loss, mask, check_values=check_values)
    name = resolve_backend(backend, loss.device, num_domains, loss.numel())
    _check_stats_allocatable(num_domains, loss.device)
    # bool("no") is True: any value switched the fixed-order sums on
    deterministic = _checks.flag(deterministic, "deterministic")
    args = (loss, domain, mask, ref_loss, num_domains, name, deterministic)
    needs_grad = torch.is_grad_enabled() and (
        loss.requires_grad or (ref_loss is not None and ref_loss.requires_grad)
    )
    if needs_grad:
        return torch.ops.fastmix.domain_stats(*args)
    return domain_stats_detached(*args)
