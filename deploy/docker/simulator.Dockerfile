# The simulated plant (OPC UA, Modbus TCP, Sparkplug B over MQTT) for demonstrations. Build from the root:
#   docker build -f deploy/docker/simulator.Dockerfile -t tianping/simulator .
FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /opt/tianping
COPY pyproject.toml README.md ./
COPY simulator ./simulator
RUN pip install '.[sim]' && useradd --system --uid 10003 tianping-sim && mkdir -p /var/lib/tianping-sim \
    && chown tianping-sim /var/lib/tianping-sim
USER tianping-sim
EXPOSE 4840
ENTRYPOINT ["tianping-sim"]
CMD ["plant", "--mqtt-host", "mosquitto", "--mqtt-port", "1883", "--opcua-port", "4840", "--state", "/var/lib/tianping-sim/state.json"]
