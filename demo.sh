#!/usr/bin/env bash
# The whole colab-remote flow on this one machine, as a demo (Debian/Ubuntu; needs root: as a
# user with sudo it asks sudo itself, in a root shell or a container it just runs):
#   bash demo.sh            # runs until Ctrl-C, then removes everything it made
#   bash demo.sh --check    # proves it works and exits
set -euo pipefail
if [ "$(id -u)" != 0 ]; then
  why="it installs packages and makes throwaway accounts"
  if command -v sudo >/dev/null 2>&1; then
    echo "demo.sh: needs root ($why); running it with sudo" >&2
    exec sudo bash "$0" "$@"
  fi
  echo "demo.sh: needs root ($why) and this machine has no sudo: run it from a root shell" \
       "(su -, then bash $0)" >&2
  exit 1
fi
cd "$(dirname "$0")"
bash scripts/bootstrap.sh
exec .venv/bin/colab-remote demo "$@"
