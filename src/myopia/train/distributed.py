"""Data parallelism applied from outside the model: torchrun (or ``accelerate launch``) sets the
environment, :func:`setup` joins the process group, :func:`parallelize` wraps the model (DDP, or FSDP2
``fully_shard`` per block or decoder layer: :func:`shard_units`), and :class:`Dist` gives the loop the few collectives it needs.

Every rank generates the same *global* batch from (seed, step, micro) and keeps its contiguous slice,
so the global sequence of examples equals the single-process order for the same global batch size.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def shard(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global batch."""
        if not self.enabled:
            return t
        n = t.shape[0]
        if n % self.world:
            raise ValueError(f"train.batch_size={n} is not divisible by the {self.world} processes; "
                             f"use a multiple of {self.world}")
        per = n // self.world
        return t[self.rank * per:(self.rank + 1) * per]

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            value = value.clone()
            torch_dist.all_reduce(value, op=torch_dist.ReduceOp.SUM)
            value /= self.world
        return value

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            value = value.clone()
            torch_dist.all_reduce(value, op=torch_dist.ReduceOp.SUM)
        return value

    def mean_and_any(self, value: torch.Tensor, flag: bool) -> tuple[torch.Tensor, bool]:
        """:meth:`mean` of ``value`` (a scalar tensor) and :meth:`any` of ``flag`` in one all-reduce: the
        loop's per-step loss average carries its stop decision, at no extra collective."""
        if not self.enabled:
            return value, flag
        both = torch.stack([value.detach().float().reshape(()), value.new_tensor(1.0 if flag else 0.0).float()])
        torch_dist.all_reduce(both, op=torch_dist.ReduceOp.SUM)
        return both[0] / self.world, bool(both[1].item() > 0)

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (every rank gets the same answer)."""
        if not self.enabled:
            return flag
        value = torch.tensor([1.0 if flag else 0.0])
        if torch_dist.get_backend() == "nccl":
            value = value.cuda()
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def all_objects(self, obj) -> list:
        """Every rank's ``obj``, in rank order (a collective)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        torch_dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def broadcast_object(self, obj):
        if not self.enabled:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]


def setup(device: str = "auto") -> Dist:
    """Join the process group that torchrun/accelerate described in the environment (if any)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if not torch_dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        torch_dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank=rank, world=world, local_rank=local_rank)


def parallelize(model: nn.Module, dist: Dist, strategy: str, device: torch.device) -> nn.Module:
    """Wrap ``model`` for data parallelism; returns it unchanged in a single process."""
    if not dist.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index if device.index is not None else dist.local_rank] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for unit in shard_units(model):
            fully_shard(unit)
        fully_shard(model)
        return model
    raise ValueError(f"train.parallel={strategy!r} is not one of ddp, fsdp")


def sharded_across_ranks(strategy: str) -> bool:
    """Whether the bare model's parameters are shards in this process (FSDP over several ranks), so that
    a measurement on it (a monitor's gradient split) would see only this rank's pieces."""
    return strategy == "fsdp" and int(os.environ.get("WORLD_SIZE", "1")) > 1


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 shards one by one (each a unit of all-gather and reshard): our GPT's
    ``blocks``; for a transformers model its decoder layers, the classes its ``_no_split_modules``
    names (outermost only); else the entries of its longest ``ModuleList``."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.ModuleList):
        return list(blocks)
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    units: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if type(m).__name__ in names and not any(name.startswith(outer + ".") for outer, _ in units):
            units.append((name, m))
    if units:
        return [m for _, m in units]
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def no_grad_sync(model: nn.Module, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)

        @contextlib.contextmanager
        def restore():
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

        return restore()
    return contextlib.nullcontext()
