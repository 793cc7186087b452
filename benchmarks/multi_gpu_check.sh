#!/usr/bin/env bash
# The multi-GPU path on one host, through the product: local launcher, NCCL between
# the ranks of a cell (rank 0's store published in the cell folder), GPU leases across
# two sweeps, real NVML telemetry, power caps in observe mode (cards never changed).
#
#   bash benchmarks/multi_gpu_check.sh OUT_DIR
#
# Needs the wheels in .wheels/ (and .wheels-pa/ without pyarrow) and $DATA (default
# .devdata) holding alpaca_data_1k.json and llama2-tokenizer.model.
set -uo pipefail
OUT=${1:?usage: multi_gpu_check.sh OUT_DIR}
DATA=${DATA:-.devdata}
mkdir -p "$OUT"
source "$(dirname "$0")/gpu_host_env.sh"
export WATTSWEEP_STATE_DIR=$OUT/capstate WATTSWEEP_LEASE_DIR=$OUT/leases
NGPU=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=index,name,power.limit --format=csv | tee "$OUT/cards.csv"
common=(dataset=alpaca dataset.path="$DATA/alpaca_data_1k.json" tokenizer="$DATA/llama2-tokenizer.model"
        weights=random dtype=bfloat16 gpu=nvml gpu.observe=true gpu.profile=h100 launcher.max_parallel="$NGPU")
fails() { for f in "$1"/cells/*/FAILED.json; do [[ -f $f ]] && { echo "== $f"; tail -c 2000 "$f"; }; done; }

echo "== two sweeps at once, each one cell over all $NGPU GPUs: they must take turns"
ws sweep model=llama-7b shards="$NGPU" batch_size=16 n_prompts=32 max_prompt_tokens=128 max_new_tokens=64 \
   "${common[@]}" sweep_dir="$OUT/a" >/dev/null
timeout 300 python3 -m orchestrator.cli sweep model=llama-tiny shards="$NGPU" batch_size=2 n_prompts=8 max_prompt_tokens=32 max_new_tokens=8 \
   "${common[@]}" sweep_dir="$OUT/b" --wait || fails "$OUT/b"
for _ in $(seq 1 300); do ls "$OUT"/a/cells/*/DONE.json "$OUT"/a/cells/*/FAILED.json >/dev/null 2>&1 && break; sleep 1; done
fails "$OUT/a"
python3 - "$OUT" <<'PY'
import glob, json, sys
out = sys.argv[1]
spans = {}
for name in ("a", "b"):
    for q in glob.glob(f"{out}/{name}/local/queue-*.json"):
        for e in json.load(open(q))["cells"]:
            spans[name] = (e.get("started_unix_s"), e.get("ended_unix_s"))
    for d in glob.glob(f"{out}/{name}/cells/*/DONE.json"):
        done = json.load(open(d))
        print(name, "world_size", done["world_size"], "rendezvous", done.get("rendezvous"), "gpu", done.get("gpu_name"))
(a0, a1), (b0, b1) = spans["a"], spans["b"]
overlap = max(a0, b0) < min(a1, b1)
print(f"a ran {a1 - a0:.1f} s, b ran {b1 - b0:.1f} s, overlap: {overlap}")
PY
grep -h "waits for" "$OUT"/a/local/*.log "$OUT"/b/local/*.log | head -3
ws reduce "$OUT/a" 2>&1 | tail -4
