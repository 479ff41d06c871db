#!/bin/sh
# Copy the files named in LIST (images/kernel-headers.txt) into DEST, each from the first SOURCE tree
# that has it: one plain (not split) header tree that BCC_KERNEL_SOURCE can name. With Debian's split
# packages give the arch tree first (generated headers, config) and then the -common tree.
# Usage: make-header-tree.sh LIST DEST SOURCE...
set -eu
LIST=${1:?usage: make-header-tree.sh LIST DEST SOURCE...}
DEST=${2:?usage: make-header-tree.sh LIST DEST SOURCE...}
shift 2
[ $# -gt 0 ] || { echo "make-header-tree.sh: name at least one source tree" >&2; exit 2; }
missing=0
for rel in $(grep -v '^[[:space:]]*#' "$LIST"); do
  src=""
  for tree in "$@"; do
    if [ -f "$tree/$rel" ]; then src="$tree/$rel"; break; fi
  done
  if [ -z "$src" ]; then
    echo "make-header-tree.sh: $rel is in none of: $*" >&2
    missing=1
    continue
  fi
  mkdir -p "$DEST/$(dirname "$rel")"
  cp "$src" "$DEST/$rel"
done
[ "$missing" = 0 ] || exit 1
