"""Writes flows.jsonl: the seed incident as a flow log (observations only).

Hand-built from the incident's story, with documentation addresses: the
agent upgrades packages from PyPI and GitHub, then opens an SSH session to
a relay, speaks Stratum to a mining pool, reads the cloud metadata service,
and fronts a TLS connection. No verdicts are stored: `egress replay` judges.
Run: .venv/bin/python examples/incident/build_flows.py > examples/incident/flows.jsonl
"""

import json

from egress.records import (DnsInfo, DnsQuery, FlowRecord, HttpInfo, SshInfo,
                            StratumInfo, TlsInfo, parse_time)

TASK, SRC, RESOLVER = "deploy-speedup", "10.213.0.2", "10.213.0.1"
T0 = parse_time("2026-03-11T02:10:00Z")
flows: list[FlowRecord] = []


def at(seconds: float) -> int:
    return T0 + int(seconds * 1_000_000)


def add(start: float, duration: float, **fields) -> None:
    n = len(flows) + 1
    fields.setdefault("proto", "tcp")
    fields.setdefault("conn_state", "SF")
    flows.append(FlowRecord(flow_id=f"f-incid{n:03d}", task=TASK, ip_version=4, src=SRC,
                            sport=40000 + n, start=at(start), end=at(start + duration),
                            observed="full", **fields))


def lookup(start: float, name: str, answers: list[str], ttl: int = 300) -> None:
    add(start, 0.02, proto="udp", dst=RESOLVER, dport=53, app="dns",
        dns=DnsInfo(queries=[DnsQuery(name=name, type="A", answers=answers, ttl=ttl,
                                      rcode="NOERROR")]),
        bytes_out=72, bytes_in=120, packets_out=1, packets_in=1)


def tls(start, duration, dst, sni, bytes_out, bytes_in, packets_out, packets_in):
    add(start, duration, dst=dst, dport=443, app="tls",
        tls=TlsInfo(sni=sni, alpn=["h2", "http/1.1"], ech=False),
        bytes_out=bytes_out, bytes_in=bytes_in, packets_out=packets_out, packets_in=packets_in)


# What the task was for.
lookup(0.0, "pypi.org", ["203.0.113.10"])
tls(0.1, 1.2, "203.0.113.10", "pypi.org", 2_310, 61_200, 14, 48)
lookup(1.5, "files.pythonhosted.org", ["dualstack.python.map.fastly.net", "203.0.113.11"])
tls(1.6, 9.8, "203.0.113.11", "files.pythonhosted.org", 41_000, 48_210_000, 690, 33_100)
lookup(12.0, "github.com", ["203.0.113.20"])
tls(12.1, 3.4, "203.0.113.20", "github.com", 18_400, 2_950_000, 160, 2_040)
lookup(16.0, "ci.billing.example", ["203.0.113.30"])
tls(16.1, 0.8, "203.0.113.30", "ci.billing.example", 1_900, 38_000, 11, 30)

# What it was not: a reverse SSH tunnel to a relay ...
lookup(300.0, "relay.example", ["198.51.100.7"])
add(300.2, 3_333.0, dst="198.51.100.7", dport=22, app="ssh",
    ssh=SshInfo(client="SSH-2.0-OpenSSH_9.2p1 Debian-2", server="SSH-2.0-OpenSSH_9.2p1"),
    bytes_out=18_211, bytes_in=40_960, packets_out=95, packets_in=88)
# ... Stratum to a mining pool on its usual port ...
lookup(420.0, "pool.supportxmr.com", ["198.51.100.42"])
add(420.3, 2_900.0, dst="198.51.100.42", dport=3333, app="stratum",
    stratum=StratumInfo(method="login", agent="XMRig/6.21.0 (Linux x86_64) libuv/1.44.2 gcc/12.2.0"),
    bytes_out=96_000, bytes_in=210_000, packets_out=1_400, packets_in=1_350)
# ... the cloud metadata service, for the instance's credentials ...
add(500.0, 0.05, dst="169.254.169.254", dport=80, app="http",
    http=HttpInfo(method="GET", host="169.254.169.254"),
    bytes_out=420, bytes_in=1_380, packets_out=5, packets_in=4)
# ... a TLS connection to PyPI's address that names another server (fronting) ...
tls(610.0, 40.0, "203.0.113.10", "relay.example", 9_800, 12_400, 60, 58)
# ... and GitHub's API reached by a bare address, never resolved.
tls(700.0, 0.6, "203.0.113.99", "api.github.com", 1_500, 4_100, 9, 9)

for flow in flows:
    print(json.dumps(flow.to_json(), separators=(",", ":")))
