#!/usr/bin/env bash
# JupyterLab for the workbench, as `make lab` starts it.
#
# It listens on 127.0.0.1 only, behind a random token printed with the URL, and
# opens the notebooks/ folder with the .venv Python as its kernel. It downloads
# nothing: the extension manager is read-only and disabled, and JupyterLab's news
# and update checks are off. Settings, workspaces and runtime files live in
# <workbench home>/jupyter (default .workbench/jupyter), never in ~/.jupyter.
# Ctrl-C stops the server and its kernels without a confirmation prompt.
#
# Usage: scripts/lab.sh [--port PORT] [--notebooks DIR]
#   WORKBENCH_LAB_PORT    port, default 8888
#   WORKBENCH_LAB_TOKEN   token to use instead of a random one (tests set it)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
python="$root/.venv/bin/python"
port=${WORKBENCH_LAB_PORT:-8888}
notebooks="$root/notebooks"

# The help text is the comment block at the top of this file.
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

while [ $# -gt 0 ]; do
    case $1 in
        --port) port=${2:?--port needs a number}; shift 2 ;;
        --notebooks) notebooks=${2:?--notebooks needs a folder}; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "lab: unknown option $1; see scripts/lab.sh --help" >&2; exit 2 ;;
    esac
done

if [ ! -x "$python" ]; then
    echo "lab: $python not found; run 'make setup' first" >&2
    exit 1
fi
if ! [[ $port =~ ^[0-9]+$ ]] || [ "$port" -lt 1 ] || [ "$port" -gt 65535 ]; then
    echo "lab: port '$port' is not a number from 1 to 65535" >&2
    exit 2
fi
if [ ! -d "$notebooks" ]; then
    echo "lab: notebook folder $notebooks does not exist" >&2
    exit 1
fi
notebooks=$(cd "$notebooks" && pwd)

# 1. Jupyter's state folders, readable by their owner only: the runtime folder
#    contains the server's token. The umask is restored afterwards, so that notebooks
#    the server saves keep the usual permissions.
home=${WORKBENCH_HOME:-$root/.workbench}
state="$home/jupyter"
saved_umask=$(umask)
umask 077
mkdir -p "$state/config/labconfig" "$state/data" "$state/runtime" \
    "$state/lab/workspaces" \
    "$state/lab/user-settings/@jupyterlab/apputils-extension"

# 2. Disable the extension manager and the news and update notifications in the
#    page, and keep a user who re-enables them in the settings from fetching news.
cat > "$state/config/labconfig/page_config.json" <<'EOF'
{
  "disabledExtensions": {
    "@jupyterlab/extensionmanager-extension": true,
    "@jupyterlab/apputils-extension:announcements": true
  }
}
EOF
settings="$state/lab/user-settings/@jupyterlab/apputils-extension"
cat > "$settings/notification.jupyterlab-settings" <<'EOF'
{
  "checkForUpdates": false,
  "fetchNews": "false"
}
EOF
umask "$saved_umask"

# 3. The kernel: register the .venv Python under the standard name python3, inside
#    the virtual environment, unless it is registered already.
kernel_python=$("$python" - <<'EOF'
import json, sys
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
try:
    spec = KernelSpecManager().get_kernel_spec("python3")
    print(spec.argv[0])
except (NoSuchKernel, IndexError, json.JSONDecodeError):
    print("")
EOF
)
if [ "$kernel_python" != "$python" ]; then
    "$python" -m ipykernel install --sys-prefix --name python3 \
        --display-name "Python 3 (workbench)" >/dev/null
    echo "lab: registered the .venv Python as kernel python3"
fi

# 4. The token: given, or 48 random hex digits.
token=${WORKBENCH_LAB_TOKEN:-$("$python" -c 'import secrets; print(secrets.token_hex(24))')}

root_flag=()
if [ "$(id -u)" -eq 0 ]; then
    root_flag=(--allow-root)
fi

echo "lab: notebooks in $notebooks"
echo "lab: open http://127.0.0.1:$port/lab?token=$token"
echo "lab: stop with Ctrl-C"

# 5. The server replaces this shell, so its PID is the server's and Ctrl-C reaches
#    it directly. Variables set here apply to it and to its kernels.
unset JUPYTER_PATH JUPYTER_CONFIG_PATH JUPYTER_NO_CONFIG
exec env \
    JUPYTER_TOKEN="$token" \
    JUPYTER_CONFIG_DIR="$state/config" \
    JUPYTER_DATA_DIR="$state/data" \
    JUPYTER_RUNTIME_DIR="$state/runtime" \
    JUPYTERLAB_SETTINGS_DIR="$state/lab/user-settings" \
    JUPYTERLAB_WORKSPACES_DIR="$state/lab/workspaces" \
    JUPYTER_PREFER_ENV_PATH=1 \
    PYDEVD_DISABLE_FILE_VALIDATION=1 \
    "$root/.venv/bin/jupyter" lab \
    "${root_flag[@]}" \
    --no-browser \
    --ServerApp.ip=127.0.0.1 \
    --ServerApp.port="$port" \
    --ServerApp.port_retries=0 \
    --ServerApp.root_dir="$notebooks" \
    --ServerApp.answer_yes=True \
    --LabApp.extension_manager=readonly \
    --LabApp.news_url=None \
    --LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate \
    --KernelManager.transport_encryption=auto
