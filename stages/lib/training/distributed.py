"""Data-parallel training under `torchrun`: one process per device, the same code as one process.

`torchrun --nproc_per_node=N -m stages.finetune ...` sets RANK, WORLD_SIZE and LOCAL_RANK; `setup()`
then joins the process group (NCCL on CUDA, gloo on CPU) and picks this process's device. Run
without torchrun, `setup()` returns a single-process context and every helper here does nothing.
Only rank 0 (`is_main`) writes outputs, checkpoints and MLflow records.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job and its device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def wrap(self, model: nn.Module) -> nn.Module:
        """DistributedDataParallel around model (averages gradients), or model itself.

        Wrap again whenever the set of trainable parameters changes: DDP registers its
        gradient hooks for the parameters that require grad when it is built.
        """
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of values over all processes (every process gets the result)."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()


def setup() -> Distributed:
    """Join the torchrun job when there is one; pick the device (cuda:LOCAL_RANK, else CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size == 1:
        return Distributed(device=device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend)
    dist = Distributed(torch.distributed.get_rank(), world_size, device)
    if not dist.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # one process reports
    log.info("data-parallel: %d processes, backend %s", world_size, backend)
    return dist


def shutdown(dist: Distributed) -> None:
    if dist.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
