"""Deployment files: Kubernetes manifests (kustomize + schema validation + what schemas miss), the Dockerfile
(hadolint), and the SLURM scripts (syntax, one shared body, the directives that make preemption work)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from electra_scale.config import load_config
from electra_scale.infra.launch import detect, node_spawn_command

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


def pytorchjob() -> tuple[dict, dict]:
    docs = {doc["kind"]: doc for doc in kustomize_dir(ROOT / "k8s" / "kubeflow")}
    return docs["PyTorchJob"], docs["ConfigMap"]


def kustomize_dir(path: Path) -> list[dict]:
    out = subprocess.run([tool("kubectl"), "kustomize", str(path)], capture_output=True, text=True, check=True)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_pytorchjob_pod_and_configmap_validate(version, tmp_path):
    """The PyTorchJob CRD's schema is not in kubernetes-validate; its pod templates and ConfigMap are core
    objects, so they are validated as a PodTemplate and a ConfigMap."""
    job, configmap = pytorchjob()
    docs = [configmap]
    for kind, replica in job["spec"]["pytorchReplicaSpecs"].items():
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": kind.lower()},
                "template": replica["template"],
            }
        )
    path = tmp_path / "pytorchjob-parts.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    validate(path, version)


def test_pytorchjob_fields_the_training_operator_needs():
    job, configmap = pytorchjob()
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    spec = job["spec"]
    replicas = spec["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"} and replicas["Master"]["replicas"] == 1
    nodes, gpus = replicas["Master"]["replicas"] + replicas["Worker"]["replicas"], int(spec["nprocPerNode"])
    assert (nodes, gpus) == OVERLAYS["large"][1:]
    for replica in replicas.values():
        assert replica["restartPolicy"] in ("OnFailure", "ExitCode")
        pod = replica["template"]["spec"]
        container = pod["containers"][0]
        # The operator finds the master port by these names; torchrun gets the master from its env.
        assert container["name"] == "pytorch"
        assert any(p["name"] == "pytorchjob-port" for p in container["ports"])
        assert container["command"] == ["torchrun"] and "--master_addr=$(MASTER_ADDR)" in container["args"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == spec["nprocPerNode"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        assert next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]["medium"] == "Memory"
        assert (
            next(v for v in pod["volumes"] if v["name"] == "site-config")["configMap"]["name"]
            == (configmap["metadata"]["name"])
        )
        for entry in container["env"]:
            if re.search(r"KEY|SECRET|TOKEN|PASSWORD", entry["name"]):
                assert "value" not in entry and "secretKeyRef" in entry["valueFrom"], entry["name"]
    cfg = load_config("configs/large.yaml")
    assert cfg.train.global_batch_size % (cfg.train.micro_batch_size * nodes * gpus) == 0


def test_pytorchjob_pod_starts_torchrun_with_the_operators_env(monkeypatch):
    """What the training operator adds to pod 3 (a Worker), then the container's command as the kubelet expands
    it, parsed by torchrun's own parser: 8 nodes, 8 processes here, node rank 3, the Master's Service."""
    from torch.distributed.run import config_from_args, get_args_parser

    job, _ = pytorchjob()
    container = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "pytorchjob-port")
    operator_env = {
        "MASTER_ADDR": f"{job['metadata']['name']}-master-0",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": "64",
        "RANK": "3",
        "PET_NPROC_PER_NODE": job["spec"]["nprocPerNode"],
        "PET_NODE_RANK": "3",
        "PET_NNODES": "8",
    }
    for key, value in operator_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = [re.sub(r"\$\((\w+)\)", lambda m: operator_env[m.group(1)], a) for a in container["args"]]
    config, _, cmd_args = config_from_args(get_args_parser().parse_args(args))
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (8, 8, 8)
    assert config.rdzv_configs["rank"] == 3 and config.rdzv_endpoint == f"{operator_env['MASTER_ADDR']}:{port}"
    assert cmd_args[cmd_args.index("-m") :][:3] == ["-m", "electra_scale", "pretrain"]
    assert cmd_args[cmd_args.index("--config") + 1] == "configs/large.yaml"


def test_dockerfile_lints_clean_and_runs_as_non_root():
    text = (ROOT / "Dockerfile").read_text()
    proc = subprocess.run([tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^ARG BASE_IMAGE=\S+", text, re.M)
    user = re.findall(r"^USER (\S+)", text, re.M)[-1]
    assert user.split(":")[0] not in ("root", "0")
    assert 'ENTRYPOINT ["electra-scale"]' in text
    assert not re.search(r"AWS_SECRET_ACCESS_KEY=|AWS_ACCESS_KEY_ID=", text)


def test_container_test_script_parses_and_hashes_the_images_inputs():
    """scripts/container_test.sh (the image built with podman and run; too slow for every CI run) is re-run
    by .ci/run when --check says its inputs changed: every file the image is built from must be among them."""
    script = ROOT / "scripts" / "container_test.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    hashed = set(re.search(r"find (.+?) -type f", script.read_text()).group(1).split())
    copied = {
        src.rstrip("/")
        for line in re.findall(r"^COPY (.+)$", (ROOT / "Dockerfile").read_text(), re.M)
        for src in line.split()[:-1]
    }
    # The package's code and configs are tested by the suite on every run; what decides how the image is
    # built and what gets installed into it must trigger a rebuild.
    assert copied - hashed == {"README.md", "electra_scale", "configs", "ds_configs"}
    assert {"Dockerfile", ".dockerignore", "scripts/container_test.sh"} <= hashed
    assert "container_test.sh --check" in (ROOT / ".ci" / "run").read_text()


SLURM_SCRIPTS = ["pretrain_large.sh", "pretrain_small.sh", "pretrain_tiny_cpu.sh"]
# The prepare flow's scripts and the last line of each: the call into common.sh, which only adds arguments.
PREPARE_SCRIPTS = {"prepare.sh": 'run_prepare "$@"', "prepare_finalize.sh": 'run_prepare --finalize "$@"'}


@pytest.mark.parametrize("script", [*SLURM_SCRIPTS, *PREPARE_SCRIPTS, "common.sh"])
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


@pytest.mark.parametrize("script", sorted(PREPARE_SCRIPTS))
def test_slurm_prepare_scripts_share_one_body(script):
    text = (ROOT / "slurm" / script).read_text()
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.M))
    # One process per task (its workers are its own processes), on the CPUs it asks for.
    assert directives["ntasks"] == "1" and int(directives["cpus-per-task"]) >= 1 and "time" in directives
    assert "array" not in directives  # the array's size is the user's --array, to match --num-tasks
    assert "slurm/common.sh" in text and text.rstrip().endswith(PREPARE_SCRIPTS[script])
    assert "srun" not in text  # launch logic lives in common.sh only


def test_large_script_has_one_task_per_gpu():
    text = (ROOT / "slurm" / "pretrain_large.sh").read_text()
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.M))
    assert directives["ntasks-per-node"] == directives["gpus-per-node"]
    assert "exclusive" in directives
    cfg = load_config("configs/large.yaml")
    tasks = int(directives["nodes"]) * int(directives["ntasks-per-node"])
    assert cfg.train.global_batch_size % (cfg.train.micro_batch_size * tasks) == 0


# The prepare flow on Kubernetes (k8s/prepare): the vocabulary step, the Indexed Job of tasks, the finalize step,
# and the Job that re-runs one failed index.
PREPARE_STEPS = ["tokenizer", "tasks", "finalize", "rerun"]


def prepare_job(step: str) -> dict:
    (job,) = kustomize_dir(ROOT / "k8s" / "prepare" / step)
    return job


@pytest.mark.parametrize("step", PREPARE_STEPS)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_prepare_manifests_build_and_validate(step, version, tmp_path):
    built = tmp_path / f"prepare-{step}.yaml"
    built.write_text(yaml.safe_dump(prepare_job(step)))
    validate(built, version)


def test_prepare_job_semantics_schemas_do_not_check():
    """What kubernetes-validate passes unchecked (enums, agreements between fields), and the three steps' commands:
    the tasks' own arguments, plus --finalize for the finalize step, and a trained vocabulary for the first."""
    jobs = {step: prepare_job(step) for step in PREPARE_STEPS}
    tasks = jobs["tasks"]
    spec, pod = tasks["spec"], tasks["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = env_of(container)
    n = int(env["ELECTRA_PREPARE_NUM_TASKS"]["value"])
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == n > 1
    # A failed index is retried alone, and a bad input (exit 2) fails its own index at once, not the Job.
    assert spec["backoffLimitPerIndex"] >= 1 and "maxFailedIndexes" not in spec
    rules = spec["podFailurePolicy"]["rules"]
    assert [r["onExitCodes"]["values"] for r in rules if r["action"] == "FailIndex"] == [[2]]
    assert all(r["onExitCodes"]["containerName"] == container["name"] for r in rules if "onExitCodes" in r)
    assert any(c["type"] == "DisruptionTarget" for r in rules if r["action"] == "Ignore" for c in r["onPodConditions"])
    assert pod["restartPolicy"] == "Never"
    # --workers is the CPU request: a pod sees all of the node's cores, not its share.
    args = container["args"]
    assert args[0] == "prepare" and args[args.index("--workers") + 1] == container["resources"]["requests"]["cpu"]
    output = args[args.index("--output") + 1]
    assert output.startswith("s3://") and args[args.index("--tokenizer") + 1] == f"{output}/tokenizer.json"

    image = parts("large")[0]["spec"]["template"]["spec"]["containers"][0]["image"]
    finalize, tokenizer = jobs["finalize"], jobs["tokenizer"]
    assert finalize["spec"]["template"]["spec"]["containers"][0]["args"] == ["prepare", "--finalize", *args[1:]]
    vocab = tokenizer["spec"]["template"]["spec"]["containers"][0]["args"]
    i = args.index("--tokenizer") + 1
    assert vocab[:i] + vocab[i + 1 : len(args)] == args[:i] + args[i + 1 :]
    assert re.fullmatch(r"train:\d+", vocab[i]) and vocab[len(args)] == "--tokenizer-only"
    rerun = jobs["rerun"]["spec"]["template"]["spec"]["containers"][0]
    assert rerun["args"] == [
        *args,
        "--task-index=$(ELECTRA_PREPARE_TASK_INDEX)",
        "--num-tasks=$(ELECTRA_PREPARE_NUM_TASKS)",
    ]
    assert 0 <= int(env_of(rerun)["ELECTRA_PREPARE_TASK_INDEX"]["value"]) < n
    for step, job in jobs.items():
        pod = job["spec"]["template"]["spec"]
        container = pod["containers"][0]
        env = env_of(container)
        assert job["metadata"]["name"] == "electra-prepare" + ("" if step == "tasks" else f"-{step}")
        assert container["image"] == image  # the training job's
        if step != "tasks":
            assert job["spec"]["completions"] == job["spec"]["parallelism"] == 1
        # finalize and the re-run know the tasks' N; the vocabulary step is a single task.
        assert int(env["ELECTRA_PREPARE_NUM_TASKS"]["value"]) == (1 if step == "tokenizer" else n)
        # Non-root, like the training job; credentials only from a Secret, by reference.
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert container["envFrom"] == [{"secretRef": {"name": "electra-s3"}}]
        assert not any(re.search(r"KEY|SECRET|TOKEN|PASSWORD", name) for name in env), sorted(env)


def pod_command(job: dict, bucket: str) -> tuple[list[str], dict[str, str]]:
    """A prepare pod's command and the env its manifest gives it, with the manifest's buckets moved to the test's
    S3 server, --workers (the pod's CPU request) to what this machine runs N of at once, and work units small
    enough (--chunk-bytes) that each of the N pods has some of this small corpus."""
    container = job["spec"]["template"]["spec"]["containers"][0]
    args = [a.replace("s3://electra-data/", f"{bucket}/") for a in container["args"]]
    args[args.index("--workers") + 1] = "1"
    args += ["--chunk-bytes", "16384"]
    env = {name: e["value"] for name, e in env_of(container).items() if "value" in e}
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]  # as the kubelet expands them
    return [str(BIN / "electra-scale"), *args], env


def test_prepare_runs_as_the_indexed_jobs_pods_then_finalize(s3_bucket, tmp_path):
    """The three Jobs' commands on a real S3 server (SeaweedFS; its keys in the env stand for the Secret): the
    vocabulary step's one pod, then the tasks' pods at once, each with the manifest's env plus the
    JOB_COMPLETION_INDEX the Job controller adds, then finalize. One index is lost for good (its pod never ran):
    finalize refuses, naming it; the re-run Job, set to that index, completes the set, the same bytes as one
    local prepare of the same text with the same vocabulary."""
    from electra_scale.infra import storage
    from tests.corpus import write_corpus

    for i in range(4):
        corpus = write_corpus(tmp_path / f"docs-{i}.jsonl", documents=100, seed=200 + i)
        storage.upload_file(corpus, f"{s3_bucket}/raw/docs-{i}.jsonl")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JOB_COMPLETION", "ELECTRA_PREPARE"))}

    def run(job: dict, index: int) -> subprocess.Popen:
        cmd, env = pod_command(job, s3_bucket)
        # Indexed Job pods get their index from the controller (JOB_COMPLETION_INDEX, and a label/annotation).
        return subprocess.Popen(cmd, env={**base, **env, "JOB_COMPLETION_INDEX": str(index)}, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip

    def finish(procs: list[subprocess.Popen], rc: int = 0) -> list[str]:
        logs = [proc.communicate(timeout=900)[0] for proc in procs]
        for proc, log in zip(procs, logs):
            assert proc.returncode == rc, log[-3000:]
        return logs

    jobs = {step: prepare_job(step) for step in PREPARE_STEPS}
    finish([run(jobs["tokenizer"], 0)])
    tasks = jobs["tasks"]
    n, lost = tasks["spec"]["completions"], 2
    finish([run(tasks, k) for k in range(n) if k != lost])
    cmd, _ = pod_command(tasks, s3_bucket)
    out = cmd[cmd.index("--output") + 1]
    (log,) = finish([run(jobs["finalize"], 0)], rc=2)
    assert log.count("error:") == 1 and f"task(s) {lost} of {n} have not finished" in log, log
    assert not storage.exists(f"{out}/manifest.json")
    rerun = jobs["rerun"]
    index = env_of(rerun["spec"]["template"]["spec"]["containers"][0])["ELECTRA_PREPARE_TASK_INDEX"]
    index["value"] = str(lost)  # what the user sets in k8s/prepare/rerun
    (log,) = finish([run(rerun, 0)])
    assert f"finalized {out}" in log, log  # the last task to finish finalizes
    # The finalize Job then says so and succeeds.
    (log,) = finish([run(jobs["finalize"], 0)])
    assert "finalized" in log and storage.exists(f"{out}/manifest.json"), log
    # A task pod that starts after that (the Job applied again) has nothing to do, and succeeds.
    (log,) = finish([run(tasks, 1)])
    assert "already finalized: " in log and "; nothing to do" in log, log

    reference = f"{s3_bucket}/reference"
    local = [*cmd[: cmd.index("--output") + 1], reference, *cmd[cmd.index("--output") + 2 :], "--num-tasks", "1"]
    local[local.index("--tokenizer") + 1] = f"{out}/tokenizer.json"
    subprocess.run(local, env=base, check=True, capture_output=True, timeout=900)
    want, got = shard_set(reference), shard_set(out)
    assert sorted(got) == sorted(want) and all(got[name] == want[name] for name in want)
    assert sum(name.endswith(".tar") for name in got) >= n, "every pod wrote shards"


def shard_set(prefix: str) -> dict[str, bytes]:
    """A shard set's objects but parts/ (the tasks' records), its manifests without their `created` time."""
    from electra_scale.infra import storage

    out = {}
    for name in storage.list_files(prefix):
        if not name.startswith("parts/"):
            data = storage.read_bytes(f"{prefix}/{name}")
            out[name] = json.dumps({**json.loads(data), "created": None}) if name.endswith("manifest.json") else data
    return out
