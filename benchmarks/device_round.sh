#!/usr/bin/env bash
# One device session's measurements, in priority order, each under its own time limit.
# Run from the repository root on the GPU machine: bash benchmarks/device_round.sh OUT_DIR PARTS
# PARTS: comma list of gputests, gemv, decode7b, decode13b; STEPS (env) the decode variants
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
if has decode7b; then
  timeout 420 python3 benchmarks/decode_bench.py --models llama-7b --batch-sizes 1,8,64 --kv-dtypes ${KV:-auto,float8_e4m3fn} \
    --steps "${STEPS:-fused}" ${BENCH_ARGS:-} --no-compare-graph --rounds 3 --reps 2 --profile-dir "$OUT/r" --out "$OUT/r/decode_7b.json" 2>&1 | grep -v Warning | tail -30
fi
if has decode13b; then
  timeout 300 python3 benchmarks/decode_bench.py --models llama-13b --batch-sizes 1,64 --kv-dtypes auto,float8_e4m3fn \
    --steps "${STEPS:-fused}" --no-compare-graph --no-compare-sampler --rounds 3 --reps 2 --out "$OUT/r/decode_13b.json" 2>&1 | grep -v Warning | tail -12
fi
nvidia-smi --query-gpu=index,power.limit --format=csv
tar -C "$OUT" -czf "$OUT/round.tgz" r && rm -rf "$OUT/r"
