# The gateway. Engines are not dependencies of enginegate: build on an engine's image so the
# config's `command` (default `vllm serve`) finds it, e.g.
#   docker build --build-arg BASE=vllm/vllm-openai:v0.26.0 -t enginegate .
#   docker run --gpus all -p 8000:8000 -e ENGINEGATE_API_KEY=... \
#     -v $PWD/enginegate.yaml:/etc/enginegate/enginegate.yaml enginegate
# (set gateway.host: 0.0.0.0 in that file so the port is reachable from outside the container)
ARG BASE=python:3.12-slim
FROM ${BASE}
WORKDIR /opt/enginegate
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY backends ./backends
RUN python3 -m pip install --no-cache-dir ".[gpu]"
EXPOSE 8000
# exec form: enginegate is PID 1 and gets SIGTERM from `docker stop`, which drains and stops engines
ENTRYPOINT ["enginegate"]
CMD ["serve", "-c", "/etc/enginegate/enginegate.yaml"]
