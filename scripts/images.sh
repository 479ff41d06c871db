#!/usr/bin/env bash
# `make images`: build flowmon/agent:<version> and flowmon/operator:<version> from images/*.Dockerfile
# with podman (daemonless, Debian's package). The base debian:12-slim is made locally when missing
# (scripts/debian-base-image.sh). An image whose inputs did not change is not rebuilt: each carries the
# hash of its build context as a label, compared first (well under a second when nothing changed).
# Usage: scripts/images.sh [agent|operator]...   (default: both)   Env: FLOWMON_IMAGE_CA (pip's CA bundle)
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf 'images: %s\n' "$*" >&2; }
[ "$(id -u)" -eq 0 ] || { log "must run as root (podman storage, debootstrap)"; exit 1; }
command -v podman >/dev/null || { log "podman is missing: run make setup"; exit 1; }

VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n 1)
CA=${FLOWMON_IMAGE_CA:-/etc/ssl/certs/ca-certificates.crt}
LABEL=io.flowmon.context
# What each image is built from (its Dockerfile's COPY sources): a change in any rebuilds it.
COMMON=(pyproject.toml README.md scripts/apt-packages.txt images/apt-install.sh)
declare -A INPUTS=(
  [agent]="images/agent.Dockerfile images/agent-entrypoint.sh images/agent-requirements.txt images/kernel-headers.txt images/make-header-tree.sh images/seccomp scripts/link-debian-bcc.sh contract kube agent bpf"
  [operator]="images/operator.Dockerfile images/operator-requirements.txt contract kube operator"
)

context_hash() {  # the files' paths and contents, without caches
  # shellcheck disable=SC2086 # the input list is split on purpose
  find "${COMMON[@]}" $1 -type f -not -path '*/__pycache__/*' -not -name '*.pyc' 2>/dev/null | LC_ALL=C sort \
    | xargs sha256sum | sha256sum | cut -c1-32
}

bash scripts/debian-base-image.sh
for name in "${@:-agent operator}"; do
  for image in $name; do
    [ -n "${INPUTS[$image]:-}" ] || { log "unknown image $image (agent, operator)"; exit 2; }
    tag=flowmon/$image:$VERSION
    want=$(context_hash "${INPUTS[$image]}")
    have=$(podman image inspect --format "{{index .Labels \"$LABEL\"}}" "$tag" 2>/dev/null || true)
    if [ "$have" = "$want" ]; then
      log "$tag is up to date"
      continue
    fi
    log "building $tag"
    secret=()
    [ -s "$CA" ] && secret=(--secret "id=pip-ca,src=$CA")
    # chroot isolation and the host's network: no cgroup or CNI setup in the build (hybrid cgroups here)
    podman build --isolation chroot --network host --pull=never --layers "${secret[@]}" \
      --label "$LABEL=$want" -f "images/$image.Dockerfile" -t "$tag" . >"/tmp/flowmon-build-$image.log" 2>&1 \
      || { tail -n 30 "/tmp/flowmon-build-$image.log" >&2; log "building $tag failed (log: /tmp/flowmon-build-$image.log)"; exit 1; }
    log "built $tag ($(podman image inspect --format '{{.Size}}' "$tag") bytes)"
  done
done
