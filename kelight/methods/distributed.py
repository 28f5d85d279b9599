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
    :class:`~kelight.data.datamodule.BatchShardSampler`, the one-process loader's batches dealt out
    in turn, shorter shares padded with empty batches so all processes run the same number of
    steps; evaluation: ``UnrepeatedDistributedSampler``, shards
    may differ by one); :class:`~kelight.methods.base.EditModule` sums the metric states and gathers the
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


def interleave(shards: Sequence[Sequence[T]], block: int = 1) -> list[T]:
    """Per-rank items back in dataset order, when rank r holds blocks r, r + N, ... of ``block`` items.

    ``block`` 1 is how ``UnrepeatedDistributedSampler(shuffle=False)`` deals out cases; ``block`` B is
    how :class:`~kelight.data.datamodule.BatchShardSampler` deals out training batches of B cases
    (only the very last block may be shorter). Each rank records its items in the order its loader
    yields them.

    Example:
        >>> interleave([[0, 2, 4], [1, 3]])
        [0, 1, 2, 3, 4]
        >>> interleave([[0, 1, 4], [2, 3]], block=2)
        [0, 1, 2, 3, 4]
    """
    if block < 1:
        raise ValueError(f"expected block >= 1, got {block}")
    rounds = max((-(-len(shard) // block) for shard in shards), default=0)
    return [item for k in range(rounds) for shard in shards for item in shard[k * block:(k + 1) * block]]
