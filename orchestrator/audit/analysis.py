"""Reading cap ledgers into an audit: changes, GPUs left capped, breaches, failures.

A GPU is left capped when, in time order per (host, GPU uuid), the last
record that changed its limit is an ``apply`` (``ok``, or ``failed`` with an
enforced value other than the previous one: the card did change) with no
successful ``restore`` or ``repair`` after it. ``observed`` records never
change a card. A breach is a change the policy does not allow.
"""
from __future__ import annotations

import datetime as _dt
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from workers.gpu.ledger import ledger_files, read_records
from workers.gpu.policy import Policy

_REL = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str, *, now: float | None = None) -> float:
    """Unix seconds from an ISO date/time ("2024-05-01", "2024-05-01T12:00")
    or an age ("90m", "24h", "7d": that long ago). Naive times are UTC."""
    m = _REL.match(text.strip())
    if m:
        return (now if now is not None else time.time()) - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        t = _dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"cannot read time {text!r}; give an ISO date/time (2024-05-01T12:00) or an age (24h, 7d)") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.timezone.utc)
    return t.timestamp()


def load_records(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Every record of the ledgers (files or sweep folders), duplicates (the
    same record in a cell ledger and the site ledger) once, in time order.
    Raises FileNotFoundError for a path that is missing or a folder with no
    ledger that is not a sweep folder (a sweep whose cells set no cap has
    none), ValueError for a file that is not a ledger (see ledger.read_records)."""
    seen: set[str] = set()
    out = []
    for given in paths:
        files = ledger_files([given])
        if not files and (Path(given) / "plan.jsonl").is_file():
            continue  # a sweep in which no cell set a power cap: nothing to audit there
        if not files and Path(given).is_dir():
            raise FileNotFoundError(f"no caps.jsonl found under {given} (not a sweep folder, or no cell set a power cap); "
                                    f"give a ledger file or a sweep folder")
        for path in files:
            for rec in read_records(path):
                key = json.dumps({k: v for k, v in rec.items() if k != "_source"}, sort_keys=True, default=str)
                if key not in seen:
                    seen.add(key)
                    out.append(rec)
    return sorted(out, key=lambda r: float(r.get("time_unix_s") or 0.0))


@dataclass(frozen=True)
class Breach:
    record: dict[str, Any]
    reason: str


@dataclass(frozen=True)
class Audit:
    changes: list[dict[str, Any]] = field(default_factory=list)
    left_capped: list[dict[str, Any]] = field(default_factory=list)
    breaches: list[Breach] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """False when a GPU is left capped or the policy was broken (the exit code)."""
        return not self.left_capped and not self.breaches


def _changed_card(rec: dict[str, Any]) -> bool:
    if rec.get("action") != "apply":
        return False
    if rec.get("result") == "ok":
        return True
    enforced, previous = rec.get("enforced_w"), rec.get("previous_w")
    return rec.get("result") == "failed" and enforced is not None and previous is not None and abs(enforced - previous) > 1e-6


def left_capped(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The apply records that left a GPU capped (records in time order)."""
    capped: dict[tuple[str, str], dict[str, Any]] = {}
    for rec in records:
        key = (str(rec.get("host")), str(rec.get("gpu_uuid")))
        if _changed_card(rec):
            capped.setdefault(key, rec)  # the first change holds the who and when
        elif rec.get("action") in ("restore", "repair") and rec.get("result") == "ok":
            capped.pop(key, None)
    return list(capped.values())


def _matches(rec: dict[str, Any], node: str | None, user: str | None) -> bool:
    if node and node not in (rec.get("node"), rec.get("host")):
        return False
    return not user or rec.get("user") == user


def audit(records: list[dict[str, Any]], *, policy: Policy | None = None, since: float | None = None,
          until: float | None = None, node: str | None = None, user: str | None = None) -> Audit:
    upto = [r for r in records if until is None or float(r.get("time_unix_s") or 0) <= until]
    # Left capped looks at the whole history up to --until: an old apply still counts.
    capped = [r for r in left_capped(upto) if _matches(r, node, user)]
    window = [r for r in upto if (since is None or float(r.get("time_unix_s") or 0) >= since) and _matches(r, node, user)]
    breaches = []
    if policy is not None:
        for r in window:
            if _changed_card(r):
                reason = policy.check(gpu_name=str(r.get("name") or ""), partition=r.get("partition"),
                                      power_cap_w=r.get("requested_w"), user=r.get("user"), account=r.get("account"))
                if reason:
                    breaches.append(Breach(r, reason))
    failures = [r for r in window if r.get("result") == "failed"]
    return Audit(window, capped, breaches, failures)
