#!/usr/bin/env bash
# Idempotent setup of a fresh Debian 12 machine for flowmon: Debian packages, kernel headers for BCC,
# tracefs, and a .venv that imports Debian's bcc module. A second run changes nothing and takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'setup: %s\n' "$*" >&2; }
need_root() { [ "$(id -u)" -eq 0 ] || { log "must run as root (installs packages, mounts tracefs)"; exit 1; }; }

apt_updated=0
apt_install() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  need_root
  if [ $apt_updated -eq 0 ]; then apt-get update -qq; apt_updated=1; fi
  log "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# 1. Debian packages (one list, shared with the container images)
mapfile -t PKGS < <(grep -v '^\s*#' scripts/apt-packages.txt | grep -v '^\s*$')
apt_install "${PKGS[@]}"

# 2. Kernel headers: BCC compiles against /lib/modules/$(uname -r)/build. Use the running kernel's own
#    headers when the host has them (or Debian ships them); otherwise Debian's generic amd64 headers.
#    Our BPF code reads only tracepoint arguments, so a header/kernel version mismatch is harmless.
KREL=$(uname -r)
MODDIR=/lib/modules/$KREL
if [ ! -e "$MODDIR/build/include/linux/kconfig.h" ] && [ ! -e "$MODDIR/build/Makefile" ]; then
  if apt-cache policy "linux-headers-$KREL" 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    apt_install "linux-headers-$KREL"
  fi
fi
if [ ! -e "$MODDIR/build/Makefile" ]; then
  apt_install linux-headers-amd64
  ARCH_HDR=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  COMMON_HDR=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
  [ -n "$ARCH_HDR" ] && [ -n "$COMMON_HDR" ] || { log "no Debian kernel headers found under /usr/src"; exit 1; }
  need_root
  log "no headers for kernel $KREL: linking $MODDIR/build -> $ARCH_HDR"
  mkdir -p "$MODDIR"
  ln -sfn "$ARCH_HDR" "$MODDIR/build"
  ln -sfn "$COMMON_HDR" "$MODDIR/source"
fi

# 3. kubectl: the tests build every kustomization with `kubectl kustomize`, the real kustomize. It is part of
#    this machine kind's image (not in Debian 12); stop with a clear message rather than skip those tests.
command -v kubectl >/dev/null || { log "kubectl not found: install it (https://kubernetes.io/docs/tasks/tools/)"; exit 1; }

# 4. tracefs (tracepoint discovery and attachment)
if [ ! -d /sys/kernel/tracing/events ]; then
  need_root
  mount -t tracefs nodev /sys/kernel/tracing
fi

# 5. The venv, on Debian's python3, which imports Debian's bcc through a .pth file pointing at a folder
#    holding only the bcc package (not all of dist-packages). Never the unrelated PyPI package "bcc".
PY=/usr/bin/python3
if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  "$PY" -m venv .venv
fi
bash scripts/link-debian-bcc.sh .venv

# Reinstall Python dependencies only when pyproject.toml changes.
STAMP=.venv/.deps-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -e "$STAMP" ]; then
  log "installing Python dependencies"
  # (pip's notes about unreachable local mirrors are noise on some machines)
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | { grep -v 'is ignored: it is neither' || true; } >&2
  .venv/bin/python -m pip install -q -e '.[dev]' 2>&1 | { grep -v 'is ignored: it is neither' || true; } >&2
  rm -f .venv/.deps-*
  touch "$STAMP"
fi
.venv/bin/python -c 'import bcc, operator, flowmon_contract, flowmon_agent, flowmon_operator, flowmon_cli, flowmon_lab' \
  || { log "venv check failed: bcc or the flowmon packages do not import"; exit 1; }
