"""Plan + submit a 1,000-cell sweep to Slurm, then `status` it; wall times.

The jobs are submitted held (``launcher.sbatch_extra=[--hold]``) and cancelled
afterwards, so only the login-node side is measured. Needs a Slurm cluster
(e.g. slurm_templates/devcluster/devcluster up).

    python benchmarks/submit_bench.py [--cells 1000] [--dir /tmp/ws-bench]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path


def timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])} ... failed: {proc.stderr.strip()[-500:]}")
    return dt, proc.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=1000)
    ap.add_argument("--dir", default="/tmp/ws-submit-bench")
    a = ap.parse_args()
    sweep = Path(a.dir)
    shutil.rmtree(sweep, ignore_errors=True)
    exe = [sys.executable, "-m", "orchestrator.cli"]
    submit_s, out = timed([*exe, "sweep", "-m", f"batch_size=range(1,{a.cells + 1})", "model=llama-tiny",
                           "gpu=simulated", "launcher=slurm", "launcher.gpus_per_node=1", "launcher.cpus_per_gpu=1",
                           "launcher.sbatch_extra=[--hold]", f"sweep_dir={sweep}"])
    jobs = sorted({ln.split("Slurm job ")[1].split()[0] for ln in out.splitlines() if "Slurm job " in ln})
    try:
        status_s = [timed([*exe, "status", str(sweep)])[0] for _ in range(3)]
        json_s, js = timed([*exe, "status", str(sweep), "--json"])
    finally:
        subprocess.run(["scancel", *jobs], check=False)
    print(f"cells={a.cells} arrays={len(jobs)} plan+submit_s={submit_s:.2f} "
          f"status_s={min(status_s):.2f}..{max(status_s):.2f} status_json_s={json_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
