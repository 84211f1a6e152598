"""All-reduce helpers for the mixture rules: asynchronous, on the current stream, no host sync.

The statistics that drive DoReMi and ODM are sums over tokens, so summing the ``[3, K]`` tensors
of every data-parallel rank gives exactly the statistics of the concatenated batch; every rank
then applies the same update and holds the same weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["resolve_group", "world_size", "all_reduce_sum_"]


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def resolve_group(process_group: Any = None) -> Any:
    """The process group to reduce over: the one given, else the default group when
    torch.distributed is initialised, else ``None`` (a single process)."""
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
