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
  echo "bootstrap: run as root (it installs system packages): sudo bash $0 $*, or from a root shell" >&2
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

# pip's own output goes to a log (shown when it fails); a terminal sees which package it is at.
# PYTHONWARNINGS: setuptools boxes a note about editable installs into every install; not for us.
pip_install() {
  local log=.venv/bootstrap-pip.log rc
  set +e
  PYTHONWARNINGS="ignore:Editable installation" .venv/bin/python -m pip install --progress-bar off "$@" \
    2>&1 | tee -a "$log" | if [ -t 1 ]; then
      awk '/^Collecting /{n++; printf "\r   %d packages, now %s\033[K", n, $2; fflush()}
           END{if (n) printf "\r\033[K"}'
    else cat >/dev/null; fi
  rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" != 0 ]; then
    echo "bootstrap: pip install $* failed (exit $rc); the end of $log:" >&2
    tail -n 25 "$log" >&2
    exit "$rc"
  fi
}

# Re-runs skip pip when pyproject.toml is what was installed (the code itself is installed
# editable: changes to it need no reinstall).
target=.; [ "$extra" = test ] && target='.[test]'
stamp="pyproject $(sha256sum pyproject.toml | cut -c1-16) $target"
if [ -x .venv/bin/python ] && [ -f .venv/.bootstrap-stamp ] && \
   { [ "$(cat .venv/.bootstrap-stamp)" = "$stamp" ] || \
     { [ "$target" = . ] && [ "$(cat .venv/.bootstrap-stamp)" = "${stamp% .}"' .[test]' ]; }; } && \
   .venv/bin/python -c 'import colab_remote' >/dev/null 2>&1; then
  echo "== .venv is up to date (pyproject.toml unchanged since its install; the code is linked, not copied)"
  exit 0
fi
started=$SECONDS
if [ ! -x .venv/bin/python ]; then
  echo "== creating the virtual environment .venv"
  "$PY" -m venv .venv
fi
rm -f .venv/.bootstrap-stamp .venv/bootstrap-pip.log
what="colab-remote"; [ "$extra" = test ] && what="colab-remote and what its tests need"
echo "== installing $what into .venv with pip (about 30 s the first time; log: .venv/bootstrap-pip.log)"
pip_install --upgrade pip
pip_install -e "$target"
echo "$stamp" > .venv/.bootstrap-stamp
echo "== .venv ready ($((SECONDS - started)) s)"
