#!/usr/bin/env bash
# wattsweep Slurm epilog: put back every GPU of this node that a job left capped.
#
# slurm.conf:   Epilog=/etc/slurm/wattsweep-epilog.sh     (a copy of this file; runs as root on the node)
# A job that ends normally, fails or is cancelled with SIGTERM restores its own
# caps; this catches SIGKILL, OOM kills and crashed nodes. It restores from the
# save files in the state folder (the previous limit, never the default) and
# records a `repair` in the ledgers. A save file whose process still runs (another
# job on a shared node) is left to that job.
#
# Site settings (environment of slurmd, or edit here):
#   WATTSWEEP          path of the wattsweep command    (default: wattsweep on PATH)
#   WATTSWEEP_STATE_DIR   state folder the jobs use     (default: /var/lib/wattsweep)
#   WATTSWEEP_SITE_LEDGER site ledger                   (default: /var/log/wattsweep/caps.jsonl if present)
#
# Exit status: always 0 unless a GPU could not be restored. A non-zero epilog
# drains the node (Slurm's behaviour), which is what a GPU stuck under someone
# else's cap deserves: an admin looks before the next job runs under it.
set -u
WATTSWEEP=${WATTSWEEP:-wattsweep}
log_tag="wattsweep-${0##*/}"
out=$("$WATTSWEEP" caps restore --all 2>&1)
rc=$?
if [[ -n "$out" ]]; then
    # one line per GPU into syslog (and the slurmd log through stderr)
    while IFS= read -r line; do
        logger -t "$log_tag" -- "job ${SLURM_JOB_ID:-?}: $line" 2>/dev/null || true
        echo "$log_tag: job ${SLURM_JOB_ID:-?}: $line" >&2
    done <<<"$out"
fi
exit $rc
