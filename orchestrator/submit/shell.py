"""The one door to Slurm's command-line tools.

Every ``sbatch``, ``squeue``, ``sacct``, ``scontrol`` and ``scancel`` call of the
login-node side goes through ``run_cmd``: one place for time limits, for errors
that carry the command's own stderr, and for counting calls in benchmarks.
"""
from __future__ import annotations

import shlex
import shutil
import subprocess
from dataclasses import dataclass

DEFAULT_TIMEOUT_S = 60.0


class SlurmCommandError(RuntimeError):
    """A Slurm command failed, was not found, or ran past its time limit."""

    def __init__(self, args: list[str], message: str, returncode: int | None = None, stderr: str = "") -> None:
        super().__init__(message)
        self.args_list = list(args)
        self.returncode = returncode
        self.stderr = stderr


@dataclass(frozen=True)
class CallCount:
    """How many commands ran, and for how long (benchmarks read this)."""

    calls: int
    seconds: float


_calls = 0
_seconds = 0.0


def quoted(path: object) -> str:
    """A path as it goes into a command printed for the user to copy: quoted where a
    shell would split it (spaces), unchanged otherwise."""
    return shlex.quote(str(path))


def call_count() -> CallCount:
    return CallCount(_calls, _seconds)


def have(tool: str) -> bool:
    """Is this command on PATH? (``squeue`` missing means: no Slurm here.)"""
    return shutil.which(tool) is not None


def run_cmd(
    args: list[str],
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    check: bool = True,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output as text.

    With ``check`` (the default), a non-zero exit raises ``SlurmCommandError``
    whose message is the command and the first lines of its stderr, e.g.
    ``sbatch: error: invalid partition specified: gpu (sbatch exited 1)``.
    """
    import time

    global _calls, _seconds
    cmd = shlex.join(args)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            args, capture_output=True, text=True, timeout=timeout_s, input=input_text, check=False
        )
    except FileNotFoundError:
        raise SlurmCommandError(args, f"{args[0]}: command not found; is Slurm installed on this host?") from None
    except subprocess.TimeoutExpired:
        raise SlurmCommandError(args, f"`{cmd}` did not answer within {timeout_s:g} s; is slurmctld up?") from None
    finally:
        _calls += 1
        _seconds += time.perf_counter() - t0
    if check and proc.returncode != 0:
        err = _first_lines(proc.stderr or proc.stdout) or "(no output)"
        raise SlurmCommandError(args, f"{err} ({args[0]} exited {proc.returncode}: `{_short(cmd)}`)", proc.returncode, proc.stderr)
    return proc


def _first_lines(text: str, n: int = 3) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return "; ".join(lines[:n])


def _short(cmd: str, limit: int = 160) -> str:
    return cmd if len(cmd) <= limit else cmd[: limit - 3] + "..."
