#!/usr/bin/env bash
# wattsweep Slurm prolog: no job starts under a cap left by an earlier one.
#
# slurm.conf:   Prolog=/etc/slurm/wattsweep-prolog.sh     (a copy of this file; runs as root on the node)
#               PrologFlags=Alloc                          (run it at allocation, before any step)
# Same work and settings as the epilog (see epilog.sh): if the epilog could not
# run (node crashed, slurmd restarted), the next job still finds its GPUs at
# their previous limits. A non-zero exit requeues the job and drains the node.
set -u
export PATH=${PATH:-/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin}

load_settings() {  # WATTSWEEP, WATTSWEEP_STATE_DIR, WATTSWEEP_SITE_LEDGER, PYTHONPATH; the environment wins
    local conf=${SLURM_CONF:-/etc/slurm/slurm.conf} key value
    local file=${conf%/*}/wattsweep.env
    [[ -r "$file" ]] || return 0
    while IFS="=" read -r key value || [[ -n "$key" ]]; do  # a last line without newline too
        case "$key" in
            WATTSWEEP|WATTSWEEP_STATE_DIR|WATTSWEEP_SITE_LEDGER|PYTHONPATH)
                [[ -z "${!key:-}" ]] && export "$key=$value" ;;
        esac
    done <"$file"
}

load_settings
read -ra wattsweep <<<"${WATTSWEEP:-wattsweep}"
log_tag="wattsweep-${0##*/}"
out=$("${wattsweep[@]}" caps restore --all 2>&1)
rc=$?
if [[ -n "$out" && "$out" != *"nothing to restore"* ]]; then
    while IFS= read -r line; do
        logger -t "$log_tag" -- "job ${SLURM_JOB_ID:-?}: $line" 2>/dev/null || true
        echo "$log_tag: job ${SLURM_JOB_ID:-?}: $line" >&2
    done <<<"$out"
fi
exit $rc
