# lossd service image: gRPC on 50051, gateway + /metrics + dashboard on 8000, one process.
# The torch wheel from PyPI carries CUDA: with the NVIDIA container runtime the
# server runs on the GPU (device auto), elsewhere on the CPU.
FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 lossd && useradd --system --uid 10001 --gid lossd --home-dir /app --shell /usr/sbin/nologin lossd
WORKDIR /app

# Dependencies first, so that code changes do not reinstall torch.
COPY kernels/pyproject.toml kernels/pyproject.toml
COPY client/pyproject.toml client/pyproject.toml
COPY server/pyproject.toml server/pyproject.toml
RUN pip install torch==2.13.0

COPY kernels kernels
COPY client client
COPY server server
RUN pip install ./kernels ./client ./server

USER 10001:10001
EXPOSE 50051 8000
ENV LOSSD_HOST=0.0.0.0 \
    LOSSD_GRPC_PORT=50051 \
    LOSSD_HTTP_PORT=8000 \
    LOSSD_DEVICE=auto

HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status == 200 else 1)"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["lossd"]
CMD ["serve"]
