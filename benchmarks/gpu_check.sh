#!/usr/bin/env bash
# GPU checks and timings in one prepared run, for a lent GPU machine (never part of CI).
#
# What it runs, in order of priority, each under its own time limit so that a slow part cannot
# eat the others' time: the CUDA tests (tests/test_cuda.py), the scaling benchmark on the GPU
# (sweeps and the >= 10M-parameter data view under max_memory="4GiB"), then the Grokking study's
# training and Fig. 3a / Fig. 4 on the GPU. Logs and reports go to $OUT (default ./gpu_out).
#
# The machine's own python3 (with torch and transformers) runs it; captum, which it lacks, comes
# as a wheel in .whl/ (see benchmarks/README.md):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 -d .whl captum==0.9.0
#
# Usage: bash benchmarks/gpu_check.sh [seconds for tests] [scaling] [grokking]
set -u
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
T_TESTS=${1:-150}
T_SCALING=${2:-240}
T_GROK=${3:-150}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 MPLBACKEND=Agg
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
{
    date -u
    nvidia-smi -L
    python3 -c "import sys, torch, transformers, captum; print(sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'captum', captum.__version__)"
} 2>&1 | tee "$OUT/env.log"

echo "== CUDA tests (limit ${T_TESTS}s)"
timeout "$T_TESTS" python3 -m pytest -q -p no:cacheprovider -rA tests/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.log"

echo "== scaling on cuda (limit ${T_SCALING}s)"
timeout "$T_SCALING" python3 benchmarks/scaling.py --device cuda --only sweeps --only big \
    --out "$OUT/scaling_cuda.md" 2>&1 | tee "$OUT/scaling_cuda.log"

echo "== grokking on cuda (limit ${T_GROK}s)"
timeout "$T_GROK" python3 benchmarks/grokking.py --config paper --max-steps 1000 --device cuda --preset fast \
    --out /tmp/grok_cuda --results "$OUT/grokking_cuda.md" \
    --skip "Fig. 5" "Fig. 3b swap" "Fig. 7 retrain" 2>&1 | tee "$OUT/grokking_cuda.log"
date -u | tee -a "$OUT/env.log"
