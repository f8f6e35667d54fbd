"""Flow records and task events: written, read back equal, and filtered."""

import pytest

from db import FlowFilter
from egress.records import (DnsInfo, DnsQuery, Finding, HttpInfo, Nat, ProcessInfo, QuicInfo,
                            SshInfo, StratumInfo, TlsInfo)
from tests.factories import T0, make_dns_flow, make_event, make_finding, make_flow

S = 1_000_000  # microseconds in a second


def full_flow(**fields):
    """A flow with every sub-record filled and findings of several shapes."""
    findings = [
        Finding.make("ssh-egress", client_banner="SSH-2.0-OpenSSH_9.2p1 Debian-2",
                     declared_for_ssh=[]),
        Finding.make("reverse-ssh-tunnel", source="process", cmdline_flag="-R 9000:localhost:22",
                     server_first_exchanges=14, keepalive_interval_s=5.25, role_reversal=None),
        Finding.make("direct-ip", address="203.0.113.10", waived=True),
        Finding.make("dns-tunnel", domain="t.example", distinct_names=300, window_s=60.0,
                     max_label_length=63, entropy=4.1, qtypes=["TXT", "NULL"]),
    ]
    base = dict(
        mode="enforce", community_id="1:gh7OxDKG6JwrR5FOX0p1BLxeS6k=", direction="outbound",
        nat=Nat(src="192.0.2.7", sport=40112), conn_state="SF", observed="first-packets+watch",
        app="ssh", server_name="relay.example", name_source="dns",
        tls=TlsInfo(sni="relay.example", alpn=["h2"], ja3="a" * 32, ja4="t13d1516h2_x", ech=False),
        http=HttpInfo(method="CONNECT", host="relay.example:443"),
        ssh=SshInfo(client="SSH-2.0-OpenSSH_9.2p1 Debian-2", server="SSH-2.0-OpenSSH_9.2p1",
                    hassh="b" * 32, hassh_server="c" * 32),
        stratum=StratumInfo(method="login", agent="XMRig/6.21.0"),
        dns=DnsInfo(queries=[DnsQuery(name="relay.example", type="A", answers=["203.0.113.10"],
                                      ttl=30, rcode="NOERROR"),
                             DnsQuery(name="nx.example", type="AAAA")]),
        quic=QuicInfo(version="0x00000001", sni="relay.example"),
        bytes_out=18211, bytes_in=2**40, packets_out=95, packets_in=88,
        verdict="block", decided_at="watch", action="killed", rule="allow[0] pypi.org tcp/443 tls",
        findings=findings,
        process=ProcessInfo(pid=4242, ppid=4200, uid=1001, exe="/usr/bin/ssh",
                            cmdline="ssh -N -R 9000:localhost:22 agent@relay.example"),
    )
    base.update(fields)
    return make_flow(**base)


def test_every_field_round_trips(store):
    flow = full_flow()
    bare = make_flow(task=None, sport=None, dport=None, proto="icmp", end=None, ip_version=6,
                     src="fd00::2", dst="2001:db8::1", bytes_out=0, packets_in=0)
    store.write([flow, bare])
    assert store.flows() == [flow, bare]
    assert store.flow(flow.flow_id) == flow
    assert store.flow(bare.flow_id) == bare
    assert store.flow("f-nothere") is None


def test_findings_keep_order_evidence_and_waived(store):
    flow = full_flow()
    store.write([flow])
    back = store.flow(flow.flow_id).findings
    assert [f.id for f in back] == [f.id for f in flow.findings]
    assert [f.waived for f in back] == [False, False, True, False]
    assert back[1].evidence.keepalive_interval_s == 5.25


def test_only_the_final_record_is_listed(store):
    interim = full_flow(event="interim", bytes_out=100, verdict="allow", findings=[])
    final = full_flow(flow_id=interim.flow_id, start=interim.start, bytes_out=9000)
    store.write([interim])
    assert store.flows() == [interim]
    store.write([final])
    assert store.flows() == [final]
    assert store.flow(interim.flow_id) == final
    # The interim's findings (none) must not leak into the final's, nor the reverse.
    assert store.flows(FlowFilter(verdict="allow")) == []


def test_latest_within_one_batch_is_the_last_written(store):
    first = make_flow(event="interim", bytes_out=1)
    second = make_flow(flow_id=first.flow_id, start=first.start, event="interim", bytes_out=2)
    third = make_flow(flow_id=first.flow_id, start=first.start, bytes_out=3)
    other = make_flow()
    store.write([first, second, other])
    store.write([third])
    assert store.flows() == [third, other]
    from sqlalchemy import func, select
    from db.models import Flow
    with store.session() as s:
        rows = s.execute(select(Flow.flow_id, func.count(), func.sum(Flow.bytes_out))
                         .where(Flow.latest.is_(True)).group_by(Flow.flow_id)).all()
        total = s.execute(select(func.count()).select_from(Flow)).scalar_one()
    assert sorted(rows) == sorted([(first.flow_id, 1, 3), (other.flow_id, 1, other.bytes_out)])
    assert total == 4


def test_task_events_round_trip_with_findings(store):
    started = make_event("task-started", time=T0)
    refused = make_event("dns-refused", time=T0 + S, findings=[
        Finding.make("dns-refused", name="pool.example", qtype="A")])
    lost = make_event("events-lost", task=None, time=T0 + 2 * S, findings=[
        Finding.make("events-lost", count=12, reason="socket overrun"),
        Finding.make("budget-exceeded", limit="connections", allowed=5, total=6)])
    flow = make_flow(findings=[make_finding()])
    store.write([lost, flow, started, refused])
    assert store.task_events() == [started, refused, lost]
    assert store.flows() == [flow]


def test_filter_by_task(store):
    mine, theirs, untagged = make_flow(task="t1"), make_flow(task="t2"), make_flow(task=None)
    store.write([mine, theirs, untagged, make_event(task="t1"), make_event(task="t2")])
    assert store.flows(FlowFilter(task="t1")) == [mine]
    assert store.flows(FlowFilter(task="t2")) == [theirs]
    assert store.flows() == [mine, theirs, untagged]
    assert [e.task for e in store.task_events(FlowFilter(task="t2"))] == ["t2"]


def test_filter_by_time_overlap(store):
    since, until = T0 + 100 * S, T0 + 200 * S
    before = make_flow(start=T0, end=since - 1)
    ends_at_since = make_flow(start=T0, end=since)
    spans = make_flow(start=T0, end=until + S)
    inside = make_flow(start=since + S, end=since + 2 * S)
    open_inside = make_flow(start=since + 3 * S, end=None)
    open_before = make_flow(start=since - 1, end=None)
    starts_at_until = make_flow(start=until, end=until + S)
    store.write([before, ends_at_since, spans, inside, open_inside, open_before, starts_at_until])
    window = FlowFilter(since=since, until=until)
    assert store.flows(window) == [ends_at_since, spans, inside, open_inside]
    assert store.flows(FlowFilter(since=since)) == [ends_at_since, spans, inside, open_inside,
                                                    starts_at_until]
    assert store.flows(FlowFilter(until=since)) == [before, ends_at_since, spans, open_before]

    events = [make_event(time=t) for t in (since - 1, since, until - 1, until)]
    store.write(events)
    assert store.task_events(window) == events[1:3]


def test_filter_by_verdict(store):
    allowed, flagged = make_flow(verdict="allow"), make_flow(verdict="flag")
    blocked, unjudged = make_flow(verdict="block"), make_flow(verdict=None)
    store.write([allowed, flagged, blocked, unjudged, make_event()])
    assert store.flows(FlowFilter(verdict="flag")) == [flagged]
    assert store.flows(FlowFilter(verdict="block")) == [blocked]
    assert store.flows(FlowFilter(verdict="allow")) == [allowed]
    assert store.task_events(FlowFilter(verdict="allow")) == []
    with pytest.raises(ValueError):
        FlowFilter(verdict="maybe")


def test_filter_by_finding(store):
    direct = make_flow(findings=[make_finding("direct-ip")])
    waived = make_flow(findings=[Finding.make("direct-ip", address="198.51.100.1", waived=True)])
    mining = make_flow(findings=[make_finding("mining-stratum", method="login"),
                                 make_finding("direct-ip")])
    clean = make_flow()
    refused = make_event("dns-refused", findings=[make_finding("dns-refused", name="x.example")])
    store.write([direct, waived, mining, clean, refused, make_event()])
    assert store.flows(FlowFilter(finding="direct-ip")) == [direct, waived, mining]
    assert store.flows(FlowFilter(finding="mining-stratum")) == [mining]
    assert store.flows(FlowFilter(finding="dns-refused")) == []
    assert store.task_events(FlowFilter(finding="dns-refused")) == [refused]
    with pytest.raises(ValueError):
        FlowFilter(finding="no-such-finding")


def test_finding_filter_looks_at_the_latest_record_only(store):
    interim = make_flow(event="interim", findings=[make_finding("direct-ip")])
    final = make_flow(flow_id=interim.flow_id, start=interim.start)
    store.write([interim, final])
    assert store.flows(FlowFilter(finding="direct-ip")) == []


def test_filters_combine_and_limit(store):
    flows = [make_flow(task="t1", verdict="flag", start=T0 + i * S, end=T0 + i * S + 1)
             for i in range(10)]
    noise = [make_flow(task="t2", verdict="flag", start=T0 + i * S) for i in range(10)]
    store.write(noise + flows)
    assert store.flows(FlowFilter(task="t1", verdict="flag", limit=3)) == flows[:3]
    assert store.flows(FlowFilter(task="t1", since=T0 + 5 * S, until=T0 + 7 * S)) == flows[5:7]
    assert store.flows(FlowFilter(limit=0)) == []


def test_same_start_is_ordered_by_flow_id(store):
    b = make_flow(flow_id="f-bbbbbbbb", start=T0)
    a = make_flow(flow_id="f-aaaaaaaa", start=T0)
    store.write([b, a])
    assert store.flows() == [a, b]


def test_capture_run_is_recorded_on_rows(store):
    run = store.add_capture_run("replay", ["incident.pcapng"], T0, "0.1.0")
    flow = make_dns_flow("pypi.org", ["151.101.0.223"])
    store.write([flow, make_event()], capture_run_id=run)
    from sqlalchemy import select
    from db.models import Flow, TaskEvent
    with store.session() as s:
        assert s.execute(select(Flow.capture_run_id)).scalars().all() == [run]
        assert s.execute(select(TaskEvent.capture_run_id)).scalars().all() == [run]
    assert store.flows() == [flow]
