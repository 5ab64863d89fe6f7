#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment in .venv and installs the requirements.
# Source it: `source scripts/setup_env.sh`. Re-running is cheap: pip only runs again when a
# requirements file changed since the last successful install.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MVG_VENV:-$repo_root/.venv}"
python_bin="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment in $venv"
  "$python_bin" -m venv "$venv"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"

stamp="$venv/.requirements.sha256"
wanted="$(cat "$repo_root"/requirements*.txt | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
  echo "[setup] installing requirements (first run takes a few minutes: torch is large)"
  # Some pip configurations list local index folders that may be absent; their warnings are noise.
  { python -m pip install --quiet -r "$repo_root/requirements-dev.txt" 2>&1; } \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  echo "$wanted" > "$stamp"
fi
