# syntax=docker/dockerfile:1
# Two images from one file; docker-compose.yml picks them by target:
#   cpu   the DICOM node, the API and `db upgrade` (the CPU build of torch: a few hundred MB)
#   cuda  the GPU model workers (PyPI's Linux torch wheel, which brings CUDA's libraries; the host
#         brings the driver through the NVIDIA container toolkit)
# Dependencies are installed from pyproject.toml alone before the source is copied, so a change to
# the source rebuilds only the last layers. The package goes in as a wheel (migrations inside).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG TORCH_VERSION=2.13.0

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/*

# The runtime dependencies (and the s3 extra) listed from pyproject.toml, torch excepted.
FROM base AS requirements
COPY pyproject.toml /build/pyproject.toml
RUN python - <<'PY'
import tomllib
project = tomllib.load(open("/build/pyproject.toml", "rb"))["project"]
wanted = [d for d in project["dependencies"] + project["optional-dependencies"]["s3"] if not d.startswith("torch")]
open("/build/requirements.txt", "w").write("\n".join(wanted) + "\n")
PY

FROM base AS deps-cpu
ARG TORCH_VERSION
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
COPY --from=requirements /build/requirements.txt /build/requirements.txt
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --index-url "$TORCH_CPU_INDEX" "torch==$TORCH_VERSION" \
 && /opt/venv/bin/pip install -r /build/requirements.txt

FROM base AS deps-cuda
ARG TORCH_VERSION
COPY --from=requirements /build/requirements.txt /build/requirements.txt
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install "torch==$TORCH_VERSION" \
 && /opt/venv/bin/pip install -r /build/requirements.txt

# The source, last: a wheel of cxr-triage alone.
FROM base AS wheel
WORKDIR /build
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM base AS cpu
COPY --from=deps-cpu /opt/venv /opt/venv
COPY --from=wheel /wheels /wheels
RUN /opt/venv/bin/pip install --no-deps /wheels/*.whl && rm -rf /wheels \
 && useradd --system --create-home --uid 10001 cxr && mkdir -p /data && chown cxr /data
ENV PATH=/opt/venv/bin:$PATH CXR_TRIAGE_DATA_DIR=/data
USER cxr
VOLUME ["/data"]
EXPOSE 11112 8000 9110
ENTRYPOINT ["cxr-triage"]
CMD ["serve"]

FROM base AS cuda
COPY --from=deps-cuda /opt/venv /opt/venv
COPY --from=wheel /wheels /wheels
RUN /opt/venv/bin/pip install --no-deps /wheels/*.whl && rm -rf /wheels \
 && useradd --system --create-home --uid 10001 cxr && mkdir -p /data && chown cxr /data
ENV PATH=/opt/venv/bin:$PATH CXR_TRIAGE_DATA_DIR=/data
USER cxr
VOLUME ["/data"]
EXPOSE 9111
ENTRYPOINT ["cxr-triage"]
CMD ["worker"]
