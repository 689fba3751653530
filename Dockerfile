# rbac-proxy container image: a role-based access control sidecar (see deploy/kubernetes/).
#
#   docker build -t rbac-proxy:0.1.0 .
#   docker run --rm -p 8080:8080 -p 9090:9090 \
#     -e RBAC_PROXY_UPSTREAM=http://host.docker.internal:3000 rbac-proxy:0.1.0
#
# Both stages use the same pinned base: the venv built in the first stage links to that exact
# interpreter. Bump the tag (and pin a digest at release time) in both FROM lines together.

# --- builder: resolve and install dependencies into a self-contained venv --------------------
FROM python:3.11.14-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Dependencies before the source: this layer is rebuilt when pyproject.toml changes, not on
# every code edit. The list comes from pyproject.toml itself (stdlib tomllib), so it cannot drift.
COPY pyproject.toml ./
RUN python -c 'import sys, tomllib; sys.stdout.write("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]) + "\n")' > requirements.txt \
 && pip install --no-cache-dir -r requirements.txt

# The package itself, without touching the dependency layer above.
COPY proxy/ ./proxy/
RUN pip install --no-cache-dir --no-deps .

# --- runtime: the venv, the shipped configuration, nothing else -------------------------------
FROM python:3.11.14-slim-bookworm

LABEL org.opencontainers.image.title="rbac-proxy" \
      org.opencontainers.image.description="Role-based access control sidecar reverse proxy" \
      org.opencontainers.image.licenses="Apache-2.0"

# No .pyc writes at run time (the root filesystem is read-only in deploy/kubernetes; pip
# already compiled the venv at build time) and unbuffered stdout for the JSON audit log.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

COPY --from=builder /opt/venv /opt/venv

# The working directory holds the shipped policy, so the defaults `--routes routes.yaml` and
# `--store file:members.yaml` resolve; Kubernetes mounts a ConfigMap over this directory.
# Files stay owned by root: the proxy user can read its configuration but never rewrite it.
WORKDIR /etc/rbac-proxy
COPY routes.yaml members.yaml schema.sql ./

# Numeric UID:GID so Kubernetes' runAsNonRoot can verify it without an /etc/passwd entry.
USER 10001:10001

# 8080: the proxy port (clients). 9090: the admin port (metrics, probes, admin API).
EXPOSE 8080 9090

# For `docker run` only: Kubernetes ignores HEALTHCHECK; use the liveness/readiness probes in
# deploy/kubernetes/ instead. Standard library only: the image ships no curl or wget.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=3)"]

ENTRYPOINT ["rbac-proxy"]
CMD ["serve"]
