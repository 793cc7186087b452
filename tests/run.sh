#!/usr/bin/env bash
# The test command: brings up the development Slurm cluster (installing Debian's
# slurm-wlm and munge when missing), runs the whole suite, and takes the cluster
# down again. Extra arguments go to pytest (e.g. `bash tests/run.sh -m "not slurm"`).
set -uo pipefail
cd "$(dirname "$0")/.."
DEVCLUSTER=slurm_templates/devcluster/devcluster
started=0
if [[ "${WATTSWEEP_NO_CLUSTER:-0}" != 1 && -x "$DEVCLUSTER" ]]; then
    if ! "$DEVCLUSTER" status >/dev/null 2>&1; then
        if "$DEVCLUSTER" up; then
            started=1
        else
            echo "tests/run.sh: the development Slurm cluster did not start; Slurm tests will be skipped" >&2
        fi
    fi
fi
python -m pytest -p no:cacheprovider "$@"
rc=$?
if [[ $started == 1 ]]; then "$DEVCLUSTER" down || true; fi
exit $rc
