# Airlock image: the trainer, its hash-pinned wheels, the GPT-2 tokenizer and weights, and the
# default corpus already prepared. Everything comes from vendor/ (run `just vendor` first), so
# the build works with `docker build --network none`.
#
#   docker build --network none --build-arg VARIANT=cpu -t airlock:cpu .
#   docker build --network none --build-arg BASE_IMAGE=airlock-base:bookworm -t airlock:cpu .   # no registry
#
# Two stages: the wheelhouse and the build tools stay in the first; the final image gets the
# finished venv and /app. No RUN --mount, so the legacy builder and BuildKit both work.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- build
FROM ${BASE_IMAGE} AS build
ARG VARIANT=cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_NO_INPUT=1

# python3 -m venv: works with the official image (/usr/local/bin/python3) and Debian's (/usr/bin/python3)
COPY vendor/${VARIANT}.lock /tmp/vendor/requirements.lock
COPY vendor/wheels/${VARIANT}/ /tmp/vendor/wheels/
# --no-deps: the lock is the complete closure (see vendor/README.md); --require-hashes checks every wheel
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-index --find-links /tmp/vendor/wheels --no-deps --require-hashes \
        -r /tmp/vendor/requirements.lock
# cuda: ~280 MB of the CUDA wheels that nothing opens at run time (no-ops for cpu). Checked against
# `ldd` of torch's libraries, torch's _preload_cuda_deps list, and a grep of every .py and .so:
#   libcusolverMg     multi-GPU dense solver (104 MB); torch links and preloads libcusolver only
#   libnvrtc.alt      a second NVRTC build (114 MB, with its builtins); torch links libnvrtc.so.13
#   triton's *_static.a  CUPTI/nvperf archives (77 MB), for linking a profiler at build time
# tests/container/test_cuda_image.py opens every library the trainer's GPU paths load.
RUN cd /opt/venv/lib/python3*/site-packages \
 && rm -f nvidia/cu13/lib/libcusolverMg.so.* nvidia/cu13/lib/libnvrtc.alt.so.* \
          nvidia/cu13/lib/libnvrtc-builtins.alt.so.* triton/backends/nvidia/lib/cupti/*_static.a

WORKDIR /app
COPY pyproject.toml README.md ./
COPY trainer/ trainer/
RUN /opt/venv/bin/pip install --no-index --no-deps --no-build-isolation . \
 && rm -rf build trainer *.egg-info

COPY configs/ configs/
COPY vendor/tokenizers/ vendor/tokenizers/
COPY vendor/models/ vendor/models/
COPY vendor/MANIFEST.json vendor/requirements.in vendor/${VARIANT}.lock vendor/vendor.py vendor/models.lock.json vendor/
# each model pinned in vendor/models.lock.json (`just vendor-model`) must match its sha256 file by
# file, or the build stops with the file named: no image ships a changed model (standard library, offline)
RUN python3 vendor/vendor.py verify
COPY tests/ tests/
COPY docs/ docs/
# the SLURM script and Kubernetes manifest, for running the image under a scheduler (apptainer, pods)
COPY deploy/ deploy/
# just gpu-check runs every GPU path of the image once (scripts/gpu_check.py)
COPY scripts/gpu_check.py scripts/

# Prepare the default and smoke corpora now, so `just train` starts training at once.
# The guard is on (run.offline=true in the configs): preparing proves nothing needs a network.
ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
# They live outside /app/data, which compose bind-mounts; the trainer reads them from there
# when ./data/prepared lacks them (AIRLOCK_PREPARED_FALLBACK).
RUN /opt/venv/bin/trainer prepare --config configs/default.yaml --data.prepared_dir=/opt/airlock/prepared \
 && /opt/venv/bin/trainer prepare --config configs/smoke.yaml --data.prepared_dir=/opt/airlock/prepared \
 && mkdir -p data/prepared volumes/checkpoints volumes/metrics \
 && chmod -R a+rX /app /opt/airlock \
 && chmod 1777 data data/prepared volumes volumes/checkpoints volumes/metrics

# ---------------------------------------------------------------- runtime
FROM ${BASE_IMAGE}
ARG VARIANT=cpu
ARG GIT_COMMIT=unknown
ARG LOCK_SHA256=unknown
ARG MANIFEST_SHA256=unknown

LABEL org.opencontainers.image.title="airlock" \
      org.opencontainers.image.description="Offline training appliance for small language models" \
      org.opencontainers.image.revision="${GIT_COMMIT}" \
      airlock.variant="${VARIANT}" \
      airlock.lock.sha256="${LOCK_SHA256}" \
      airlock.vendor.manifest.sha256="${MANIFEST_SHA256}"

# A non-root user without needing `useradd` (Debian's minbase has no passwd package).
# Compose and just run as the host's UID:GID instead, so HOME is world-writable.
RUN echo "airlock:x:1000:1000:airlock:/home/airlock:/bin/sh" >> /etc/passwd \
 && echo "airlock:x:1000:" >> /etc/group \
 && mkdir -p -m 1777 /home/airlock

# cuda: gcc, g++ and Python.h from vendor/debs/cuda/ (the wildcard matches nothing for cpu).
# torch.compile's Inductor emits Triton kernels on a GPU, and Triton builds its CUDA launcher with
# a C compiler and Python.h the first time it runs one. scripts/install-debs.sh says how
# (228 MiB installed, and 70 MiB of .debs left in this COPY layer).
COPY scripts/install-debs.sh vendor/debs/${VARIANT}* /tmp/debs/
RUN sh /tmp/debs/install-debs.sh /tmp/debs && rm -rf /tmp/debs

COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
COPY --from=build /opt/airlock /opt/airlock

ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    HOME=/home/airlock \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HF_HOME=/tmp/hf \
    MPLCONFIGDIR=/tmp/matplotlib \
    TOKENIZERS_PARALLELISM=false \
    AIRLOCK_PREPARED_FALLBACK=/opt/airlock/prepared \
    AIRLOCK_IMAGE_VARIANT=${VARIANT} \
    AIRLOCK_GIT_COMMIT=${GIT_COMMIT}

WORKDIR /app
USER 1000:1000
# exec form: the trainer is PID 1's child under `init: true` (or PID 1) and gets SIGTERM itself
ENTRYPOINT ["trainer"]
CMD ["train", "--config", "configs/default.yaml"]
