#!/usr/bin/env bash
# Set up a virtualenv with fastgw (compiled core included) and its test tools, then run
# the whole test suite. Safe to run again: it reuses .venv and rebuilds the core.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
exec .venv/bin/python -m pytest "$@"
