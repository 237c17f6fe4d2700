#!/usr/bin/env bash
# Installs what the tests need into .venv and runs them. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
# pytest exits 5 when it collected no test; that is a failure here, and set -e passes it on.
exec .venv/bin/python -m pytest "$@"
