"""Deployment files: Kubernetes manifests (kustomize + schema validation + what schemas miss), the Dockerfile
(hadolint), and the SLURM scripts (syntax, one shared body, the directives that make preemption work)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from electra_scale.config import load_config
from electra_scale.launch import detect, node_spawn_command

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
K8S_VERSIONS = ["1.30.0", "1.37.0"]
OVERLAYS = {"small": ("configs/small.yaml", 1, 4), "large": ("configs/large.yaml", 8, 8)}


def tool(name: str) -> str:
    path = shutil.which(name) or str(BIN / name)
    assert Path(path).exists(), f"{name} is missing: `make test` installs it (test extras)"
    return path


def kustomize(overlay: str) -> list[dict]:
    out = subprocess.run(
        [tool("kubectl"), "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
    )
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def validate(path: Path, version: str) -> None:
    proc = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "-k", version, str(path)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_overlays_build_and_validate(overlay, version, tmp_path):
    built = tmp_path / f"{overlay}.yaml"
    built.write_text(yaml.safe_dump_all(kustomize(overlay)))
    validate(built, version)


@pytest.mark.parametrize("name", ["service.yaml", "job.yaml"])
def test_base_manifests_validate(name):
    for version in K8S_VERSIONS:
        validate(ROOT / "k8s" / "base" / name, version)


def parts(overlay: str) -> tuple[dict, dict, dict]:
    docs = {doc["kind"]: doc for doc in kustomize(overlay)}
    return docs["Job"], docs["Service"], docs["ConfigMap"]


def env_of(container: dict) -> dict:
    return {e["name"]: e for e in container["env"]}


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_job_semantics_schemas_do_not_check(overlay):
    config, nodes, gpus = OVERLAYS[overlay]
    job, service, configmap = parts(overlay)
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = env_of(container)
    # Enums and cross-field agreements (kubernetes-validate passes `completionMode: Indexd`).
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == nodes == int(env["ELECTRA_NNODES"]["value"])
    assert int(env["ELECTRA_NPROC_PER_NODE"]["value"]) == gpus
    assert container["resources"]["limits"]["nvidia.com/gpu"] == str(gpus)
    assert service["spec"]["clusterIP"] == "None"
    assert pod["subdomain"] == service["metadata"]["name"] == env["ELECTRA_K8S_SERVICE"]["value"]
    assert set(service["spec"]["selector"].items()) <= set(job["spec"]["template"]["metadata"]["labels"].items())
    assert pod["restartPolicy"] == "Never" and spec["backoffLimitPerIndex"] >= 1
    rules = spec["podFailurePolicy"]["rules"]
    fail = [r for r in rules if r["action"] == "FailJob"]
    ignore = [r for r in rules if r["action"] == "Ignore"]
    assert fail[0]["onExitCodes"]["values"] == [2]  # config errors fail fast
    assert any(r.get("onExitCodes", {}).get("values") == [75] for r in ignore)  # checkpointed after SIGTERM
    assert any(c["type"] == "DisruptionTarget" for r in ignore for c in r.get("onPodConditions", []))
    # Non-root, /dev/shm in memory, credentials only by reference.
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    for name, entry in env.items():
        if re.search(r"KEY|SECRET|TOKEN|PASSWORD", name):
            assert "value" not in entry and "secretKeyRef" in entry["valueFrom"], name
    # The container runs our one entry point with the preset plus the ConfigMap's site settings.
    args = container["args"]
    assert args[0] == "pretrain" and args[args.index("--config") + 1] == config
    site = yaml.safe_load(configmap["data"]["site.yaml"])
    cfg = load_config(
        [config], [f"data.shards={site['data']['shards']}", f"run.output_dir={site['run']['output_dir']}"]
    )
    assert cfg.run.output_dir.startswith("s3://")


def test_a_pod_finds_its_place_from_the_manifest_env():
    """The env a pod of the large Job gets (manifest values + what Kubernetes adds) -> launch.py's answer."""
    job, service, _ = parts("large")
    env = {k: e["value"] for k, e in env_of(job["spec"]["template"]["spec"]["containers"][0]).items() if "value" in e}
    name = job["metadata"]["name"]
    env.update(JOB_COMPLETION_INDEX="3", HOSTNAME=f"{name}-3")  # set by the Job controller
    dist = detect(env)
    assert (dist.node_rank, dist.world_size, dist.local_world_size) == (3, 64, 8)
    assert dist.master_addr == f"{name}-0.{service['metadata']['name']}"
    cmd = node_spawn_command(dist, ["pretrain", "--config", "configs/large.yaml"])
    assert "--nproc_per_node=8" in cmd and "--node_rank=3" in cmd


def test_dockerfile_lints_clean_and_runs_as_non_root():
    text = (ROOT / "Dockerfile").read_text()
    proc = subprocess.run([tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^ARG BASE_IMAGE=\S+", text, re.M)
    user = re.findall(r"^USER (\S+)", text, re.M)[-1]
    assert user.split(":")[0] not in ("root", "0")
    assert 'ENTRYPOINT ["electra-scale"]' in text
    assert not re.search(r"AWS_SECRET_ACCESS_KEY=|AWS_ACCESS_KEY_ID=", text)


SLURM_SCRIPTS = ["pretrain_large.sh", "pretrain_small.sh", "pretrain_tiny_cpu.sh"]


@pytest.mark.parametrize("script", [*SLURM_SCRIPTS, "common.sh"])
def test_slurm_scripts_parse(script):
    subprocess.run(["bash", "-n", str(ROOT / "slurm" / script)], check=True)


@pytest.mark.parametrize("script", SLURM_SCRIPTS)
def test_slurm_scripts_share_one_body(script):
    text = (ROOT / "slurm" / script).read_text()
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.M))
    assert re.match(r"USR1@\d+$", directives["signal"]) and "requeue" in directives
    assert "ntasks-per-node" in directives and "time" in directives
    assert re.search(r"^CONFIG=configs/\w+\.yaml$", text, re.M)
    assert "slurm/common.sh" in text and text.rstrip().endswith('run_pretrain "$@"')
    assert "srun" not in text  # launch logic lives in common.sh only
    config = re.search(r"^CONFIG=(\S+)$", text, re.M).group(1)
    load_config(config)


def test_large_script_has_one_task_per_gpu():
    text = (ROOT / "slurm" / "pretrain_large.sh").read_text()
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.M))
    assert directives["ntasks-per-node"] == directives["gpus-per-node"]
    assert "exclusive" in directives
    cfg = load_config("configs/large.yaml")
    tasks = int(directives["nodes"]) * int(directives["ntasks-per-node"])
    assert cfg.train.global_batch_size % (cfg.train.micro_batch_size * tasks) == 0
