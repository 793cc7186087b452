"""Site policy: reject, never clamp; clear errors for a malformed file."""
from __future__ import annotations

import pytest

from workers.gpu.policy import PolicyError, load_policy, parse_policy

V100 = "Tesla V100-SXM2-32GB"
H100 = "NVIDIA H100 80GB HBM3"


def write(tmp_path, text):
    p = tmp_path / "policy.yaml"
    p.write_text(text)
    return p


def check(policy, watts, gpu=V100, partition="gpu", user="alice", account="proj"):
    return policy.check(gpu_name=gpu, partition=partition, power_cap_w=watts, user=user, account=account)


def test_list_of_caps_allows_exactly_those(tmp_path):
    p = load_policy(write(tmp_path, "rules:\n  - gpu: '*v100*'\n    caps_w: [250, 175, 150]\n"))
    assert check(p, 175) is None and check(p, 175.0) is None
    assert "not an allowed cap" in check(p, 200)
    assert check(p, None) is None  # no cap: nothing to allow


def test_range_is_inclusive_and_out_of_range_is_a_breach(tmp_path):
    p = load_policy(write(tmp_path, "rules:\n  - gpu: '*V100*'\n    range_w: [150, 250]\n"))
    assert check(p, 150) is None and check(p, 250) is None
    assert "outside the allowed range 150-250 W" in check(p, 149)
    assert "outside" in check(p, 300)


def test_unlisted_gpu_is_denied_by_default_and_allowed_when_default_allow(tmp_path):
    deny = load_policy(write(tmp_path, "rules:\n  - gpu: '*V100*'\n    range_w: [100, 300]\n"))
    assert "no rule for GPU" in check(deny, 300, gpu=H100)
    allow = parse_policy({"default": "allow", "rules": [{"gpu": "*V100*", "range_w": [100, 300]}]})
    assert check(allow, 500, gpu=H100) is None


def test_partition_rules(tmp_path):
    p = parse_policy({"rules": [{"partition": "energy", "range_w": [100, 300]},
                                {"partition": "prod", "caps_w": [250]}]})
    assert check(p, 150, partition="energy") is None
    assert "not an allowed cap" in check(p, 150, partition="prod")
    assert "no rule" in check(p, 150, partition="debug")


def test_users_and_accounts(tmp_path):
    p = parse_policy({"rules": [{"range_w": [100, 300], "users": ["alice"], "accounts": ["energy"]}]})
    assert check(p, 200, user="alice", account="x") is None
    assert check(p, 200, user="bob", account="energy") is None
    assert "may not cap" in check(p, 200, user="bob", account="x")


@pytest.mark.parametrize("text, message", [
    ("rules:\n  - gpu: x\n", "exactly one of range_w"),
    ("rules:\n  - range_w: [300, 100]\n", "min <= max"),
    ("rules:\n  - caps_w: [a]\n", "numbers"),
    ("rules:\n  - caps: [150]\n", "unknown keys"),
    ("default: maybe\n", "'deny' or 'allow'"),
    ("rules: [\n", "not valid YAML"),
])
def test_malformed_policy_says_what_is_wrong(tmp_path, text, message):
    with pytest.raises(PolicyError, match=message):
        load_policy(write(tmp_path, text))


def test_missing_policy_file(tmp_path):
    with pytest.raises(PolicyError, match="cannot read policy file"):
        load_policy(tmp_path / "nope.yaml")
