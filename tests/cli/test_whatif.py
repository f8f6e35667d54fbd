"""egress replay --from-db on the bundled lab incident, on SQLite and PostgreSQL."""

import json

import pytest
from sqlalchemy import create_engine, select

from db import models
from tests.cli.test_commands import run
from tests.cli.test_export import LAB, TASK, incident  # noqa: F401 (a fixture)

RELAY = """version = 1
purpose = "Install Python dependencies, and keep a session to the relay"
task = "deps-install"
profiles = ["dns", "pypi"]

[[allow]]
host = "relay.example"
ports = [443]
protocol = "ssh"
"""

TIGHT = """version = 1
purpose = "Install Python dependencies from pypi.org only"
task = "deps-install"
mode = "enforce"
profiles = ["dns"]

[[allow]]
host = "pypi.org"
"""


def _rows(url: str) -> list:
    """Every row of every table, in key order: what the store holds, byte for byte."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [(t.name, [tuple(r) for r in conn.execute(
                select(t).order_by(*t.primary_key.columns))])
                for t in models.Base.metadata.sorted_tables]
    finally:
        engine.dispose()


def _what_if(store_url, tmp_path, manifest_text, *extra):
    path = tmp_path / "new.toml"
    path.write_text(manifest_text)
    result = run("replay", "--from-db", "--purpose", path, "--db", store_url, "--json", *extra)
    return result.exit_code, json.loads(result.output)


def test_allowing_the_relay_leaves_the_tunnel_flagged(incident, tmp_path):
    before = _rows(incident)
    status, out = _what_if(incident, tmp_path, RELAY)
    assert status == 10 and out["kind"] == "what-if" and out["flows"] == 8
    (tunnel,) = out["changes"]
    assert tunnel["server_name"] == "relay.example" and tunnel["dport"] == 443
    assert tunnel["before"]["verdict"] == tunnel["after"]["verdict"] == "flag"
    assert {f["id"] for f in tunnel["before"]["findings"]} == \
        {"undeclared-destination", "ssh-egress", "reverse-ssh-tunnel"}
    # the purpose now allows the destination; the detector's finding stays
    assert [f["id"] for f in tunnel["after"]["findings"]] == ["reverse-ssh-tunnel"]
    assert tunnel["kept"] == ["reverse-ssh-tunnel"]
    assert "relay.example" in tunnel["after"]["rule"]
    assert out["after"] == {"allow": 6, "flag": 2, "block": 0} == out["before"]
    assert _rows(incident) == before


def test_a_tighter_purpose_blocks_the_index_it_no_longer_declares(incident, tmp_path):
    before = _rows(incident)
    status, out = _what_if(incident, tmp_path, TIGHT)
    assert status == 10
    changed = {c["server_name"]: c for c in out["changes"]}
    assert set(changed) == {"files.pythonhosted.org", "relay.example", "pool.supportxmr.com"}
    files = changed["files.pythonhosted.org"]
    assert (files["before"]["verdict"], files["after"]["verdict"]) == ("allow", "block")
    assert [f["id"] for f in files["after"]["findings"]] == ["undeclared-destination"]
    assert all(c["after"]["verdict"] == "block" for c in out["changes"])
    # blocked at its start in enforce mode, the tunnel never ran: nothing kept into it
    assert changed["relay.example"]["kept"] == [] and out["kept"] == 0
    assert out["after"] == {"allow": 5, "flag": 0, "block": 3}
    assert _rows(incident) == before


def test_the_same_purpose_changes_nothing_and_still_violates(incident, tmp_path):
    status, out = _what_if(incident, tmp_path, (LAB / "purpose.toml").read_text())
    assert status == 10 and out["changes"] == [] and out["violations"]


def test_declaring_the_pool_leaves_its_critical_findings(incident, tmp_path):
    declared = RELAY + '\n[[allow]]\nhost = "pool.supportxmr.com"\nports = [3333]\n' \
        'protocol = "stratum"\n'
    status, out = _what_if(incident, tmp_path, declared, "--task", TASK)
    assert status == 10 and out["after"]["flag"] == 2
    miner = next(c for c in out["changes"] if c["dport"] == 3333)
    assert {f["id"] for f in miner["after"]["findings"]} == {"mining-pool", "mining-stratum"}
    assert miner["kept"] == []      # judged again from the stored Stratum record, not kept


def test_table_output(incident, tmp_path):
    path = tmp_path / "tight.toml"
    path.write_text(TIGHT)
    result = run("replay", "--from-db", "--purpose", path, "--db", incident)
    assert result.exit_code == 10
    assert "would now be allowed 5, flagged 0, blocked 3" in result.output
    assert "allow -> block 1, flag -> block 2" in result.output
    assert "(kept)" not in result.output
    path.write_text(RELAY)
    relay = run("replay", "--from-db", "--purpose", path, "--db", incident)
    assert "reverse-ssh-tunnel(kept); rule allow[0] relay.example tcp/443 ssh" in relay.output
    assert "1 finding(s) kept from the store" in relay.output


@pytest.mark.parametrize("args,message", [
    ((), "give INPUTS (captures or flow logs) or --from-db"),
    (("--from-db", "x.pcap"), "not both"),
    (("--from-db",), "--from-db needs --purpose"),
    (("--from-db", "--local", "10.0.0.0/8"), "--tasks and --local"),
])
def test_usage_errors(incident, args, message):
    purpose = ("--purpose", LAB / "purpose.toml") if "--local" in args else ()
    result = run("replay", *args, *purpose, "--db", incident)
    assert result.exit_code == 2 and message in result.output


def test_unknown_task_is_one_line(incident):
    result = run("replay", "--from-db", "--task", "no-such-task", "--purpose",
                 LAB / "purpose.toml", "--db", incident)
    assert result.exit_code == 1
    assert result.output == "egress: no task 'no-such-task' in the store\n"


def test_without_a_task_every_stored_task_is_judged(incident, tmp_path):
    status, out = _what_if(incident, tmp_path, RELAY.replace('task = "deps-install"\n', ""))
    assert status == 10 and out["flows"] == 8       # the one task; untagged flows are no task's
    assert [c["server_name"] for c in out["changes"]] == ["relay.example"]
