#!/bin/sh
# The DaemonSet's init container: put the agent's seccomp profile where kubelet looks for Localhost
# profiles (the host's /var/lib/kubelet/seccomp, mounted at $1), as flowmon/agent.json. Written to a
# temporary name and renamed, so that kubelet never reads half a file; unchanged files are left alone.
# Needs no capability: uid 0 owns the directory.
set -eu
DIR=${1:?usage: flowmon-install-seccomp-profile KUBELET_SECCOMP_DIR}/flowmon
SRC=/opt/flowmon/seccomp/agent.json
mkdir -p "$DIR"
if cmp -s "$SRC" "$DIR/agent.json"; then
  echo "flowmon: seccomp profile $DIR/agent.json is current"
  exit 0
fi
cp "$SRC" "$DIR/.agent.json.tmp"
mv "$DIR/.agent.json.tmp" "$DIR/agent.json"
echo "flowmon: installed seccomp profile $DIR/agent.json"
