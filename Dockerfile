# The dispatcher, with the example receiver beside it (docker-compose.yml runs it from this image as
# `python -m example_receiver`; it is not part of the dispatcher's wheel). It needs a RabbitMQ
# broker: 4.x (docker-compose.yml runs rabbitmq:4-management) or 3.10-3.13, see README "Broker
# versions".
#   docker build -t bounce-dispatcher .
#   docker run -v $PWD/config/docker.toml:/etc/dispatcher/dispatcher.toml:ro \
#              -e DISPATCHER_BROKER_URL=amqp://user:pass@rabbitmq:5672/ -p 8088:8088 bounce-dispatcher
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A system user with a fixed uid, so volume ownership is predictable.
RUN groupadd --system --gid 10001 dispatcher \
 && useradd --system --uid 10001 --gid dispatcher --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin dispatcher

WORKDIR /src
COPY pyproject.toml README.md ./
COPY dispatcher ./dispatcher
COPY signing ./signing
# The example receiver is not in the wheel: it stays importable from its own directory.
COPY example_receiver /opt/bounce/example_receiver
ENV PYTHONPATH=/opt/bounce
RUN pip install './signing[aiohttp,fast]' . \
 && rm -rf /src \
 && mkdir -p /etc/dispatcher /var/lib/dispatcher/keys /data \
 && chown -R dispatcher:dispatcher /var/lib/dispatcher /data \
 && chmod 700 /var/lib/dispatcher/keys

WORKDIR /var/lib/dispatcher
USER dispatcher

# Signing keys (private: mount a volume or a secret, never bake them into the image).
VOLUME ["/var/lib/dispatcher/keys"]
ENV DISPATCHER_CONFIG=/etc/dispatcher/dispatcher.toml
EXPOSE 8088

# slim has no curl: ask /healthz with Python's standard library ([http].listen must be :8088).
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8088/healthz', timeout=2)"]

# SIGTERM (docker stop) drains in-flight deliveries; give it drain_timeout plus a margin
# (docker stop -t / compose stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["dispatcher"]
CMD ["run"]
