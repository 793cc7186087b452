#!/usr/bin/env bash
# The shard sweep on one multi-GPU host, through wattsweep's own path: local launcher,
# NCCL between the ranks of a cell, real NVML telemetry, power caps in observe mode
# (the cards are read, never changed). Run from the repository root on the GPU host:
#
#   bash benchmarks/gpu_shard_sweep.sh OUT_DIR [MODELS] [extra overrides...]
#
# Needs: the wheels in .wheels/ (and .wheels-pa/ if the host has no pyarrow) and a data
# folder DATA (default .devdata) holding alpaca_data_1k.json and llama2-tokenizer.model.
set -euo pipefail
OUT=${1:?usage: gpu_shard_sweep.sh OUT_DIR [MODELS] [overrides...]}
MODELS=${2:-llama-7b,llama-13b}
shift $(( $# >= 2 ? 2 : 1 ))
DATA=${DATA:-.devdata}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -c "import pyarrow" 2>/dev/null || pip install -q --no-deps --no-index .wheels-pa/*.whl
python3 -c "import fairscale, submitit, hydra" 2>/dev/null || pip install -q --no-deps --no-index .wheels/*.whl
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=index,name,power.limit,power.min_limit,power.max_limit --format=csv | tee "$OUT/cards.csv"
python3 -m orchestrator.cli sweep -m model="$MODELS" shards=1,2,4 batch_size=1,8,32 \
    dataset=alpaca dataset.path="$DATA/alpaca_data_1k.json" tokenizer="$DATA/llama2-tokenizer.model" \
    weights=random dtype=bfloat16 gpu=nvml gpu.observe=true gpu.profile=h100 \
    n_prompts=32 max_prompt_tokens=128 max_new_tokens=128 sweep_dir="$OUT/sweep" "$@" --wait
python3 -m orchestrator.cli report "$OUT/sweep" || true
