#!/bin/sh
# Creates .venv with the newest supported Python and installs kdlab with the pinned versions of its lock file.
set -eu
cd "$(dirname "$0")/.."
PY=$(sh tools/pick_python.sh)
V=$("$PY" -c "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')")
echo "kdlab: using $PY (Python $V) with requirements/lock-py$V.txt"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade "pip>=24"
.venv/bin/python -m pip install -q --disable-pip-version-check -c "requirements/lock-py$V.txt" -e ".[test]"
touch .venv/.installed
