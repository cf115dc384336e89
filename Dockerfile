# electra-scale for GPU machines in the cloud:
#   docker build -t electra-scale:0.1.0 .
#   docker run --gpus all --ipc=host -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY -e AWS_ENDPOINT_URL \
#     --entrypoint torchrun electra-scale:0.1.0 --nproc_per_node=gpu -m electra_scale \
#     pretrain --config configs/large.yaml data.shards=s3://... run.output_dir=s3://...
#
# BASE_IMAGE: by default NVIDIA's PyTorch image; its CUDA build of torch and the packages NVIDIA ships with it
# are kept as they are (never reinstalled). Any Debian/Ubuntu image works too: Python comes from apt when the
# base has none, and torch is installed when it is missing (TORCH_SPEC, from TORCH_INDEX if set, e.g.
# https://download.pytorch.org/whl/cu128). scripts/container_test.sh builds it this way from a bare Debian.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.03-py3
FROM ${BASE_IMAGE}

ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX=
# An offline build from a wheelhouse instead of PyPI (what scripts/container_test.sh does):
#   --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=http://127.0.0.1:PORT/
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# PIP_BREAK_SYSTEM_PACKAGES: the image is the environment, so pip installs into the system Python (PEP 668
# guards a distribution's own Python, which a bare Debian base uses).
# TORCH_EXTENSIONS_DIR: DeepSpeed compiles the ops it was not built with on first use into this directory;
# FusedAdam is prebuilt below on CUDA bases.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_ROOT_USER_ACTION=ignore \
    TORCH_EXTENSIONS_DIR=/home/electra/.cache/torch_extensions

# Python from the distribution when the base has none (a bare Debian/Ubuntu): the release's own python3,
# whatever its version (so apt versions are not pinned).
# hadolint ignore=DL3008
RUN if ! python3 -m pip --version >/dev/null 2>&1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-pip ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi

WORKDIR /opt/electra-scale
COPY requirements/ requirements/

# torch only when the base lacks it: a CUDA base's own build must stay. Its dependencies follow our pins.
RUN python3 -c "import torch" 2>/dev/null \
    || python3 -m pip install -c requirements/constraints.txt ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "$TORCH_SPEC"

COPY pyproject.toml README.md ./
COPY electra_scale/ electra_scale/
COPY configs/ configs/
COPY ds_configs/ ds_configs/
# Our pins apply to every package the base does not already have; what the base ships (NVIDIA's numpy, its
# own pip constraints) wins, since its torch was built and validated against exactly those.
# The user is uid 1000, as the Kubernetes manifests' runAsUser. Ubuntu 24.04 bases (NVIDIA's among them)
# already have a user 1000 (`ubuntu`): it gives way to ours.
RUN python3 -c "import importlib.metadata as md, re; norm = lambda n: re.sub(r'[-_.]+', '-', n).lower(); \
have = {norm(d.metadata['Name'] or '') for d in md.distributions()}; \
print(''.join(line for line in open('requirements/constraints.txt') if norm(line.split('==')[0].strip()) not in have))" \
        > /tmp/constraints.txt \
    && python3 -m pip install -c /tmp/constraints.txt . \
    && rm /tmp/constraints.txt \
    && python3 -c "import torch, deepspeed, electra_scale" \
    && if getent passwd 1000 >/dev/null; then userdel --remove "$(getent passwd 1000 | cut -d: -f1)"; fi \
    && if getent group 1000 >/dev/null; then groupdel "$(getent group 1000 | cut -d: -f1)"; fi \
    && useradd --create-home --uid 1000 --user-group electra

# A CUDA build of torch: DeepSpeed's FusedAdam (the paper presets' Adam, without bias correction) prebuilt into
# the installed DeepSpeed, so that nodes without a CUDA toolkit can run the image (DS_BUILD_FUSED_ADAM=1 needs
# the base's nvcc; the architectures are A100, H100/H200 and B200).
RUN if python3 -c "import sys, torch; sys.exit(torch.version.cuda is None)" && command -v nvcc >/dev/null; then \
        TORCH_CUDA_ARCH_LIST="8.0;9.0;10.0" DS_BUILD_FUSED_ADAM=1 python3 -m pip install --no-deps \
            --no-build-isolation --force-reinstall "$(grep -i '^deepspeed==' requirements/constraints.txt)" \
        && python3 -c "from deepspeed.git_version_info import installed_ops as o; assert o['fused_adam']"; \
    fi

# A CPU build of torch (as in the tests' image): DeepSpeed's CPU backend JIT-compiles its shared-memory
# collective (deepspeed_shm_comm) when a process starts. It needs a C++ compiler and Python's headers, and
# its cache is filled here, as the run-time user, so that containers start without a 30 s compile.
# hadolint ignore=DL3008
RUN if python3 -c "import sys, torch; sys.exit(torch.version.cuda is not None or torch.version.hip is not None)"; then \
        apt-get update \
        && apt-get install -y --no-install-recommends g++ python3-dev \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# Never root at run time. No credentials in the image: pass them with -e at `docker run`.
USER 1000:1000
RUN if python3 -c "import sys, torch; sys.exit(torch.version.cuda is not None or torch.version.hip is not None)"; then \
        DS_ACCELERATOR=cpu python3 -c "from deepspeed.accelerator import get_accelerator; \
get_accelerator().create_op_builder('ShareMemCommBuilder').load()"; \
    fi
ENTRYPOINT ["electra-scale"]
CMD ["--help"]
