#!/usr/bin/env bash
# Set up this checkout on a fresh Debian/Ubuntu machine, as root: the system programs colab-remote
# drives (OpenSSH server and client, rsync, ...), a virtual environment in .venv (Debian 12 and
# Ubuntu 24.04 refuse pip into the system Python, PEP 668) and the package in it.
#   bash scripts/bootstrap.sh          # the package
#   bash scripts/bootstrap.sh test     # the package and what the tests need
set -euo pipefail
cd "$(dirname "$0")/.."
extra=${1:-}

if [ "$(id -u)" != 0 ]; then
  echo "bootstrap: run as root (it installs system packages): sudo bash $0 $*" >&2
  exit 1
fi

need=()
programs="sshd:openssh-server ssh:openssh-client rsync:rsync setsid:util-linux"
if [ "$extra" = test ]; then
  programs="$programs ip:iproute2 git:git autossh:autossh lsyncd:lsyncd"
fi
for pair in $programs; do
  prog=${pair%%:*} pkg=${pair#*:}
  command -v "$prog" >/dev/null 2>&1 || [ -x "/usr/sbin/$prog" ] || need+=("$pkg")
done
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || need+=(python3)
if command -v "$PY" >/dev/null 2>&1 && ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  need+=(python3-venv)
fi

if [ ${#need[@]} -gt 0 ]; then
  echo "== installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Without systemd the openssh-server package would start the system's sshd on port 22:
  # a policy-rc.d that says no keeps it from starting (removed again afterwards).
  added_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    added_policy=1
  fi
  trap 'if [ "$added_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi' EXIT
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if [ "$extra" = test ]; then
  .venv/bin/python -m pip install -q -e '.[test]'
else
  .venv/bin/python -m pip install -q -e .
fi
