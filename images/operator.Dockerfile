# The flowmon operator (kopf): flowmon_contract and flowmon_operator in a venv. No BCC, no host access;
# runs as a non-root user on a read-only root filesystem.
# Build from the repository root (`make images` does this with podman):
#   docker build -f images/operator.Dockerfile -t flowmon/operator:0.1.0 .
# Behind a TLS-intercepting proxy, give pip its CA bundle: --secret id=pip-ca,src=/path/to/ca.crt

# --- the venv's third-party packages (pip lives and dies in this stage) ---
FROM debian:12-slim AS venv
COPY scripts/apt-packages.txt images/apt-install.sh images/operator-requirements.txt /tmp/build/
RUN sh /tmp/build/apt-install.sh /tmp/build/apt-packages.txt base
RUN --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
    && python3 -m venv /opt/flowmon \
    && /opt/flowmon/bin/pip install --no-cache-dir -q -r /tmp/build/operator-requirements.txt \
    && /opt/flowmon/bin/pip uninstall -q -y pip setuptools

# --- the operator ---
FROM debian:12-slim
COPY scripts/apt-packages.txt images/apt-install.sh /tmp/build/
RUN sh /tmp/build/apt-install.sh /tmp/build/apt-packages.txt operator && rm -rf /tmp/build
COPY --from=venv /opt/flowmon /opt/flowmon
COPY contract/flowmon_contract /opt/flowmon/lib/python3.11/site-packages/flowmon_contract
COPY kube/flowmon_kube /opt/flowmon/lib/python3.11/site-packages/flowmon_kube
COPY operator/flowmon_operator /opt/flowmon/lib/python3.11/site-packages/flowmon_operator
RUN /opt/flowmon/bin/python -m compileall -q /opt/flowmon/lib/python3.11/site-packages/flowmon_contract \
       /opt/flowmon/lib/python3.11/site-packages/flowmon_kube \
       /opt/flowmon/lib/python3.11/site-packages/flowmon_operator \
    && /opt/flowmon/bin/python -c "import flowmon_operator.main, kopf"
ENV PATH=/opt/flowmon/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /
USER 65532:65532
ENTRYPOINT ["/opt/flowmon/bin/python", "-m", "flowmon_operator"]
