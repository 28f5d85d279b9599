"""Several processes (``--trainer.devices N --trainer.strategy ddp``): cases are sharded, metrics exact.

An edit run has no gradient to all-reduce: every process edits its own shard of the cases (z and
its optimiser live inside the editor, the model weights are frozen); besides Lightning's per-step
bookkeeping, processes meet only at the end of the epoch, where the metric states are summed and
the case rows gathered. So
:class:`EditDDPStrategy` is Lightning's DDP (process launch, process group, collectives) without
the ``DistributedDataParallel`` wrapper, which refuses a module with no trainable parameter.
``kelight fit/validate --trainer.strategy ddp`` selects it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy

T = TypeVar("T")


class EditDDPStrategy(DDPStrategy):
    """Lightning's ``ddp`` for edit runs: one process per device, no gradient synchronisation.

    Each process edits and evaluates its own cases, every case exactly once (training:
    :class:`~kelight.data.datamodule.PaddedShardSampler`, shorter shards padded with an empty slot so
    all processes run the same number of steps; evaluation: ``UnrepeatedDistributedSampler``, shards
    may differ by one); :class:`~kelight.module.EditModule` sums the metric states and gathers the
    case rows at the end. Not for methods that train shared parameters on
    gradients of several processes' cases (they need the ``DistributedDataParallel`` wrapper).

    Example:
        >>> EditDDPStrategy(process_group_backend="gloo").process_group_backend
        'gloo'
    """

    strategy_name = "ddp_edit"

    def configure_ddp(self) -> None:
        """Keep the bare LightningModule (``DDPStrategy`` would wrap it in ``DistributedDataParallel``)."""


def gather_objects(obj: T) -> list[T]:
    """``obj`` of every process, in rank order (``[obj]`` without an initialised process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[T | None] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out  # type: ignore[return-value]


def interleave(shards: Sequence[Sequence[T]]) -> list[T]:
    """Per-rank items back in dataset order: rank r's k-th item is item ``r + k·world_size``.

    That is how ``UnrepeatedDistributedSampler(shuffle=False)`` deals the cases out, and each rank
    records its cases in the order its loader yields them.

    Example:
        >>> interleave([[0, 2, 4], [1, 3]])
        [0, 1, 2, 3, 4]
    """
    longest = max((len(shard) for shard in shards), default=0)
    return [shard[k] for k in range(longest) for shard in shards if k < len(shard)]
