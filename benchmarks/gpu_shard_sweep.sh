#!/usr/bin/env bash
# The shard sweep on one multi-GPU host, through wattsweep's own path: local launcher
# (one cell at a time per free GPU set), NCCL between the ranks of a cell, real NVML
# telemetry, power caps in observe mode (the cards are read, never changed).
# Run from the repository root on the GPU host:
#
#   bash benchmarks/gpu_shard_sweep.sh OUT_DIR [MODELS] [extra overrides...]
#
# Needs the wheels in .wheels/ (and .wheels-pa/ when the host has no pyarrow) and a data
# folder $DATA (default .devdata) holding alpaca_data_1k.json and llama2-tokenizer.model.
set -uo pipefail
OUT=${1:?usage: gpu_shard_sweep.sh OUT_DIR [MODELS] [overrides...]}
MODELS=${2:-llama-7b,llama-13b}
shift $(( $# >= 2 ? 2 : 1 ))
DATA=${DATA:-.devdata}
mkdir -p "$OUT"
source "$(dirname "$0")/gpu_host_env.sh"
export WATTSWEEP_STATE_DIR=$OUT/capstate
NGPU=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=index,name,power.limit,power.min_limit,power.max_limit,driver_version --format=csv | tee "$OUT/cards.csv"
common=(dataset=alpaca dataset.path="$DATA/alpaca_data_1k.json" tokenizer="$DATA/llama2-tokenizer.model"
        weights=random dtype=bfloat16 gpu=nvml gpu.observe=true gpu.profile=h100
        launcher.max_parallel="$NGPU")
show_failures() { for f in "$1"/cells/*/FAILED.json; do [[ -f $f ]] && { echo "== $f"; tail -c 3000 "$f"; }; done; }

echo "== smoke: tiny model, shards 1 and 2, on the GPUs"
ws sweep -m model=llama-tiny shards=1,2 batch_size=2 n_prompts=4 max_new_tokens=8 max_prompt_tokens=32 \
   "${common[@]}" sweep_dir="$OUT/smoke" --wait || { show_failures "$OUT/smoke"; exit 1; }

echo "== shard sweep: $MODELS"
ws sweep -m model="$MODELS" shards=1,2,4 batch_size=1,8,32 n_prompts=32 max_prompt_tokens=128 max_new_tokens=64 \
   "${common[@]}" sweep_dir="$OUT/sweep" "$@" --wait
show_failures "$OUT/sweep"
ws report "$OUT/sweep" --format both || true

echo "== run-to-run spread: the cheapest cell three more times"
for i in 1 2 3; do
  ws sweep model=llama-7b shards=1 batch_size=32 n_prompts=32 max_prompt_tokens=128 max_new_tokens=64 \
     "${common[@]}" sweep_dir="$OUT/repeat-$i" --wait >/dev/null 2>&1
  ws reduce "$OUT/repeat-$i" --quiet >/dev/null 2>&1 || true
done
