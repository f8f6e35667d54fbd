"""Test factories: every test builds flows, findings and events here."""

from __future__ import annotations

import itertools

from hypothesis import strategies as st

from egress.records import (FlowRecord, Finding, TaskEvent, DnsInfo, DnsQuery, TlsInfo,
                            SshInfo, HttpInfo, parse_time)

T0 = parse_time("2026-03-11T02:14:07.120000Z")
"""A fixed start time for hand-built flows (microseconds since the epoch)."""

_ids = itertools.count(1)
_ports = itertools.count(40000)


def make_flow(**fields) -> FlowRecord:
    """An outbound TCP flow of task ``t1`` to 203.0.113.10:443; override any field."""
    n = next(_ids)
    base = dict(flow_id=f"f-t{n:07d}", task="t1", proto="tcp", ip_version=4,
                src="10.213.0.2", dst="203.0.113.10", dport=443,
                start=T0 + n * 1000, end=T0 + n * 1000 + 500_000, conn_state="SF",
                observed="full", bytes_out=1200, bytes_in=5400, packets_out=8,
                packets_in=7)
    if "sport" not in fields:
        base["sport"] = 1024 + next(_ports) % 64000   # distinct, and always a port
    base.update(fields)
    return FlowRecord(**base)


def make_tls_flow(sni: str | None, **fields) -> FlowRecord:
    return make_flow(app="tls", tls=TlsInfo(sni=sni, alpn=["h2", "http/1.1"]), **fields)


def make_ssh_flow(**fields) -> FlowRecord:
    fields.setdefault("dport", 22)
    return make_flow(app="ssh", ssh=SshInfo(client="SSH-2.0-OpenSSH_9.2p1 Debian-2",
                                            server="SSH-2.0-OpenSSH_9.2p1"), **fields)


def make_http_flow(host: str | None, **fields) -> FlowRecord:
    fields.setdefault("dport", 80)
    return make_flow(app="http", http=HttpInfo(method="GET", host=host), **fields)


def make_dns_flow(name: str, answers: list[str], *, qtype: str = "A", ttl: int = 300,
                  **fields) -> FlowRecord:
    """A DNS lookup by the task; its answers bind ``name`` (and CNAMEs) to addresses."""
    fields.setdefault("dst", "10.213.0.1")
    fields.setdefault("dport", 53)
    return make_flow(proto="udp", app="dns", conn_state="SF",
                     dns=DnsInfo(queries=[DnsQuery(name=name, type=qtype, answers=answers,
                                                   ttl=ttl, rcode="NOERROR")]),
                     **fields)


PURPOSE_HEAD = 'version = 1\npurpose = "test"\n'
RESOLVER_RULE = '\n[[allow]]\ncidr = "10.213.0.1/32"\nprotocol = "dns"\n'
"""The task's resolver (make_dns_flow's), declared so that its answers bind names."""


def make_judge(rules: str = "", mode=None, *, tasks=("t1",), detectors=None,
               task_detectors=None):
    """A judge for tasks ``tasks`` under a purpose of ``rules`` (manifest text), whose
    resolver is declared; detectors as given, else the shipped ones."""
    from egress.judge import Judge, TaskPolicy
    from egress.records import Mode
    from tagging import manifest
    mode = mode or Mode.AUDIT
    purpose = manifest.parse(PURPOSE_HEAD + rules + RESOLVER_RULE, "t.toml")
    return Judge([TaskPolicy(t, purpose, mode) for t in tasks], mode=mode, detectors=detectors,
                 task_detectors=task_detectors)


def make_finding(id: str = "direct-ip", **evidence) -> Finding:
    if id == "direct-ip" and not evidence:
        evidence = {"address": "203.0.113.10"}
    return Finding.make(id, **evidence)


def make_event(event: str = "task-started", task: str = "t1", findings=(), time: int = T0):
    return TaskEvent(task=task, time=time, event=event, findings=list(findings))


@st.composite
def mutated(draw, base: bytes) -> bytes:
    """``base`` truncated, with bytes flipped, inserted or deleted."""
    data = bytearray(base)
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 8))]
        else:
            del data[at:]
    return bytes(data)
