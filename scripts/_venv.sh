# Shared by scripts/run and scripts/test: make .venv with python3 if missing and install
# vtick into it (EXTRAS selects optional dependency groups).  Sourced, not executed.
#
# The install is editable, so a code change needs no reinstall; only pyproject.toml (the
# dependencies, the package list) does.  A stamp file per EXTRAS holds the hash of the
# pyproject.toml it was installed from, and the install is skipped while it matches and
# vtick still imports.  Delete .venv/.vtick-installed-* to force a reinstall.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
STAMP="$VENV/.vtick-installed-${EXTRAS:-base}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
WANT="$("$VENV/bin/python" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$ROOT/pyproject.toml")"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ] \
    || ! "$VENV/bin/python" -c "import vtick.host, vtick.guest, vtick.proto" 2>/dev/null; then
    rm -f "$STAMP"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
    # the build's own notes (setuptools' "Editable installation" reminder) are shown
    # only if the install fails
    LOG="$(mktemp "${TMPDIR:-/tmp}/vtick-install-XXXXXX")"
    if ! "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
            -e "$ROOT${EXTRAS:+[$EXTRAS]}" >"$LOG" 2>&1 \
        || ! "$VENV/bin/python" -c "import vtick.host, vtick.guest, vtick.proto" 2>>"$LOG"; then
        cat "$LOG" >&2
        rm -f "$LOG"
        echo "vtick: installation into $VENV failed" >&2
        exit 1
    fi
    rm -f "$LOG"
    echo "$WANT" > "$STAMP"
fi
