"""`wattsweep audit`: changes, GPUs left capped, breaches, failures, exit codes."""
from __future__ import annotations

import csv
import io
import json

import pytest

from orchestrator import cli
from orchestrator.audit.analysis import audit, left_capped, parse_time
from workers.gpu.ledger import LedgerWriter, make_record

GPU = dict(uuid="GPU-1", name="Tesla V100-SXM2-32GB", index=0)


def rec(action, result="ok", *, t, previous=300.0, requested=150.0, enforced=150.0, uuid="GPU-1", user="alice", **kw):
    r = make_record(action=action, result=result, index=0, uuid=uuid, name=GPU["name"], previous_w=previous,
                    requested_w=requested, enforced_w=enforced, cell_id="abc", user=user, **kw)
    r["time_unix_s"] = t
    return r


def write(path, *records):
    w = LedgerWriter([path])
    for r in records:
        w.append(r)
    return path


def run_audit(capsys, *args):
    rc = cli.main(["audit", *args])
    return rc, capsys.readouterr().out


def test_left_capped_until_restored_or_repaired():
    assert left_capped([rec("apply", t=1)]) != []
    assert left_capped([rec("apply", t=1), rec("restore", t=2)]) == []
    assert left_capped([rec("apply", t=1), rec("repair", t=2)]) == []
    assert left_capped([rec("apply", t=1), rec("restore", "failed", t=2)]) != []
    assert left_capped([rec("apply", "observed", t=1)]) == []
    # a failed apply that did change the card (enforced differs from previous) counts
    assert left_capped([rec("apply", "failed", t=1, enforced=170.0)]) != []
    assert left_capped([rec("apply", "failed", t=1, enforced=None)]) == []
    # per GPU: another GPU's restore does not clear this one
    assert left_capped([rec("apply", t=1), rec("restore", t=2, uuid="GPU-2")]) != []


def test_exit_code_non_zero_while_left_capped_and_zero_after_repair(tmp_path, capsys):
    ledger = write(tmp_path / "site.jsonl", rec("apply", t=1))
    rc, out = run_audit(capsys, "--ledger", str(ledger))
    assert rc == 1 and "GPUs left capped (1)" in out and "caps restore --all" in out
    write(ledger, rec("repair", t=2))
    rc, out = run_audit(capsys, "--ledger", str(ledger))
    assert rc == 0 and "OK: 0 left capped" in out


def test_sweep_folder_is_read_as_its_cell_ledgers(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    write(sweep / "cells" / "aaa" / "caps.jsonl", rec("apply", t=1), rec("restore", t=2))
    write(sweep / "cells" / "bbb" / "caps.jsonl", rec("apply", t=3, uuid="GPU-2"))
    rc, out = run_audit(capsys, "--ledger", str(sweep), "--format", "json")
    data = json.loads(out)
    assert rc == 1 and len(data["changes"]) == 3 and [r["gpu_uuid"] for r in data["left_capped"]] == ["GPU-2"]


def test_policy_breach_exits_non_zero(tmp_path, capsys):
    ledger = write(tmp_path / "l.jsonl", rec("apply", t=1, requested=200.0, enforced=200.0), rec("restore", t=2))
    policy = tmp_path / "p.yaml"
    policy.write_text("rules:\n  - gpu: '*V100*'\n    caps_w: [250, 175, 150]\n")
    rc, out = run_audit(capsys, "--ledger", str(ledger), "--policy", str(policy))
    assert rc == 1 and "policy breaches (1)" in out and "200 W is not an allowed cap" in out
    rc, _ = run_audit(capsys, "--ledger", str(ledger))
    assert rc == 0


def test_failures_are_listed_but_do_not_fail_the_audit(tmp_path, capsys):
    ledger = write(tmp_path / "l.jsonl", rec("apply", "failed", t=1, enforced=None, error="no permission"))
    rc, out = run_audit(capsys, "--ledger", str(ledger))
    assert rc == 0 and "failures (1)" in out and "no permission" in out


def test_filters_and_formats(tmp_path, capsys):
    ledger = write(tmp_path / "l.jsonl", rec("apply", t=1000, user="alice"), rec("restore", t=1001, user="alice"),
                   rec("apply", t=5000, user="bob", uuid="GPU-2"))
    rc, out = run_audit(capsys, "--ledger", str(ledger), "--user", "alice", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rc == 0 and [r["action"] for r in rows] == ["apply", "restore"]  # bob's cap is not alice's
    rc, out = run_audit(capsys, "--ledger", str(ledger), "--until", "1970-01-01T00:30:00", "--format", "json")
    assert rc == 0 and len(json.loads(out)["changes"]) == 2
    rc, out = run_audit(capsys, "--ledger", str(ledger), "--since", "1970-01-01T01:00:00", "--format", "json")
    data = json.loads(out)
    assert rc == 1 and len(data["changes"]) == 1 and data["left_capped"][0]["user"] == "bob"


def test_duplicate_records_in_cell_and_site_ledgers_count_once(tmp_path):
    r1, r2 = rec("apply", t=1), rec("restore", t=2)
    a = write(tmp_path / "a.jsonl", r1, r2)
    b = write(tmp_path / "b.jsonl", r1)
    from orchestrator.audit.analysis import load_records

    assert len(audit(load_records([a, b])).changes) == 2


def test_parse_time():
    assert parse_time("1970-01-02") == 86400
    assert parse_time("24h", now=100000.0) == 100000.0 - 86400
    with pytest.raises(ValueError, match="ISO date"):
        parse_time("yesterday")


def test_missing_ledger_is_a_usage_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WATTSWEEP_SITE_LEDGER", str(tmp_path / "none.jsonl"))
    assert cli.main(["audit"]) == 2
    assert "give --ledger" in capsys.readouterr().err


# A typo must not read as a clean bill of health: what is not a ledger is refused (exit 2), naming the file.

def run_audit_err(capsys, *args):
    rc = cli.main(["audit", *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_a_jsonl_file_that_is_not_a_ledger_is_refused(tmp_path, capsys):
    plan = tmp_path / "plan.jsonl"
    plan.write_text('{"id": "78cff907382a", "params": {"shards": 1}}\n{"id": "7ce4b83fac71", "params": {"shards": 2}}\n')
    rc, out, err = run_audit_err(capsys, "--ledger", str(plan))
    assert rc == 2 and out == "" and "OK" not in err
    assert f"{plan}:1 is not a cap ledger record" in err and '"action": "apply"' in err and len(err.splitlines()) == 1


def test_a_text_or_binary_file_is_refused_naming_it(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("hello\nworld\n")
    rc, _, err = run_audit_err(capsys, "--ledger", str(text))
    assert rc == 2 and f"{text}:1 is not a JSON record" in err
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage\n")
    rc, _, err = run_audit_err(capsys, "--ledger", str(binary))
    assert rc == 2 and f"{binary}:1 is not UTF-8 text" in err and "Traceback" not in err
    mixed = write(tmp_path / "mixed.jsonl", rec("apply", t=1))
    with open(mixed, "a") as f:
        f.write("not a record\n")
    write(mixed, rec("restore", t=2))  # garbage between records is not a torn end
    rc, _, err = run_audit_err(capsys, "--ledger", str(mixed))
    assert rc == 2 and f"{mixed}:2 is not a JSON record" in err


def test_a_folder_with_no_ledger_is_refused(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, out, err = run_audit_err(capsys, "--ledger", str(empty))
    assert rc == 2 and "OK" not in out and f"no caps.jsonl found under {empty}" in err


def test_a_sweep_whose_cells_set_no_cap_has_nothing_to_audit(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    (sweep / "cells" / "aaa").mkdir(parents=True)
    (sweep / "plan.jsonl").write_text('{"id": "aaa"}\n')
    rc, out, err = run_audit_err(capsys, "--ledger", str(sweep))
    assert rc == 0 and "no caps.jsonl" not in err


def test_a_torn_last_line_is_still_skipped_with_a_warning(tmp_path, capsys):
    ledger = write(tmp_path / "caps.jsonl", rec("apply", t=1), rec("restore", t=2))
    with open(ledger, "a") as f:
        f.write('{"time": "2024-05-01T12:00:00.000+00:00", "time_un')  # a writer killed mid-write
    rc, out, err = run_audit_err(capsys, "--ledger", str(ledger))
    assert rc == 0 and "changes (2)" in out and f"{ledger}:3 is not a JSON record" in err and "skipped" in err
    other = write(tmp_path / "other.jsonl", rec("apply", t=1))
    with open(other, "ab") as f:
        f.write(b"\x00\x00\x00\n")  # a zero-filled tail on a network file system
    rc, out, err = run_audit_err(capsys, "--ledger", str(other))
    assert rc == 1 and "GPUs left capped (1)" in out and f"{other}:2" in err and "skipped" in err


def test_an_empty_ledger_file_is_a_ledger_with_no_changes(tmp_path, capsys):
    site = tmp_path / "caps.jsonl"
    site.touch()  # the site ledger as docs/admin.md creates it
    rc, out, _ = run_audit_err(capsys, "--ledger", str(site))
    assert rc == 0 and "changes (0)" in out


def test_changes_name_their_backend_and_simulated_cards_are_said_to_be_so(tmp_path, capsys):
    ledger = write(tmp_path / "site.jsonl", rec("apply", t=1, backend="simulated"), rec("restore", t=2, backend="simulated"))
    rc, out = run_audit(capsys, "--ledger", str(ledger))
    assert rc == 0 and "backend" in out.splitlines()[1] and out.count("simulated") >= 3
    assert "changed simulated cards, not real ones" in out
    real = write(tmp_path / "real.jsonl", rec("apply", t=1, backend="nvml"), rec("restore", t=2, backend="nvml"))
    assert "not real ones" not in run_audit(capsys, "--ledger", str(real))[1]


def test_the_table_says_where_each_record_was_written(tmp_path, capsys):
    """A repair made from a login node (`caps restore --node n1`) must be told
    apart from the job's own restore on n1."""
    r = rec("repair", t=2)
    r["by"] = {"user": "admin", "host": "login1", "pid": 7, "slurm_job_id": None}
    ledger = write(tmp_path / "site.jsonl", rec("apply", t=1), r)
    rc, out = run_audit(capsys, "--ledger", str(ledger))
    lines = out.splitlines()
    assert rc == 0 and lines[1].split()[-1] == "by_host" and lines[3].split()[-1] == "login1"
