# atlasgs-bids, the BIDS App, as a container image.
#
#   docker build --build-arg VERSION="$(cat version)" -t atlasgs-bids:"$(cat version)" .
#   docker run --rm --gpus all -v /data/bids:/bids:ro -v /data/out:/out atlasgs-bids:0.1.0 /bids /out participant
#
# docs/containers.md has the local build (no registry: docker/build-base.sh, CPU torch) and the Apptainer image.
#
# BASE defaults to python:3.11-slim-bookworm (Debian 12, CPython 3.11), and that is the CUDA-capable choice here:
# TORCH_SPEC's default, torch 2.13.0 from PyPI, is the CUDA 13.0 build for x86_64 Linux, and its CUDA runtime,
# cuBLAS, cuFFT, cuDNN 9.20, NCCL ... come as pip wheels (cuda-toolkit==13.0.3, nvidia-cudnn-cu13, ...; see that
# wheel's Requires-Dist). The image then needs only the host's NVIDIA driver (CUDA 13: driver >= 580), which
# `docker run --gpus all` (NVIDIA Container Toolkit) and `apptainer run --nv` mount in; `--device auto` then picks
# CUDA. An nvidia/cuda:13.0.x-runtime base would carry a second copy of those libraries and Python 3.12. Without a
# GPU the same image runs on the CPU. For a CPU-only image (1.9 GB; the CUDA libraries add several GB) build with
#   --build-arg TORCH_SPEC=torch==2.13.0+cpu --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# or, offline, PIP_FIND_LINKS pointing at a folder/URL that holds the CPU wheel (tests/container/smoke.sh does).
ARG BASE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------------------- build
FROM ${BASE} AS build
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=""
ARG PIP_FIND_LINKS=""
# PIP_CA_URL: a PEM bundle appended to the build stage's CA certificates, for builds behind a TLS-inspecting proxy
# (tests/container/smoke.sh serves the host's bundle on 127.0.0.1); it never reaches the final image.
ARG PIP_CA_URL=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
    PIP_FIND_LINKS=${PIP_FIND_LINKS} PIP_CERT=/etc/ssl/certs/ca-certificates.crt
RUN python3 -m venv /opt/atlasgs \
 && if [ -n "${PIP_CA_URL}" ]; then python3 -c 'import sys, urllib.request; \
sys.stdout.buffer.write(urllib.request.urlopen(sys.argv[1]).read())' "${PIP_CA_URL}" >> "${PIP_CERT}"; fi
ENV PATH=/opt/atlasgs/bin:${PATH}

# torch first, from TORCH_SPEC (its own dependencies held to the lock's pins), then every other run-time dependency
# at the exact versions the test suite ran with (docker/requirements.lock, made by docker/lock.py).
COPY docker/requirements.lock /tmp/requirements.lock
RUN pip install -c /tmp/requirements.lock ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "${TORCH_SPEC}" \
 && pip install -r /tmp/requirements.lock

# The package itself, non-editable. VERSION must equal the `version` file: the image label is then the version
# that `--version`, the sidecars and dataset_description.json report. Last, drop torch's C++ unit-test binaries
# (torch/test, ~80 MB, never imported).
ARG VERSION
COPY pyproject.toml version README.md /src/
COPY atlasgs_bids /src/atlasgs_bids
RUN test -n "${VERSION}" || { echo 'pass --build-arg VERSION="$(cat version)"' >&2; exit 1; } \
 && test "${VERSION}" = "$(cat /src/version)" \
    || { echo "VERSION=${VERSION} differs from the version file ($(cat /src/version))" >&2; exit 1; } \
 && pip install --no-deps /src \
 && pip check \
 && test "$(cd / && atlasgs-bids --version)" = "atlasgs-bids ${VERSION}" \
 && python -c "import deepbet.utils as u, os; [os.stat(f'{u.DATA_PATH}/models/{m}.pt') for m in ('model', 'bbox_model')]" \
 && bids-validator-deno --version \
 && rm -rf /src /tmp/requirements.lock "$(python -c 'import torch, os; print(os.path.dirname(torch.__file__))')/test"

# -------------------------------------------------------------------------------------------------------- runtime
FROM ${BASE}
ARG VERSION
ARG IMAGE_TAG="atlasgs-bids:${VERSION}"
LABEL org.opencontainers.image.title="atlasgs-bids" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.description="BIDS App: thick-slice brain MRI brought to the subject's T1w grid (AtlasGS)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/atlasgs/atlasgs-bids"

COPY --from=build /opt/atlasgs /opt/atlasgs

# Runs as any uid (HPC, `docker run --user`): nothing is written inside the image; HOME and every cache live in /tmp
# (the container's own /tmp under Docker; the Apptainer definition moves them to $TMPDIR). NIPYPE_NO_ET: no
# version check over the network. DENO_DIR: the validator's runtime cache. The GeneratedBy.Container entry of the
# derivatives' dataset_description.json comes from ATLASGS_CONTAINER_*.
ENV PATH=/opt/atlasgs/bin:${PATH} \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/.cache/matplotlib \
    DENO_DIR=/tmp/.cache/deno \
    NIPYPE_NO_ET=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    ATLASGS_CONTAINER_TYPE=docker \
    ATLASGS_CONTAINER_TAG=${IMAGE_TAG}
WORKDIR /tmp
ENTRYPOINT ["atlasgs-bids"]
CMD ["--help"]
