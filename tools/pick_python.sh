#!/bin/sh
# Prints the newest Python interpreter (>= 3.11) on this machine that kdlab has a lock file for.
# Looks on PATH and in pyenv (where python3.X shims only work with PYENV_VERSION set).
cd "$(dirname "$0")/.." || exit 1
for v in 3.13 3.12 3.11; do
  [ -f "requirements/lock-py$v.txt" ] || continue
  if command -v pyenv >/dev/null 2>&1; then
    for full in $(pyenv versions --bare 2>/dev/null | grep -E "^$v\.[0-9]+$" | sort -t. -k3 -n -r); do
      p="$(pyenv root)/versions/$full/bin/python$v"
      [ -x "$p" ] && { echo "$p"; exit 0; }
    done
  fi
  p=$(command -v "python$v" 2>/dev/null) && "$p" -c "import sys" >/dev/null 2>&1 && { echo "$p"; exit 0; }
done
if python3 -c "import sys; sys.exit(sys.version_info < (3, 11))" 2>/dev/null; then
  command -v python3; exit 0
fi
echo "kdlab needs Python >= 3.11; none found (install one, e.g. with pyenv)" >&2
exit 1
