"""The task's resolver: which names it answers, which addresses the task may learn,
and, over real sockets on 127.0.0.1, that refused names never reach upstream and
that an answer leaves only after its addresses were admitted."""

from __future__ import annotations

import ipaddress
import socket
import socketserver
import struct
import threading
import time

import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from dns.rdtypes.svcbbase import ParamKey

from egress.enforce.dnspolicy import NamePolicy, private_reason, query_name, rewrite
from egress.enforce.resolver import Resolver
from egress.records import DnsRefusedEvidence, NameBinding, TaskEvent
from tagging import manifest

PURPOSE = """version = 1
purpose = "Fetch from the project's hosts"
task = "t-dns"

[[allow]]
host = "www.example.org"

[[allow]]
host = "*.cdn.example"

[[allow]]
host = "bücher.example"

[[allow]]
cidr = "10.5.0.0/16"
"""
ECH = "AAT+DQAA"   # a minimal ECHConfigList: length 4, then 4 bytes


@pytest.fixture(scope="module")
def purpose():
    return manifest.parse(PURPOSE, "test.toml")


@pytest.fixture(scope="module")
def policy(purpose):
    return NamePolicy(purpose, host_addresses=["198.51.100.99", "2001:db8::99"])


def name(text: str) -> dns.name.Name:
    return dns.name.from_text(text)


def response(qname: str, qtype: str, answer=(), additional=(),
             flags="QR RD RA") -> dns.message.Message:
    """An upstream response from zone-file lines."""
    text = "\n".join([f"id 7\nopcode QUERY\nrcode NOERROR\nflags {flags}", ";QUESTION",
                      f"{qname} IN {qtype}", ";ANSWER", *answer, ";AUTHORITY", ";ADDITIONAL",
                      *additional])
    return dns.message.from_text(text)


def addresses_in(message: dns.message.Message) -> set[str]:
    return {rd.address for rrset in message.answer + message.additional
            if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA) for rd in rrset}


# ---------------------------------------------------------------- names


@pytest.mark.parametrize("wire, expected", [
    ("WWW.Example.ORG.", "www.example.org"),
    ("xn--bcher-kva.example.", "xn--bcher-kva.example"),
    ("_dmarc.example.org.", "_dmarc.example.org"),
])
def test_query_names_are_normalised(wire, expected):
    assert query_name(name(wire)) == expected


def test_a_label_holding_a_dot_is_no_host_name():
    # One label "evil.cdn" under "example": its text form ends in ".cdn.example", as
    # "*.cdn.example" wants, but the upstream would ask example's servers about it.
    sneaky = dns.name.Name([b"x", b"evil.cdn", b"example", b""])
    assert sneaky.to_text().endswith(r"evil\.cdn.example.")
    assert query_name(sneaky) is None


@pytest.mark.parametrize("labels", [
    [b""], [b"a b", b"example", b""], [b"\xc3\xbc", b"example", b""],
    [b"*", b"cdn", b"example", b""]])
def test_names_outside_host_syntax_are_none(labels):
    assert query_name(dns.name.Name(labels)) is None


@pytest.mark.parametrize("text, allowed", [
    ("www.example.org", True), ("WWW.EXAMPLE.ORG.", True),
    ("example.org", False), ("api.www.example.org", False),
    ("img.cdn.example", True), ("a.b.cdn.example", True), ("cdn.example", False),
    ("xcdn.example", False),
    ("xn--bcher-kva.example", True), ("XN--BCHER-KVA.example", True),
    ("10.5.0.1", False),                   # a cidr rule allows addresses, not names
])
def test_names_allowed_by_host_rules(policy, text, allowed):
    assert policy.allows(query_name(name(text))) is allowed


# ---------------------------------------------------------------- addresses


@pytest.mark.parametrize("address, why", [
    ("10.1.2.3", "rfc1918"), ("172.16.0.1", "rfc1918"), ("172.31.255.255", "rfc1918"),
    ("192.168.1.1", "rfc1918"), ("100.64.0.1", "rfc6598"), ("100.100.100.200", "rfc6598"),
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("169.254.169.254", "link-local"),
    ("fe80::1", "link-local"), ("fd00:ec2::254", "ula"), ("fc00::1", "ula"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"), ("224.0.0.251", "multicast"),
    ("ff02::1", "multicast"), ("255.255.255.255", "reserved"),
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.9.9.9", "rfc1918"),
])
def test_private_and_special_addresses(address, why):
    assert private_reason(ipaddress.ip_address(address)) == why


@pytest.mark.parametrize("address", ["192.0.2.1", "198.51.100.7", "203.0.113.10", "2001:db8::1",
                                     "8.8.8.8", "172.32.0.1", "100.128.0.1", "2606:4700::1"])
def test_documentation_and_public_addresses_are_not_private(address):
    assert private_reason(ipaddress.ip_address(address)) is None


def test_refusal_host_addresses_and_cidr_rules(policy):
    assert policy.refusal("203.0.113.10") is None
    assert policy.refusal("198.51.100.99") == "host-address"
    assert policy.refusal("::ffff:198.51.100.99") == "host-address"
    assert policy.refusal("2001:db8::99") == "host-address"
    assert policy.refusal("10.5.3.4") is None           # the purpose's cidr rule names it
    assert policy.refusal("10.6.3.4") == "rfc1918"


# ---------------------------------------------------------------- rewriting


def test_rewrite_keeps_chain_addresses_and_drops_the_rest(policy):
    msg = response("www.example.org.", "A", answer=[
        "www.example.org. 300 IN CNAME edge.cdn.example.",
        "edge.cdn.example. 120 IN A 203.0.113.10",
        "edge.cdn.example. 120 IN A 10.0.0.5",
        "edge.cdn.example. 120 IN A 10.5.0.9",
        "stray.example. 120 IN A 198.51.100.1",
    ], additional=["ns.example. 300 IN A 198.51.100.2"], flags="QR RD RA AD")
    done = rewrite(msg, name("www.example.org."), policy, min_ttl=30)
    assert done.addresses == {"203.0.113.10": 120, "10.5.0.9": 120}
    assert done.dropped == {"10.0.0.5": "rfc1918", "198.51.100.1": "off-chain"}
    assert done.names() == ["www.example.org", "edge.cdn.example"]
    assert addresses_in(msg) == {"203.0.113.10", "10.5.0.9"}
    assert not msg.flags & dns.flags.AD
    assert msg.rcode() == dns.rcode.NOERROR


def test_rewrite_leaves_a_clean_answer_alone(policy):
    msg = response("www.example.org.", "AAAA", answer=["www.example.org. 60 IN AAAA 2001:db8::10"],
                   flags="QR RD RA AD")
    before = msg.to_wire()
    done = rewrite(msg, name("www.example.org."), policy, min_ttl=30)
    assert done.addresses == {"2001:db8::10": 60} and not done.changed
    assert msg.to_wire() == before


def test_every_address_dropped_leaves_an_empty_noerror(policy):
    msg = response("www.example.org.", "A", answer=["www.example.org. 60 IN A 169.254.169.254",
                                                     "www.example.org. 60 IN A 127.0.0.1"])
    done = rewrite(msg, name("www.example.org."), policy, min_ttl=30)
    assert done.addresses == {} and msg.answer == [] and msg.rcode() == dns.rcode.NOERROR
    assert set(done.dropped.values()) == {"link-local", "loopback"}


@pytest.mark.parametrize("ttl, floor, kept",
                         [(5, 30, 30), (300, 30, 300), (5, 0, 5), (60, 3600, 3600)])
def test_ttl_floor(policy, ttl, floor, kept):
    msg = response("www.example.org.", "A", answer=[f"www.example.org. {ttl} IN A 203.0.113.10"])
    assert rewrite(msg, name("www.example.org."), policy, min_ttl=floor).addresses == \
        {"203.0.113.10": kept}
    assert msg.answer[0].ttl == ttl      # the client's TTL is the upstream's


def test_https_hints_admitted_and_ech_stripped(policy):
    msg = response("www.example.org.", "HTTPS", answer=[
        f"www.example.org. 90 IN HTTPS 1 . mandatory=ech alpn=h2 ipv4hint=203.0.113.5,10.0.0.1 "
        f"ech={ECH} ipv6hint=2001:db8::5"])
    done = rewrite(msg, name("www.example.org."), policy, min_ttl=30)
    assert done.addresses == {"203.0.113.5": 90, "2001:db8::5": 90}
    assert done.dropped == {"10.0.0.1": "rfc1918"} and done.ech_stripped == 1
    (rd,) = msg.answer[0]
    assert set(rd.params) == {ParamKey.ALPN, ParamKey.IPV4HINT, ParamKey.IPV6HINT}
    assert rd.params[ParamKey.IPV4HINT].addresses == ("203.0.113.5",)
    assert "ech" not in msg.to_text()
    dns.message.from_wire(msg.to_wire())                  # still a valid message


def test_svcb_off_the_chain_loses_hints_and_ech(policy):
    msg = response("www.example.org.", "A", answer=["www.example.org. 60 IN A 203.0.113.10"],
                   additional=[f"svc.example. 60 IN SVCB 1 . ipv4hint=198.51.100.3 ech={ECH}"])
    done = rewrite(msg, name("www.example.org."), policy, min_ttl=30)
    assert done.addresses == {"203.0.113.10": 60}
    (rd,) = msg.additional[0]
    assert dict(rd.params) == {}


# ---------------------------------------------------------------- a tiny upstream


class Upstream:
    """An authoritative test server over UDP and TCP on 127.0.0.1 that counts what it got.

    ``zone`` lines are zone-file records; CNAMEs are followed. UDP answers above the
    client's size are truncated (TC, empty), like any server.
    """

    def __init__(self, *zone: str):
        self.rrsets: dict[tuple[dns.name.Name, int], dns.rrset.RRset] = {}
        for line in zone:
            owner, ttl, _, rtype, rdata = line.split(None, 4)
            rrset = dns.rrset.from_text(owner, int(ttl), "IN", rtype, rdata)
            key = (rrset.name, rrset.rdtype)
            if key in self.rrsets:
                self.rrsets[key].union_update(rrset)
            else:
                self.rrsets[key] = rrset
        self.received: list[tuple[str, str, str]] = []   # (transport, name, type)
        self.lock = threading.Lock()
        upstream = self

        class Udp(socketserver.BaseRequestHandler):
            def handle(self):
                data, sock = self.request
                sock.sendto(upstream.respond(data, "udp"), self.client_address)

        class Tcp(socketserver.StreamRequestHandler):
            def handle(self):
                size = struct.unpack("!H", self.rfile.read(2))[0]
                reply = upstream.respond(self.rfile.read(size), "tcp")
                self.wfile.write(struct.pack("!H", len(reply)) + reply)

        self.udp = socketserver.ThreadingUDPServer(("127.0.0.1", 0), Udp)
        self.port = self.udp.server_address[1]
        self.tcp = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Tcp)
        self.address = ("127.0.0.1", self.port)

    def respond(self, wire: bytes, transport: str) -> bytes:
        query = dns.message.from_wire(wire)
        q = query.question[0]
        with self.lock:
            self.received.append((transport, q.name.to_text(omit_final_dot=True).lower(),
                                  dns.rdatatype.to_text(q.rdtype)))
        reply = dns.message.make_response(query, recursion_available=True)
        owner = q.name
        for _ in range(8):
            cname = self.rrsets.get((owner, dns.rdatatype.CNAME))
            if cname is None:
                break
            reply.answer.append(cname)
            owner = cname[0].target
        if (owner, q.rdtype) in self.rrsets:
            reply.answer.append(self.rrsets[(owner, q.rdtype)])
        elif not any(n == owner for n, _ in self.rrsets):
            reply.set_rcode(dns.rcode.NXDOMAIN)
        size = max(512, query.payload) if query.edns >= 0 and transport == "udp" else \
            (512 if transport == "udp" else 65535)
        try:
            return reply.to_wire(max_size=size)
        except dns.exception.TooBig:
            reply.answer = []
            reply.flags |= dns.flags.TC
            return reply.to_wire()

    def names(self) -> set[str]:
        with self.lock:
            return {n for _, n, _ in self.received}

    def __enter__(self):
        for server in (self.udp, self.tcp):
            threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc):
        for server in (self.udp, self.tcp):
            server.shutdown()
            server.server_close()


MANY = [f"many.cdn.example. 300 IN A 203.0.113.{i}" for i in range(1, 61)]
ZONE = ["www.example.org. 300 IN CNAME edge.cdn.example.",
        "edge.cdn.example. 5 IN A 203.0.113.10",
        "edge.cdn.example. 5 IN A 192.168.7.7",
        "img.cdn.example. 300 IN TXT \"v=spf1 -all\"",
        "img.cdn.example. 300 IN MX 10 mail.example.org.",
        f"svc.cdn.example. 300 IN HTTPS 1 . alpn=h2 ipv6hint=2001:db8::7 ech={ECH}",
        "refused.example. 300 IN A 198.51.100.66",
        "slow.cdn.example. 300 IN A 198.51.100.8",
        *MANY]


class Calls:
    """The resolver's callbacks, recorded."""

    def __init__(self, delay: float = 0.0, fail: bool = False):
        self.delay, self.fail = delay, fail
        self.allowed: list[tuple[str, list]] = []
        self.events: list[TaskEvent] = []
        self.bindings: list[NameBinding] = []
        self.returned_at: list[float] = []

    def on_allow(self, name, addresses):
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("nft: set is full")
        self.allowed.append((name, addresses))
        self.returned_at.append(time.monotonic())


@pytest.fixture
def upstream():
    with Upstream(*ZONE) as up:
        yield up


def serve(purpose, upstream_address, calls: Calls, **kw) -> Resolver:
    return Resolver(purpose, "t-dns", [("127.0.0.1", 0)], upstream_address,
                    on_allow=calls.on_allow, on_event=calls.events.append,
                    on_binding=calls.bindings.append, **kw)


def ask(resolver: Resolver, qname: str, qtype: str = "A", tcp: bool = False, **kw):
    query = dns.message.make_query(qname, qtype, **kw)
    host, port = resolver.addresses[0]
    if tcp:
        return dns.query.tcp(query, host, port=port, timeout=5)
    return dns.query.udp(query, host, port=port, timeout=5)


# ---------------------------------------------------------------- round trips


def test_allowed_name_forwarded_admitted_and_bound(purpose, upstream):
    calls = Calls()
    with serve(purpose, upstream.address, calls) as resolver:
        got = ask(resolver, "WWW.example.org")
        counters = resolver.counters
    assert got.rcode() == dns.rcode.NOERROR
    assert addresses_in(got) == {"203.0.113.10"}          # 192.168.7.7 dropped
    assert calls.allowed == [("www.example.org", [("203.0.113.10", 30)])]
    host, port = resolver.addresses[0]
    assert {(b.name, b.address, b.ttl, b.resolver, b.resolver_port, b.task)
            for b in calls.bindings} == {
        ("www.example.org", "203.0.113.10", 30, host, port, "t-dns"),
        ("edge.cdn.example", "203.0.113.10", 30, host, port, "t-dns")}
    assert upstream.received == [("udp", "www.example.org", "A")]
    assert counters["forwarded"] == 1 and counters["dropped_addresses"] == 1
    assert calls.events == []


def test_refused_names_never_reach_upstream(purpose, upstream):
    calls = Calls()
    with serve(purpose, upstream.address, calls) as resolver:
        answers = [ask(resolver, n, t) for n, t in [
            ("refused.example", "A"), ("refused.example", "TXT"), ("example.org", "MX"),
            ("cdn.example", "AAAA"), ("secret-data.attacker.example", "A")]]
        sneaky = dns.message.make_query(dns.name.Name([b"leak", b"x.cdn", b"example", b""]), "A")
        host, port = resolver.addresses[0]
        answers.append(dns.query.tcp(sneaky, host, port=port, timeout=5))
        counters = resolver.counters
    assert [a.rcode() for a in answers] == [dns.rcode.NXDOMAIN] * 6
    assert upstream.received == []
    assert counters["refused"] == 6 and counters["forwarded"] == 0
    assert [e.event for e in calls.events] == ["dns-refused"] * 6
    evidence = [e.findings[0].evidence for e in calls.events]
    assert all(isinstance(ev, DnsRefusedEvidence) for ev in evidence)
    assert [(ev.name, ev.qtype) for ev in evidence][:2] == [("refused.example", "A"),
                                                            ("refused.example", "TXT")]
    assert evidence[5].name == r"leak.x\.cdn.example"
    assert all(e.task == "t-dns" and e.findings[0].severity == "high" and
               not e.findings[0].waived for e in calls.events)
    assert calls.allowed == [] and calls.bindings == []


def test_non_address_types_forwarded_as_they_are(purpose, upstream):
    calls = Calls()
    with serve(purpose, upstream.address, calls) as resolver:
        txt = ask(resolver, "img.cdn.example", "TXT")
        mx = ask(resolver, "img.cdn.example", "MX")
    assert [r.rdtype for r in txt.answer] == [dns.rdatatype.TXT]
    assert txt.answer[0][0].strings == (b"v=spf1 -all",)
    assert mx.answer[0][0].exchange == name("mail.example.org.")
    assert calls.allowed == []          # no address in them


def test_https_record_hints_admitted_and_ech_stripped(purpose, upstream):
    calls = Calls()
    with serve(purpose, upstream.address, calls, min_ttl=600) as resolver:
        got = ask(resolver, "svc.cdn.example", "HTTPS", use_edns=0)
    (rd,) = got.answer[0]
    assert ParamKey.ECH not in rd.params and ParamKey.ALPN in rd.params
    assert calls.allowed == [("svc.cdn.example", [("2001:db8::7", 600)])]


def test_truncated_answers_go_over_tcp(purpose, upstream):
    calls = Calls()
    with serve(purpose, upstream.address, calls) as resolver:
        small = ask(resolver, "many.cdn.example")                 # no EDNS: 512 bytes
        assert small.flags & dns.flags.TC and small.answer == []
        assert calls.allowed == []      # nothing released, nothing admitted yet
        full = ask(resolver, "many.cdn.example", tcp=True)
        big = ask(resolver, "many.cdn.example", use_edns=0, payload=4096)
        counters = resolver.counters
    assert len(addresses_in(full)) == 60 and not full.flags & dns.flags.TC
    assert len(addresses_in(big)) == 60 and not big.flags & dns.flags.TC
    # udp then tcp upstream for the first; tcp straight away for the client's tcp;
    # the client's 4096 passed on, so one udp answer sufficed for the last.
    assert [t for t, n, _ in upstream.received] == ["udp", "tcp", "tcp", "udp"]
    assert counters["truncated"] == 1 and counters["upstream_tcp"] == 2
    assert len(calls.allowed) == 2 and len(calls.allowed[0][1]) == 60


def test_answer_released_only_after_on_allow_returned(purpose, upstream):
    calls = Calls(delay=0.4)
    with serve(purpose, upstream.address, calls) as resolver:
        sent = time.monotonic()
        got = ask(resolver, "slow.cdn.example")
        received = time.monotonic()
    assert addresses_in(got) == {"198.51.100.8"}
    assert len(calls.returned_at) == 1
    assert sent + 0.4 <= calls.returned_at[0] <= received


def test_failing_on_allow_gives_servfail_and_no_binding(purpose, upstream):
    calls = Calls(fail=True)
    with serve(purpose, upstream.address, calls) as resolver:
        udp = ask(resolver, "www.example.org")
        tcp = ask(resolver, "www.example.org", tcp=True)
        counters = resolver.counters
    assert udp.rcode() == tcp.rcode() == dns.rcode.SERVFAIL
    assert udp.answer == [] and tcp.answer == []
    assert calls.bindings == []
    assert counters["servfail"] == 2 and counters["callback_errors"] == 2


def test_dead_upstream_gives_servfail(purpose):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))          # bound, never read: the upstream times out
        calls = Calls()
        with serve(purpose, s.getsockname(), calls, timeout=0.3) as resolver:
            got = ask(resolver, "www.example.org")
            counters = resolver.counters
    assert got.rcode() == dns.rcode.SERVFAIL and counters["servfail"] == 1
    assert calls.allowed == []


def udp_exchange(address, payload: bytes, wait: float = 0.5) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(wait)
        s.sendto(payload, address)
        try:
            return s.recv(65535)
        except socket.timeout:
            return None


def test_malformed_packets_counted_and_the_server_lives_on(purpose, upstream):
    calls = Calls()
    with serve(purpose, upstream.address, calls) as resolver:
        where = resolver.addresses[0]
        assert udp_exchange(where, b"\x12\x34") is None                    # no header: dropped
        header_only = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)  # one question, absent
        formerr = udp_exchange(where, header_only)
        assert formerr[:2] == b"\x12\x34"
        assert formerr[3] & 0x0F == dns.rcode.FORMERR and formerr[2] & 0x80
        as_response = dns.message.make_response(dns.message.make_query("www.example.org", "A"))
        assert udp_exchange(where, as_response.to_wire()) is None         # a response: dropped
        two = dns.message.make_query("www.example.org", "A")
        two.question.append(dns.rrset.RRset(name("img.cdn.example."), 1, dns.rdatatype.A))
        assert dns.message.from_wire(udp_exchange(where, two.to_wire())).rcode() == \
            dns.rcode.FORMERR
        with socket.create_connection(where, timeout=2) as tcp:
            tcp.sendall(struct.pack("!H", 12) + b"\xab\xcd" + header_only[2:])
            reply = tcp.recv(100)
            assert reply[2:4] == b"\xab\xcd" and reply[5] & 0x0F == dns.rcode.FORMERR
            tcp.sendall(struct.pack("!H", 5) + b"\xab\xcd\x01\x00\x00")
            assert tcp.recv(100) == b""                     # no header: connection closed
        still = ask(resolver, "www.example.org")
        counters = resolver.counters
    assert addresses_in(still) == {"203.0.113.10"}
    assert counters["malformed"] == 6 and counters["queries"] == 7
    assert upstream.received == [("udp", "www.example.org", "A")]


def test_client_edns_options_and_letter_case_not_passed_upstream(purpose):
    seen = []

    class Spy(Upstream):
        def respond(self, wire, transport):
            seen.append(dns.message.from_wire(wire))
            return super().respond(wire, transport)

    calls = Calls()
    with Spy(*ZONE) as up, serve(purpose, up.address, calls) as resolver:
        opt = dns.edns.GenericOption(65001, b"exfiltrated bytes")
        ask(resolver, "wWw.ExAmPlE.oRg", use_edns=0, payload=1400, want_dnssec=True,
            options=[opt])
    (q,) = seen
    assert q.options == () and q.payload == 1400 and q.ednsflags & dns.flags.DO
    assert q.question[0].name.labels == (b"www", b"example", b"org", b"")


def test_listens_on_ipv6(purpose, upstream):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    calls = Calls()
    resolver = Resolver(purpose, "t-dns", [("::1", 0)], upstream.address,
                        on_allow=calls.on_allow, on_event=calls.events.append,
                        on_binding=calls.bindings.append)
    try:
        resolver.start()
    except OSError as e:
        pytest.skip(f"no ::1 here ({e})")
    try:
        host, port = resolver.addresses[0]
        got = dns.query.udp(dns.message.make_query("www.example.org", "A"), host, port=port,
                            timeout=5)
    finally:
        resolver.stop()
    assert addresses_in(got) == {"203.0.113.10"}
    assert {b.resolver for b in calls.bindings} == {"::1"}


def test_waived_refusal_still_refused(upstream):
    waiving = manifest.parse(
        PURPOSE.replace('task = "t-dns"', 'task = "t-dns"\nwaive = ["dns-refused"]'), "waive.toml")
    calls = Calls()
    with serve(waiving, upstream.address, calls) as resolver:
        got = ask(resolver, "refused.example")
    assert got.rcode() == dns.rcode.NXDOMAIN and upstream.received == []
    assert calls.events[0].findings[0].waived
