# syntax=docker/dockerfile:1
#
# rmt-dist GPU worker image (also runs the CPU head): Ray 2.60.0, Python 3.11, CUDA 12.8,
# torch 2.13.0+cu128 and the rest of requirements.txt, the rmt_dist package, and the jobs/ scripts.
#
#   docker build -t rmt-dist:0.1.0-ray2.60.0-py311-cu128 .
#
# Why this base: rayproject/ray:<ver>-py311-cu128 is Ray's own image built FROM
# nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04 (ray-project/ray ci/docker/ray.cuda.base.wanda.yaml),
# so it already has Ray 2.60.0, conda Python 3.11, nvcc and g++ (DeepSpeed JIT-builds its CUDA/C++
# ops with them) and a non-root user `ray` (uid 1000, gid 100). rayproject/ray-ml is no longer published.
# Keep three things in step (tests/test_cluster_specs.py checks them): the -cuXYZ of this tag, the
# whl/cuXYZ index below, and the pins in requirements.txt (ray, torch).
FROM rayproject/ray:2.60.0-py311-cu128

# ninja: torch.utils.cpp_extension (DeepSpeed's JIT op builder) needs it; libaio-dev: DeepSpeed's
# async_io op (NVMe offload). System tools only: every Python package comes from requirements.txt.
USER root
RUN apt-get update \
 && apt-get install -y --no-install-recommends ninja-build libaio-dev \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /home/ray/rmt-dist && chown ray:users /home/ray/rmt-dist

# DeepSpeed builds an op (fused_adam, cpu_adam, ...) the first time a run asks for it, on the GPU
# node, for these architectures (A100 = 8.0, H100 = 9.0), and caches it under TORCH_EXTENSIONS_DIR.
# The LD_LIBRARY_PATH tail is where EFA's libfabric and the aws-ofi-nccl plugin appear when the host's
# /opt/amazon is mounted (cluster/aws-a100.yaml does that on p4d nodes); absent directories are ignored.
ENV CUDA_HOME=/usr/local/cuda \
    TORCH_CUDA_ARCH_LIST="8.0;9.0" \
    TORCH_EXTENSIONS_DIR=/home/ray/.cache/torch_extensions \
    LD_LIBRARY_PATH="${LD_LIBRARY_PATH}:/opt/amazon/efa/lib:/opt/amazon/ofi-nccl/lib/x86_64-linux-gnu:/opt/amazon/ofi-nccl/lib" \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

USER ray
WORKDIR /home/ray/rmt-dist

# Exactly requirements.txt, nothing else: torch==2.13.0 resolves to the +cu128 build from the CUDA
# index (its local version sorts above PyPI's plain 2.13.0), everything else from PyPI.
COPY --chown=ray:users requirements.txt ./
RUN pip install -r requirements.txt --extra-index-url https://download.pytorch.org/whl/cu128 \
 && python -c "import torch, ray; assert torch.__version__.split('+')[0] == '2.13.0' and torch.version.cuda == '12.8', (torch.__version__, torch.version.cuda); assert ray.__version__ == '2.60.0', ray.__version__"

# The package (pyproject.toml at the repo root) and the job scripts. The copy here is also the
# working_dir the RayJob points at (cluster/kuberay/rayjob.yaml), so `python jobs/...` resolves.
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users rmt_dist ./rmt_dist
COPY --chown=ray:users jobs ./jobs
RUN pip install --no-deps . \
 && mkdir -p "${TORCH_EXTENSIONS_DIR}" \
 && python -c "import rmt_dist, rmt_dist.config"
