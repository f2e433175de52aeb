# The edge agent. Build from the repository root:
#   docker build -f deploy/docker/agent.Dockerfile -t tianping/agent .
FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /opt/tianping
COPY pyproject.toml README.md ./
COPY protocol ./protocol
COPY connectors ./connectors
COPY agent ./agent
RUN pip install '.[agent]' && useradd --system --uid 10002 --home-dir /var/lib/tianping-agent tianping \
    && mkdir -p /var/lib/tianping-agent && chown tianping /var/lib/tianping-agent
USER tianping
VOLUME ["/var/lib/tianping-agent"]
EXPOSE 9464
# /etc/tianping/agent.toml is mounted; its data_dir holds the key (0600), the enrollment and the outbox.
ENTRYPOINT ["tianping-agent"]
CMD ["run", "--config", "/etc/tianping/agent.toml", "--metrics-port", "9464", "--metrics-host", "0.0.0.0"]
