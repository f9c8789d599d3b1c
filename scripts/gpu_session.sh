#!/usr/bin/env bash
# One device call: GPU tests, kernel benchmarks against fla, whole-engine bench. Logs go to $OUT.
# Usage on the GPU machine: bash scripts/gpu_session.sh [tests|kernels|engine]...   (default: all three)
source scripts/gpu_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
parts=${*:-tests kernels engine}
for part in $parts; do
  case $part in
    tests)
      timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu ${GPU_TESTS:-tests/kernels tests/e2e/test_gpu_parity.py} -s \
        2>&1 | grep -vE "^\s*$" | tail -60 > "$OUT/gpu_tests.log"; tail -25 "$OUT/gpu_tests.log" ;;
    kernels)
      timeout 150 python3 benchmarks/kernels/bench_gdn.py 2>&1 | tail -30 > "$OUT/bench_gdn.log"; cat "$OUT/bench_gdn.log" ;;
    engine)
      timeout 240 python3 -m deltaserve.cli bench --preset qwen3.5-9b --prompt-lens 512,2048,8192 \
        --batch-sizes 1,16,64 --context 1024 --steps 32 2>&1 | grep -v "^INFO\|it/s" | tail -15 > "$OUT/bench_9b.log"
      cat "$OUT/bench_9b.log" ;;
  esac
done
