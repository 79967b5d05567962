"""torchrun's data-parallel processes, in one place: who this process is (rank, world size, local rank), which
device it works on, the process group's set-up and teardown, and the collectives that training and data
extraction use. Both follow the same three rules:

- The backend follows the device the work runs on: NCCL for CUDA, gloo otherwise. NCCL reduces only CUDA
  tensors, so a `--device cpu` run on a machine that happens to have a GPU must get gloo.
- Under torchrun each process takes the GPU of its LOCAL_RANK (`--device cuda` means cuda:LOCAL_RANK) and makes it
  the current device before the group exists, so NCCL's communicator and every un-indexed CUDA allocation land
  on that GPU, not all on GPU 0.
- A process group that someone else initialised (accelerate, a test, the caller's own script) is used as it is
  and left alone; only a group initialised here is destroyed here.
"""

from __future__ import annotations

import gc

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hass_deploy.errors import HassDeployError


def backend_for(device: torch.device) -> str:
    """The process-group backend for work on `device`: NCCL only for CUDA."""
    return "nccl" if device.type == "cuda" else "gloo"


def process_device(device: str, local_rank: int) -> torch.device:
    """The device one process works on: "cuda" is the GPU of its local rank (one GPU per process on a node);
    an explicit "cuda:N" or "cpu" is taken as given."""
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise HassDeployError(f"--device must be cpu, cuda or cuda:N, got {device!r}") from None
    if resolved.type == "cuda" and resolved.index is None:
        return torch.device("cuda", local_rank)
    return resolved


def _environment_int(environ: Mapping[str, str], name: str, default: int) -> int:
    value = environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise HassDeployError(f"the environment variable {name}={value!r} is not an integer "
                              "(torchrun sets it; unset it to run a single process)") from None


@dataclass(frozen=True)
class Ranks:
    """This process's place among torchrun's data-parallel processes (or a single process: world 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # of the process group; None when there is none
    owns_group: bool = False  # initialised here, so destroyed by `close()`

    @classmethod
    def from_environment(cls, device: str = "cpu", environ: Mapping[str, str] | None = None) -> "Ranks":
        """Read WORLD_SIZE/RANK/LOCAL_RANK (torchrun's), pick and make current this process's device, and join
        the process group: an existing one as it is, else one initialised here with `backend_for(device)`."""
        environ = os.environ if environ is None else environ
        existing = dist.is_available() and dist.is_initialized()
        if existing:
            rank, world = dist.get_rank(), dist.get_world_size()
        else:
            rank, world = _environment_int(environ, "RANK", 0), _environment_int(environ, "WORLD_SIZE", 1)
        # Without LOCAL_RANK (a launcher other than torchrun, on one node) the global rank is the local one.
        local_rank = _environment_int(environ, "LOCAL_RANK", rank)
        resolved = process_device(device, local_rank)
        if resolved.type == "cuda":
            _use_gpu(resolved, device)
        if existing:
            return cls(rank, world, local_rank, resolved, dist.get_backend(), owns_group=False)
        if world <= 1:
            return cls(0, 1, local_rank, resolved)
        backend = backend_for(resolved)
        dist.init_process_group(backend)
        return cls(rank, world, local_rank, resolved, backend, owns_group=True)

    def __enter__(self) -> "Ranks":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Destroy the process group if it was initialised here (a caller's group outlives this)."""
        if self.owns_group and dist.is_initialized():
            # A DDP wrapper lives in reference cycles (its hooks), so it outlives the training call until the cyclic
            # collector runs; its reducer must go before the group it holds, or gloo can abort the rank at exit
            # ("terminate called without an active exception": the caller's-group test in test_trainer.py aborted so).
            gc.collect()
            dist.destroy_process_group()

    @property
    def collective_device(self) -> torch.device:
        """Where a tensor must be for a collective: NCCL reduces CUDA tensors only, gloo is used on the CPU."""
        if self.backend != "nccl":
            return torch.device("cpu")
        return self.device if self.device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of `value` over the ranks, on `value`'s device (a copy; `value` itself is left as it is)."""
        if self.world == 1:
            return value.clone()
        total = value.to(self.collective_device, copy=True)
        dist.all_reduce(total)
        return total.to(value.device)

    def all_ok(self, ok: bool) -> bool:
        """True when every rank reports ok (a collective: also a barrier, and no rank waits on a failed one)."""
        if self.world == 1:
            return ok
        flag = torch.tensor([int(ok)], device=self.collective_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())


def _use_gpu(device: torch.device, asked: str) -> None:
    if not torch.cuda.is_available():
        raise HassDeployError(f"--device {asked}: this torch sees no CUDA device")
    if device.index >= torch.cuda.device_count():
        raise HassDeployError(f"--device {asked} means {device} here, but this machine has "
                              f"{torch.cuda.device_count()} GPU(s)")
    torch.cuda.set_device(device)
