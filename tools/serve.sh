#!/usr/bin/env bash
# Install what is needed, then serve (default: the bundled SmolLM2 model on 127.0.0.1:8000).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/tools/bootstrap.sh" test
exec "$root/.venv/bin/python" -m scalellm.server "$@"
