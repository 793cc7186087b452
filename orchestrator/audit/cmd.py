"""``wattsweep audit``: who capped which GPU, when, and whether it came back."""
from __future__ import annotations

import argparse
import csv
import json
import sys
from typing import Any, TextIO

from orchestrator.audit.analysis import Audit, audit, load_records, parse_time
from workers.gpu.ledger import FIELDS, site_ledger_path
from workers.gpu.policy import PolicyError, load_policy

DESCRIPTION = """Audit power-cap ledgers: every change, GPUs left capped (an apply with no
restore or repair after it), changes outside the site policy, and failures.
Reads the site ledger by default; --ledger takes ledger files or sweep folders."""
EPILOG = """exit status: 0 nothing left capped and no policy breach; 1 a GPU is left capped or the
policy was broken; 2 the ledgers or policy could not be read: a path that does not exist, a
folder with no caps.jsonl under it (a sweep folder whose cells set no cap is fine), or a file that is not a ledger (one JSON record a line;
a torn last line is skipped with a warning).

examples:
  wattsweep audit                                   the site ledger (WATTSWEEP_SITE_LEDGER or /var/log/wattsweep/caps.jsonl)
  wattsweep audit --ledger SWEEP_DIR --format json
  wattsweep audit --since 24h --policy /etc/wattsweep/policy.yaml   (from cron: mail on non-zero exit)"""

TABLE_COLUMNS = ("time", "user", "node", "slurm_job_id", "cell_id", "index", "previous_w", "requested_w",
                 "enforced_w", "action", "result", "backend", "by_host")
# backend: "simulated" marks cards that are not real. by_host: where the record
# was written: the GPU's node for a job's own records, a login node for an
# admin's `caps restore --node` (the JSON output has all of "by").


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ledger", action="append", metavar="PATH", help="ledger file or sweep folder (repeatable)")
    p.add_argument("--since", help="only records from then on: ISO time or age (24h, 7d)")
    p.add_argument("--until", help="only records up to then: ISO time or age")
    p.add_argument("--node", help="only this node (Slurm node name or host)")
    p.add_argument("--user", help="only this user's changes")
    p.add_argument("--policy", metavar="FILE", help="site policy YAML to check every change against")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")


def run(args: argparse.Namespace) -> int:
    try:
        paths = args.ledger or _default_ledger()
        records = load_records(paths)
        policy = load_policy(args.policy) if args.policy else None
        since = parse_time(args.since) if args.since else None
        until = parse_time(args.until) if args.until else None
    except (OSError, ValueError, PolicyError) as exc:
        print(f"wattsweep audit: {exc}", file=sys.stderr)
        return 2
    result = audit(records, policy=policy, since=since, until=until, node=args.node, user=args.user)
    {"table": _table, "csv": _csv, "json": _json}[args.format](result, sys.stdout)
    return 0 if result.ok else 1


def _default_ledger() -> list[str]:
    site = site_ledger_path()
    if site is None or not site.exists():
        raise FileNotFoundError("no site ledger on this machine; give --ledger PATH (a ledger file or a sweep folder) "
                                "or set WATTSWEEP_SITE_LEDGER (see docs/admin.md)")
    return [str(site)]


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _value(r: dict[str, Any], column: str) -> Any:
    if column == "by_host":
        by = r.get("by")
        return by.get("host") if isinstance(by, dict) else None
    return r.get(column)


def _rows_table(rows: list[dict[str, Any]], out: TextIO, extra: str | None = None) -> None:
    cols = list(TABLE_COLUMNS) + ([extra] if extra else [])
    cells = [[_cell(_value(r, c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
    print("  " + "  ".join(c.ljust(w) for c, w in zip(cols, widths)), file=out)
    for row in cells:
        print("  " + "  ".join(v.ljust(w) for v, w in zip(row, widths)), file=out)


def _table(a: Audit, out: TextIO) -> None:
    print(f"changes ({len(a.changes)}):", file=out)
    if a.changes:
        _rows_table(a.changes, out)
    print(f"\nGPUs left capped ({len(a.left_capped)}):", file=out)
    if a.left_capped:
        _rows_table(a.left_capped, out, "gpu_uuid")
        print("  fix: on that node, `wattsweep caps restore --all` (or let the Slurm epilog run)", file=out)
    print(f"\npolicy breaches ({len(a.breaches)}):", file=out)
    for b in a.breaches:
        r = b.record
        print(f"  {r.get('time')} {r.get('user')} {r.get('node')} GPU {r.get('index')}: {b.reason}", file=out)
    print(f"\nfailures ({len(a.failures)}):", file=out)
    for r in a.failures:
        print(f"  {r.get('time')} {r.get('user')} {r.get('node')} GPU {r.get('index')} {r.get('action')}: {r.get('error')}",
              file=out)
    if any(r.get("backend") == "simulated" for r in a.changes):
        print("\n(rows with backend simulated changed simulated cards, not real ones)", file=out)
    verdict = "OK" if a.ok else "PROBLEM"
    print(f"\n{verdict}: {len(a.left_capped)} left capped, {len(a.breaches)} policy breaches, "
          f"{len(a.failures)} failures", file=out)


def _csv(a: Audit, out: TextIO) -> None:
    """One row per change, with flags for left capped and breach."""
    capped = {id(r) for r in a.left_capped}
    reasons = {id(b.record): b.reason for b in a.breaches}
    w = csv.writer(out)
    w.writerow([*FIELDS, "left_capped", "policy_breach"])
    for r in a.changes:
        w.writerow([_csv_cell(r.get(f)) for f in FIELDS] + [id(r) in capped, reasons.get(id(r), "")])
    for r in a.left_capped:  # applies before --since still show
        if not any(r is c for c in a.changes):
            w.writerow([_csv_cell(r.get(f)) for f in FIELDS] + [True, reasons.get(id(r), "")])


def _csv_cell(v: Any) -> Any:
    return "" if v is None else v


def _json(a: Audit, out: TextIO) -> None:
    def clean(r: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in r.items() if not k.startswith("_")}

    json.dump({"ok": a.ok, "changes": [clean(r) for r in a.changes], "left_capped": [clean(r) for r in a.left_capped],
               "policy_breaches": [{"record": clean(b.record), "reason": b.reason} for b in a.breaches],
               "failures": [clean(r) for r in a.failures]}, out, indent=2, default=str)
    out.write("\n")
