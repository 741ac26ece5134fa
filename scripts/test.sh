#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh machine, then run it:
# - the servers tests talk to (Debian packages; installed when missing and running as root),
# - a virtualenv in .venv with fastgw (compiled core included) and its test tools.
# Safe to run again: it reuses .venv and rebuilds the core. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

# promtool (package prometheus) checks the metrics exposition.
need_apt=()
command -v promtool >/dev/null || need_apt+=(prometheus)
command -v redis-server >/dev/null || need_apt+=(redis-server)  # shared-limit tests
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    else
        echo "note: missing ${need_apt[*]} (Debian packages); tests that need them will skip" >&2
    fi
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
exec .venv/bin/python -m pytest "$@"
