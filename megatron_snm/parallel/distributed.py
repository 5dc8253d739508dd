"""Who am I, how many are we, and which backend: the same answer under every launcher.

- `deepspeed` (pdsh/local) and `torchrun` export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT.
- `mpirun` (Open MPI) exports OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK; where those are absent but
  the process runs under another MPI, mpi4py answers. MASTER_ADDR must then be given (or is the
  local host for a single node) and MASTER_PORT defaults to 29500.

`discover()` reads this without starting anything, so configuration checks can use the world size
before any process group exists; training/deepspeed_adapter.init_distributed(env) then starts
torch.distributed through DeepSpeed with NCCL on GPU and gloo on CPU. `port_in_use_message` words
a rendezvous port that another job holds as one line.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torch" (deepspeed/torchrun), "mpi" (OMPI_* or mpi4py), "single"

    @property
    def backend(self) -> str:
        return "nccl" if torch.cuda.is_available() else "gloo"


def _mpi4py_world():
    """(rank, size, local rank) from mpi4py when this process runs under an MPI launcher, else None."""
    if not any(k.startswith(("PMI_", "PMIX_", "MPI_LOCALRANKID", "SLURM_MPI")) for k in os.environ):
        return None  # importing mpi4py outside an MPI job would start a singleton MPI world
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    world = MPI.COMM_WORLD
    local = world.Split_type(MPI.COMM_TYPE_SHARED)
    return world.Get_rank(), world.Get_size(), local.Get_rank()


def _free_port(addr: str) -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def discover() -> DistEnv:
    env = os.environ
    addr, port = env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", "29500"))
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")), addr, port, "torch")
    if "OMPI_COMM_WORLD_RANK" in env:
        return DistEnv(int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"]),
                       int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")), addr, port, "mpi")
    mpi = _mpi4py_world()
    if mpi is not None:
        return DistEnv(*mpi, addr, port, "mpi")
    # One process and no launcher: the rendezvous is our own, so a busy default port must not stop it.
    return DistEnv(0, 1, 0, addr, port if "MASTER_PORT" in env else _free_port(addr), "single")


def port_in_use_message(err: BaseException) -> str | None:
    """One line for the rendezvous failing because its port is taken (another job on this node
    listens there), or None for any other error."""
    text = str(err)
    if not isinstance(err, RuntimeError) or not re.search(r"EADDRINUSE|address already in use", text, re.IGNORECASE):
        return None
    port = re.search(r"port: (\d+)", text)
    port = port.group(1) if port else os.environ.get("MASTER_PORT", "?")
    return (f"--master_port {port} is already in use on {socket.gethostname()} (another job listens there): give "
            "the launcher another --master_port (or MASTER_PORT), e.g. a free one such as "
            f"{_free_port('127.0.0.1')}")


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
