# afs in a container: the CUDA toolkit (nvcc, cuBLAS) for sm80..sm100 engines, a C++ compiler for
# CPU engines, and afs-build on the PATH.
#   docker build -t afs .
#   docker run --gpus all -v $PWD/engines:/engines afs afs-build --model demo --output /engines/demo
FROM nvidia/cuda:13.0.0-devel-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ git \
 && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/afs-venv
ENV PATH=/opt/afs-venv/bin:$PATH

WORKDIR /src/afs
COPY . .
RUN pip install --no-cache-dir . && afs-build --help >/dev/null

WORKDIR /work
CMD ["afs-build", "--help"]
