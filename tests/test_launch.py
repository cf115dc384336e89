"""Launcher detection (launch.py): every supported environment, precedence, and contradictory environments."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from electra_scale.infra.launch import LaunchError, cuda_index, detect, expand_hostlist, node_spawn_command


@pytest.mark.parametrize(
    ("hostlist", "expected"),
    [
        ("localhost", ["localhost"]),
        ("node[01-03,7],login", ["node01", "node02", "node03", "node7", "login"]),
        ("gpu-[8-10]", ["gpu-8", "gpu-9", "gpu-10"]),
        ("a[1-2]b[3-4]", ["a1b3", "a1b4", "a2b3", "a2b4"]),
        ("r1n[001-002].cluster", ["r1n001.cluster", "r1n002.cluster"]),
    ],
)
def test_expand_hostlist_like_scontrol(hostlist, expected):
    assert expand_hostlist(hostlist) == expected


def test_expand_hostlist_rejects_garbage():
    with pytest.raises(LaunchError, match="cannot expand"):
        expand_hostlist("node[a-b]")


def test_single_process():
    env = detect({})
    assert (env.rank, env.world_size, env.local_world_size, env.source) == (0, 1, 1, "single process")


def test_torchrun():
    env = detect(
        {
            "RANK": "3",
            "WORLD_SIZE": "4",
            "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "h0",
            "MASTER_PORT": "1234",
        }
    )
    assert (env.rank, env.world_size, env.local_rank, env.node_rank, env.master_addr, env.master_port) == (
        3,
        4,
        1,
        1,
        "h0",
        1234,
    )
    assert env.source == "torchrun/deepspeed"


SLURM = {
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "8",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_TASKS_PER_NODE": "4(x2)",
    "SLURM_JOB_ID": "123456",
    "SLURM_STEP_ID": "0",
}


def test_slurm():
    env = detect(SLURM)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.node_rank) == (5, 8, 1, 4, 1)
    assert env.master_addr == "gpu07" and env.master_port == 20000 + 123456 % 20000
    assert env.source == "SLURM" and env.num_nodes == 2


def test_torchrun_inside_slurm_wins():
    env = detect({**SLURM, "RANK": "0", "WORLD_SIZE": "1"})
    assert env.source == "torchrun/deepspeed" and env.world_size == 1


def test_slurm_batch_shell_is_not_a_rank():
    """The sbatch script itself (no srun step) is not one of the training tasks."""
    batch = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_ID"}
    assert detect(batch).source == "single process"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"SLURM_PROCID": "8"}, r"rank 8 must be in \[0, world size 8\)"),
        ({"SLURM_LOCALID": "4"}, r"local rank 4 must be in \[0, local world size 4\)"),
        ({"SLURM_NTASKS": "two"}, r"SLURM_NTASKS='two' is not an integer"),
        ({"SLURM_TASKS_PER_NODE": "16(x2)"}, r"16 processes per node exceed the world size 8"),
    ],
)
def test_slurm_contradictions(change, message):
    with pytest.raises(LaunchError, match=message):
        detect({**SLURM, **change})


def test_openmpi():
    env = detect(
        {
            "OMPI_COMM_WORLD_RANK": "2",
            "OMPI_COMM_WORLD_SIZE": "4",
            "OMPI_COMM_WORLD_LOCAL_RANK": "0",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
            "MASTER_ADDR": "head",
        }
    )
    assert (env.rank, env.world_size, env.local_rank, env.node_rank, env.master_addr) == (2, 4, 0, 1, "head")
    assert env.source == "OpenMPI"


def test_openmpi_without_master_says_how_to_fix():
    try:
        import mpi4py  # noqa: F401

        pytest.skip("mpi4py is installed: it finds the master itself")
    except ImportError:
        pass
    with pytest.raises(LaunchError, match=r"mpirun -x MASTER_ADDR"):
        detect({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"})


K8S = {
    "JOB_COMPLETION_INDEX": "1",
    "ELECTRA_NNODES": "3",
    "ELECTRA_K8S_SERVICE": "electra",
    "HOSTNAME": "electra-large-1",
}


def test_kubernetes_indexed_job():
    env = detect(K8S)
    assert (env.rank, env.world_size, env.node_rank, env.master_addr) == (1, 3, 1, "electra-large-0.electra")
    assert env.source == "Kubernetes Indexed Job"
    assert node_spawn_command(env, ["pretrain"]) is None


def test_kubernetes_pod_with_several_gpus_spawns_torchrun():
    env = detect({**K8S, "ELECTRA_NPROC_PER_NODE": "8"})
    assert (env.rank, env.world_size, env.local_world_size) == (8, 24, 8)
    cmd = node_spawn_command(env, ["pretrain", "--config", "configs/large.yaml"])
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert {"--nnodes=3", "--nproc_per_node=8", "--node_rank=1", "--master_addr=electra-large-0.electra"} <= set(cmd)
    assert cmd[-3:] == ["pretrain", "--config", "configs/large.yaml"]


def test_kubernetes_contradictions():
    with pytest.raises(LaunchError, match=r"ELECTRA_K8S_SERVICE is not set"):
        detect({k: v for k, v in K8S.items() if k != "ELECTRA_K8S_SERVICE"})
    with pytest.raises(LaunchError, match=r"JOB_COMPLETION_INDEX=3 must be in \[0, ELECTRA_NNODES=3\)"):
        detect({**K8S, "JOB_COMPLETION_INDEX": "3"})


def test_launch_error_is_one_line_and_exit_2(tmp_path):
    env = {**os.environ, **SLURM, "SLURM_PROCID": "9"}
    proc = subprocess.run(
        [sys.executable, "-m", "electra_scale", "pretrain", "--config", "configs/tiny.yaml", f"data.shards={tmp_path}"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "SLURM: rank 9 must be in [0, world size 8)" in errors[0]


def test_gpu_index_with_one_visible_gpu_per_task(monkeypatch):
    """A site that binds one GPU per task shows each process one device: it is index 0 whatever the local
    rank; with several visible, the local rank picks, and one past the end is refused in one line."""
    assert [cuda_index(r, 1) for r in range(4)] == [0, 0, 0, 0]
    assert [cuda_index(r, 8) for r in range(8)] == list(range(8))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    with pytest.raises(
        LaunchError, match=r"^local rank 2 has no GPU: this process sees 2 \(CUDA_VISIBLE_DEVICES=2,3\)"
    ):
        cuda_index(2, 2)
