#!/usr/bin/env bash
# Prepare a machine for the workbench: system packages, the .venv virtual environment
# and the de-identification key. Safe to run again: each step is skipped when its
# result is already in place, so a second run installs nothing.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
python=${PYTHON:-python3}
extras=${WORKBENCH_EXTRAS:-ml,federation,lab,dev}
state_dir=${WORKBENCH_HOME:-$root/.workbench}

say() { printf 'setup: %s\n' "$*"; }

# 1. System packages. Orthanc and PostgreSQL servers are started by the project itself,
#    never as system services; Chromium serves the notebook browser test.
missing=()
command -v Orthanc >/dev/null 2>&1 || missing+=(orthanc)
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    missing+=(postgresql)
fi
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
    sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo=(sudo)
        else
            say "missing system packages: ${missing[*]}; install them as root, then run again" >&2
            exit 1
        fi
    fi
    say "installing system packages: ${missing[*]}"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# 2. The virtual environment. PyTorch goes first, pinned, so that no other package
#    pulls a different multi-gigabyte build; torchvision lets timm install.
stamp=.venv/.workbench-setup
want=$( (cat pyproject.toml; echo "$extras") | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/python ]; then
    say "creating .venv"
    "$python" -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    if ! .venv/bin/python -c 'import torch, torchvision' >/dev/null 2>&1; then
        say "installing torch==2.14.1 torchvision==0.29.1"
        .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
    fi
    say "installing workbench[$extras]"
    .venv/bin/pip install -q -e ".[$extras]"
    echo "$want" > "$stamp"
else
    say ".venv is up to date"
fi

# 3. The de-identification key: random, readable by its owner only, never in git.
.venv/bin/workbench init --home "$state_dir"
