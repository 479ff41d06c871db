"""The operator's settings: names, image and sizing of everything it creates (env prefix FLOWMON_)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from flowmon_contract.policy import DEFAULT_OPERATOR_NAMESPACE


class Resources(BaseModel):
    """Container requests and limits, as in a Pod spec."""

    requests: dict[str, str]
    limits: dict[str, str]


def _agent_resources() -> Resources:
    # BCC compiles the BPF program with LLVM at start: peak memory is far above the steady state,
    # so the limit leaves room for the compile while the request reflects the running agent.
    return Resources(
        requests={"cpu": "100m", "memory": "256Mi"},
        limits={"cpu": "1", "memory": "1Gi"},
    )


def _tolerate_everything() -> list[dict]:
    # Flows on an unmonitored node are invisible: the agent must run on every node, tainted or not.
    return [{"operator": "Exists"}]


class OperatorSettings(BaseSettings):
    """Every knob has a default that works with manifests/; override with FLOWMON_<FIELD> variables."""

    model_config = SettingsConfigDict(env_prefix="FLOWMON_", frozen=True, extra="ignore")

    operator_namespace: str = DEFAULT_OPERATOR_NAMESPACE
    cluster_domain: str = "cluster.local"
    agent_image: str = "flowmon/agent:0.1.0"
    agent_image_pull_policy: str = "IfNotPresent"
    agent_port: int = Field(default=9443, ge=1024, le=65535)
    agent_service_name: str = "flowmon-agent"
    agent_service_account: str = "flowmon-agent"
    daemonset_name: str = "flowmon-agent"
    configmap_name: str = "flowmon-policy"
    ca_secret_name: str = "flowmon-ca"
    serving_cert_secret_name: str = "flowmon-agent-tls"
    admin_token_secret_name: str = "flowmon-agent-admin"
    scrape_secret_prefix: str = "flowmon-scrape-"
    service_monitor_prefix: str = "flowmon-"
    resources: Resources = Field(default_factory=_agent_resources)
    tolerations: list[dict] = Field(default_factory=_tolerate_everything)
    node_selector: dict[str, str] = Field(default_factory=lambda: {"kubernetes.io/os": "linux"})
    priority_class_name: str | None = None  # e.g. system-node-critical, where quotas allow it
    agent_host_pid: bool = True  # adopt connections opened before the agent started (builders explains)
    # The agent's seccomp profile (docs/operator.md, "Least privilege"): Localhost (default; an init
    # container installs flowmon/agent.json, the runtime default plus bpf and perf_event_open, into
    # kubelet_seccomp_dir), RuntimeDefault (containerd >= 1.6.9 or Docker >= 23 only: their default allows
    # bpf/perf_event_open to CAP_BPF/CAP_PERFMON; CRI-O's does not), or Unconfined.
    agent_seccomp: Literal["Localhost", "RuntimeDefault", "Unconfined"] = "Localhost"
    kubelet_seccomp_dir: str = "/var/lib/kubelet/seccomp"  # kubelet's --root-dir + /seccomp
    max_unavailable: str = "10%"  # DaemonSets round percentages up: at least one node at a time
    # The period of the full cluster round (drift, agents that missed a push). One round for the cluster,
    # not per monitor: each agent is asked once per period.
    timer_interval_seconds: float = Field(default=30.0, gt=0)
    # Events within this window share one round (e.g. every monitor resumed at start).
    round_debounce_seconds: float = Field(default=0.3, ge=0)
    push_timeout_seconds: float = Field(default=5.0, gt=0)
    # TokenReview: ServiceAccounts ("namespace/name", e.g. a cluster Prometheus) that read every monitor with
    # their own token. Non-empty turns TokenReview on in the agents, which then need `tokenreviews: create`
    # (manifests/token-review). Empty (default): only the per-monitor scrape tokens.
    token_review_readers: list[
        Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-.a-z0-9]*[a-z0-9])?$")]
    ] = Field(default_factory=list)
    # cert-manager: "Issuer/<name>" (in operator_namespace) or "ClusterIssuer/<name>". Set: the operator
    # renders a cert-manager Certificate for the serving-cert Secret instead of issuing it, and trusts the
    # issued Secret's ca.crt (needs manifests/cert-manager). Empty (default): the operator's own CA.
    cert_manager_issuer: Annotated[
        str, Field(pattern=r"^((Cluster)?Issuer/[a-z0-9]([-.a-z0-9]*[a-z0-9])?)?$")
    ] = ""
    # Go durations, as cert-manager reads them: 90 days (cert-manager's default); renew 30 days before
    # expiry, as needs_renewal's margin for the operator's own certificates.
    cert_manager_duration: Annotated[str, Field(pattern=r"^([0-9]+(h|m|s))+$")] = "2160h"
    cert_manager_renew_before: Annotated[str, Field(pattern=r"^([0-9]+(h|m|s))+$")] = "720h"
    ca_validity_days: int = Field(default=3650, ge=1)
    cert_validity_days: int = Field(default=365, ge=1)

    @property
    def agent_labels(self) -> dict[str, str]:
        """The agent pods' labels: the DaemonSet's selector, the Service's and the ServiceMonitors'."""
        return {"app.kubernetes.io/name": "flowmon-agent", "app.kubernetes.io/component": "agent"}

    @property
    def token_review_usernames(self) -> list[str]:
        """The Kubernetes usernames TokenReview reports for token_review_readers."""
        return [f"system:serviceaccount:{ref.replace('/', ':', 1)}" for ref in self.token_review_readers]

    @property
    def cert_manager_issuer_ref(self) -> dict[str, str] | None:
        """The Certificate's issuerRef, or None when the operator issues the serving certificate itself."""
        if not self.cert_manager_issuer:
            return None
        kind, name = self.cert_manager_issuer.split("/", 1)
        return {"group": "cert-manager.io", "kind": kind, "name": name}

    @property
    def agent_service_dns(self) -> str:
        """The name agents' certificates carry and scrapers/pushers verify (tlsConfig.serverName)."""
        return f"{self.agent_service_name}.{self.operator_namespace}.svc"

    @property
    def agent_dns_names(self) -> list[str]:
        """Every name of the agent Service, for the serving certificate's SANs."""
        short = self.agent_service_name
        ns = self.operator_namespace
        return [short, f"{short}.{ns}", f"{short}.{ns}.svc", f"{short}.{ns}.svc.{self.cluster_domain}"]
