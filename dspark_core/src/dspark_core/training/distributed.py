"""The process group of a training run: init from torchrun's environment, collectives, model wrapping.

A run started by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) joins the default process group
with NCCL on CUDA and gloo on CPU; a plain ``python`` run is a world of one with no process group.
The model is wrapped in DDP or sharded with FSDP2 (``fully_shard``); the full, unsharded state dicts
for checkpoints come from ``torch.distributed.checkpoint.state_dict`` in both cases.
"""

from __future__ import annotations

import datetime
import gc
import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from dspark_core.errors import DSparkError

__all__ = [
    "DistributedContext",
    "fsdp_available",
    "rank_seed",
]

T = TypeVar("T")


def rank_seed(seed: int, rank: int, stream: str) -> int:
    """A 63-bit seed for RNG ``stream`` of ``rank``: distinct per rank and stream, stable everywhere."""
    digest = hashlib.sha256(f"dspark/{seed}/{rank}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def fsdp_available() -> bool:
    """Whether this torch has FSDP2's ``fully_shard``."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class DistributedContext:
    """This process's place in the run: rank, world size, device, and the process group if any."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialized_here: bool = False

    @classmethod
    def from_environment(cls, device: str = "auto") -> DistributedContext:
        """Join the default process group when torchrun started several processes.

        ``device`` is ``auto``, ``cpu`` or ``cuda``; on CUDA each rank takes GPU ``LOCAL_RANK``.
        """
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda":
            if not torch.cuda.is_available():
                raise DSparkError("device 'cuda' was requested but CUDA is not available")
            torch.cuda.set_device(local_rank)
            torch_device = torch.device("cuda", local_rank)
        else:
            torch_device = torch.device("cpu")
        initialized_here = False
        if world_size > 1 and not dist.is_initialized():
            backend = "nccl" if torch_device.type == "cuda" else "gloo"
            # Evaluation runs on rank 0 while the others wait, so allow long waits.
            dist.init_process_group(
                backend,
                timeout=datetime.timedelta(minutes=60),
                device_id=torch_device if torch_device.type == "cuda" else None,
            )
            initialized_here = True
        if dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        return cls(rank, world_size, local_rank, torch_device, initialized_here)

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether collectives are needed."""
        return self.world_size > 1 and dist.is_initialized()

    def barrier(self) -> None:
        """Wait for every rank (no-op in a world of one)."""
        if self.distributed:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def all_reduce(self, values: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce ``values`` across ranks in place (``sum`` or ``max``) and return it."""
        if self.distributed:
            reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
            dist.all_reduce(values, op=reduce_op)
        return values

    def all_gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, work: Callable[[], T]) -> T:
        """Run ``work()`` on rank 0 and hand its result, or its error, to every rank."""
        if not self.distributed:
            return work()
        outcome: tuple[str, Any] = ("ok", None)
        failure: Exception | None = None
        if self.is_main:
            try:
                outcome = ("ok", work())
            except Exception as exc:
                failure = exc
                outcome = ("error", f"{type(exc).__name__}: {exc}")
        outcome = self.broadcast_object(outcome)
        if failure is not None:
            raise failure  # rank 0 reports its own error, the others that rank 0 failed
        if outcome[0] == "error":
            raise DSparkError(f"rank 0 failed: {outcome[1]}")
        result: T = outcome[1]
        return result

    def shutdown(self, *, wait_for_peers: bool = False) -> None:
        """Leave the process group if this context joined it.

        After a successful run pass ``wait_for_peers=True``: every rank then finishes its last
        collective before any tears the group down. Gloo aborts the process (SIGABRT at exit) when a
        group dies with work in flight or is only freed during interpreter shutdown. After a failure
        the peers may be gone, so no barrier is attempted.
        """
        if self.initialized_here and dist.is_initialized():
            if wait_for_peers:
                self.barrier()
            gc.collect()  # free wrapped models (DDP reducers, FSDP meshes) that still hold the group
            dist.destroy_process_group()
            self.initialized_here = False

    # -- models -------------------------------------------------------------------------------

    def wrap(self, model: nn.Module, parallelism: str) -> nn.Module:
        """The module to train: ``model`` itself alone, else DDP, or FSDP2 applied in place."""
        if not self.distributed:
            return model
        if parallelism == "fsdp":
            if not fsdp_available():
                raise DSparkError(
                    f"parallelism 'fsdp' needs FSDP2 (torch.distributed.fsdp.fully_shard), which torch "
                    f"{torch.__version__} lacks; use parallelism 'ddp'"
                )
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(self.device.type, (self.world_size,))
            # One shard group per layer overlaps communication with compute; the root takes the rest.
            for layer in getattr(model, "layers", []):
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    @staticmethod
    def no_sync(wrapped: nn.Module, skip: bool) -> Any:
        """A context skipping the gradient all-reduce of a DDP micro-batch that is not the last one."""
        no_sync = getattr(wrapped, "no_sync", None)
        if skip and callable(no_sync):
            return no_sync()
        return nullcontext()

    @staticmethod
    @contextmanager
    def fsdp_accumulating(wrapped: nn.Module, accumulating: bool) -> Iterator[None]:
        """With FSDP2, keep gradients unsharded between micro-batches (no reduce-scatter until the last)."""
        setter = getattr(wrapped, "set_requires_gradient_sync", None)
        if callable(setter):
            setter(not accumulating)
        yield


def full_state_dicts(
    wrapped: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The trainable weights and the optimizer state, unsharded, on CPU, keyed by parameter name.

    Collective under FSDP: every rank must call it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    model_state, optim_state = get_state_dict(wrapped, optimizer, options=options)
    return dict(model_state), dict(optim_state)


def load_full_state_dicts(
    wrapped: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, Any],
    optim_state: dict[str, Any],
) -> None:
    """Inverse of :func:`full_state_dicts`; frozen weights are left as they are."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    options = StateDictOptions(full_state_dict=True, strict=False)
    missing = set(_trainable_names(wrapped)) - set(model_state)
    if missing:
        raise DSparkError(f"the checkpoint lacks trainable weights {sorted(missing)}")
    set_state_dict(
        wrapped,
        optimizer,
        model_state_dict=model_state,
        optim_state_dict=optim_state,
        options=options,
    )


def _trainable_names(wrapped: nn.Module) -> list[str]:
    module = getattr(wrapped, "module", wrapped)
    return [name for name, p in module.named_parameters() if p.requires_grad]
