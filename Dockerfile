# One image for the node, the worker and the API (docker-compose.yml picks the command).
# torch==2.13.0 from PyPI on Linux is the CUDA build the GPU workers need; for a CPU-only
# image build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu
FROM python:3.11-slim-bookworm

ARG TORCH_INDEX=""
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CXR_TRIAGE_DATA_DIR=/data

RUN apt-get update \
 && apt-get install -y --no-install-recommends dcmtk libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --create-home --uid 10001 cxr

WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY alembic ./alembic
COPY src ./src
RUN if [ -n "$TORCH_INDEX" ]; then pip install --no-cache-dir --index-url "$TORCH_INDEX" torch==2.13.0; fi \
 && pip install --no-cache-dir -e . \
 && mkdir -p /data && chown cxr /data

USER cxr
VOLUME ["/data"]
EXPOSE 11112 8000
ENTRYPOINT ["cxr-triage"]
CMD ["serve"]
