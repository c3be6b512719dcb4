# healthd in a container. There is no systemd here, so the watchdog's job falls to HEALTHCHECK,
# which fails when healthd itself stops making progress (its status file stops being
# rewritten), never merely because a component it watches is unhealthy.
#
#   docker build -t healthd .
#   docker run -d --name healthd -p 127.0.0.1:9469:9469 \
#       -v /etc/healthd:/etc/healthd:ro -v healthd-state:/var/lib/healthd healthd

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: the wheel, from the source tree only -------------------------------------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY healthd ./healthd
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

# --- runtime: the wheel and its dependencies, nothing else ---------------------------------
FROM ${PYTHON_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # Inside a container the metrics port must listen beyond loopback to be published.
    HEALTHD_DAEMON__METRICS_ADDRESS=0.0.0.0:9469 \
    HEALTHD_CONFIG=/etc/healthd/healthd.toml \
    # ${credential:NAME} reads $CREDENTIALS_DIRECTORY/NAME; Docker and Compose secrets are
    # mounted at /run/secrets/NAME, so the same config works unchanged.
    CREDENTIALS_DIRECTORY=/run/secrets

# A fixed numeric id, so that volume ownership and runAsNonRoot checks need no passwd lookup.
RUN groupadd --system --gid 10001 healthd \
    && useradd --system --uid 10001 --gid healthd --home-dir /var/lib/healthd --no-create-home \
        --shell /usr/sbin/nologin healthd \
    && mkdir -p /etc/healthd /var/lib/healthd \
    && chown healthd:healthd /var/lib/healthd

COPY --from=build /dist/ /tmp/dist/
RUN pip install --no-cache-dir /tmp/dist/*.whl && rm -rf /tmp/dist

USER 10001:10001
WORKDIR /var/lib/healthd
# The config is mounted read-only at /etc/healthd; the status file lives in a volume, so that a
# sidecar (nginx) can serve it and it survives a restart.
VOLUME ["/var/lib/healthd"]
# 9469: /metrics. 9470: job heartbeats (push_address), which stays on loopback until the
# operator sets HEALTHD_DAEMON__PUSH_ADDRESS=0.0.0.0:9470 (give each heartbeat a token then).
EXPOSE 9469 9470

# The status file is rewritten at least every status_file_refresh (5 s by default); 60 s
# without a rewrite means the event loop is stuck. Override if status_file is moved.
HEALTHCHECK --interval=30s --timeout=10s --start-period=90s --retries=2 \
    CMD ["python", "-m", "healthd.exporters.status_file", "--max-age", "60", "/var/lib/healthd/status.json"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["healthd"]
CMD ["run"]
