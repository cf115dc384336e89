# electra-scale for GPU machines in the cloud:
#   docker build -t electra-scale:0.1.0 .
#   docker run --gpus all --ipc=host -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY -e AWS_ENDPOINT_URL \
#     electra-scale:0.1.0 pretrain --config configs/large.yaml data.shards=s3://... run.output_dir=s3://...
# The base is a CUDA PyTorch image (its torch satisfies ours, so pip keeps it). Any image with Python >= 3.11
# and torch works: --build-arg BASE_IMAGE=...
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.03-py3
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # DeepSpeed compiles its CUDA ops (fused Adam) on first use into this directory; mount a volume here to
    # keep them between runs, or prebuild at image build time with DS_BUILD_FUSED_ADAM=1.
    TORCH_EXTENSIONS_DIR=/home/electra/.cache/torch_extensions

WORKDIR /opt/electra-scale
COPY pyproject.toml README.md ./
COPY requirements/ requirements/
COPY electra_scale/ electra_scale/
COPY configs/ configs/
COPY ds_configs/ ds_configs/
RUN python3 -m pip install --no-cache-dir -c requirements/constraints.txt . \
    && useradd --create-home --uid 1000 --user-group electra

# Never root at run time. No credentials in the image: pass them with -e at `docker run`.
USER 1000:1000
ENTRYPOINT ["electra-scale"]
CMD ["--help"]
