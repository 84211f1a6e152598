"""All-reduce helpers for the mixture rules: asynchronous, on the current stream, no host sync.

The statistics that drive DoReMi and ODM are sums over tokens, so summing the ``[3, K]`` tensors
of every data-parallel rank gives exactly the statistics of the concatenated batch; every rank
then applies the same update and holds the same weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["resolve_group", "world_size", "all_reduce_sum_", "check_ranks_agree"]


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class _GroupLeftBehind:
    """Stands in for a process group that an object was pickled with: groups cannot be pickled."""

    def __repr__(self) -> str:
        return "<process group left behind by pickling>"


def state_without_group(attributes: dict[str, Any]) -> dict[str, Any]:
    """``__getstate__`` for an object with a ``process_group`` attribute: everything else as is,
    the group replaced by a marker that :func:`resolve_group` refuses with a message."""
    state = dict(attributes)
    if state.get("process_group") is not None:
        state["process_group"] = _GroupLeftBehind()
    return state


def deepcopy_sharing_group(obj: Any, memo: dict[int, Any]) -> Any:
    """``__deepcopy__`` that copies everything but ``process_group``, which the copy shares."""
    import copy

    new = obj.__class__.__new__(obj.__class__)
    memo[id(obj)] = new
    for key, value in obj.__dict__.items():
        new.__dict__[key] = value if key == "process_group" else copy.deepcopy(value, memo)
    return new


def resolve_group(process_group: Any = None) -> Any:
    """The process group to reduce over: the one given, else the default group when
    torch.distributed is initialised, else ``None`` (a single process).

    A given group must be a ``torch.distributed.ProcessGroup`` that includes this rank, with
    torch.distributed initialised (ValueError/TypeError naming process_group otherwise).
    """
    if isinstance(process_group, _GroupLeftBehind):
        raise ValueError(
            "process_group: this object was pickled (or torch.save'd) with a process group, "
            "which cannot be pickled; set its .process_group again (None: the world group)"
        )
    if process_group is not None:
        if not _dist_ready():
            raise ValueError("process_group was given but torch.distributed is not initialised")
        from torch.distributed import distributed_c10d

        # A rank outside the group would get no work handle back from the all-reduce.
        not_in_group = getattr(distributed_c10d, "_rank_not_in_group", lambda group: False)
        if not_in_group(process_group):
            raise ValueError(
                f"process_group does not include this rank ({torch.distributed.get_rank()}); "
                "build the mixer only on the ranks of its group"
            )
        # Anything else reached torch's collectives, which failed with e.g. AttributeError
        # "'str' object has no attribute 'size'" (checked after the marker above: new_group
        # hands a non-member the int GroupMember.NON_GROUP_MEMBER).
        if not isinstance(process_group, torch.distributed.ProcessGroup):
            raise TypeError(
                "process_group must be a torch.distributed.ProcessGroup (e.g. from "
                f"torch.distributed.new_group) or None, got {type(process_group).__name__}"
            )
        return process_group
    if _dist_ready():
        return torch.distributed.group.WORLD
    return None


def world_size(group: Any) -> int:
    """Number of ranks in ``group`` (1 for ``None``)."""
    if group is None:
        return 1
    return torch.distributed.get_world_size(group)


def all_reduce_sum_(tensor: Tensor, group: Any) -> Tensor:
    """Sum ``tensor`` over the ranks of ``group`` in place and return it.

    The collective is issued asynchronously; ``wait()`` on a GPU backend (NCCL) only makes the
    current stream wait for the communication stream, so the host never blocks.  Under
    ``torch.compile`` the traceable functional collective is used instead.
    """
    if group is None or world_size(group) == 1:
        return tensor
    if torch.compiler.is_compiling():
        from torch.distributed import _functional_collectives as funcol

        tensor.copy_(funcol.all_reduce(tensor, "sum", group))
        return tensor
    work = torch.distributed.all_reduce(
        tensor, op=torch.distributed.ReduceOp.SUM, group=group, async_op=True
    )
    work.wait()
    return tensor


def _feed(h: Any, value: Any) -> None:
    if isinstance(value, np.generic):  # a numpy scalar digests as the Python number it holds
        value = value.item()
    if isinstance(value, Tensor):
        t = value.detach().cpu().contiguous()
        try:
            value = t.numpy()
        except TypeError:  # bfloat16 and the other dtypes numpy lacks: digest their bytes
            h.update(f"tensor{t.dtype}{tuple(t.shape)}:".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            return
    if isinstance(value, np.ndarray):
        h.update(f"array{value.dtype.str}{value.shape}:".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, Mapping):
        h.update(f"dict{len(value)}(".encode())
        for key in sorted(value, key=repr):
            _feed(h, key)
            _feed(h, value[key])
        h.update(b")")
    elif isinstance(value, (set, frozenset)):
        # Iteration order follows hash randomisation, which differs between processes.
        h.update(f"set{len(value)}(".encode())
        for digest in sorted(_fingerprint(item) for item in value):
            h.update(digest.to_bytes(8, "little"))
        h.update(b")")
    elif isinstance(value, (tuple, list)):
        h.update(f"{type(value).__name__}{len(value)}(".encode())
        for item in value:
            _feed(h, item)
        h.update(b")")
    else:
        # repr of a scalar, str or None (repr would abbreviate a large array, hence the above)
        text = repr(value)
        h.update(f"{len(text)}:{text}".encode())


def _fingerprint(value: Any) -> int:
    """A 62-bit digest of ``value``: arrays and tensors by dtype, shape and bytes, lists and
    tuples item by item, mappings by sorted key, anything else by its repr.  Equal values give
    equal digests on every machine and process."""
    h = hashlib.blake2b(digest_size=8)
    _feed(h, value)
    # 62 bits, so that the digest and its negation both fit an int64 (see check_ranks_agree).
    return int.from_bytes(h.digest(), "little") >> 2


def _collective_device(group: Any, device: torch.device | None) -> torch.device:
    """Where a small tensor for a collective over ``group`` must live: ``device`` when it is a
    GPU, else the CPU when the group's backend takes CPU tensors (gloo, mpi), else the current
    GPU (NCCL only)."""
    if device is not None and device.type == "cuda":
        return device
    backend = str(torch.distributed.get_backend(group)).lower()
    if "gloo" in backend or "mpi" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def check_ranks_agree(
    what: str,
    fields: Mapping[str, Any],
    group: Any,
    *,
    device: torch.device | None = None,
    rank: int | None = None,
    num_ranks: int | None = None,
) -> None:
    """Raise ValueError on every rank of ``group`` unless all of them hold equal ``fields``.

    A collective: every rank of ``group`` must call it, with the same field names.  One
    all-reduce (MAX) of each field's digest and of its negation gives every rank the largest and
    the smallest digest, so every rank reaches the same verdict and raises the same error: no
    rank is left waiting for another that gave up.  With ``rank`` and ``num_ranks`` (this
    process's slice of the data and the number of slices it assumes), also checks that
    ``num_ranks`` is the group's size and that each slice is taken exactly once.  It reads the
    result on the host (a synchronisation): call it outside CUDA-graph capture and
    ``torch.compile``, e.g. once before training.
    """
    if group is None:
        raise ValueError(
            f"{what}: comparing ranks needs torch.distributed initialised and a process group"
        )
    fields = dict(fields)
    if num_ranks is not None:
        fields["world_size"] = num_ranks
    # By sorted name, so that ranks building the mapping in another order still compare like
    # with like; the names themselves are compared first.
    names = ["field names", *sorted(fields)]
    digests = [_fingerprint(sorted(fields))] + [_fingerprint(fields[name]) for name in names[1:]]
    size = world_size(group)
    taken = [0] * size
    if rank is not None and 0 <= rank < size:
        taken[rank] = 1
    dev = _collective_device(group, device)
    values = torch.tensor(digests + [-d for d in digests] + taken, dtype=torch.int64, device=dev)
    torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX, group=group)
    got = values.cpu().tolist()
    n = len(names)
    # Every rank holds the same ``got``, and past the first check the same fields: each branch
    # below is taken on all ranks or on none.
    differ = [name for i, name in enumerate(names) if got[i] != -got[n + i]]
    if "field names" not in differ:  # report in the caller's order
        differ = [name for name in fields if name in differ]
    head = f"{what} is not the same on the {size} ranks of its process group: "
    if differ:
        raise ValueError(head + f"they differ in {', '.join(differ)}")
    if num_ranks is not None and num_ranks != size:
        raise ValueError(head + f"world_size={num_ranks}, but the group has {size} ranks")
    if rank is not None and not all(got[2 * n :]):
        missing = [i for i, seen in enumerate(got[2 * n :]) if not seen]
        raise ValueError(
            head + f"rank(s) {missing} are taken by no process, so two processes read the same "
            "slice of every global batch"
        )
