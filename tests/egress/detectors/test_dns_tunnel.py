"""dns-tunnel: iodine, dnscat2 and dns2tcp shapes fire once per task and domain; CDNs,
package installs, DKIM, reverse lookups and service discovery do not; the window slides,
tasks stay apart and the state stays bounded. Directly and through the judge."""

from __future__ import annotations

import base64
import collections
import dataclasses
import itertools
import math
import random
import struct

import pytest

from egress.detectors import Context, dns_tunnel
from egress.detectors.dns_tunnel import (DnsTunnel, domain_label_count, render,
                                         wire_labels)
from egress.identify import dns
from egress.judge import Judge
from egress.records import (DnsInfo, DnsQuery, DnsTunnelEvidence, Mode, Severity, Step,
                            Verdict, read_record)
from tests.factories import make_judge, T0, make_dns_flow, make_flow, make_tls_flow

SECOND = 1_000_000
CTX = Context(step=Step.END, purpose=None, names=())

# ------------------------------------------------------------------ building names


def dotify(text: str, every: int) -> str:
    return ".".join(text[i:i + every] for i in range(0, len(text), every))


def b32(rng: random.Random, n: int) -> str:
    return base64.b32encode(rng.randbytes(n)).decode().rstrip("=").lower()


def iodine_name(rng: random.Random, domain: str) -> str:
    """iodine upstream data: a user/command hex digit, base32 payload, a dot every 57."""
    return dotify(rng.choice("0123456789abcdef") + b32(rng, 110), 57) + "." + domain


def dnscat2_name(rng: random.Random, domain: str) -> str:
    """dnscat2: the packet in hex, 63 characters a label (at least 20 bytes: its header)."""
    return dotify(rng.randbytes(rng.randint(20, 110)).hex(), 63) + "." + domain


def dns2tcp_name(rng: random.Random, domain: str) -> str:
    """dns2tcp: base64 payload (lower-cased by the resolver path, as we render it)."""
    text = base64.b64encode(rng.randbytes(rng.randint(40, 90))).decode().rstrip("=").lower()
    return dotify(text, 63) + "." + domain


IODINE_B128 = (b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
               + bytes(range(0xBC, 0xFE)))
"""iodine's base128 alphabet: letters, digits and 0xBC-0xFD."""
assert len(IODINE_B128) == 128
T_PRIVATE = 65399
"""iodine's private query type (0xFF77)."""


def wire_query(labels: list[bytes], qtype: int) -> bytes:
    """A DNS query message on the wire (RD set, class IN)."""
    qname = b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"
    return struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + qname + struct.pack(
        "!HH", qtype, 1)


# ------------------------------------------------------------------ building flows


_DNS_FLOW = make_flow(proto="udp", app="dns", dst="10.213.0.1", dport=53, sport=53053)
_flow_ids = itertools.count(1)


def dns_flow(queries: list[tuple[str, str]], start: int, task: str = "t1"):
    """One ended DNS flow of ``task`` to its resolver carrying ``queries`` (name, type).

    A copy of one factory flow: these tests make tens of thousands, and make_flow's
    source ports (shared by the whole session) would run past 65535.
    """
    return dataclasses.replace(
        _DNS_FLOW, flow_id=f"f-dnst{next(_flow_ids):06d}", task=task, start=start,
        end=start + SECOND // 10, findings=[],
        dns=DnsInfo(queries=[DnsQuery(name=n, type=t, rcode="NOERROR") for n, t in queries]))


def feed(detector: DnsTunnel, queries, *, step: float = 0.2, task: str = "t1",
         start: int = T0):
    """One flow per query, ``step`` seconds apart; the (index, event) pairs raised."""
    out = []
    for i, (name, qtype) in enumerate(queries):
        flow = dns_flow([(name, qtype)], start + int(i * step * SECOND), task)
        out.extend((i, e) for e in detector.observe(flow, CTX))
    return out


# ------------------------------------------------------------------ expectations


def label_entropy(label: bytes) -> float:
    n = len(label)
    return -sum(c / n * math.log2(c / n) for c in collections.Counter(label).values())


def expected(domain: str, queries, labels_of=None) -> DnsTunnelEvidence:
    """The evidence for ``queries`` all in one window, computed from the names we built."""
    if labels_of is None:
        def labels_of(name):
            return [p.encode() for p in name[:-len(domain) - 1].split(".")]
    below = [label for name, _ in queries for label in labels_of(name)]
    long = [label_entropy(label) for label in below if len(label) >= 16]
    return DnsTunnelEvidence(
        domain=domain, distinct_names=len({n for n, _ in queries}), window_s=60.0,
        max_label_length=max(len(label) for label in below),
        entropy=round(sum(long) / len(long), 2) if long else None,
        qtypes=sorted({t for _, t in queries}))


def is_payload(name: str, domain: str) -> bool:
    labels = name[:-len(domain) - 1].split(".")
    long = [label_entropy(label.encode()) for label in labels if len(label) >= 16]
    return max(map(len, labels)) >= 40 or bool(long and sum(long) / len(long) >= 3.5)


def nth_distinct(queries, n: int, keep=lambda name, qtype: True) -> int:
    """Index of the query that makes ``n`` distinct names among those ``keep`` accepts."""
    seen = set()
    for i, (name, qtype) in enumerate(queries):
        if keep(name, qtype):
            seen.add(name)
            if len(seen) == n:
                return i
    raise AssertionError(f"fewer than {n} distinct names")


def only_event(events):
    assert len(events) == 1, [e for _, e in events]
    index, event = events[0]
    assert event.event == "dns-tunnel" and event.task == "t1"
    (finding,) = event.findings
    assert finding.id == "dns-tunnel" and finding.severity is Severity.HIGH
    return index, finding.evidence


# ------------------------------------------------------------------ tunnels


def iodine_session(rng, domain: str, n: int, qtype: str = "NULL"):
    """iodine's handshake (version, login, options: short names) then data queries."""
    handshake = [(f"v{b32(rng, 4)}.{domain}", qtype), (f"l{b32(rng, 5)}.{domain}", qtype),
                 (f"o{b32(rng, 2)}.{domain}", qtype)]
    return handshake + [(iodine_name(rng, domain), qtype) for _ in range(n)]


def test_iodine_null_fires_once_with_its_evidence():
    domain = "example.net"
    queries = iodine_session(random.Random(1), "t1.tun." + domain, 300)
    index, evidence = only_event(feed(DnsTunnel(), queries))
    # three distinct payload-shaped NULL names: the handshake's short names do not count
    assert not any(is_payload(n, domain) for n, _ in queries[:3])
    assert index == nth_distinct(queries, dns_tunnel.MIN_ODD_TYPE_NAMES,
                                 lambda n, t: is_payload(n, domain)) == 5
    assert evidence == expected(domain, queries[:index + 1])
    assert evidence.max_label_length == 57 and evidence.qtypes == ["NULL"]
    assert evidence.entropy > dns_tunnel.HIGH_ENTROPY


def test_iodine_base128_private_type_as_rendered_from_the_wire():
    rng = random.Random(2)
    domain = [b"t1", b"tun", b"example", b"net"]
    queries, wire = [], {}
    for _ in range(50):
        labels = [bytes(rng.choice(IODINE_B128) for _ in range(57)) for _ in range(3)]
        query = dns.as_query(dns.message(wire_query(labels + domain, T_PRIVATE)))
        queries.append((query.name, query.type))
        wire[query.name] = [label.lower() for label in labels] + [b"t1", b"tun"]
    assert all("\\" in name for name, _ in queries)  # the renderer escaped the high bytes
    assert queries[0][1] == "TYPE65399"
    index, evidence = only_event(feed(DnsTunnel(), queries))
    assert index == dns_tunnel.MIN_ODD_TYPE_NAMES - 1
    assert evidence == expected("example.net", queries[:index + 1], wire.__getitem__)
    assert evidence.max_label_length == 57   # wire bytes, not the longer rendered text


def test_dnscat2_fires_once():
    rng = random.Random(3)
    domain = "c2.example.org"
    queries = [(dnscat2_name(rng, domain), rng.choice(["TXT", "CNAME", "MX"]))
               for _ in range(400)]
    index, evidence = only_event(feed(DnsTunnel(), queries, step=0.05))
    assert all(is_payload(n, "example.org") for n, _ in queries)
    first_txt = nth_distinct(queries, dns_tunnel.MANY_TXT, lambda n, t: t == "TXT")
    first_many = nth_distinct(queries, dns_tunnel.MANY_NAMES)
    assert index == min(first_txt, first_many)
    assert evidence == expected("example.org", queries[:index + 1])
    assert evidence.max_label_length == 63


def test_dnscat2_without_txt_fires_on_many_names():
    rng = random.Random(4)
    queries = [(dnscat2_name(rng, "example.org"), rng.choice(["CNAME", "MX"]))
               for _ in range(100)]
    index, evidence = only_event(feed(DnsTunnel(), queries))
    assert index == dns_tunnel.MANY_NAMES - 1
    assert evidence == expected("example.org", queries[:index + 1])
    assert evidence.qtypes == ["CNAME", "MX"]


def test_dns2tcp_txt_fires_once():
    rng = random.Random(5)
    domain = "dns2tcp.example.co.uk"
    queries = [(dns2tcp_name(rng, domain), "TXT") for _ in range(200)]
    index, evidence = only_event(feed(DnsTunnel(), queries, step=0.1))
    assert index == dns_tunnel.MANY_TXT - 1
    assert evidence == expected("example.co.uk", queries[:index + 1])  # co.uk: three labels
    assert evidence.qtypes == ["TXT"] and evidence.entropy > 4


def test_many_queries_in_one_flow():
    rng = random.Random(6)
    queries = [(dnscat2_name(rng, "example.org"), "CNAME") for _ in range(64)]
    events = DnsTunnel().observe(dns_flow(queries, T0), CTX)
    (event,) = events
    assert event.findings[0].evidence == expected("example.org", queries)
    assert event.time == T0 + SECOND // 10     # the flow's end


def test_one_event_per_domain():
    rng = random.Random(7)
    a = [(iodine_name(rng, "a.example"), "NULL") for _ in range(100)]
    b = [(dns2tcp_name(rng, "b.example"), "TXT") for _ in range(100)]
    queries = [q for pair in zip(a, b) for q in pair]
    events = feed(DnsTunnel(), queries)
    assert [e.findings[0].evidence.domain for _, e in events] == ["a.example", "b.example"]
    assert [i for i, _ in events] == [2 * (dns_tunnel.MIN_ODD_TYPE_NAMES - 1),
                                      2 * (dns_tunnel.MANY_TXT - 1) + 1]


def test_names_are_grouped_case_insensitively():
    rng = random.Random(8)
    queries = [(iodine_name(rng, "Tun.EXAMPLE.net").upper(), "NULL") for _ in range(10)]
    _, evidence = only_event(feed(DnsTunnel(), queries))
    assert evidence.domain == "example.net"


# ------------------------------------------------------------------ benign


def cdn():
    rng = random.Random(10)
    out = []
    for _ in range(200):
        out.append(("d" + b32(rng, 10)[:13] + ".cloudfront.net", "A"))   # d3c33hcgiwev3
        out.append((f"e{rng.randint(1, 99999)}.a.akamaiedge.net", "A"))
    return out


def package_installs():
    words = ["api", "codeload", "objects", "uploads", "raw", "media", "avatars",
             "releases", "pkg", "files"]
    hosts = [f"{w}{suffix}" for w in words for suffix in ("", "-eu", "-us", "-ap", "1")]
    assert len(hosts) == 50
    return [(f"{h}.{d}", t) for h in hosts for d in ("pypi.org", "github.com")
            for t in ("A", "AAAA", "HTTPS")]


def dkim():
    rng = random.Random(11)
    out = []
    for d in ("example.com", "example.org", "example.net", "mail.example.co.uk"):
        out += [(d, "TXT"), (f"_dmarc.{d}", "TXT"), (f"selector1._domainkey.{d}", "TXT"),
                (f"google._domainkey.{d}", "TXT")]
        # Amazon SES: three 32-character random selectors a domain: payload-shaped, but few
        out += [(f"{b32(rng, 20)}._domainkey.{d}", "TXT") for _ in range(3)]
    return out


def reverse_lookups():
    rng = random.Random(12)
    v4 = [(f"{rng.randint(0, 255)}.{rng.randint(0, 255)}.113.203.in-addr.arpa", "PTR")
          for _ in range(300)]
    v6 = [(".".join(rng.randbytes(16).hex()[::-1]) + ".ip6.arpa", "PTR") for _ in range(300)]
    return v4 + v6


def long_legit_name():
    name = "this-is-a-very-long-but-perfectly-legitimate-service-host.example.com"
    assert len(name.split(".")[0]) >= dns_tunnel.LONG_LABEL
    short = [(f"host{i}.example.com", "A") for i in range(40)]
    return [(name, t) for t in ("A", "AAAA", "HTTPS", "TXT")] * 30 + short


def service_discovery():
    out = [("_services._dns-sd._udp.local", "PTR"), ("lb._dns-sd._udp.example.com", "PTR")]
    for service in ("_http._tcp", "_ipp._tcp", "_ssh._tcp", "_ldap._tcp", "_kerberos._udp"):
        out += [(f"{service}.example.com", "SRV"), (f"{service}.local", "PTR")]
        out += [(f"host-{i}.{service}.example.com", "SRV") for i in range(10)]
    return out


BENIGN = {"cdn": cdn, "package-installs": package_installs, "dkim": dkim,
          "reverse-lookups": reverse_lookups, "long-legit-name": long_legit_name,
          "service-discovery": service_discovery}


@pytest.mark.parametrize("build", BENIGN.values(), ids=BENIGN.keys())
def test_benign_does_not_fire(build):
    queries = build()
    assert feed(DnsTunnel(), queries, step=0.01) == []
    # all of it in one flow after another, in one window, still nothing
    detector = DnsTunnel()
    for i in range(0, len(queries), 64):
        assert list(detector.observe(dns_flow(queries[i:i + 64], T0 + i * 1000), CTX)) == []


def test_benign_shapes_are_really_many():
    """The benign cases reach the counts a tunnel reaches; only their shape differs."""
    per_domain = collections.Counter(
        render(wire_labels(n)[-domain_label_count(wire_labels(n)):])
        for n in {n for n, _ in cdn() + package_installs()})
    assert per_domain["cloudfront.net"] >= dns_tunnel.MANY_NAMES
    assert per_domain["pypi.org"] == per_domain["github.com"] == 50


def test_reverse_lookups_keep_no_state():
    detector = DnsTunnel()
    feed(detector, reverse_lookups(), step=0.01)
    assert detector.tracked_domains("t1") == 0


# ------------------------------------------------------------------ window


def test_window_slides():
    rng = random.Random(20)
    queries = [(dnscat2_name(rng, "example.org"), "A") for _ in range(40)]
    detector = DnsTunnel()
    assert feed(detector, queries, step=15) == []   # 40 names over 10 minutes
    times = [i * 15 for i in range(40)]
    in_window = [t for t in times if t >= times[-1] - dns_tunnel.WINDOW_S]
    assert detector.tracked_queries("t1") == len(in_window) == 5   # the window's only
    index, evidence = only_event(feed(DnsTunnel(), queries, step=1))   # within a minute
    assert index == dns_tunnel.MANY_NAMES - 1


def test_distinct_names_count_the_window_only():
    rng = random.Random(21)
    early = [(dnscat2_name(rng, "example.org"), "A") for _ in range(25)]
    late = [(dnscat2_name(rng, "example.org"), "A") for _ in range(30)]
    detector = DnsTunnel()
    assert feed(detector, early, step=1) == []
    events = feed(detector, late, step=0.5, start=T0 + 120 * SECOND)
    index, evidence = only_event(events)
    assert index == dns_tunnel.MANY_NAMES - 1 and evidence.distinct_names == 30


def test_straggler_older_than_the_window_is_not_counted():
    rng = random.Random(22)
    queries = [(iodine_name(rng, "example.net"), "NULL") for _ in range(3)]
    detector = DnsTunnel()
    assert feed(detector, queries[:2], start=T0 + 300 * SECOND) == []
    assert feed(detector, queries[2:], start=T0) == []   # five minutes late
    assert detector.tracked_queries("t1") == 2


def test_a_straggler_counts_while_inside_the_window():
    rng = random.Random(23)
    names = [(dnscat2_name(rng, "example.org"), "A") for _ in range(32)]
    detector = DnsTunnel()

    def at(seconds, queries):
        return list(detector.observe(dns_flow(queries, T0 + int(seconds * SECOND)), CTX))

    assert at(100, names[:1]) == []
    assert at(45, names[1:2]) == []      # late, but inside the window of the newest (100)
    assert at(10, names[2:3]) == []      # older than that window: not counted
    assert detector.tracked_queries("t1") == 2
    # from 106 s on the straggler at 45 s has left the window: 28 more make 29 names
    for i, name in enumerate(names[3:31]):
        assert at(106 + i / 10, [name]) == []
    (event,) = at(110, names[31:32])
    assert event.findings[0].evidence.distinct_names == dns_tunnel.MANY_NAMES


# ------------------------------------------------------------------ tasks


def test_tasks_are_kept_apart():
    rng = random.Random(30)
    queries = [(dnscat2_name(rng, "example.org"), "A") for _ in range(40)]
    detector = DnsTunnel()
    events = []
    for i, q in enumerate(queries):
        task = ("t1", "t2")[i % 2]
        events += detector.observe(dns_flow([q], T0 + i * SECOND // 10, task), CTX)
    assert events == []   # 40 names under one domain, but 20 a task
    more = [(dnscat2_name(rng, "example.org"), "A") for _ in range(10)]
    events = feed(detector, more, start=T0 + 5 * SECOND)
    index, evidence = only_event(events)
    assert index == 9 and evidence.distinct_names == 30
    assert detector.tracked_domains("t2") == 1 and detector.tracked_domains("t1") == 0


# ------------------------------------------------------------------ bounds


def test_state_stays_bounded_over_10000_domains():
    detector = DnsTunnel()
    rng = random.Random(40)
    tunnel = [(iodine_name(rng, "tun.example.net"), "A") for _ in range(40)]
    queries = []
    for i in range(10_000):
        queries.append((f"www.site{i}.example", "A"))
        if i % 250 == 0 and tunnel:
            queries.append(tunnel.pop())   # a slow tunnel among the crowd stays tracked
    events = feed(detector, queries, step=0.001)
    assert detector.tracked_domains("t1") == dns_tunnel.MAX_DOMAINS_PER_TASK
    assert detector.tracked_queries("t1") == dns_tunnel.MAX_DOMAINS_PER_TASK  # one each
    ((_, event),) = events
    assert event.findings[0].evidence.domain == "example.net"


def test_one_domains_window_is_capped():
    detector = DnsTunnel()
    feed(detector, [(f"host{i}.example.com", "A") for i in range(10_000)], step=0.001)
    assert detector.tracked_domains("t1") == 1
    assert detector.tracked_queries("t1") == dns_tunnel.MAX_QUERIES_PER_DOMAIN


def test_tasks_are_capped():
    detector = DnsTunnel()
    for i in range(dns_tunnel.MAX_TASKS + 100):
        if i == dns_tunnel.MAX_TASKS - 1:   # task-0 seen again: now among the recent ones
            detector.observe(dns_flow([("www.example.com", "A")], T0, task="task-0"), CTX)
        detector.observe(dns_flow([("www.example.com", "A")], T0, task=f"task-{i}"), CTX)
    assert detector.tracked_tasks() == dns_tunnel.MAX_TASKS
    assert detector.tracked_domains("task-1") == 0          # the least recent went first
    assert detector.tracked_domains("task-0") == 1
    assert detector.tracked_domains(f"task-{dns_tunnel.MAX_TASKS + 99}") == 1


def test_fired_domains_are_capped_and_never_raised_twice_while_remembered():
    detector = DnsTunnel()
    rng = random.Random(41)
    n = dns_tunnel.MAX_FIRED_PER_TASK + 10
    queries = [(iodine_name(rng, f"tun{i}.example"), "NULL") for i in range(n) for _ in range(3)]
    assert len(feed(detector, queries, step=0.001)) == n
    assert len(detector._tasks["t1"].fired) == dns_tunnel.MAX_FIRED_PER_TASK
    assert detector.tracked_domains("t1") == 0     # a raised domain's window is let go
    again = [(iodine_name(rng, f"tun{n - 1}.example"), "NULL") for _ in range(3)]
    assert feed(detector, again, step=0.001) == []


# ------------------------------------------------------------------ names


@pytest.mark.parametrize("name, labels", [
    ("www.Example.COM.", [b"www", b"example", b"com"]),
    ("a\\.b.example.com", [b"a.b", b"example", b"com"]),
    ("\\200\\001x.example", [b"\xc8\x01x", b"example"]),
    ("\\\\.example", [b"\\", b"example"]),
    (".", []),
    ("", []),
])
def test_wire_labels_undo_dig_escapes(name, labels):
    assert wire_labels(name) == labels


@pytest.mark.parametrize("name, domain", [
    ("a.b.example.com", "example.com"),
    ("a.b.example.co.uk", "example.co.uk"),
    ("x.shop.com.au", "shop.com.au"),
    ("co.uk", "co.uk"),
    ("localhost", "localhost"),
    ("a\\.b.\\200x.example", "\\200x.example"),
])
def test_registrable_domain(name, domain):
    labels = wire_labels(name)
    assert render(labels[-domain_label_count(labels):]) == domain


def test_render_matches_the_dns_identifier():
    labels = [bytes(range(0, 256, 7)), b"a.b", b"example"]
    query = dns.as_query(dns.message(wire_query(labels, 1)))
    assert render(wire_labels(query.name)) == query.name


def test_flows_without_dns_are_ignored():
    detector = DnsTunnel()
    assert list(detector.observe(make_tls_flow("example.org"), CTX)) == []
    assert list(detector.observe(make_flow(app="dns", proto="udp", dns=DnsInfo()), CTX)) == []
    assert detector.tracked_tasks() == 0


# ------------------------------------------------------------------ through the judge

def judge_for(text: str = "", mode=Mode.AUDIT, tasks=("t1",)) -> Judge:
    return make_judge(text, mode, tasks=tasks, task_detectors=[DnsTunnel()])


def judge_all(judge: Judge, queries, *, task="t1", step=0.2, start=T0):
    """One flow per query, through the judge; make_dns_flow's flows for the short runs."""
    flows = []
    for i, (name, qtype) in enumerate(queries):
        at = start + int(i * step * SECOND)
        flow = make_dns_flow(name, [], qtype=qtype, task=task, start=at,
                             end=at + SECOND // 10) if len(queries) <= 200 \
            else dns_flow([(name, qtype)], at, task)
        flows.append(judge.judge_flow(flow))
    return flows


@pytest.mark.parametrize("mode", [Mode.AUDIT, Mode.ENFORCE])
def test_through_the_judge(mode):
    rng = random.Random(50)
    iodine = iodine_session(rng, "t1.tun.example.net", 100)
    dnscat = [(dnscat2_name(rng, "c2.example.org"), "TXT") for _ in range(100)]
    j = judge_for(mode=mode)
    flows = judge_all(j, iodine) + judge_all(j, dnscat, start=T0 + SECOND // 20)
    assert {f.verdict for f in flows} == {Verdict.ALLOW}   # the flows themselves are fine
    events = j.events()
    assert [e.event for e in events] == ["dns-tunnel", "dns-tunnel"]
    assert [e.task for e in events] == ["t1", "t1"]
    first, second = (e.findings[0] for e in events)
    assert first.evidence == expected("example.net", iodine[:6])
    assert second.evidence == expected("example.org", dnscat[:dns_tunnel.MANY_TXT])
    assert not first.waived and first.severity is Severity.HIGH
    assert j.events() == []
    for e in events:   # the task event as the JSON stream carries it
        assert read_record(e.to_json(), strict=True) == e


def test_through_the_judge_waived():
    rng = random.Random(51)
    j = judge_for('waive = ["dns-tunnel"]\n')
    judge_all(j, [(dns2tcp_name(rng, "example.com"), "TXT") for _ in range(20)])
    (event,) = j.events()
    assert event.findings[0].waived


def test_through_the_judge_benign_and_tasks_apart():
    rng = random.Random(52)
    j = judge_for(tasks=("t1", "t2"))
    for build in BENIGN.values():
        judge_all(j, build(), step=0.01)
    tunnel = [(dnscat2_name(rng, "tunnel.example"), "A") for _ in range(40)]
    judge_all(j, tunnel[:20], task="t1", step=0.5)
    judge_all(j, tunnel[20:], task="t2", step=0.5)
    assert j.events() == []
    judge_all(j, tunnel[:30], task="t2", step=0.5, start=T0 + 12 * SECOND)
    (event,) = j.events()
    assert event.task == "t2" and event.findings[0].evidence.distinct_names == 30
