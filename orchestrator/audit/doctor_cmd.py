"""``wattsweep doctor``: can this node set power caps, by which backend, and what is missing."""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from workers.gpu.base import GpuError
from workers.gpu.ledger import site_ledger_path
from workers.gpu.state import node_dir, read_saves, resolve_state_dir

DESCRIPTION = "Say whether power caps can be set on this node, by which backend, and what is missing."
EPILOG = """exit status: 0 caps can be set here (by the backend named); 1 they cannot (the
report says what to fix), or the state folder is unusable: a file, or a --state-dir that
does not exist; the simulated backend always works for trying wattsweep out."""


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", help="state folder to check, which must exist (default: as the workers resolve it)")


def check_root() -> Check:
    root = os.geteuid() == 0
    return Check("root", root, "running as root" if root else f"running as uid {os.geteuid()} (not root)",
                 "" if root else "setting limits needs root: use gpu.backend=capctl with the sudo rule, or a prolog")


def check_nvml() -> tuple[Check, list[str]]:
    from workers.gpu.nvml import NvmlBackend

    try:
        b = NvmlBackend(observe_only=True)
    except GpuError as exc:
        return Check("NVML", False, str(exc), "install the NVIDIA driver (and nvidia-ml-py) on GPU nodes"), []
    try:
        lines = [f"GPU {d.index} {d.name}: limit {b.get_power_limit_w(d.index):g} W, range {d.min_limit_w:g}-"
                 f"{d.max_limit_w:g} W, default {d.default_limit_w:g} W" for d in b.devices()]
    except GpuError as exc:
        return Check("NVML", False, f"NVML loads but fails: {exc}", "check `nvidia-smi`"), []
    finally:
        b.close()
    if not lines:
        return Check("NVML", False, "NVML loads but lists no GPU", "check the job's GPU request / CUDA_VISIBLE_DEVICES"), []
    return Check("NVML", True, f"{len(lines)} GPU(s)"), lines


def check_sudo_rule(run=subprocess.run, as_root: bool | None = None) -> Check:
    if os.geteuid() == 0 if as_root is None else as_root:
        # The rule is how non-root jobs reach the helper; root sets limits itself.
        return Check("sudo rule", True, "not needed: running as root")
    if shutil.which("sudo") is None:
        return Check("sudo rule", False, "sudo is not installed", "install sudo and add the rule from docs/admin.md")
    try:
        proc = run(["sudo", "-n", "-l", "wattsweep-capctl"], capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check("sudo rule", False, f"sudo -n -l failed: {exc}", "see docs/admin.md")
    if proc.returncode == 0:
        return Check("sudo rule", True, f"sudo allows {proc.stdout.strip() or 'wattsweep-capctl'}")
    return Check("sudo rule", False, "no passwordless sudo rule for wattsweep-capctl",
                 "add to /etc/sudoers.d/wattsweep: `%gpuusers ALL=(root) NOPASSWD: /usr/local/bin/wattsweep-capctl` (docs/admin.md)")


def folder_problem(state_dir: Path, explicit: bool = False) -> str | None:
    """Why no save file can be kept in the state folder, or None. A missing
    default folder is fine (the first cap creates it); a missing --state-dir is a typo."""
    if state_dir.exists() and not state_dir.is_dir():
        return f"{state_dir} is not a folder"
    if explicit and not state_dir.exists():
        return f"{state_dir} does not exist"
    return None


def check_folder(state_dir: Path, explicit: bool = False) -> Check:
    problem = folder_problem(state_dir, explicit)
    if problem:
        return Check("state folder", False, problem,
                     "give the jobs' state folder (--state-dir, gpu.state_dir or WATTSWEEP_STATE_DIR), or create it")
    try:
        saves = read_saves(node_dir(state_dir))
    except ValueError as exc:
        return Check("state folder", False, str(exc), "remove the unreadable save file")
    writable = os.access(state_dir, os.W_OK) if state_dir.exists() else os.access(state_dir.parent, os.W_OK)
    detail = f"{state_dir} ({'writable' if writable else 'NOT writable'}), {len(saves)} save file(s) on this node"
    if saves:
        return Check("state folder", False, detail, "GPUs are left capped by a killed job: `wattsweep caps restore --all`")
    if str(state_dir).startswith(os.environ.get("TMPDIR") or "/nonexistent"):
        return Check("state folder", writable, detail + "; under $TMPDIR, which a per-job TMPDIR wipes",
                     "set WATTSWEEP_STATE_DIR (or gpu.state_dir) to a lasting node-local folder so the epilog can repair")
    return Check("state folder", writable, detail, "" if writable else "create it writable, or set WATTSWEEP_STATE_DIR")


def check_ledger() -> Check:
    site = site_ledger_path()
    if site is None:
        return Check("site ledger", False, "none configured", "create /var/log/wattsweep or set WATTSWEEP_SITE_LEDGER (docs/admin.md)")
    ok = os.access(site if site.exists() else site.parent, os.W_OK)
    return Check("site ledger", ok, f"{site} ({'writable' if ok else 'not writable by this user; capctl writes it as root'})")


def verdict(root: Check, nvml: Check, sudo: Check, smi: bool) -> tuple[bool, str]:
    if nvml.ok and root.ok:
        return True, "caps can be set here with gpu.backend=nvml (auto picks it)"
    if nvml.ok and sudo.ok:
        return True, "caps can be set here with gpu.backend=capctl (through sudo -n wattsweep-capctl)"
    if smi and root.ok:
        return True, "caps can be set here with gpu.backend=nvidia-smi"
    if not nvml.ok:
        return False, ("no NVIDIA GPU answers: caps cannot be set here; gpu.backend=auto will use the simulated node, "
                       "and gpu.observe=true reads real cards without changing them")
    return False, "caps cannot be set here: " + (root.fix or sudo.fix)


def run(args: argparse.Namespace) -> int:
    root, (nvml, gpus), sudo = check_root(), check_nvml(), check_sudo_rule()
    smi = shutil.which("nvidia-smi") is not None
    capctl = shutil.which("wattsweep-capctl")
    state_dir = resolve_state_dir(args.state_dir)
    folder = check_folder(state_dir, explicit=bool(args.state_dir))
    checks = [root, nvml, Check("nvidia-smi", smi, "on PATH" if smi else "not on PATH"), sudo,
              Check("wattsweep-capctl", capctl is not None, capctl or "not on PATH", "" if capctl else "pip install wattsweep on the node"),
              folder, check_ledger()]
    for c in checks:
        print(f"[{'ok' if c.ok else '--'}] {c.name}: {c.detail}" + (f"\n     fix: {c.fix}" if c.fix and not c.ok else ""))
    for line in gpus:
        print(f"     {line}")
    ok, text = verdict(root, nvml, sudo, smi and nvml.ok)
    problem = folder_problem(state_dir, explicit=bool(args.state_dir))
    if problem:  # a file, or a mistyped --state-dir: never a clean bill of health
        ok, text = False, f"state folder {problem}; fix it and run doctor again"
    print(("OK: " if ok else "NO: ") + text)
    return 0 if ok else 1
