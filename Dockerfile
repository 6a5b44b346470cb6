# One image for every labtrain pod: Ray head and workers, the lab queue, the metrics exporter.
# The job is picked by the command (`python -m jobs.<name> --config ...`), as on the local cluster.
#
#   docker build -t ghcr.io/<lab>/labtrain:0.1.0 .
#   docker build --build-arg CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-devel-ubuntu22.04 \
#                --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 -t ... .
#
# Dependencies: the same pyproject.toml and constraints.txt as `make install`. constraints.txt pins
# torch==<version>; here that exact version is installed first from PyTorch's CUDA index (TORCH_INDEX_URL),
# whose wheels carry a local tag (2.13.0+cu128) that the `torch==2.13.0` pin accepts, so the second step,
# `pip install -c constraints.txt .`, keeps the CUDA build and resolves everything else as locally.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04
FROM ${CUDA_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG USER_UID=1000

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    TORCH_EXTENSIONS_DIR=/home/labtrain/.cache/torch_extensions \
    LABTRAIN_STORAGE_ROOT=/home/labtrain/runs
# (The Helm chart and cluster/ray-up/lab.yaml point LABTRAIN_STORAGE_ROOT at shared storage or S3.)

# python3.11 (jammy-updates); g++ and python3.11-dev for the ops DeepSpeed compiles at run time;
# wget, curl, rsync, openssh-client, procps and tini are what Ray, KubeRay's probes and `ray up` use;
# libibverbs1, ibverbs-providers and librdmacm1 let NCCL use InfiniBand/RoCE where a pod is given a device.
# Versions come from the CUDA base image's Ubuntu release: pinning them would break on every point release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3.11 python3.11-dev python3.11-venv g++ make git wget curl ca-certificates \
      rsync openssh-client procps tini libibverbs1 ibverbs-providers librdmacm1 \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv "$VIRTUAL_ENV" \
 && groupadd --gid "${USER_UID}" labtrain \
 && useradd --create-home --uid "${USER_UID}" --gid "${USER_UID}" --shell /bin/bash labtrain

WORKDIR /opt/labtrain

# Dependencies first (a layer that survives code changes): torch from the CUDA index at the pinned version,
# then the project's dependency list from pyproject.toml under the same constraints.
COPY pyproject.toml constraints.txt ./
RUN pip install --upgrade pip setuptools wheel -c constraints.txt \
 && pip install --index-url "${TORCH_INDEX_URL}" "$(grep '^torch==' constraints.txt)" \
 && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install -c constraints.txt -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# The package and the jobs, in place: `python -m jobs.<name>` runs from this directory (the queue's job cwd).
COPY platform ./platform
COPY jobs ./jobs
COPY README.md ./
RUN pip install --no-deps -c constraints.txt . \
 && python -c "import labtrain, jobs.vatt, ray, torch; print('labtrain ok, ray', ray.__version__, 'torch', torch.__version__)"

# Numeric, so that Kubernetes can check runAsNonRoot.
USER ${USER_UID}:${USER_UID}
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["labtrain", "--help"]
