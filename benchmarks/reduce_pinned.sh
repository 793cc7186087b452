#!/usr/bin/env bash
# The reducer benchmark on N cores of a larger machine (a Slurm job's CPU
# allocation, or a quiet stand-in for a small machine): the sweep is generated
# once on every core, then each timed run is pinned with taskset to N CPUs on
# N different physical cores (no two hyper-thread siblings).
#
#   bash benchmarks/reduce_pinned.sh [N=2] [RUNS=5] [DIR=/tmp/wattsweep-reduce-bench]
set -euo pipefail
N=${1:-2}; RUNS=${2:-5}; DIR=${3:-/tmp/wattsweep-reduce-bench}
cd "$(dirname "$0")/.."

# One CPU per physical core, the first N of them (skipping CPU 0, where the
# kernel's housekeeping runs), from the kernel's sibling lists.
cpus=$(python3 - "$N" <<'EOF'
import glob, sys
n, seen, pick = int(sys.argv[1]), set(), []
paths = sorted(glob.glob("/sys/devices/system/cpu/cpu[0-9]*/topology/thread_siblings_list"),
               key=lambda p: int(p.split("/cpu")[-1].split("/")[0]))
for p in paths:
    cpu = int(p.split("/cpu")[-1].split("/")[0])
    sib = open(p).read().strip()
    if sib in seen:
        continue
    seen.add(sib)
    if cpu != 0:
        pick.append(cpu)
if len(pick) < n:
    sys.exit(f"only {len(pick)} physical cores besides CPU 0; asked for {n}")
print(",".join(map(str, pick[:n])))
EOF
)
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); pinned to CPUs $cpus ($N physical cores)"
python3 benchmarks/reduce_bench.py --dir "$DIR" >/dev/null  # generate (not timed) and warm the page cache
for i in $(seq "$RUNS"); do
  taskset -c "$cpus" python3 benchmarks/reduce_bench.py --dir "$DIR"
done
