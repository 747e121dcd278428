#!/usr/bin/env bash
# GPU check for the masked-sparse optimizer: every GPU-marked test, then the step benchmark.
# Writes to $OUT (default ./gpu_out). Finishes in under 8 minutes on one H100.
set -uo pipefail
OUT="${OUT:-./gpu_out}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
status=0
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"

echo "== nvidia-smi" | tee "$OUT/summary.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/summary.txt"

echo "== pytest -m gpu" | tee -a "$OUT/summary.txt"
timeout 240 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels_backends.py \
    tests/test_kernels_reference.py tests/test_masked_optimizer.py 2>&1 | tee "$OUT/pytest_gpu.txt" \
    || status=1
tail -3 "$OUT/pytest_gpu.txt" >> "$OUT/summary.txt"

# 1 B params need ~16 GB per optimizer plus autotuning's restore copies; fall back to 250 M
free_gb=$("$PY" -c "import torch; print(torch.cuda.mem_get_info()[0] // 2**30)")
params=250000000
if [ "${free_gb:-0}" -ge 60 ]; then params=1000000000; fi
echo "== benchmark --params $params" | tee -a "$OUT/summary.txt"
timeout 180 "$PY" benchmarks/optimizer_step.py --device cuda --params "$params" --json \
    > "$OUT/bench_cuda.json" 2> "$OUT/bench_cuda.err" || status=1
cat "$OUT/bench_cuda.json" | tee -a "$OUT/summary.txt"
timeout 60 "$PY" benchmarks/optimizer_step.py --device cuda --params 25000000 \
    > "$OUT/bench_cuda_25m.txt" 2>&1 || status=1
cat "$OUT/bench_cuda_25m.txt" | tee -a "$OUT/summary.txt"
exit $status
