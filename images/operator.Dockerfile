# The flowmon operator (kopf): no BCC, no host access; runs as a non-root user on a read-only root fs.
# Build from the repository root:  docker build -f images/operator.Dockerfile -t flowmon/operator:0.1.0 .
FROM debian:12-slim

COPY scripts/apt-packages.txt images/apt-install.sh /tmp/build/
RUN sh /tmp/build/apt-install.sh /tmp/build/apt-packages.txt base && rm -rf /tmp/build

WORKDIR /src
COPY pyproject.toml README.md ./
COPY contract/ contract/
COPY agent/ agent/
COPY operator/ operator/
COPY cli/ cli/
COPY lab/ lab/
RUN python3 -m venv /opt/flowmon \
    && /opt/flowmon/bin/pip install --no-cache-dir /src \
    && /opt/flowmon/bin/python -c "import flowmon_operator, kopf" \
    && rm -rf /src

ENV PATH=/opt/flowmon/bin:$PATH \
    PYTHONUNBUFFERED=1
WORKDIR /
USER 65532:65532
ENTRYPOINT ["flowmon"]
CMD ["operator"]
