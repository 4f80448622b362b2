# lossd service image: gRPC on 50051, gateway + /metrics + dashboard on 8000, one process.
#
#   docker build -t lossd:cpu .                         # CPU image: torch's CPU build (small)
#   docker build -t lossd:cuda --build-arg VARIANT=cuda .  # CUDA image: the CUDA torch wheel
#
# The CUDA variant uses torch's default Linux wheel, which carries its own CUDA runtime
# libraries (the nvidia-* wheels): the host needs only the NVIDIA driver and the NVIDIA
# container runtime (compose: docker-compose.gpu.yml; Kubernetes: nvidia.com/gpu). The
# server picks the GPU by itself (LOSSD_DEVICE=auto).
#
# Stages: `deps` installs the third-party dependencies from the pyproject files alone (a
# layer that a code change does not rebuild), `build` adds the three lossd distributions
# from source, `runtime` copies the finished virtual environment onto a clean base.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS deps
ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
# The PyTorch index that serves the CPU-only wheels (no CUDA libraries, a fraction of the size).
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/lossd
ENV PATH=/opt/lossd/bin:$PATH
WORKDIR /src
RUN case "$VARIANT" in \
        cpu) pip install --no-cache-dir --index-url "$TORCH_CPU_INDEX_URL" "torch==$TORCH_VERSION" ;; \
        cuda) pip install --no-cache-dir "torch==$TORCH_VERSION" ;; \
        *) echo "VARIANT must be cpu or cuda, not '$VARIANT'" >&2; exit 1 ;; \
    esac
# Only the pyproject files: this layer is rebuilt when a dependency changes, not the code.
COPY kernels/pyproject.toml kernels/pyproject.toml
COPY client/pyproject.toml client/pyproject.toml
COPY server/pyproject.toml server/pyproject.toml
COPY deploy/docker/third_party_requirements.py /usr/local/lib/lossd-docker/
RUN python /usr/local/lib/lossd-docker/third_party_requirements.py kernels/pyproject.toml client/pyproject.toml server/pyproject.toml > requirements.txt \
    && pip install --no-cache-dir -r requirements.txt

FROM deps AS build
COPY kernels kernels
COPY client client
COPY server server
# --no-deps: everything they need is in the layer above; a missing one fails `pip check`.
RUN pip install --no-cache-dir --no-deps ./kernels ./client ./server && pip check

FROM ${PYTHON_IMAGE} AS runtime
# Re-declared: an ARG from before the first FROM is not visible inside a stage.
ARG PYTHON_IMAGE
ARG VARIANT=cpu
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="lossd" \
      org.opencontainers.image.description="gRPC loss-evaluation service (${VARIANT} build)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
ENV PATH=/opt/lossd/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/lossd \
    XDG_CACHE_HOME=/var/lib/lossd/.cache \
    LOSSD_HOST=0.0.0.0 \
    LOSSD_GRPC_PORT=50051 \
    LOSSD_HTTP_PORT=8000 \
    LOSSD_DEVICE=auto \
    LOSSD_DATA_DIR=/var/lib/lossd/data
# A numeric non-root user whose primary group is root (gid 0) and whose writable directory is
# group-writable: the image also runs under an arbitrary UID (OpenShift's restricted policy
# assigns one, always with gid 0).
RUN useradd --system --uid 10001 --gid 0 --home-dir /var/lib/lossd --create-home --shell /usr/sbin/nologin lossd \
    && mkdir -p /var/lib/lossd/.cache /var/lib/lossd/data \
    && chgrp -R 0 /var/lib/lossd \
    && chmod -R g=u /var/lib/lossd
COPY --from=build /opt/lossd /opt/lossd
COPY deploy/docker/healthcheck.py /usr/local/lib/lossd-docker/healthcheck.py
WORKDIR /var/lib/lossd
USER 10001:0
EXPOSE 50051 8000
# The gRPC health service (grpc.health.v1), over TLS when the server serves TLS.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "/usr/local/lib/lossd-docker/healthcheck.py"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["lossd"]
CMD ["serve"]
