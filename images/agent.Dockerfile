# The flowmon agent: BCC from Debian, flowmon_contract and flowmon_agent in a venv that imports Debian's
# bcc, a generic kernel header tree, the Localhost seccomp profile the DaemonSet's init container installs.
# Build from the repository root (`make images` does this with podman):
#   docker build -f images/agent.Dockerfile -t flowmon/agent:0.1.0 .
# Behind a TLS-intercepting proxy, give pip its CA bundle: --secret id=pip-ca,src=/path/to/ca.crt
# The final stage holds only what the agent runs: no pip, compiler, docs, CLI or lab.

# --- the venv's third-party packages (pip lives and dies in this stage) ---
FROM debian:12-slim AS venv
COPY scripts/apt-packages.txt images/apt-install.sh images/agent-requirements.txt scripts/link-debian-bcc.sh /tmp/build/
RUN sh /tmp/build/apt-install.sh /tmp/build/apt-packages.txt base
RUN --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
    && python3 -m venv /opt/flowmon \
    && /opt/flowmon/bin/pip install --no-cache-dir -q -r /tmp/build/agent-requirements.txt \
    && /opt/flowmon/bin/pip uninstall -q -y pip setuptools \
    && bash /tmp/build/link-debian-bcc.sh /opt/flowmon

# --- the generic kernel header tree, from Debian's linux-headers packages (not their dependencies) ---
FROM debian:12-slim AS headers
COPY images/kernel-headers.txt images/make-header-tree.sh /tmp/build/
RUN apt-get update -qq \
    && mkdir /tmp/debs && cd /tmp/debs \
    && arch=$(apt-cache depends linux-headers-amd64 | awk '/Depends: linux-headers-.*-amd64$/ {print $2}') \
    && common=$(apt-cache depends "$arch" | awk '/Depends: linux-headers-.*-common$/ {print $2}') \
    && apt-get download -qq "$arch" "$common" \
    && for deb in *.deb; do dpkg-deb -x "$deb" /tmp/x; done \
    && sh /tmp/build/make-header-tree.sh /tmp/build/kernel-headers.txt /opt/kernel-headers \
       "/tmp/x/usr/src/$arch" "/tmp/x/usr/src/$common" \
    && echo "${arch#linux-headers-}" > /opt/kernel-headers/RELEASE \
    && rm -rf /tmp/debs /tmp/x /var/lib/apt/lists/*

# --- the agent ---
FROM debian:12-slim
COPY scripts/apt-packages.txt images/apt-install.sh /tmp/build/
RUN sh /tmp/build/apt-install.sh /tmp/build/apt-packages.txt agent && rm -rf /tmp/build
COPY --from=venv /opt/flowmon /opt/flowmon
COPY --from=headers /opt/kernel-headers /opt/flowmon/kernel-headers
COPY images/seccomp/flowmon-agent.json /opt/flowmon/seccomp/agent.json
COPY images/install-seccomp-profile.sh /usr/local/bin/flowmon-install-seccomp-profile
COPY images/agent-entrypoint.sh /usr/local/bin/flowmon-agent-entrypoint
# flowmon's own packages last: a source change rebuilds only these layers. Compiled here, because the
# root filesystem is read-only at run time.
COPY contract/flowmon_contract /opt/flowmon/lib/python3.11/site-packages/flowmon_contract
COPY kube/flowmon_kube /opt/flowmon/lib/python3.11/site-packages/flowmon_kube
COPY agent/flowmon_agent /opt/flowmon/lib/python3.11/site-packages/flowmon_agent
COPY bpf/ /opt/flowmon/bpf/
RUN /opt/flowmon/bin/python -m compileall -q /opt/flowmon/lib/python3.11/site-packages/flowmon_contract \
       /opt/flowmon/lib/python3.11/site-packages/flowmon_kube \
       /opt/flowmon/lib/python3.11/site-packages/flowmon_agent \
    && /opt/flowmon/bin/python -c "import bcc, flowmon_agent.main"
ENV FLOWMON_BPF_DIR=/opt/flowmon/bpf \
    FLOWMON_GENERIC_HEADERS=/opt/flowmon/kernel-headers \
    PATH=/opt/flowmon/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /
# uid 0 with only the capabilities the DaemonSet grants (flowmon_operator.builders); settings from env.
ENTRYPOINT ["/usr/local/bin/flowmon-agent-entrypoint", "/opt/flowmon/bin/python", "-m", "flowmon_agent"]
