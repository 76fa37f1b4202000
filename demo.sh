#!/usr/bin/env bash
# The whole colab-remote flow on this one machine, as a demo (run as root on Debian/Ubuntu):
#   sudo bash demo.sh            # runs until Ctrl-C, then removes everything it made
#   sudo bash demo.sh --check    # proves it works and exits
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/bootstrap.sh
exec .venv/bin/colab-remote demo "$@"
