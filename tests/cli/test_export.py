"""egress export on a store filled from the bundled lab incident, on SQLite and PostgreSQL."""

import json
from pathlib import Path

import pytest

from egress.community_id import community_id
from egress.records import read_record
from tests import zeeklog
from tests.cli.test_commands import run

ROOT = Path(__file__).resolve().parents[2]
LAB = ROOT / "examples/lab-incident"
TASK = "deps-install"
PROTO_NUMBER = {"tcp": 6, "udp": 17}


@pytest.fixture
def incident(store_url):
    result = run("replay", LAB / "incident.pcap", "--local", "10.99.0.2/32",
                 "--purpose", LAB / "purpose.toml", "--db", store_url)
    assert result.exit_code == 10, result.output
    return store_url


def _contract(store_url) -> list[dict]:
    out = run("audit", "--db", store_url, "--task", TASK, "--json", "--no-events").output
    return [json.loads(line) for line in out.splitlines()]


def test_jsonl_is_what_audit_json_prints(incident):
    exported = run("export", "--db", incident, "--task", TASK, "--format", "jsonl")
    audited = run("audit", "--db", incident, "--task", TASK, "--json")
    assert exported.exit_code == 0
    assert exported.output == audited.output
    records = [read_record(json.loads(line), strict=True) for line in exported.output.splitlines()]
    assert {type(r).__name__ for r in records} == {"FlowRecord", "TaskEvent"}


def test_zeek_conn_log_of_the_incident(incident, tmp_path):
    out = tmp_path / "conn.log"
    result = run("export", "--db", incident, "--task", TASK, "--format", "zeek", "-o", out)
    assert result.exit_code == 0 and result.output == ""
    header, rows = zeeklog.read(out.read_text())
    flows = {f["flow_id"]: f for f in _contract(incident)}
    assert [r["uid"] for r in rows] == list(flows)       # one line per flow, by start
    for row in rows:
        flow = flows[row["uid"]]
        assert row["community_id"] == flow["community_id"]
        assert row["community_id"] == community_id(
            PROTO_NUMBER[row["proto"]], str(row["id.orig_h"]), str(row["id.resp_h"]),
            row["id.orig_p"], row["id.resp_p"])
        assert (row["orig_ip_bytes"], row["resp_ip_bytes"], row["conn_state"]) == \
            (flow["bytes_out"], flow["bytes_in"], flow["conn_state"])
    services = {r["service"] for r in rows}
    assert {"ssl", "dns", "ssh", zeeklog.UNSET} <= services   # stratum: no Zeek analyzer


def test_eve_of_the_incident(incident):
    result = run("export", "--db", incident, "--task", TASK, "--format", "eve")
    events = [json.loads(line) for line in result.output.splitlines()]
    flows = _contract(incident)
    assert len(events) == len(flows)
    alerted = {e["dest_port"] for e in events if e["flow"]["alerted"]}
    assert alerted == {f["dport"] for f in flows if f["verdict"] != "allow"} == {443, 3333}
    assert [e["community_id"] for e in events] == [f["community_id"] for f in flows]


def test_filters_narrow_the_export(incident):
    result = run("export", "--db", incident, "--task", TASK, "--format", "eve",
                 "--verdict", "flag")
    assert {json.loads(line)["dest_port"] for line in result.output.splitlines()} == {443, 3333}


def test_errors_are_one_line(incident, tmp_path):
    unknown = run("export", "--db", incident, "--task", "no-such-task", "--format", "zeek")
    assert unknown.exit_code == 1 and unknown.output == "egress: no task 'no-such-task' in the store\n"
    none = run("export", "--db", incident, "--task", TASK, "--format", "zeek", "--verdict", "block")
    assert none.exit_code == 1
    assert none.output == f"egress: task '{TASK}' has no flows that match the filters\n"
    missing_dir = tmp_path / "no" / "conn.log"
    unwritable = run("export", "--db", incident, "--task", TASK, "--format", "zeek",
                     "-o", missing_dir)
    assert unwritable.exit_code == 1 and unwritable.output.count("\n") == 1
    assert unwritable.output.startswith(f"egress: cannot write {missing_dir}: ")
    assert not missing_dir.parent.exists()
    no_task = run("export", "--db", incident, "--format", "zeek")
    assert no_task.exit_code == 2 and "give --task" in no_task.output




def test_a_task_without_flows_is_one_line(store_url):
    from db import Store
    from tagging import manifest
    with Store.open(store_url) as store:
        store.add_task("quiet", manifest.load(LAB / "purpose.toml"), started=1)
    result = run("export", "--db", store_url, "--task", "quiet", "--format", "eve")
    assert result.exit_code == 1 and result.output == "egress: task 'quiet' has no flows\n"
