#!/usr/bin/env bash
# One entry point for a fresh machine: builds .venv from requirements.lock (once), then runs a command.
#   ./dev.sh demo      set up, then run the demo (synth -> preprocess -> guide -> pretrain -> evaluate -> segmenter -> predict)
#   ./dev.sh test      set up, then run the test suite
#   ./dev.sh setup     set up only
#   ./dev.sh <anything else>   run `anatdiff <args>` inside the environment
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.anatdiff-installed

setup() {
  if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info[:2] in {(3, 11), (3, 12)} else 1)'; then
    echo "anatdiff needs Python 3.11 or 3.12; $PY is $("$PY" --version 2>&1). Set PYTHON=/path/to/python3.11." >&2
    exit 2
  fi
  if [[ ! -f $STAMP || requirements.lock -nt $STAMP || pyproject.toml -nt $STAMP ]]; then
    echo "[dev.sh] installing pinned dependencies into $VENV (first run takes a minute or two)" >&2
    [[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
    pipq() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>&1 | { grep -v 'is ignored: it is neither' || true; }; return "${PIPESTATUS[0]}"; }
    pipq -r requirements.lock
    pipq --no-deps -e .
    touch "$STAMP"
  fi
}

cmd=${1:-demo}
[[ $# -gt 0 ]] && shift
setup
export PATH="$PWD/$VENV/bin:$PATH"
case "$cmd" in
  setup) ;;
  test) exec "$VENV/bin/python" -m pytest -q "$@" ;;
  demo) exec "$VENV/bin/anatdiff" demo "$@" ;;
  *) exec "$VENV/bin/anatdiff" "$cmd" "$@" ;;
esac
