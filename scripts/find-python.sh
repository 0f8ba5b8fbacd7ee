#!/usr/bin/env sh
# Prints the path of a Python 3.12+ interpreter, or explains how to get one and fails.
# Looks on PATH first, then in pyenv's and uv's install folders, so a machine whose
# default python3 is older still works without anything installed by hand.
for cand in "${WARDEN_PYTHON:-}" python3.12 python3.13 python3; do
    [ -n "$cand" ] || continue
    path=$(command -v "$cand" 2>/dev/null) || continue
    if "$path" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
        echo "$path"; exit 0
    fi
done
roots="${PYENV_ROOT:-$HOME/.pyenv}/versions $HOME/.local/share/uv/python /usr/local/bin /opt/python"
for root in $roots; do
    for path in "$root"/3.12*/bin/python3 "$root"/cpython-3.12*/bin/python3 \
                "$root"/3.13*/bin/python3 "$root"/cpython-3.13*/bin/python3; do
        [ -x "$path" ] || continue
        if "$path" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
            echo "$path"; exit 0
        fi
    done
done
cat >&2 <<'MSG'
warden needs Python 3.12 or newer, and none was found.
  Debian/Ubuntu:  sudo apt-get install python3.12 python3.12-venv   (Ubuntu 24.04+, Debian 13+)
  any system:     install it with pyenv or uv, or set WARDEN_PYTHON=/path/to/python3.12
MSG
exit 1
