# telepipe daemon image. Mirrors the README install: a Python 3.11 environment,
# `pip install .` of this repository, the span wire reader compiled into numba's cache,
# then `telepipe run` (listening on all interfaces).
FROM python:3.11-slim-bookworm

WORKDIR /opt/telepipe
COPY pyproject.toml README.md telepipe.example.toml ./
COPY pipeline/ pipeline/
COPY sources/ sources/
COPY sinks/ sinks/
COPY telepipe/ telepipe/
RUN pip install --no-cache-dir . \
    && python -I -m pipeline.compiled \
    && useradd --system --uid 10001 --home-dir /var/lib/telepipe --create-home telepipe

USER 10001
VOLUME ["/var/lib/telepipe"]
EXPOSE 4317 9464
ENTRYPOINT ["telepipe"]
CMD ["run", "--otlp-grpc", "0.0.0.0:4317", "--http", "0.0.0.0:9464", "--data-dir", "/var/lib/telepipe"]
