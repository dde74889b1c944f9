#!/usr/bin/env bash
# One prepared run on a bare GPU machine with no network, under 8 minutes: the GPU tests, decode attention
# against the device's copy bandwidth, and the engine's step for the previous commit and this one.
#
# Bring along (ignored by git, carried beside the tree):
#   .whl/      wheels the machine lacks (msgspec, llguidance, gguf; it has torch, transformers and its
#              own CuPy, e.g. cupy-cuda13x, which is used as it is: nothing here installs the project)
#   .gpu/tokenizer   the bundled model's tokenizer (a folder)
#   .gpu/base.tar    the previous commit's tree: git archive <commit> > .gpu/base.tar
# Results go to $OUT (default /tmp/gpu-check): tests.log, kernels_cuda.md, base.json, head.json, gpu.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
site=/tmp/scalellm-site
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
  || { echo "wheel install failed" | tee "$OUT/gpu.md"; exit 1; }
export PYTHONPATH="$site:$PWD" SCALELLM_TEST_TOKENIZER="$PWD/.gpu/tokenizer"
commit="$(cat .gpu/commit 2>/dev/null || echo unknown)"
{
  echo "# GPU check"
  echo
  echo "$(date -u +%Y-%m-%d), commit $commit, $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)," \
       "torch $("$PY" -c 'import torch; print(torch.__version__)'), CuPy $("$PY" -c 'import cupy; print(cupy.__version__)')."
} > "$OUT/gpu.md"

echo "== GPU tests (150 s at most)"
timeout 150 "$PY" -m pytest -q -p no:cacheprovider -k "gpu or on_gpu" tests/test_cuda_kernels.py \
  tests/test_cuda_host_engine.py tests/test_cuda_step.py tests/test_speculative_cuda.py > "$OUT/tests.log" 2>&1
rc=$?
printf '\n## GPU tests\n\n`%s` (exit %s)\n' "$(tail -1 "$OUT/tests.log")" "$rc" >> "$OUT/gpu.md"

echo "== decode attention against the copy bandwidth (60 s at most)"
timeout 60 "$PY" bench/kernel_ops.py --device cuda > "$OUT/kernels.log" 2>&1 \
  && cp bench/results/kernels_cuda.md "$OUT/" && { printf '\n## Kernels\n\n'; cat bench/results/kernels_cuda.md; } >> "$OUT/gpu.md"

echo "== the step: random checkpoints (60 s at most), the previous commit, then this one (100 s each at most)"
timeout 60 "$PY" bench/gpu_step.py --build-only --tokenizer .gpu/tokenizer > "$OUT/build.log" 2>&1
rm -rf /tmp/scalellm-base && mkdir -p /tmp/scalellm-base && tar -xf .gpu/base.tar -C /tmp/scalellm-base
for run in base:/tmp/scalellm-base head:$PWD; do
  label="${run%%:*}" tree="${run#*:}"
  timeout 100 "$PY" bench/gpu_step.py --tree "$tree" --label "$label" --tokenizer .gpu/tokenizer \
    --concurrency 1,16,64 > "$OUT/$label.json" 2> "$OUT/$label.log"
done
{
  printf '\n## The step, offline (random bfloat16 weights, 128 in / 128 out, EOS ignored)\n\n'
  "$PY" bench/gpu_step.py --report "$OUT/base.json" "$OUT/head.json"
} >> "$OUT/gpu.md" 2>&1
cat "$OUT/gpu.md"
