#!/bin/sh
# The agent image's entrypoint: choose the kernel header tree BCC compiles the BPF program against, then
# exec the command. The BPF code reads only tracepoint arguments, so any complete tree compiles it:
#   1. $FLOWMON_KERNEL_HEADERS: a directory, or `kheaders` (the kernel's own /sys/kernel/kheaders.tar.xz,
#      CONFIG_IKHEADERS, unpacked into /tmp);
#   2. the node's own headers at /lib/modules/$(uname -r)/build, when complete (the DaemonSet mounts the
#      host's /lib/modules and /usr/src read-only, so the usual `build` link resolves). BCC_KERNEL_SOURCE
#      stays unset: BCC then also finds Debian's split `source` tree itself, which naming `build` breaks;
#   3. /usr/src/kernels/$(uname -r) or /usr/src/linux-headers-$(uname -r), when complete;
#   4. the generic tree in the image ($FLOWMON_GENERIC_HEADERS, from Debian's linux-headers).
# FLOWMON_HOST_ROOT prefixes every searched node path (tests); FLOWMON_KERNEL_RELEASE overrides
# `uname -r` (tests). Exit 13 (flowmon_agent's "kernel headers" cause) when no tree is usable.
set -eu
ROOT=${FLOWMON_HOST_ROOT:-}
KREL=${FLOWMON_KERNEL_RELEASE:-$(uname -r)}
NODE=${NODE_NAME:-$(hostname)}
GENERIC=${FLOWMON_GENERIC_HEADERS:-/opt/flowmon/kernel-headers}
EXIT_HEADERS=13
case $(uname -m) in x86_64) ARCH=x86 ;; aarch64) ARCH=arm64 ;; *) ARCH=$(uname -m) ;; esac

say() { echo "flowmon-agent: $*" >&2; }
fail() {  # one line, in the log and as the pod's termination message
  say "$1"
  { echo "$1" >/dev/termination-log; } 2>/dev/null || true
  exit "$EXIT_HEADERS"
}

# complete BUILD [SOURCE]: what BCC needs of a configured tree; SOURCE is the split source half, if any.
complete() {
  src=${2:-$1}
  [ -f "$src/include/linux/kconfig.h" ] && [ -d "$src/arch/$ARCH/include" ] \
    && [ -f "$1/include/generated/autoconf.h" ] && [ -f "$1/include/generated/uapi/linux/version.h" ]
}

if [ -n "${FLOWMON_KERNEL_HEADERS:-}" ]; then
  if [ "$FLOWMON_KERNEL_HEADERS" = kheaders ]; then
    [ -f "$ROOT/sys/kernel/kheaders.tar.xz" ] \
      || fail "FLOWMON_KERNEL_HEADERS=kheaders but /sys/kernel/kheaders.tar.xz is missing on node $NODE (modprobe kheaders, or unset it to use the image's generic headers)"
    tree=/tmp/kheaders-$KREL
    rm -rf "$tree" && mkdir -p "$tree"
    xz -dc "$ROOT/sys/kernel/kheaders.tar.xz" | tar -x -C "$tree" \
      || fail "could not unpack /sys/kernel/kheaders.tar.xz into $tree (is /tmp writable and large enough?)"
    FLOWMON_KERNEL_HEADERS=$tree
  fi
  complete "$FLOWMON_KERNEL_HEADERS" \
    || fail "FLOWMON_KERNEL_HEADERS=$FLOWMON_KERNEL_HEADERS is not a complete header tree (needs include/linux/kconfig.h, include/generated/autoconf.h, arch/$ARCH/include)"
  export BCC_KERNEL_SOURCE="$FLOWMON_KERNEL_HEADERS"
  say "kernel $KREL, headers at $BCC_KERNEL_SOURCE (FLOWMON_KERNEL_HEADERS)"
  exec "$@"
fi

unset BCC_KERNEL_SOURCE
build=$ROOT/lib/modules/$KREL/build
source=$ROOT/lib/modules/$KREL/source
[ -d "$source" ] || source=$build
if complete "$build" "$source"; then
  say "kernel $KREL, the node's headers at $build$([ "$source" != "$build" ] && echo " and $source")"
  exec "$@"
fi
why="no headers at $build"
if [ -L "$build" ] && [ ! -e "$build" ]; then
  why="$build links to $(readlink "$build"), which is not mounted"
elif [ -d "$build" ]; then
  why="the headers at $build are incomplete"
fi
for tree in "$ROOT/usr/src/kernels/$KREL" "$ROOT/usr/src/linux-headers-$KREL"; do
  if complete "$tree"; then
    export BCC_KERNEL_SOURCE="$tree"
    say "kernel $KREL, the node's headers at $tree"
    exec "$@"
  fi
done
if complete "$GENERIC"; then
  export BCC_KERNEL_SOURCE="$GENERIC"
  say "kernel $KREL, the image's generic headers $(cat "$GENERIC/RELEASE" 2>/dev/null || true) ($why)"
  exec "$@"
fi
fail "no kernel header tree for kernel $KREL on node $NODE: $why, and the image's generic tree $GENERIC is missing. Install the node's headers (Debian/Ubuntu: apt install linux-headers-$KREL; Fedora/RHEL: dnf install kernel-devel-$KREL) or set FLOWMON_KERNEL_HEADERS"
