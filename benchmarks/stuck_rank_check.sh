#!/usr/bin/env bash
# Ranks blocked in an NCCL collective, stopped through the product (caps in observe
# mode: cards never changed). Two two-rank cells on the local launcher:
#  1. rank 1 hangs on purpose (ignores SIGTERM), so rank 0 waits in NCCL, where Python
#     cannot run its signal handler. `wattsweep cancel` must still end rank 0 within
#     WATTSWEEP_STUCK_GRACE_S, with FAILED.json written by its stop watcher; the hung
#     rank is killed after the kill wait.
#  2. rank 1 is SIGKILLed (as by the out-of-memory killer) while rank 0 waits in NCCL,
#     with the local runner's own gang stop pushed out of the way (as on Slurm, which
#     has none): rank 0's peer watch must find rank 1 gone after WATTSWEEP_PEER_TIMEOUT_S,
#     name it in FAILED.json and stop rank 0.
#
#   bash benchmarks/stuck_rank_check.sh OUT_DIR
#
# Needs two GPUs, the wheels in .wheels/ (and .wheels-pa/ without pyarrow) and $DATA
# (default .devdata) holding alpaca_data_1k.json and llama2-tokenizer.model.
set -uo pipefail
OUT=${1:?usage: stuck_rank_check.sh OUT_DIR}
DATA=${DATA:-.devdata}
mkdir -p "$OUT"
source "$(dirname "$0")/gpu_host_env.sh"
export WATTSWEEP_STATE_DIR=$OUT/capstate WATTSWEEP_LEASE_DIR=$OUT/leases WATTSWEEP_STUCK_GRACE_S=5
nvidia-smi --query-gpu=index,name,power.limit --format=csv
S=$OUT/s
ws sweep model=llama-tiny shards=2 batch_size=2 n_prompts=8 max_prompt_tokens=32 max_new_tokens=8 \
   dataset=alpaca dataset.path="$DATA/alpaca_data_1k.json" tokenizer="$DATA/llama2-tokenizer.model" \
   weights=random dtype=bfloat16 gpu=nvml gpu.observe=true power_cap_w=300 fail_on_purpose=hang-rank-1 \
   sweep_dir="$S" >/dev/null || exit 1
for _ in $(seq 1 240); do grep -qs "hangs on purpose" "$S"/cells/*/launch/*.err && break; sleep 0.5; done
grep -hs "hangs on purpose" "$S"/cells/*/launch/*.err || { echo "rank 1 never hung"; ws status "$S"; exit 1; }
sleep 5  # rank 0 into its NCCL wait
t0=$(date +%s.%N)
ws cancel "$S"
for _ in $(seq 1 600); do ls "$S"/cells/*/FAILED.json >/dev/null 2>&1 && break; sleep 0.1; done
t1=$(date +%s.%N)
python3 - "$S" "$t0" "$t1" <<'PY'
import glob, json, sys
s, t0, t1 = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
for f in glob.glob(f"{s}/cells/*/FAILED.json"):
    d = json.load(open(f))
    print(f"FAILED.json {t1 - t0:.1f} s after cancel: rank {d.get('rank')} stopped_blocked={d.get('stopped_blocked')}")
    print("error:", d["error"])
    print("innermost frames:", "\n".join(d.get("traceback", "").splitlines()[-6:]))
PY
for _ in $(seq 1 90); do ws status "$S" 2>/dev/null | grep -q "1 cancelled" && break; sleep 1; done
echo "ended $(python3 -c "import time,sys; print(round(time.time()-float(sys.argv[1]),1))" "$t0") s after cancel"
ws status "$S"
ws audit --ledger "$S" | tail -3
nvidia-smi --query-gpu=index,power.limit --format=csv

echo "== 2. rank 1 killed while rank 0 waits in NCCL; the runner's gang stop out of the way"
export WATTSWEEP_GANG_GRACE_S=600 WATTSWEEP_PEER_TIMEOUT_S=10
K=$OUT/k
ws sweep model=llama-tiny shards=2 batch_size=2 n_prompts=8 max_prompt_tokens=32 max_new_tokens=8 \
   dataset=alpaca dataset.path="$DATA/alpaca_data_1k.json" tokenizer="$DATA/llama2-tokenizer.model" \
   weights=random dtype=bfloat16 gpu=nvml gpu.observe=true fail_on_purpose=kill-rank-1 \
   sweep_dir="$K" >/dev/null || exit 1
t0=$(date +%s.%N)
for _ in $(seq 1 1800); do ls "$K"/cells/*/FAILED.json >/dev/null 2>&1 && break; sleep 0.1; done
python3 - "$K" "$t0" <<'PY'
import glob, json, os, sys, time
k, t0 = sys.argv[1], float(sys.argv[2])
for f in glob.glob(f"{k}/cells/*/FAILED.json"):
    d = json.load(open(f))
    print(f"FAILED.json {os.path.getmtime(f) - t0:.1f} s after submission: rank {d.get('rank')}, "
          f"found by rank {d.get('found_by_rank')}")
    print("error:", d["error"])
PY
for _ in $(seq 1 60); do ws status "$K" 2>/dev/null | grep -q "1 failed" && break; sleep 1; done
ws status "$K"
grep -h "stops:\|not taken by the main thread" "$K"/cells/*/launch/*.err | head -5
