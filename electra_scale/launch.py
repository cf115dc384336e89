"""Who am I: rank, world size and master address from the launcher's environment, then distributed init.

Recognised now: torchrun and the deepspeed launcher (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
and a single process with no launcher. SLURM, Kubernetes Indexed Jobs and mpirun plug in here as further
detectors (the launch issue), so the rest of the code only ever sees a ``DistEnv``.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import torch

log = logging.getLogger("electra_scale")


class LaunchError(RuntimeError):
    """A contradictory or incomplete launcher environment."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # which launcher we detected

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(env: dict, key: str) -> int:
    try:
        return int(env[key])
    except ValueError as err:
        raise LaunchError(f"{key}={env[key]!r} is not an integer") from err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect(env: dict[str, str] | None = None) -> DistEnv:
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        local_world = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world
        if not 0 <= rank < world:
            raise LaunchError(f"RANK={rank} must be in [0, WORLD_SIZE={world})")
        if world > 1 and "MASTER_ADDR" not in env:
            raise LaunchError("WORLD_SIZE > 1 but MASTER_ADDR is not set; start with torchrun or set MASTER_ADDR/PORT")
        return DistEnv(
            rank,
            world,
            local_rank,
            local_world,
            env.get("MASTER_ADDR", "127.0.0.1"),
            int(env.get("MASTER_PORT", _free_port())),
            "torchrun/deepspeed",
        )
    return DistEnv(0, 1, 0, 1, "127.0.0.1", _free_port(), "single process")


def init_distributed(dist_env: DistEnv) -> torch.device:
    """Export the env torch.distributed reads, initialise DeepSpeed's process group, pick the device."""
    import deepspeed

    os.environ.update(
        RANK=str(dist_env.rank),
        WORLD_SIZE=str(dist_env.world_size),
        LOCAL_RANK=str(dist_env.local_rank),
        MASTER_ADDR=dist_env.master_addr,
        MASTER_PORT=str(dist_env.master_port),
    )
    if torch.cuda.is_available():
        torch.cuda.set_device(dist_env.local_rank)
        device, backend = torch.device("cuda", dist_env.local_rank), "nccl"
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # Share the cores between the ranks of this machine instead of oversubscribing them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist_env.local_world_size))
        device, backend = torch.device("cpu"), "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    if dist_env.is_main:
        log.info(
            "launch: %s, world size %d, backend %s, master %s:%d",
            dist_env.source,
            dist_env.world_size,
            backend,
            dist_env.master_addr,
            dist_env.master_port,
        )
    return device
