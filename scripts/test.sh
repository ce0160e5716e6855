#!/usr/bin/env bash
# The test command: from a fresh clone it makes the virtual environment (.venv, or $DMOE_VENV)
# with everything the tests need, reinstalls when pyproject.toml changed, then runs pytest
# with the arguments given (e.g. `scripts/test.sh -m "not docker" -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${DMOE_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
fi
stamp="$venv/.dmoe-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$venv/bin/python" -m pip install --quiet -e '.[test]'
    touch "$stamp"
fi
exec "$venv/bin/python" -m pytest "$@"
