#!/usr/bin/env bash
# Install what is needed, then run the test suite (extra arguments go to pytest).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/tools/bootstrap.sh" test
cd "$root"
exec .venv/bin/python -m pytest -q "$@"
