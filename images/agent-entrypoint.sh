#!/bin/sh
# The agent image's entrypoint: find kernel headers for the running kernel on the host, tell BCC where
# they are (BCC_KERNEL_SOURCE), then exec the command. Without headers, stop with an error that says
# what to install: BCC cannot compile the BPF program, and a crash loop inside BCC says much less.
#
# The DaemonSet mounts the host's /lib/modules and /usr/src read-only at the same paths, so the usual
# `build` symlink (-> /usr/src/linux-headers-...) resolves. FLOWMON_HOST_ROOT prefixes every searched
# path (tests); FLOWMON_KERNEL_RELEASE overrides `uname -r` (tests); FLOWMON_KERNEL_HEADERS names a
# header tree to use before any other.
set -eu
ROOT=${FLOWMON_HOST_ROOT:-}
KREL=${FLOWMON_KERNEL_RELEASE:-$(uname -r)}
NODE=${NODE_NAME:-$(hostname)}

is_header_tree() {  # a configured header tree: what BCC's clang needs to include <linux/...>
  [ -f "$1/include/linux/kconfig.h" ] || [ -f "$1/Makefile" ]
}

found=""
for candidate in \
  "${FLOWMON_KERNEL_HEADERS:-}" \
  "$ROOT/lib/modules/$KREL/build" \
  "$ROOT/lib/modules/$KREL/source" \
  "$ROOT/usr/src/linux-headers-$KREL" \
  "$ROOT/usr/src/kernels/$KREL"; do
  if [ -n "$candidate" ] && is_header_tree "$candidate"; then
    found=$candidate
    break
  fi
done

if [ -n "$found" ]; then
  export BCC_KERNEL_SOURCE="$found"
  echo "flowmon-agent: kernel $KREL headers at $found" >&2
elif [ -f "$ROOT/sys/kernel/kheaders.tar.xz" ]; then
  # CONFIG_IKHEADERS: the kernel carries its own headers; BCC unpacks them into /tmp.
  echo "flowmon-agent: kernel $KREL headers from /sys/kernel/kheaders.tar.xz" >&2
else
  link=$(readlink "$ROOT/lib/modules/$KREL/build" 2>/dev/null || true)
  hint=""
  [ -n "$link" ] && hint=" ($ROOT/lib/modules/$KREL/build links to $link, which is missing: is /usr/src mounted?)"
  msg="flowmon-agent: no kernel headers for kernel $KREL on node $NODE$hint. BCC compiles the BPF program
against them. Install them on the host (Debian/Ubuntu: apt install linux-headers-$KREL;
Fedora/RHEL: dnf install kernel-devel-$KREL), or load the kheaders module (modprobe kheaders),
or mount a header tree and set FLOWMON_KERNEL_HEADERS to it."
  echo "$msg" >&2
  { echo "$msg" > /dev/termination-log; } 2>/dev/null || true
  exit 78  # EX_CONFIG
fi
exec "$@"
