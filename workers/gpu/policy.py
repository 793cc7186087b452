"""Site power-cap policy: which caps a user may set on which GPUs.

A YAML file of rules (see docs/admin.md)::

    default: deny            # when no rule matches the GPU and partition (deny | allow)
    rules:
      - gpu: "*V100*"        # glob on the GPU name, case-insensitive (default "*")
        partition: gpu       # glob on the Slurm partition (default "*"; matches no partition too)
        range_w: [150, 300]  # allowed caps, inclusive ...
        caps_w: [150, 175, 250]   # ... or an explicit list (one of the two)
        users: [alice]       # optional: only these users ...
        accounts: [energy]   # ... or these accounts may cap

A request is allowed when a rule matching its GPU and partition allows it.
The policy rejects and never clamps: a breach is an error, not a nearby value.
Checked at plan time and again when the cap is applied.
"""
from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

TOLERANCE_W = 1e-6


class PolicyError(ValueError):
    """The policy file is missing or malformed."""


@dataclass(frozen=True)
class Rule:
    gpu: str = "*"
    partition: str = "*"
    range_w: tuple[float, float] | None = None
    caps_w: tuple[float, ...] | None = None
    users: tuple[str, ...] | None = None
    accounts: tuple[str, ...] | None = None

    def matches(self, gpu_name: str, partition: str | None) -> bool:
        if not fnmatch.fnmatch(gpu_name.lower(), self.gpu.lower()):
            return False
        return partition is None or fnmatch.fnmatch(partition, self.partition)

    def breach(self, power_cap_w: float, user: str | None, account: str | None) -> str | None:
        if self.users is not None or self.accounts is not None:
            ok_user = self.users is not None and user in self.users
            ok_account = self.accounts is not None and account in self.accounts
            if not (ok_user or ok_account):
                return f"user {user!r} (account {account!r}) may not cap GPUs matching {self.gpu!r}"
        if self.range_w is not None:
            lo, hi = self.range_w
            if not lo - TOLERANCE_W <= power_cap_w <= hi + TOLERANCE_W:
                return f"{power_cap_w:g} W is outside the allowed range {lo:g}-{hi:g} W for GPUs matching {self.gpu!r}"
        if self.caps_w is not None and not any(abs(power_cap_w - c) <= TOLERANCE_W for c in self.caps_w):
            allowed = ", ".join(f"{c:g}" for c in self.caps_w)
            return f"{power_cap_w:g} W is not an allowed cap ({allowed} W) for GPUs matching {self.gpu!r}"
        return None


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...] = ()
    default_allow: bool = False
    source: str = "<empty>"

    def check(self, *, gpu_name: str, partition: str | None, power_cap_w: float | None,
              user: str | None, account: str | None) -> str | None:
        """The reason ``power_cap_w`` breaks the policy, or None when allowed.
        None cap (leave the card alone) is always allowed."""
        if power_cap_w is None:
            return None
        matching = [r for r in self.rules if r.matches(gpu_name, partition)]
        if not matching:
            if self.default_allow:
                return None
            where = f" on partition {partition!r}" if partition else ""
            return f"policy {self.source} has no rule for GPU {gpu_name!r}{where} (default: deny)"
        reasons = [r.breach(float(power_cap_w), user, account) for r in matching]
        if any(reason is None for reason in reasons):
            return None
        return f"policy {self.source}: {reasons[0]}"


def _floats(value: Any, key: str, where: str) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise PolicyError(f"{where}: {key} must be a non-empty list of watts")
    try:
        return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise PolicyError(f"{where}: {key} must hold numbers (watts), got {value!r}") from None


def _strings(value: Any, key: str, where: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple)):
        raise PolicyError(f"{where}: {key} must be a list of names")
    return tuple(str(v) for v in value)


def _rule(d: Any, where: str) -> Rule:
    known = {"gpu", "partition", "range_w", "caps_w", "users", "accounts"}
    if not isinstance(d, dict):
        raise PolicyError(f"{where}: a rule must be a mapping with keys {sorted(known)}")
    unknown = set(d) - known
    if unknown:
        raise PolicyError(f"{where}: unknown keys {sorted(unknown)}; valid: {sorted(known)}")
    if ("range_w" in d) == ("caps_w" in d):
        raise PolicyError(f"{where}: give exactly one of range_w: [min, max] or caps_w: [w, ...]")
    range_w = None
    if "range_w" in d:
        lo_hi = _floats(d["range_w"], "range_w", where)
        if len(lo_hi) != 2 or lo_hi[0] > lo_hi[1]:
            raise PolicyError(f"{where}: range_w must be [min, max] with min <= max, got {d['range_w']!r}")
        range_w = (lo_hi[0], lo_hi[1])
    caps_w = _floats(d["caps_w"], "caps_w", where) if "caps_w" in d else None
    return Rule(str(d.get("gpu", "*")), str(d.get("partition", "*")), range_w, caps_w,
                _strings(d.get("users"), "users", where), _strings(d.get("accounts"), "accounts", where))


def parse_policy(data: Any, source: str = "<policy>") -> Policy:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: top level must be a mapping with 'rules' (and optional 'default')")
    unknown = set(data) - {"rules", "default"}
    if unknown:
        raise PolicyError(f"{source}: unknown keys {sorted(unknown)}; valid: ['default', 'rules']")
    default = str(data.get("default", "deny"))
    if default not in ("deny", "allow"):
        raise PolicyError(f"{source}: default must be 'deny' or 'allow', got {default!r}")
    rules = data.get("rules") or []
    if not isinstance(rules, list):
        raise PolicyError(f"{source}: rules must be a list")
    return Policy(tuple(_rule(r, f"{source} rule {i + 1}") for i, r in enumerate(rules)), default == "allow", source)


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read a policy file; PolicyError with the file and what is wrong."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise PolicyError(f"cannot read policy file {p}: {exc.strerror or exc}; check gpu.policy_path") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(f"policy file {p} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return parse_policy(data, str(p))
