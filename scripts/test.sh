#!/usr/bin/env bash
# Set up (or refresh) the virtualenv, then run the whole test suite on 2 workers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -n "${NS_WORKERS:-2}" -q -p no:cacheprovider "$@"
