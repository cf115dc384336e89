"""Who am I: rank, world size and master address from the launcher's environment, then distributed init.

Every way of starting a run ends in the same ``electra-scale pretrain``; this module is the only place that
knows how each launcher describes the job. Detection order (the first that matches wins, and the start-up log
names it):

1. torchrun / the deepspeed launcher: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``.
   Checked first because it is explicit, and because torchrun may itself run inside a SLURM or Kubernetes job.
2. SLURM (``srun``): ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, ``SLURM_NODEID``; the master is the
   first host of ``SLURM_JOB_NODELIST``, expanded here as ``scontrol show hostnames`` does (compute nodes need
   not have scontrol); the port is ``MASTER_PORT`` or derived from the job id, so every task agrees on it.
3. OpenMPI (``mpirun``): ``OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK/LOCAL_SIZE``; the master is ``MASTER_ADDR``
   (``mpirun -x MASTER_ADDR=...``) or, with mpi4py installed, rank 0's hostname broadcast over MPI.
4. A Kubernetes Indexed Job: ``JOB_COMPLETION_INDEX`` is the pod's index, ``ELECTRA_NNODES`` the number of pods,
   ``ELECTRA_K8S_SERVICE`` the headless Service (the pod's ``subdomain``); pod ``i`` is reachable as
   ``<job>-<i>.<service>``, so the master is ``<job>-0.<service>`` (or ``MASTER_ADDR``, if set). With
   ``ELECTRA_NPROC_PER_NODE`` > 1 the pod
   starts one process per GPU itself, through torchrun (see ``node_spawn_command``).
5. Nothing: one process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

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
    node_rank: int
    master_addr: str
    master_port: int
    source: str  # which launcher we detected

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


# ------------------------------------------------------------------------------------------------ helpers
def _int(env: dict, key: str, default: int | None = None) -> int:
    if key not in env:
        if default is None:
            raise LaunchError(f"{key} is not set")
        return default
    try:
        return int(env[key])
    except ValueError as err:
        raise LaunchError(f"{key}={env[key]!r} is not an integer") from err


def free_port() -> int:
    """A TCP port free on this machine now (for a master that nobody else picks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _checked(env: DistEnv) -> DistEnv:
    if env.world_size < 1:
        raise LaunchError(f"{env.source}: world size {env.world_size} must be >= 1")
    if not 0 <= env.rank < env.world_size:
        raise LaunchError(f"{env.source}: rank {env.rank} must be in [0, world size {env.world_size})")
    if not 0 <= env.local_rank < env.local_world_size:
        raise LaunchError(
            f"{env.source}: local rank {env.local_rank} must be in [0, local world size {env.local_world_size})"
        )
    if env.local_world_size > env.world_size:
        raise LaunchError(
            f"{env.source}: {env.local_world_size} processes per node exceed the world size {env.world_size}"
        )
    if not 0 < env.master_port < 65536:
        raise LaunchError(f"{env.source}: master port {env.master_port} is not a TCP port")
    return env


_BRACKET = re.compile(r"^(?P<prefix>[^\[]*)\[(?P<ranges>[^\]]+)\](?P<suffix>.*)$")


def expand_hostlist(hostlist: str) -> list[str]:
    """``node[01-03,7],login`` -> node01 node02 node03 node7 login, as ``scontrol show hostnames`` prints."""
    hosts: list[str] = []
    # Split on commas outside brackets.
    items, depth, current = [], 0, ""
    for ch in hostlist.strip():
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    items.append(current)
    for item in filter(None, items):
        m = _BRACKET.match(item)
        if not m:
            hosts.append(item)
            continue
        tails = expand_hostlist(m["suffix"]) if "[" in m["suffix"] else [m["suffix"]]
        for part in m["ranges"].split(","):
            lo, _, hi = part.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                raise LaunchError(f"cannot expand SLURM host list {hostlist!r} (range {part!r})")
            width = len(lo)
            for n in range(int(lo), int(hi or lo) + 1):
                hosts.extend(f"{m['prefix']}{n:0{width}d}{tail}" for tail in tails)
    return hosts


# ------------------------------------------------------------------------------------------------ launchers
def _from_torchrun(env: dict) -> DistEnv:
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    if world > 1 and "MASTER_ADDR" not in env:
        raise LaunchError("WORLD_SIZE > 1 but MASTER_ADDR is not set; start with torchrun or set MASTER_ADDR/PORT")
    local_world = _int(env, "LOCAL_WORLD_SIZE", world)
    return DistEnv(
        rank=rank,
        world_size=world,
        local_rank=_int(env, "LOCAL_RANK", rank % local_world),
        local_world_size=local_world,
        node_rank=_int(env, "GROUP_RANK", rank // local_world),
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=_int(env, "MASTER_PORT", 29500),
        source="torchrun/deepspeed",
    )


def _slurm_tasks_per_node(value: str) -> int:
    """``SLURM_TASKS_PER_NODE`` looks like ``8(x4)`` or ``8(x2),4``: the first count is ours on a uniform job."""
    m = re.match(r"^(\d+)", value)
    if not m:
        raise LaunchError(f"SLURM_TASKS_PER_NODE={value!r} is not understood")
    return int(m.group(1))


def _from_slurm(env: dict) -> DistEnv:
    # Inside an srun step, the step's task count is the world (the job may hold more tasks than the step).
    world = _int(env, "SLURM_STEP_NUM_TASKS") if "SLURM_STEP_NUM_TASKS" in env else _int(env, "SLURM_NTASKS")
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise LaunchError("SLURM_PROCID is set but SLURM_JOB_NODELIST is not; run the training under srun")
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or str(world)
    job_id = _int(env, "SLURM_JOB_ID", 0)
    return DistEnv(
        rank=_int(env, "SLURM_PROCID"),
        world_size=world,
        local_rank=_int(env, "SLURM_LOCALID", 0),
        local_world_size=_slurm_tasks_per_node(per_node),
        node_rank=_int(env, "SLURM_NODEID", 0),
        master_addr=env.get("MASTER_ADDR") or expand_hostlist(nodelist)[0],
        # Every task computes the same port from the job id; two jobs sharing a node get different ports.
        master_port=_int(env, "MASTER_PORT", 20000 + job_id % 20000),
        source="SLURM",
    )


def _from_openmpi(env: dict) -> DistEnv:
    rank = _int(env, "OMPI_COMM_WORLD_RANK")
    master = env.get("MASTER_ADDR")
    if not master:
        try:
            from mpi4py import MPI
        except ImportError as err:
            raise LaunchError(
                "started by mpirun but MASTER_ADDR is not set: pass `mpirun -x MASTER_ADDR=<rank 0 host>` or "
                "install the mpi extra (pip install 'electra-scale[mpi]') to find it over MPI"
            ) from err
        master = MPI.COMM_WORLD.bcast(socket.gethostname() if rank == 0 else None, root=0)
    local_world = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", 1)
    return DistEnv(
        rank=rank,
        world_size=_int(env, "OMPI_COMM_WORLD_SIZE"),
        local_rank=_int(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0),
        local_world_size=local_world,
        node_rank=_int(env, "OMPI_COMM_WORLD_NODE_RANK", rank // local_world),
        master_addr=master,
        master_port=_int(env, "MASTER_PORT", 29500),
        source="OpenMPI",
    )


def _from_kubernetes(env: dict) -> DistEnv:
    index = _int(env, "JOB_COMPLETION_INDEX")
    nodes = _int(env, "ELECTRA_NNODES", 1)
    per_pod = _int(env, "ELECTRA_NPROC_PER_NODE", 1)
    service = env.get("ELECTRA_K8S_SERVICE")
    if not service and nodes > 1:
        raise LaunchError(
            f"Kubernetes Indexed Job (JOB_COMPLETION_INDEX={index}) with {nodes} pods but ELECTRA_K8S_SERVICE is "
            "not set; set it to the headless Service's name (the pod's spec.subdomain)"
        )
    if not 0 <= index < nodes:
        raise LaunchError(f"JOB_COMPLETION_INDEX={index} must be in [0, ELECTRA_NNODES={nodes})")
    hostname = env.get("HOSTNAME", socket.gethostname())
    job = env.get("ELECTRA_K8S_JOB") or re.sub(rf"-{index}$", "", hostname)
    return DistEnv(
        rank=index * per_pod,
        world_size=nodes * per_pod,
        local_rank=0,
        local_world_size=per_pod,
        node_rank=index,
        master_addr=env.get("MASTER_ADDR") or (f"{job}-0.{service}" if service else "127.0.0.1"),
        master_port=_int(env, "MASTER_PORT", 29500),
        source="Kubernetes Indexed Job",
    )


def detect(env: dict[str, str] | None = None) -> DistEnv:
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        return _checked(_from_torchrun(env))
    if "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
        return _checked(_from_slurm(env))
    if "OMPI_COMM_WORLD_RANK" in env:
        return _checked(_from_openmpi(env))
    if "JOB_COMPLETION_INDEX" in env:
        return _checked(_from_kubernetes(env))
    return DistEnv(0, 1, 0, 1, 0, "127.0.0.1", free_port(), "single process")


def cli_command(argv: list[str], nproc: int = 1, **node) -> list[str]:
    """The one command line that starts ``electra-scale ARGV``: this Python on the package, under torchrun for
    more than one process per node. ``node``: nnodes, node_rank, master_addr, master_port (a free local port
    by default). compare, the demo and a Kubernetes pod's spawn all start runs through it."""
    if nproc == 1 and not node:
        return [sys.executable, "-m", "electra_scale", *argv]
    node.setdefault("master_port", free_port())
    flags = [f"--{key}={value}" for key, value in node.items()]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        *flags,
        "-m",
        "electra_scale",
        *argv,
    ]


def node_spawn_command(dist_env: DistEnv, argv: list[str]) -> list[str] | None:
    """A Kubernetes pod (one per node) that should run several processes re-executes itself under torchrun
    with the node's coordinates; the children then see torchrun's variables. None when no spawn is needed."""
    if dist_env.source != "Kubernetes Indexed Job" or dist_env.local_world_size == 1:
        return None
    return cli_command(
        argv,
        dist_env.local_world_size,
        nnodes=dist_env.num_nodes,
        node_rank=dist_env.node_rank,
        master_addr=dist_env.master_addr,
        master_port=dist_env.master_port,
    )


# A rank that stops on a signal after checkpointing touches this file (path from the supervising pod process);
# torchrun itself reports any non-zero child as exit 1, which would hide "preempted, try again" (75).
PREEMPTED_FLAG_ENV = "ELECTRA_PREEMPTED_FLAG"


def run_node(cmd: list[str], preempted_code: int) -> int:
    """Run a pod's torchrun as a child: forward SIGTERM/SIGUSR1 straight to the ranks (torchrun would tear
    them down instead of letting them checkpoint) and exit with ``preempted_code`` if they stopped on one."""
    import signal
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="electra-node-") as tmp:
        flag = Path(tmp, "preempted")
        proc = subprocess.Popen(cmd, env={**os.environ, PREEMPTED_FLAG_ENV: str(flag)})

        def forward(signum, _frame):
            for pid in _children(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, forward)
        code = proc.wait()
        return preempted_code if code != 0 and flag.exists() else code


def _children(pid: int) -> list[int]:
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        return [int(c) for t in tasks for c in (t / "children").read_text().split()]
    except OSError:
        return []


def mark_preempted() -> None:
    """Called by a rank that checkpointed and stops on a signal (see run_node)."""
    if os.environ.get(PREEMPTED_FLAG_ENV):
        Path(os.environ[PREEMPTED_FLAG_ENV]).touch()


def cuda_index(local_rank: int, visible: int) -> int:
    """This process's GPU among those it sees. One visible GPU is its own, whatever the local rank: sites that
    bind one GPU per task (``srun --gpus-per-task=1``, ``--gpu-bind=single``, Kubernetes' device plugin) set
    CUDA_VISIBLE_DEVICES to it. Otherwise the local rank picks one, and must exist."""
    if visible == 1:
        return 0
    if not 0 <= local_rank < visible:
        raise LaunchError(
            f"local rank {local_rank} has no GPU: this process sees {visible} "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); start at most {visible} "
            "processes per node, or give each process its own GPU"
        )
    return local_rank


def init_distributed(dist_env: DistEnv, timeout: timedelta | None = None) -> torch.device:
    """Export the env torch.distributed reads, initialise DeepSpeed's process group, pick the device.
    ``timeout``: how long a collective may wait before it fails (engine/watchdog.py sets it from run.timeouts;
    gloo honours it, NCCL with its async error handling)."""
    import deepspeed

    os.environ.update(
        RANK=str(dist_env.rank),
        WORLD_SIZE=str(dist_env.world_size),
        LOCAL_RANK=str(dist_env.local_rank),
        LOCAL_WORLD_SIZE=str(dist_env.local_world_size),
        MASTER_ADDR=dist_env.master_addr,
        MASTER_PORT=str(dist_env.master_port),
    )
    if torch.cuda.is_available():
        index = cuda_index(dist_env.local_rank, torch.cuda.device_count())
        torch.cuda.set_device(index)
        device, backend = torch.device("cuda", index), "nccl"
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # Share the cores between the ranks of this machine instead of oversubscribing them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist_env.local_world_size))
        device, backend = torch.device("cpu"), "gloo"
    deadline = {"timeout": timeout} if timeout is not None else {}  # else DeepSpeed's default
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, **deadline)
    if dist_env.is_main:
        log.info(
            "launch: %s, world size %d (%d node(s) x %d), backend %s, master %s:%d",
            dist_env.source,
            dist_env.world_size,
            dist_env.num_nodes,
            dist_env.local_world_size,
            backend,
            dist_env.master_addr,
            dist_env.master_port,
        )
    return device
