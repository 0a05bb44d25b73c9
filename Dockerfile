# syntax=docker/dockerfile:1
#
# lungserve container image. GPU by default, CPU with a build argument:
#   docker build -t lungserve:gpu .
#   docker build --build-arg VARIANT=cpu -t lungserve:cpu .
#   docker run --gpus all -p 8000:8000 lungserve:gpu        # needs the NVIDIA Container Toolkit
#
# Base image. onnxruntime-gpu 1.27+ is built for CUDA 13 + cuDNN 9, and requirements/gpu.txt pins
# it with its [cuda,cudnn] extras: the CUDA 13 runtime, cuBLAS, cuFFT, cuRAND, NVRTC and cuDNN 9
# arrive as hash-checked pip wheels, which the engine loads with onnxruntime.preload_dlls(). The
# only GPU piece the image cannot carry is the kernel driver (libcuda), which the NVIDIA
# Container Toolkit mounts from the host. An nvidia/cuda:13.0.x-cudnn-runtime-ubuntu24.04 base
# would therefore add a second, unpinned copy of the same libraries (GBs) and an apt-managed
# Python. So both variants use an official Python image (3.11 here; the universal locks also
# install on 3.12 and 3.13: --build-arg PYTHON_IMAGE=python:3.13-slim-bookworm), and the
# NVIDIA_* variables below keep what the CUDA base would give: the toolkit exposes the GPUs and
# refuses to start the container on a driver too old for CUDA 13 (instead of ORT silently
# falling back to CPU; LUNGSERVE_PROVIDER=cuda also refuses that).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
# gpu -> requirements/gpu.txt (onnxruntime-gpu), cpu -> requirements/serve.txt (onnxruntime).
ARG VARIANT=gpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_NO_INPUT=1
WORKDIR /src
# Dependencies first (own layer, cached while only the code changes); same flags as `make serve`.
COPY requirements/ requirements/
RUN case "${VARIANT}" in \
        gpu) lock=requirements/gpu.txt ;; \
        cpu) lock=requirements/serve.txt ;; \
        *) echo "VARIANT must be gpu or cpu, not '${VARIANT}'" >&2; exit 1 ;; \
    esac \
    && python -m venv /opt/venv \
    && /opt/venv/bin/python -m pip install --require-hashes -r "${lock}" \
    && /opt/venv/bin/python -m pip install --require-hashes -r requirements/build.txt
COPY pyproject.toml README.md ./
COPY service/ service/
COPY export/ export/
# As in the Makefile, but not editable: the runtime stage keeps the venv, not the source tree.
RUN /opt/venv/bin/python -m pip install --no-deps --no-build-isolation .

FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    NVIDIA_REQUIRE_CUDA="cuda>=13.0" \
    MALLOC_ARENA_MAX=2
RUN groupadd --system --gid 10001 lungserve \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/lungserve lungserve
COPY --from=builder /opt/venv /opt/venv
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /home/lungserve
EXPOSE 8000
# Readiness, not liveness: unhealthy until the model is loaded and warm. No curl in slim images.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health/ready', timeout=4)"]
# 0.0.0.0 is right inside a container: the port is only reachable where `docker run -p` publishes
# it. (Outside containers the default stays 127.0.0.1.) Other settings: LUNGSERVE_* variables.
CMD ["lungserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
