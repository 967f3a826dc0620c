#!/usr/bin/env bash
# One command for a GPU machine (CUDA torch, nvcc, CMake, ninja, pybind11; no internet needed):
# builds the extension, runs the CUDA tests and the whole test suite, runs the GPU benchmark, and
# writes the raw logs and a JSON summary into the folder given as argument.
#
#   bash benchmarks/gpu_check.sh benchmarks/results/gpu-$(date +%F)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  $PY -c "import setuptools; print('setuptools', setuptools.__version__, '(pyproject needs >= 77)')"
  nvcc --version | tail -2
  lscpu | grep -E 'Model name|^CPU\(s\)'
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
rc=0
$PY -m pip install --no-build-isolation -e . > "$OUT/build.log" 2>&1 || { echo "build failed: $OUT/build.log"; tail -30 "$OUT/build.log"; exit 1; }
$PY -c "import fastsoup, json; print(json.dumps(fastsoup.native_info()))" | tee "$OUT/native_info.json"
$PY -m pytest -q tests/test_cuda.py -rs > "$OUT/test_cuda.log" 2>&1 || rc=1
tail -3 "$OUT/test_cuda.log"
$PY -m pytest -q tests/test_learned.py -k cuda -rs > "$OUT/test_learned_cuda.log" 2>&1 || rc=1
tail -3 "$OUT/test_learned_cuda.log"
$PY -m pytest -q tests > "$OUT/test_all.log" 2>&1 || rc=1
tail -3 "$OUT/test_all.log"
$PY -m benchmarks.bench_cuda --json "$OUT/bench_cuda.json" > "$OUT/bench_cuda.log" 2>&1 || rc=1
cat "$OUT/bench_cuda.log"
exit $rc
