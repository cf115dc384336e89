#!/usr/bin/env bash
# The Dockerfile for real, without a Docker engine: podman builds it from a bare Debian base made with
# debootstrap (substituted through BASE_IMAGE), then the image runs the tiny pretraining on 2 CPU ranks, as its
# non-root user, against a SeaweedFS S3 server on the host (host network), with the S3 credentials passed
# through the environment only. It passes when the container exits 0 and a COMPLETE checkpoint is in S3.
#
#   scripts/container_test.sh           build, run, check; on success record the inputs' hash
#   scripts/container_test.sh --check   exit 0 when the recorded hash matches the inputs (nothing to re-test)
#
# It takes minutes, so .ci/run calls it only when its inputs (Dockerfile, .dockerignore, pyproject.toml,
# requirements/, this script) differ from those of the last recorded pass: .ci/container.sha256, which is
# committed with the change that made the run necessary.
#
# The `docker` CLI is used against podman's API socket when one is installed (ELECTRA_CONTAINER_CLI=podman
# forces podman). The build is offline: pip inside it reads a wheelhouse that the host's pip fills (torch's
# CPU build included) and serves on loopback, so it needs neither PyPI's TLS nor a multi-GB CUDA torch.
# Needs root on Debian; installs podman, buildah, runc and debootstrap if missing (scripts/services.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STAMP=.ci/container.sha256

inputs_hash() {
    find Dockerfile .dockerignore pyproject.toml requirements scripts/container_test.sh -type f -print0 \
        | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1
}

if [ "${1:-}" = "--check" ]; then
    [ -f "$STAMP" ] && [ "$(cut -d' ' -f1 "$STAMP")" = "$(inputs_hash)" ]
    exit
fi

START=$(date +%s)
VENV=${VENV:-$ROOT/.venv}
PY=$VENV/bin/python
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
BASE=localhost/debian:bookworm-minbase
IMAGE=localhost/electra-scale:container-test
# Kept between runs (the base image, podman's storage); not in the repository.
STATE=${ELECTRA_CONTAINER_HOME:-/var/tmp/electra-scale-containers}
log() { echo "container-test: $*" >&2; }

scripts/bootstrap.sh
scripts/services.sh containers
mkdir -p "$STATE"

# podman, configured for a machine without systemd: cgroupfs, file events, host network (the S3 server
# listens on the host's loopback). overlay storage where the kernel has it: vfs copies every layer in full.
driver=vfs
grep -qw overlay /proc/filesystems && driver=overlay
cat >"$STATE/containers.conf" <<EOF
[containers]
netns = "host"
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "runc"
EOF
cat >"$STATE/storage.conf" <<EOF
[storage]
driver = "$driver"
graphroot = "$STATE/storage-$driver"
runroot = "$STATE/run"
EOF
export CONTAINERS_CONF=$STATE/containers.conf CONTAINERS_STORAGE_CONF=$STATE/storage.conf

pids=()
work=$(mktemp -d)
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

# 1. The base: Debian bookworm, minbase (no Python), from Debian's own packages.
if ! podman image exists "$BASE"; then
    log "debootstrap --variant=minbase bookworm -> $BASE"
    debootstrap --variant=minbase bookworm "$work/rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" \
        >"$work/debootstrap.log" || { tail -20 "$work/debootstrap.log"; exit 1; }
    tar -C "$work/rootfs" -c . | podman import - "$BASE" >/dev/null
    rm -rf "$work/rootfs"
fi

# 2. A wheelhouse for the build: the package's dependencies at our pins, torch's CPU build, the build backend.
log "wheelhouse ($TORCH_SPEC + pyproject dependencies)"
"$PY" -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
    >"$work/requirements.txt"
rm -rf "$STATE/wheels"
"$PY" -m pip wheel --disable-pip-version-check --wheel-dir "$STATE/wheels" \
    -c requirements/constraints.txt "$TORCH_SPEC" -r "$work/requirements.txt" "setuptools>=68" wheel \
    >"$work/wheelhouse.log" 2>&1 || { tail -30 "$work/wheelhouse.log"; exit 1; }
port=$("$PY" -c "from electra_scale.infra.launch import free_port; print(free_port())")
"$PY" -m http.server --bind 127.0.0.1 "$port" --directory "$STATE/wheels" >"$work/wheels.log" 2>&1 &
pids+=($!)

# 3. The engine: the docker CLI against podman's socket, or podman.
cli=podman
build_args=(--format docker)  # docker format keeps the Dockerfile's SHELL (OCI has no such field)
if [ "${ELECTRA_CONTAINER_CLI:-}" != podman ] && command -v docker >/dev/null; then
    rm -f "$STATE/podman.sock"  # left by a run that was killed
    podman system service --time=0 "unix://$STATE/podman.sock" >"$work/podman-service.log" 2>&1 &
    pids+=($!)
    export DOCKER_HOST=unix://$STATE/podman.sock DOCKER_BUILDKIT=0  # podman's Docker API has no BuildKit
    for _ in $(seq 100); do docker version >/dev/null 2>&1 && break; sleep 0.2; done
    cli=docker
    build_args=()
fi
log "engine: $cli ($(podman --version), storage $driver)"

# 4. Build from the bare base, offline.
build_start=$(date +%s)
"$cli" build "${build_args[@]}" --network host \
    --build-arg BASE_IMAGE="$BASE" \
    --build-arg PIP_NO_INDEX=1 \
    --build-arg PIP_FIND_LINKS="http://127.0.0.1:$port/" \
    -t "$IMAGE" . >"$work/build.log" 2>&1 || { tail -40 "$work/build.log"; exit 1; }
build_s=$(($(date +%s) - build_start))
user=$("$cli" image inspect --format '{{.Config.User}}' "$IMAGE")
log "built $IMAGE in ${build_s}s; runs as $user"
[ "$("$cli" run --rm --network host --entrypoint id "$IMAGE" -u)" != 0 ] || { log "the image runs as root"; exit 1; }

# 5. Host S3 + tiny pretraining in the container + checks (Python for SeaweedFS, shards and the S3 checks).
CLI=$cli IMAGE=$IMAGE WORK=$work "$PY" - <<'PY'
import json, os, random, subprocess, sys, time

from electra_scale.infra import storage
from electra_scale.data import prepare
from electra_scale.infra.s3server import SeaweedS3

cli, image, work = os.environ["CLI"], os.environ["IMAGE"], os.environ["WORK"]
server = SeaweedS3(f"{work}/s3").start()
try:
    os.environ.update(server.env())
    server.create_bucket("electra-ct")
    rng = random.Random(0)
    words = "the of and to in is was river city music war king water light school road film stone paper".split()
    with open(f"{work}/docs.jsonl", "w") as f:
        for _ in range(300):
            text = " ".join(" ".join(rng.choices(words, k=rng.randint(4, 16))).capitalize() + "." for _ in range(8))
            f.write(json.dumps({"text": text}) + "\n")
    manifest = prepare([f"{work}/docs.jsonl"], "s3://electra-ct/shards", "train:300", seq_len=128,
                       samples_per_shard=64, progress=False)
    steps = 20
    # Credentials reach the container as `-e NAME` (value from this environment), never on a command line.
    cmd = [cli, "run", "--rm", "--network", "host", "--ipc", "host",
           *[a for k in server.env() for a in ("-e", k)],
           "--entrypoint", "torchrun", image, "--nproc_per_node", "2", "-m", "electra_scale",
           "pretrain", "--config", "configs/tiny.yaml",
           "data.shards=s3://electra-ct/shards", "run.output_dir=s3://electra-ct/run",
           f"model.vocab_size={manifest.vocab_size}", f"train.max_steps={steps}",
           "train.global_batch_size=8", "train.micro_batch_size=4", "train.log_every=5", "checkpoint.every_steps=10"]
    print("container-test: $", " ".join(cmd), flush=True)
    start = time.monotonic()
    rc = subprocess.run(cmd).returncode
    print(f"container-test: container exited {rc} after {time.monotonic() - start:.0f}s", flush=True)
    if rc != 0:
        sys.exit(f"container-test: FAILED: the container exited {rc}")
    done = f"s3://electra-ct/run/checkpoints/step_{steps:07d}/COMPLETE"
    if not storage.exists(done):
        sys.exit(f"container-test: FAILED: no {done}")
    logged = [json.loads(line)["step"] for line in storage.read_text("s3://electra-ct/run/metrics.jsonl").splitlines()]
    print(f"container-test: {done} present; metrics at steps {logged}")
    # Nothing of the secret may be in the image: not in its config, not in its history.
    meta = subprocess.run([cli, "image", "inspect", image], capture_output=True, text=True, check=True).stdout
    hist = subprocess.run([cli, "history", "--no-trunc", image], capture_output=True, text=True, check=True).stdout
    if server.secret_key in meta + hist:
        sys.exit("container-test: FAILED: the S3 secret is in the image")
finally:
    server.stop()
PY

size=$("$cli" image inspect --format '{{.Size}}' "$IMAGE")
log "image size $((size / 1000000)) MB ($size bytes); base $BASE"
# Keep the disk in check: the image (rebuilt next time) and dangling layers go; the base stays for next time.
if [ -z "${ELECTRA_KEEP_IMAGE:-}" ]; then
    "$cli" rmi "$IMAGE" >/dev/null
fi
podman image prune -f >/dev/null
rm -rf "$STATE/wheels"

echo "$(inputs_hash)  Dockerfile .dockerignore pyproject.toml requirements/ scripts/container_test.sh" >"$STAMP"
log "PASSED in $(($(date +%s) - START))s (build ${build_s}s, image $((size / 1000000)) MB); recorded in $STAMP"
