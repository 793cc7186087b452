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
# Site settings, from the environment, else from `wattsweep.env` next to
# slurm.conf (KEY=VALUE lines; slurmd runs this script with a bare environment,
# so its own variables do not reach here):
#   WATTSWEEP             the wattsweep command, words split on spaces
#                         (default: wattsweep on PATH; e.g. "/opt/ws/bin/python -m orchestrator.cli")
#   WATTSWEEP_STATE_DIR   state folder the jobs use     (default: /var/lib/wattsweep)
#   WATTSWEEP_SITE_LEDGER site ledger                   (default: /var/log/wattsweep/caps.jsonl if present)
#   PYTHONPATH            where the wattsweep package is, if not installed
#
# Exit status: always 0 unless a GPU could not be restored. A non-zero epilog
# drains the node (Slurm's behaviour), which is what a GPU stuck under someone
# else's cap deserves: an admin looks before the next job runs under it.
set -u
export PATH=${PATH:-/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin}

load_settings() {  # only the keys above; the environment wins over the file
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
if [[ -n "$out" ]]; then
    # one line per GPU into syslog (and the slurmd log through stderr)
    while IFS= read -r line; do
        logger -t "$log_tag" -- "job ${SLURM_JOB_ID:-?}: $line" 2>/dev/null || true
        echo "$log_tag: job ${SLURM_JOB_ID:-?}: $line" >&2
    done <<<"$out"
fi
exit $rc
