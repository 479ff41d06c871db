"""A kubelet stand-in: run a pod template's containers under runc (podman) the way kubelet would.

What kubelet does and this does too: init containers to completion, then the container; the image's
entrypoint unless `command` replaces it, `args` after it; env with `$(VAR)` expansion and `fieldRef`
values (spec.nodeName, status.podIP, metadata.*); capabilities drop/add; runAsUser; readOnlyRootFilesystem;
allowPrivilegeEscalation (no_new_privs); the seccomp profile (RuntimeDefault: the runtime's default,
Localhost: a file under kubelet's seccomp directory, Unconfined); hostNetwork, hostPID; hostPath (with
type DirectoryOrCreate), Secret, ConfigMap and emptyDir volumes as files, readOnly mounts; the service
account token volume and KUBERNETES_SERVICE_* variables; a host file as /dev/termination-log; resource
limits; httpGet probes as kubelet sends them (HTTPS without verifying the certificate).
The node is this host; `host_paths` replaces hostPath sources (a node without kernel headers).
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import resource
import secrets
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from flowmon_agent import netns

PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
TERMINATION_LOG = "/dev/termination-log"


@dataclass
class Node:
    """This host as a Kubernetes node, and where the stand-in keeps its pods' files."""

    name: str
    ip: str
    root: Path  # kubelet's directory: volumes, termination logs, the seccomp directory
    api_host: str  # KUBERNETES_SERVICE_HOST / _PORT: the API server pods reach
    api_port: int
    api_ca_pem: str
    host_paths: Mapping[str, Path] = field(default_factory=dict)  # hostPath source -> what stands in for it

    @property
    def seccomp_dir(self) -> Path:
        return self.root / "seccomp"

    def host_path(self, path: str) -> Path:
        for prefix, replacement in self.host_paths.items():
            if path == prefix or path.startswith(prefix + "/"):
                return replacement / path[len(prefix) :].lstrip("/")
        if path == "/var/lib/kubelet/seccomp":  # kubelet's own directory is the stand-in's
            return self.seccomp_dir
        return Path(path)


def ulimits() -> list[str]:
    """nofile and nproc at or below this host's hard limits: runc cannot raise them for a container
    without CAP_SYS_RESOURCE (measured here: nproc 65536 fails under a hard limit of 96367, 32768 works)."""
    nofile = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 16384)
    nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[1], 32768)
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) references to variables defined earlier; $$ escapes; unknown ones stay."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
        lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]),
        value,
    )


@dataclass(frozen=True)
class PodNetwork:
    """A pod's own network namespace (a lab pod, /run/netns/NAME) and its IP. Probes are sent from
    `probe_from`, another namespace on the same switch: this host has no route to the lab's addresses."""

    netns: str
    ip: str
    probe_from: str


STATE_FORMAT = "{{.State.Running}} {{.State.ExitCode}}"


class Pod:
    """One pod of a template on `node`: `objects` holds the Secrets and ConfigMaps it mounts; `network`
    is its namespace unless the template asks for hostNetwork."""

    def __init__(
        self,
        node: Node,
        name: str,
        namespace: str,
        template: Mapping,
        objects: Sequence[Mapping],
        sa_token: str,
        network: PodNetwork | None = None,
    ) -> None:
        self.node, self.name, self.namespace, self.network = node, name, namespace, network
        self.spec = template["spec"]
        self.labels = template.get("metadata", {}).get("labels", {})
        self.objects = objects
        self.sa_token = sa_token
        self.dir = node.root / "pods" / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.started: list[str] = []
        # podman's container names are host-wide: a run that was killed must not block the next one
        self.run_id = secrets.token_hex(3)

    def container_name(self, name: str) -> str:
        return f"{self.name}-{self.run_id}-{name}"

    # --- volumes ------------------------------------------------------------------------------------------
    def _object(self, kind: str, name: str) -> Mapping:
        found = [o for o in self.objects if o["kind"] == kind and o["metadata"]["name"] == name]
        assert found, f"the pod mounts {kind} {name}, which the render did not produce"
        return found[0]

    def _files(self, name: str, files: Mapping[str, bytes], mode: int) -> Path:
        where = self.dir / "volumes" / name
        where.mkdir(parents=True, exist_ok=True)
        for key, data in files.items():
            (where / key).write_bytes(data)
            (where / key).chmod(mode)
        return where

    def volume_source(self, volume: Mapping) -> Path:
        name = volume["name"]
        if "hostPath" in volume:
            path = self.node.host_path(volume["hostPath"]["path"])
            if volume["hostPath"].get("type") == "DirectoryOrCreate":
                path.mkdir(parents=True, exist_ok=True)
            assert path.exists(), f"hostPath {path} is missing on this node"
            return path
        if "configMap" in volume:
            data = self._object("ConfigMap", volume["configMap"]["name"])["data"]
            return self._files(
                name, {k: v.encode() for k, v in data.items()}, volume["configMap"].get("defaultMode", 0o644)
            )
        if "secret" in volume:
            data = self._object("Secret", volume["secret"]["secretName"])["data"]
            files = {k: base64.b64decode(v) for k, v in data.items()}
            return self._files(name, files, volume["secret"].get("defaultMode", 0o644))
        if "emptyDir" in volume:
            path = self.dir / "volumes" / name
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o777)
            return path
        raise AssertionError(f"volume kind not supported by the stand-in: {volume}")

    def service_account_volume(self) -> Path:
        return self._files(
            "kube-api-access",
            {
                "token": self.sa_token.encode(),
                "ca.crt": self.node.api_ca_pem.encode(),
                "namespace": self.namespace.encode(),
            },
            0o644,
        )

    @property
    def ip(self) -> str:
        if self.spec.get("hostNetwork"):
            return self.node.ip
        assert self.network is not None, "a pod without hostNetwork needs a PodNetwork"
        return self.network.ip

    # --- env ------------------------------------------------------------------------------------------------
    def field(self, path: str) -> str:
        values = {
            "spec.nodeName": self.node.name,
            "status.podIP": self.ip,
            "status.hostIP": self.node.ip,
            "metadata.name": self.name,
            "metadata.namespace": self.namespace,
            "spec.serviceAccountName": self.spec.get("serviceAccountName", "default"),
        }
        assert values.get(path), f"fieldRef {path} not supported by the stand-in"
        return values[path]

    def env(self, container: Mapping) -> dict[str, str]:
        env = {
            "KUBERNETES_SERVICE_HOST": self.node.api_host,
            "KUBERNETES_SERVICE_PORT": str(self.node.api_port),
        }
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = expand(item["value"], env)
            else:
                env[item["name"]] = self.field(item["valueFrom"]["fieldRef"]["fieldPath"])
        return env

    # --- the container ----------------------------------------------------------------------------------
    def seccomp_option(self, container: Mapping) -> list[str]:
        profile = container.get("securityContext", {}).get("seccompProfile") or self.spec.get(
            "securityContext", {}
        ).get("seccompProfile", {"type": "Unconfined"})  # kubelet's default without SeccompDefault
        if profile["type"] == "RuntimeDefault":
            return []  # the runtime's own default profile (podman's; containerd's would be its own)
        if profile["type"] == "Unconfined":
            return ["--security-opt", "seccomp=unconfined"]
        path = self.node.seccomp_dir / profile["localhostProfile"]
        assert path.is_file(), f"Localhost seccomp profile {path} does not exist (kubelet would refuse)"
        return ["--security-opt", f"seccomp={path}"]

    def run_args(self, container: Mapping, image_id: str, *, detach: bool) -> list[str]:
        # the pod's securityContext is the default of each container's (runAsUser, seccompProfile, ...)
        security = {**self.spec.get("securityContext", {}), **container.get("securityContext", {})}
        assert not security.get("privileged"), "the stand-in runs no privileged containers"
        args = [*PODMAN, "run", "--name", self.container_name(container["name"]), "--pull", "never"]
        args += ulimits()
        args += ["-d"] if detach else []
        if self.spec.get("hostNetwork"):
            args += ["--network", "host"]
        else:
            assert self.network is not None, "a pod without hostNetwork needs a PodNetwork"
            args += ["--network", f"ns:/run/netns/{self.network.netns}"]
        if self.spec.get("hostPID"):
            args += ["--pid", "host"]
        caps = security.get("capabilities", {})
        args += [f"--cap-drop={c}" for c in caps.get("drop", [])] + [
            f"--cap-add={c}" for c in caps.get("add", [])
        ]
        if "runAsUser" in security:
            user = str(security["runAsUser"])
            args += ["--user", f"{user}:{security['runAsGroup']}" if "runAsGroup" in security else user]
        if security.get("readOnlyRootFilesystem"):
            args += ["--read-only", "--read-only-tmpfs=false"]  # kubelet adds no tmpfs of its own
        if security.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        args += self.seccomp_option(container)
        limits = container.get("resources", {}).get("limits", {})
        if "memory" in limits:
            args += ["--memory", limits["memory"].replace("Mi", "m").replace("Gi", "g")]
        if "cpu" in limits:
            cpu = limits["cpu"]
            args += ["--cpus", str(int(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu))]
        volumes = {v["name"]: v for v in self.spec.get("volumes", [])}
        for mount in container.get("volumeMounts", []):
            source = self.volume_source(volumes[mount["name"]])
            args += ["-v", f"{source}:{mount['mountPath']}" + (":ro" if mount.get("readOnly") else "")]
        if self.spec.get("automountServiceAccountToken", True):
            args += ["-v", f"{self.service_account_volume()}:{SA_DIR}:ro"]
        log = self.termination_log(container["name"])
        log.write_text("")
        args += ["-v", f"{log}:{TERMINATION_LOG}"]
        for key, value in self.env(container).items():
            args += ["-e", f"{key}={value}"]
        if "command" in container:
            args += ["--entrypoint", json.dumps(container["command"])]
        return [*args, image_id, *container.get("args", [])]

    def termination_log(self, container: str) -> Path:
        return self.dir / f"{container}.termination-log"

    def run_init_containers(self, timeout: float = 60) -> None:
        for container in self.spec.get("initContainers", []):
            done = subprocess.run(
                self.run_args(container, container["image"], detach=False),
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            self.started.append(self.container_name(container["name"]))
            assert done.returncode == 0, f"init container {container['name']}: {done.stdout}{done.stderr}"

    def start(self, name: str) -> float:
        """Start the named container (detached); the monotonic time it was started at."""
        (container,) = [c for c in self.spec["containers"] if c["name"] == name]
        args = self.run_args(container, container["image"], detach=True)
        started = time.monotonic()
        subprocess.run(args, check=True, capture_output=True, timeout=60)
        self.started.append(self.container_name(name))
        return started

    def container(self, name: str) -> Mapping:
        (container,) = [c for c in self.spec["containers"] if c["name"] == name]
        return container

    def state(self, name: str) -> tuple[bool, int]:
        out = subprocess.run(
            [*PODMAN, "inspect", "--format", STATE_FORMAT, self.container_name(name)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        return out[0] == "true", int(out[1])

    def wait_exit(self, name: str, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while (state := self.state(name))[0]:
            assert time.monotonic() < deadline, f"{name} still runs after {timeout} s"
            time.sleep(0.2)
        return state[1]

    def logs(self, name: str) -> str:
        done = subprocess.run([*PODMAN, "logs", self.container_name(name)], capture_output=True, text=True)
        return done.stdout + done.stderr

    # --- probes -----------------------------------------------------------------------------------------
    def probe(self, name: str, kind: str) -> int | None:
        """One httpGet probe of the container as kubelet sends it: its HTTP status, None if no answer."""
        container = self.container(name)
        get = container[kind]["httpGet"]
        port = get["port"]
        if isinstance(port, str):
            (port,) = [p["containerPort"] for p in container.get("ports", []) if p["name"] == port]
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # kubelet does not verify
        url = f"{get.get('scheme', 'HTTP').lower()}://{get.get('host', self.ip)}:{port}{get['path']}"
        where = contextlib.nullcontext()
        if not self.spec.get("hostNetwork") and self.network is not None:
            where = netns.entered(f"/run/netns/{self.network.probe_from}")
        timeout = container[kind].get("timeoutSeconds", 1)
        try:
            with where, urllib.request.urlopen(url, timeout=timeout, context=context) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None

    def wait_ready(self, name: str, timeout: float) -> None:
        """Until the startup probe and then the readiness probe succeed (200..399), or the container ends;
        a container with neither is waited for through its liveness probe."""
        deadline = time.monotonic() + timeout
        container = self.container(name)
        kinds = [k for k in ("startupProbe", "readinessProbe") if k in container] or ["livenessProbe"]
        for kind in kinds:
            while not (200 <= (self.probe(name, kind) or 0) < 400):
                running, code = self.state(name)
                assert running, f"{name} exited with {code}:\n{self.logs(name)}"
                assert time.monotonic() < deadline, f"{name} not ready after {timeout} s:\n{self.logs(name)}"
                time.sleep(0.1)

    def remove(self) -> None:
        for container in reversed(self.started):
            with contextlib.suppress(subprocess.SubprocessError):
                subprocess.run([*PODMAN, "rm", "-f", "-t", "5", container], capture_output=True, timeout=60)
        self.started.clear()
