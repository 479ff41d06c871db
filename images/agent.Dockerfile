# The flowmon agent: BCC from Debian, the flowmon package in a venv that imports Debian's bcc.
# Build from the repository root:  docker build -f images/agent.Dockerfile -t flowmon/agent:0.1.0 .
# Kernel headers are NOT in the image: they must match the node's kernel, so the DaemonSet mounts the
# host's /lib/modules and /usr/src and the entrypoint finds them (or stops with a clear error).
FROM debian:12-slim

COPY scripts/apt-packages.txt images/apt-install.sh /tmp/build/
RUN sh /tmp/build/apt-install.sh /tmp/build/apt-packages.txt base agent

WORKDIR /src
COPY pyproject.toml README.md ./
COPY contract/ contract/
COPY agent/ agent/
COPY operator/ operator/
COPY cli/ cli/
COPY lab/ lab/
COPY scripts/link-debian-bcc.sh /tmp/build/
RUN python3 -m venv /opt/flowmon \
    && /opt/flowmon/bin/pip install --no-cache-dir /src \
    && bash /tmp/build/link-debian-bcc.sh /opt/flowmon \
    && /opt/flowmon/bin/python -c "import bcc, flowmon_agent" \
    && rm -rf /src /tmp/build

# bpf_loader finds the C sources here (the installed package is not next to the repository's bpf/).
COPY bpf/ /opt/flowmon/bpf/
COPY images/agent-entrypoint.sh /usr/local/bin/flowmon-agent-entrypoint
ENV FLOWMON_BPF_DIR=/opt/flowmon/bpf \
    PATH=/opt/flowmon/bin:$PATH \
    PYTHONUNBUFFERED=1
WORKDIR /
# Runs as uid 0 with only the capabilities the DaemonSet grants (see flowmon_operator.builders).
ENTRYPOINT ["/usr/local/bin/flowmon-agent-entrypoint", "flowmon"]
CMD ["agent"]
