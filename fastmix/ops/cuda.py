"""The ``"cuda"`` backend: torch-side wrapper of the compiled ``fastmix._cuda`` module.

``fastmix._cuda`` is a plain pybind11 module (no libtorch): it takes device pointers, sizes and the
current CUDA stream as integers.  This module owns the torch side: it makes inputs contiguous,
allocates outputs, and passes ``torch.cuda.current_stream().cuda_stream`` so the kernels order
correctly with the training step (and record into CUDA graphs).  Importing it never fails: when
the extension is missing or CUDA cannot run, :func:`availability` says why.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor

from fastmix.ops import _assume_constant_result
from fastmix.ops.reference import check_state_layout

try:
    from fastmix import _cuda

    _IMPORT_ERROR: str | None = None
except ImportError as exc:
    _cuda = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

LOSS_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
ID_CODES = {torch.int32: 0, torch.int64: 1}
MAX_DOMAINS = 1024


@functools.lru_cache(maxsize=1)
def availability() -> tuple[bool, str]:
    """(usable, the module's status or why it cannot run); asked once per process."""
    if _cuda is None:
        return False, (
            f"fastmix._cuda is not built ({_IMPORT_ERROR}); it is compiled when nvcc is found at "
            "build time: python setup.py build_ext --inplace"
        )
    status = _cuda.status()
    if not status.startswith("ok"):
        return False, f"fastmix._cuda is built but CUDA cannot run: {status}"
    if not torch.cuda.is_available():
        return False, f"fastmix._cuda reports {status!r} but this torch has no CUDA"
    return True, f"fastmix._cuda: {status}"


def can_run(device: torch.device) -> tuple[bool, str]:
    """Whether the kernels can run on tensors of ``device`` (and why not)."""
    ok, why = availability()
    if not ok:
        return False, why
    if device.type != "cuda":
        return False, "the cuda backend runs on CUDA tensors only"
    # setup.py builds sm_80 and sm_90 code plus compute_90 PTX: any card of capability >= 8.0 runs
    # it; an older one would fail every launch with "no kernel image", so it falls back instead.
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return False, f"cuda kernels need compute capability >= 8.0; this GPU has {major}.{minor}"
    return True, ""


def _module():
    ok, why = availability()
    if not ok:
        raise RuntimeError(why)
    return _cuda


def _inputs(loss: Tensor, domain: Tensor, mask: Tensor | None, ref_loss: Tensor | None):
    """Contiguous tensors (kept alive by the caller until the launch returns) and the kwargs."""
    keep = [loss.contiguous(), domain.contiguous()]
    keep.append(mask.contiguous() if mask is not None else None)
    keep.append(ref_loss.contiguous() if ref_loss is not None else None)
    per_sequence = domain.dim() == 1 and loss.dim() == 2
    seq_len = loss.shape[1] if per_sequence else 1
    kwargs = dict(
        loss=keep[0].data_ptr(),
        loss_dtype=LOSS_CODES[loss.dtype],
        ref_loss=keep[3].data_ptr() if keep[3] is not None else 0,
        domain=keep[1].data_ptr(),
        id_dtype=ID_CODES[domain.dtype],
        mask=keep[2].data_ptr() if keep[2] is not None else 0,
        n=loss.numel(),
        seq_len=max(int(seq_len), 1),
    )
    return keep, kwargs


def _on(device: torch.device):
    """Make ``device`` current for the launch (a no-op context when it already is)."""
    if device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def _check_domains(num_domains: int) -> None:
    if num_domains > MAX_DOMAINS:
        raise ValueError(f"num_domains={num_domains} exceeds the cuda limit {MAX_DOMAINS}")


# A constant for torch.compile: DoReMi.step may allocate its workspace while being traced, and a
# call into the compiled module would break the graph.
@_assume_constant_result
def _workspace_nbytes(num_domains: int) -> int:
    return int(_module().workspace_bytes(num_domains))


def fused_workspace(num_domains: int, device: torch.device) -> Tensor:
    """The zeroed workspace a DoReMi keeps for its fused steps (each launch re-zeroes it)."""
    _check_domains(num_domains)
    return torch.zeros(_workspace_nbytes(num_domains), dtype=torch.uint8, device=device)


def domain_stats(
    loss: Tensor,
    domain: Tensor,
    mask: Tensor | None,
    ref_loss: Tensor | None,
    num_domains: int,
    deterministic: bool = False,
) -> tuple[Tensor, Tensor]:
    """CUDA version of :func:`fastmix.ops.reference.domain_stats` (one kernel launch)."""
    module = _module()
    _check_domains(num_domains)
    dev = loss.device
    with _on(dev):
        keep, kwargs = _inputs(loss, domain, mask, ref_loss)
        out = torch.empty((3, num_domains), dtype=torch.float32, device=dev)
        oob = torch.empty((), dtype=torch.int64, device=dev)
        nbytes = module.workspace_bytes(num_domains)
        workspace = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        # only the header and accumulator must start at zero; the partials are overwritten
        workspace[: 16 + 12 * num_domains].zero_()
        module.domain_stats(
            **kwargs, num_domains=num_domains, out_stats=out.data_ptr(), out_oob=oob.data_ptr(),
            workspace=workspace.data_ptr(), workspace_nbytes=nbytes,
            deterministic=bool(deterministic), stream=torch.cuda.current_stream(dev).cuda_stream,
        )  # fmt: skip
        del keep
    return out, oob


def doremi_step_(
    loss: Tensor, domain: Tensor, mask: Tensor | None, ref_loss: Tensor, state: Tensor,
    counters: Tensor, workspace: Tensor, step_size: float, smoothing: float, proxy: str,
    deterministic: bool = False,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Statistics + update + objective in ONE launch; returns (objective, aux)."""
    module = _module()
    k = state.shape[1]
    _check_domains(k)
    check_state_layout(state, counters)
    if workspace.dtype != torch.uint8 or workspace.numel() < module.workspace_bytes(k):
        raise ValueError("workspace must come from fused_workspace(num_domains, device)")
    dev = loss.device
    with _on(dev):
        keep, kwargs = _inputs(loss, domain, mask, ref_loss)
        objective = torch.empty((), dtype=torch.float32, device=dev)
        aux = torch.empty((4, k), dtype=torch.float32, device=dev)
        module.fused_step(
            **kwargs, num_domains=k, state=state.data_ptr(), counters=counters.data_ptr(),
            objective=objective.data_ptr(), aux=aux.data_ptr(), workspace=workspace.data_ptr(),
            workspace_nbytes=workspace.numel(), step_size=float(step_size),
            smoothing=float(smoothing), dro=proxy == "dro", deterministic=bool(deterministic),
            stream=torch.cuda.current_stream(dev).cuda_stream,
        )  # fmt: skip
        del keep
    return objective, aux


def doremi_update_(
    stats: Tensor, state: Tensor, counters: Tensor, step_size: float, smoothing: float, proxy: str
) -> tuple[Tensor, Tensor]:
    """The update from finished ``[3, K]`` statistics (one single-block launch)."""
    module = _module()
    k = state.shape[1]
    _check_domains(k)
    check_state_layout(state, counters, stats)
    dev = state.device
    with _on(dev):
        stats_c = stats.contiguous()
        objective = torch.empty((), dtype=torch.float32, device=dev)
        aux = torch.empty((4, k), dtype=torch.float32, device=dev)
        module.update(
            stats=stats_c.data_ptr(), num_domains=k, state=state.data_ptr(),
            counters=counters.data_ptr(), objective=objective.data_ptr(), aux=aux.data_ptr(),
            step_size=float(step_size), smoothing=float(smoothing), dro=proxy == "dro",
            stream=torch.cuda.current_stream(dev).cuda_stream,
        )  # fmt: skip
    return objective, aux
