"""Write the agent's Localhost seccomp profile: the runtime's default profile, evaluated for the agent's
capabilities on x86_64, plus bpf() and perf_event_open(), minus what containerd's default also denies.

Podman's and CRI-O's default profile (containers-common) and containerd's before 1.6.9 allow these two
only to CAP_SYS_ADMIN, which the agent does not get; containerd >= 1.6.9 and Docker >= 23 allow them to
CAP_BPF / CAP_PERFMON, which is what this profile does on every runtime. The output is plain OCI
(names, action, args, errnoRet), the format kubelet's Localhost profiles and podman both read.

    python3 images/seccomp/generate.py /usr/share/containers/seccomp.json > images/seccomp/flowmon-agent.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# The agent's capabilities (flowmon_operator.builders.AGENT_CAPABILITIES), as the profile names them.
CAPABILITIES = frozenset({"CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"})
ARCH = "amd64"
ADDED = ("bpf", "perf_event_open")  # the kernel still checks CAP_BPF / CAP_PERFMON on every call
# Allowed by containers-common's default, denied by containerd's without CAP_SYS_ADMIN/CAP_SYS_BOOT, and
# never called by the agent in a cluster (it reads conntrack in its own, the host's, network namespace).
REMOVED = frozenset(
    {"mount", "umount", "umount2", "unshare", "setns", "pivot_root", "reboot", "ptrace", "keyctl", "add_key",
     "request_key"}
)  # fmt: skip
OCI_KEYS = ("names", "action", "args", "errnoRet")


def applies(rule: dict) -> bool:
    """Whether a containers-common rule applies to the agent: its includes met, its excludes not."""
    includes, excludes = rule.get("includes") or {}, rule.get("excludes") or {}
    if "arches" in includes and ARCH not in includes["arches"]:
        return False
    if "caps" in includes and not set(includes["caps"]) <= CAPABILITIES:
        return False
    if "arches" in excludes and ARCH in excludes["arches"]:
        return False
    return not ("caps" in excludes and set(excludes["caps"]) <= CAPABILITIES)


def agent_profile(default: dict) -> dict:
    rules = []
    for rule in default["syscalls"]:
        if not applies(rule):
            continue
        names = [n for n in rule["names"] if n not in ADDED and n not in REMOVED]
        if names:
            rules.append({k: v for k, v in {**rule, "names": names}.items() if k in OCI_KEYS and v})
    rules.append({"names": list(ADDED), "action": "SCMP_ACT_ALLOW"})
    (x86,) = [arch for arch in default["archMap"] if arch["architecture"] == "SCMP_ARCH_X86_64"]
    return {
        "defaultAction": default["defaultAction"],
        "defaultErrnoRet": default.get("defaultErrnoRet", 1),
        "architectures": [x86["architecture"], *x86["subArchitectures"]],
        "syscalls": rules,
    }


def main(argv: list[str]) -> None:
    default = json.loads(Path(argv[1] if len(argv) > 1 else "/usr/share/containers/seccomp.json").read_text())
    json.dump(agent_profile(default), sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv)
