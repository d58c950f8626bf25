# Shared by scripts/run and scripts/test: make .venv with python3 if missing and install
# vtick into it (EXTRAS selects optional dependency groups).  Sourced, not executed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT${EXTRAS:+[$EXTRAS]}" 2>&1 \
    | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -c "import vtick.host, vtick.guest, vtick.proto" \
    || { echo "vtick: installation into $VENV failed" >&2; exit 1; }
