# The central verifier (HTTP API, officials' console, /metrics). Build from the repository root:
#   docker build -f deploy/docker/verifier.Dockerfile -t tianping/verifier .
FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /opt/tianping
COPY pyproject.toml README.md ./
COPY protocol ./protocol
COPY connectors ./connectors
COPY agent ./agent
COPY verifier ./verifier
COPY simulator ./simulator
COPY demo ./demo
RUN pip install '.[verifier]' && useradd --system --uid 10001 --home-dir /var/lib/tianping tianping \
    && mkdir -p /var/lib/tianping && chown tianping /var/lib/tianping
USER tianping
EXPOSE 8700
# TIANPING_DB (postgresql+psycopg://…), TIANPING_ADMIN_TOKEN and, optionally, TIANPING_INFLUX_* come from the
# environment; `tianping-verifier init` is run once (idempotent) before the replicas start.
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8700/healthz', timeout=4)" || exit 1
ENTRYPOINT ["tianping-verifier"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8700"]
