#!/bin/sh
# Install the Debian packages of the named sections of scripts/apt-packages.txt (the list setup.sh
# installs whole), so an image and the development machine cannot drift apart.
# Usage: apt-install.sh [--print] LIST SECTION...   (--print: list the packages, install nothing)
set -eu
PRINT=0
if [ "${1:-}" = "--print" ]; then PRINT=1; shift; fi
LIST=${1:?usage: apt-install.sh [--print] LIST SECTION...}
shift
[ $# -gt 0 ] || { echo "apt-install.sh: name at least one section" >&2; exit 2; }
PKGS=""
for SECTION in "$@"; do
  FOUND=$(awk -v want="$SECTION" '
    /^## section: / { current = $3; if (current == want) seen = 1; next }
    /^[[:space:]]*(#|$)/ { next }
    current == want { print $1 }
    END { if (!seen) exit 3 }
  ' "$LIST") || { echo "apt-install.sh: no section '$SECTION' in $LIST" >&2; exit 3; }
  PKGS="$PKGS $FOUND"
done
if [ "$PRINT" = 1 ]; then
  for p in $PKGS; do echo "$p"; done
  exit 0
fi
apt-get update
# shellcheck disable=SC2086 # word splitting of the package list is intended
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $PKGS
rm -rf /var/lib/apt/lists/*
