#!/usr/bin/env bash
# One device session's measurements, in priority order, each under its own time limit.
# Run from the repository root on the GPU machine: bash benchmarks/device_round.sh OUT_DIR PARTS
# PARTS: comma list of gputests, gemv, tmatune, decode7b, decode13b; STEPS (env) the decode variants.
# tmatune sweeps the TMA kernel's launch settings at one row on this card (gemv_bench.py --tma) and
# hands the fastest to decode7b/decode13b as the step fused-tma-alt (tma_pick.py), when STEPS names it.
set -uo pipefail
OUT=${1:?OUT_DIR}; PARTS=${2:-gemv,decode7b,gputests}
mkdir -p "$OUT/r"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl .wheels-pa/*.whl .wheels-test/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=index,name,power.limit,power.min_limit,power.max_limit,driver_version --format=csv | tee "$OUT/r/cards.csv"
has() { [[ ",$PARTS," == *",$1,"* ]]; }
if has gputests; then
  (export PATH=$PWD/tests/device:$PATH PYTHONPATH=$PYTHONPATH:$PWD/tests/device
   timeout 240 python3 -m pytest -q -p no_card_writes tests/test_model_gpu.py ${GPU_TESTS:-tests/test_gpu_nvml.py tests/test_gpu_select.py \
     tests/test_telemetry_sampler.py tests/test_caps_behaviour.py} -k "not (wrig or simulated or nvidia-smi or capctl)" 2>&1 | tail -8)
fi
if has gemv; then
  timeout 240 python3 benchmarks/gemv_bench.py --batch-sizes ${GEMV_BATCHES:-1,8,64} ${GEMV_ARGS:-} --out "$OUT/r/gemv_bench.json" 2>&1 | tail -40
fi
TMA_ALT=${TMA_ALT:-}  # or given: ROLE=BLOCK_N,BLOCK_K,warps,stages;...  (decode_bench.py --tma-alt)
if has tmatune; then
  timeout 240 python3 benchmarks/gemv_bench.py --tma --batch-sizes 1 --shapes wqkv,wo,w13,w2 \
    --tma-configs "${TMA_SWEEP:-64,128,4,4;64,128,4,6;64,128,4,8;64,128,4,10;64,256,4,4;64,128,8,8;128,128,4,4}" \
    --out "$OUT/r/gemv_tma.json" 2>&1 | tail -8
  if PICKED=$(python3 benchmarks/tma_pick.py "$OUT/r/gemv_tma.json"); then
    echo "fastest TMA settings here: $PICKED"; TMA_ALT=$PICKED
  fi
fi
STEPS=${STEPS:-fused}
if [[ -z "$TMA_ALT" ]]; then STEPS=$(echo ",$STEPS," | sed 's/,fused-tma-alt,/,/; s/^,//; s/,$//'); fi
BENCH=(--steps "$STEPS" --no-compare-graph --reps 2)
[[ -n "$TMA_ALT" ]] && BENCH+=(--tma-alt "$TMA_ALT")
[[ -n "${ROUNDS:-}" ]] && BENCH+=(--rounds "$ROUNDS")
read -ra EXTRA <<<"${BENCH_ARGS:-}"
if [[ -z "$STEPS" ]]; then
  echo "no decode step left to measure (fused-tma-alt needs TMA_ALT or tmatune)"
else
  if has decode7b; then
    timeout 420 python3 benchmarks/decode_bench.py --models llama-7b --batch-sizes ${BATCHES:-1,8,64} --kv-dtypes ${KV:-auto,float8_e4m3fn} \
      "${BENCH[@]}" "${EXTRA[@]}" --profile-dir "$OUT/r" --out "$OUT/r/decode_7b.json" 2>&1 | grep -v Warning | tail -30
  fi
  if has decode13b; then
    timeout 300 python3 benchmarks/decode_bench.py --models llama-13b --batch-sizes ${BATCHES13:-1,64} --kv-dtypes ${KV13:-auto,float8_e4m3fn} \
      "${BENCH[@]}" --no-compare-sampler "${EXTRA[@]}" --out "$OUT/r/decode_13b.json" 2>&1 | grep -v Warning | tail -12
  fi
fi
nvidia-smi --query-gpu=index,power.limit --format=csv
tar -C "$OUT" -czf "$OUT/round.tgz" r && rm -rf "$OUT/r"
