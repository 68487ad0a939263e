# syntax=docker/dockerfile:1
#
# One image for both processes; deploy/k8s runs it as
#   gateway:  tokenwire gateway --host 0.0.0.0 --port 8000
#   worker:   tokenwire worker --metrics-port 9100
# It runs as uid 10001 on a read-only root filesystem: nothing is written outside /tmp
# (no bytecode at run time, HOME and TMPDIR on /tmp, which Kubernetes mounts as an emptyDir).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a self-contained virtualenv with tokenwire and its dependencies -------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/tokenwire
ENV PATH=/opt/tokenwire/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared/ shared/
COPY gateway/ gateway/
COPY worker/ worker/
COPY tokenwire/ tokenwire/
# The web page and the browser SDK are package data of tokenwire.web (pyproject.toml); the
# install takes only the files the page needs (.dockerignore also keeps web's tests out).
COPY web/ web/
# Extras to add, comma-separated: `--build-arg EXTRAS=otel` for OpenTelemetry tracing.
ARG EXTRAS=""
# A regular (not editable) install; pip compiles the bytecode here, at build time.
RUN pip install ".${EXTRAS:+[$EXTRAS]}" && python -m compileall -q /opt/tokenwire

# --- runtime: the virtualenv (page included) and an unprivileged user ---------------------
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 tokenwire \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /tmp --shell /usr/sbin/nologin tokenwire
COPY --from=build /opt/tokenwire /opt/tokenwire
ENV PATH=/opt/tokenwire/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    TMPDIR=/tmp
WORKDIR /app
USER 10001:10001
# 8000: gateway (page, /v1/ws, /healthz, /readyz, /metrics); 9100: worker (/metrics, /healthz).
EXPOSE 8000 9100
ENTRYPOINT ["tokenwire"]
CMD ["gateway", "--host", "0.0.0.0", "--port", "8000"]
