"""egress.timeline: the entries a task's records give, and their order."""

from egress import timeline
from egress.records import (Action, NameBinding, ProcessInfo, Step, TaskEvent, Verdict)
from tests.factories import T0, make_dns_flow, make_finding, make_flow, make_ssh_flow

SSH = ProcessInfo(pid=4242, ppid=4200, uid=1001, exe="/usr/bin/ssh",
                  cmdline="ssh -N -R 9000:localhost:22 agent@relay.example")


def kinds(entries):
    return [(e.entry, e.flow_id) for e in entries]


def test_a_flow_opens_is_judged_and_closes_in_that_order():
    tunnel = make_ssh_flow(start=T0, end=T0 + 5_000_000, verdict=Verdict.FLAG,
                           decided_at=Step.START, process=SSH,
                           findings=[make_finding("ssh-egress", client_banner="SSH-2.0-x",
                                                  declared_for_ssh=[])])
    entries = timeline.build([tunnel])
    assert kinds(entries) == [("flow-open", tunnel.flow_id), ("finding", tunnel.flow_id),
                              ("flow-close", tunnel.flow_id)]
    assert [e.time for e in entries] == [T0, T0, T0 + 5_000_000]
    assert all(e.process == SSH for e in entries)
    assert entries[1].detail["id"] == "ssh-egress"
    assert entries[1].detail["evidence"]["client_banner"] == "SSH-2.0-x"
    assert entries[2].detail["duration_s"] == 5.0


def test_findings_decided_late_are_placed_at_the_flows_last_packet():
    flow = make_flow(start=T0, end=T0 + 9_000_000, verdict=Verdict.BLOCK,
                     decided_at=Step.WATCH, action=Action.KILLED,
                     findings=[make_finding("direct-ip")])
    entries = timeline.build([flow])
    assert kinds(entries) == [("flow-open", flow.flow_id), ("finding", flow.flow_id),
                              ("kill", flow.flow_id), ("flow-close", flow.flow_id)]
    assert entries[1].time == entries[2].time == T0 + 9_000_000
    assert entries[2].detail == {"action": "killed", "decided_at": "watch"}


def test_a_block_at_the_gate_and_a_flow_still_open():
    blocked = make_flow(start=T0, end=T0 + 1000, verdict=Verdict.BLOCK, decided_at=Step.GATE,
                        action=Action.REJECTED, findings=[make_finding("direct-ip")])
    still_open = make_flow(start=T0 + 10, end=T0 + 20, event="interim", verdict=Verdict.ALLOW,
                           decided_at=Step.START)
    entries = timeline.build([still_open, blocked])
    assert kinds(entries) == [("flow-open", blocked.flow_id), ("finding", blocked.flow_id),
                              ("block", blocked.flow_id), ("flow-open", still_open.flow_id),
                              ("flow-close", blocked.flow_id)]
    assert entries[2].detail == {"action": "rejected", "decided_at": "gate"}


def test_a_dns_flow_is_a_lookup_and_bindings_it_carried_are_not_repeated():
    lookup = make_dns_flow("pypi.org", ["203.0.113.10"], start=T0, verdict=Verdict.ALLOW)
    carried = NameBinding(task="t1", name="pypi.org", address="203.0.113.10", ttl=300,
                          time=T0 + 100, flow_id=lookup.flow_id)
    entries = timeline.build([lookup], [], [carried])
    assert kinds(entries) == [("dns", lookup.flow_id)]
    assert entries[0].detail == {
        "source": "flow", "resolver": "10.213.0.1:53", "verdict": "allow",
        "lookups": [{"name": "pypi.org", "type": "A", "answers": ["203.0.113.10"],
                     "rcode": "NOERROR"}]}


def test_our_resolvers_answers_are_one_lookup_each():
    when = T0 + 500
    chain = [NameBinding(task="t1", name=name, address=address, ttl=60, time=when,
                         resolver="10.213.0.1", resolver_port=53)
             for name in ("www.example.org", "cdn.example.net")
             for address in ("203.0.113.7", "203.0.113.8")]
    later = NameBinding(task="t1", name="pypi.org", address="203.0.113.10", ttl=60,
                        time=when + 1, resolver="10.213.0.1", resolver_port=53)
    entries = timeline.build([], [], [later, *chain])
    assert [e.entry for e in entries] == ["dns", "dns"]
    first = entries[0]
    assert first.time == when and first.flow_id is None and first.detail["source"] == "resolver"
    # The answer's chain in the order the resolver wrote it: the name asked, then its CNAME.
    assert first.detail["lookups"] == [
        {"name": "www.example.org", "type": None, "answers": ["203.0.113.7", "203.0.113.8"],
         "rcode": "NOERROR"},
        {"name": "cdn.example.net", "type": None, "answers": ["203.0.113.7", "203.0.113.8"],
         "rcode": "NOERROR"}]
    assert entries[1].detail["lookups"][0]["name"] == "pypi.org"


def test_task_events_keep_their_place_and_findings():
    killed = TaskEvent(task="t1", time=T0 + 50, event="task-killed",
                       findings=[make_finding("events-lost", count=3, reason="queue full")])
    started = TaskEvent(task="t1", time=T0, event="task-started")
    ended = TaskEvent(task="t1", time=T0 + 50, event="task-ended")
    flow = make_flow(start=T0, end=T0 + 50, verdict=Verdict.ALLOW, decided_at=Step.START)
    entries = timeline.build([flow], [ended, killed, started])
    assert [e.entry for e in entries] == ["task-started", "flow-open", "flow-close",
                                          "task-event", "task-ended"]
    assert entries[3].detail["event"] == "task-killed"
    assert entries[3].detail["findings"][0]["evidence"] == {"count": 3, "reason": "queue full"}


def test_json_has_the_same_keys_on_every_entry():
    flow = make_ssh_flow(process=SSH, verdict=Verdict.FLAG, decided_at=Step.START,
                         findings=[make_finding("direct-ip")])
    entries = timeline.build([flow], [TaskEvent(task="t1", time=T0, event="task-started")])
    for e in entries:
        data = e.to_json()
        assert list(data) == ["schema", "kind", "time", "entry", "task", "flow_id", "detail",
                              "process"]
        assert data["schema"] == 1 and data["kind"] == "timeline"
        assert data["time"].endswith("Z")
    opened = next(e for e in entries if e.entry == "flow-open").to_json()
    assert opened["process"] == {"pid": 4242, "ppid": 4200, "uid": 1001, "exe": "/usr/bin/ssh",
                                 "cmdline": "ssh -N -R 9000:localhost:22 agent@relay.example"}
