#!/usr/bin/env bash
# Make a venv import Debian's bcc module (python3-bpfcc) and nothing else from Debian's dist-packages:
# a .pth file points at a folder holding only a link to the bcc package. Never the unrelated PyPI "bcc".
# Usage: scripts/link-debian-bcc.sh VENV_DIR   (used by scripts/setup.sh and images/agent.Dockerfile)
set -euo pipefail
VENV=$(cd "${1:?usage: $0 VENV_DIR}" && pwd)
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p "$VENV/debian-bcc"
ln -sfn /usr/lib/python3/dist-packages/bcc "$VENV/debian-bcc/bcc"
echo "$VENV/debian-bcc" > "$SITE/debian_bcc.pth"
