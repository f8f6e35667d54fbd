"""DNS by payload: scapy-built messages parse; malformed bytes give None, never an exception."""

from __future__ import annotations

import signal
import struct
from contextlib import contextmanager

import pytest
from hypothesis import given, settings, strategies as st
from scapy.layers.dns import DNS, DNSQR, DNSRR, DNSRROPT, EDNS0TLV

from egress.identify import dns
from egress.identify.dns import chain_answers, is_plausible_dns, message, tcp_messages, tcp_stream


@contextmanager
def deadline(seconds: int = 5):
    """Fail instead of hanging when a parser loops."""
    def expired(signum, frame):
        raise AssertionError(f"parser did not return within {seconds}s")
    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def python_org_response(compress: bool) -> bytes:
    pkt = DNS(id=0x1234, qr=1, rd=1, ra=1, qd=DNSQR(qname="www.python.org", qtype="A"), an=[
        DNSRR(rrname="www.python.org", type="CNAME", ttl=3600,
              rdata="dualstack.python.map.fastly.net"),
        DNSRR(rrname="dualstack.python.map.fastly.net", type="A", ttl=60,
              rdata="151.101.0.223"),
        DNSRR(rrname="dualstack.python.map.fastly.net", type="A", ttl=45,
              rdata="151.101.64.223")])
    return bytes(pkt.compress() if compress else pkt)


QUESTION_A = b"\x07example\x03com\x00\x00\x01\x00\x01"


def header(qd=1, an=0, ns=0, ar=0, bits=0x0100, ident=7) -> bytes:
    return struct.pack("!HHHHHH", ident, bits, qd, an, ns, ar)


def wire(name: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".") if p) + b"\x00"


# --------------------------------------------------------------------------
# Queries and responses


def test_query_fields():
    msg = message(bytes(DNS(id=4242, rd=1, qd=DNSQR(qname="WWW.Python.ORG.", qtype="A"))))
    assert msg is not None
    assert (msg.id, msg.is_response, msg.opcode, msg.rcode) == (4242, False, 0, "NOERROR")
    assert msg.flags == ("rd",)
    assert msg.questions == (dns.Question(name="www.python.org", qtype="A", qclass="IN"),)
    assert msg.answers == () and msg.edns is None and msg.size == 32


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "compressed"])
def test_cname_chain(compress):
    data = python_org_response(compress)
    if compress:
        assert b"\xc0\x0c" in data  # scapy did use pointers
    msg = message(data)
    assert msg is not None and msg.is_response and msg.flags == ("qr", "rd", "ra")
    assert [(r.name, r.type, r.ttl, r.data) for r in msg.answers] == [
        ("www.python.org", "CNAME", 3600, "dualstack.python.map.fastly.net"),
        ("dualstack.python.map.fastly.net", "A", 60, "151.101.0.223"),
        ("dualstack.python.map.fastly.net", "A", 45, "151.101.64.223")]
    assert chain_answers(msg) == (
        ["dualstack.python.map.fastly.net", "151.101.0.223", "151.101.64.223"], 45)
    query = dns.as_query(msg)
    assert (query.name, query.type, query.rcode, query.ttl) == ("www.python.org", "A",
                                                                "NOERROR", 45)
    assert query.answers == chain_answers(msg)[0]


def test_chain_follows_names_not_order_and_skips_strangers():
    pkt = DNS(id=1, qr=1, qd=DNSQR(qname="a.example", qtype="AAAA"), an=[
        DNSRR(rrname="c.example", type="AAAA", ttl=30, rdata="2001:db8::1"),
        DNSRR(rrname="other.example", type="AAAA", ttl=5, rdata="2001:db8::dead"),
        DNSRR(rrname="b.example", type="CNAME", ttl=20, rdata="c.example"),
        DNSRR(rrname="a.example", type="CNAME", ttl=10, rdata="b.example")])
    assert chain_answers(message(bytes(pkt))) == (
        ["b.example", "c.example", "2001:db8::1"], 10)


def test_cname_loop_resolves_to_nothing():
    pkt = DNS(id=1, qr=1, qd=DNSQR(qname="a.example", qtype="A"), an=[
        DNSRR(rrname="a.example", type="CNAME", ttl=10, rdata="b.example"),
        DNSRR(rrname="b.example", type="CNAME", ttl=10, rdata="a.example"),
        DNSRR(rrname="a.example", type="A", ttl=10, rdata="192.0.2.1")])
    with deadline():
        assert chain_answers(message(bytes(pkt))) == (["b.example"], 10)


def test_aaaa_is_compressed_text():
    pkt = DNS(id=9, qr=1, qd=DNSQR(qname="v6.example", qtype="AAAA"),
              an=DNSRR(rrname="v6.example", type="AAAA", ttl=7,
                       rdata="2a04:4e42:0000:0000:0000:0000:0000:0223"))
    msg = message(bytes(pkt))
    assert msg.answers[0].data == "2a04:4e42::223"
    assert chain_answers(msg) == (["2a04:4e42::223"], 7)


def test_nxdomain_with_soa():
    pkt = DNS(id=3, qr=1, rd=1, ra=1, rcode=3, qd=DNSQR(qname="nope.example.com", qtype="A"),
              ns=DNSRR(rrname="example.com", type="SOA", ttl=900,
                       rdata=b"\x02ns\x07example\x03com\x00\x04root\x07example\x03com\x00"
                             + struct.pack("!IIIII", 2024010101, 7200, 3600, 1209600, 300)))
    msg = message(bytes(pkt))
    assert msg.rcode == "NXDOMAIN"
    assert msg.authorities[0].data == ("ns.example.com root.example.com "
                                       "2024010101 7200 3600 1209600 300")
    assert chain_answers(msg) == ([], None)
    assert dns.as_query(msg).answers == [] and dns.as_query(msg).rcode == "NXDOMAIN"


def test_txt_and_null():
    txt = DNS(id=5, qr=1, qd=DNSQR(qname="t.example", qtype="TXT"),
              an=DNSRR(rrname="t.example", type="TXT", ttl=1,
                       rdata=[b"v=spf1 -all", b'say "hi"\\', b"\x00\xff"]))
    assert message(bytes(txt)).answers[0].data == \
        '"v=spf1 -all" "say \\"hi\\"\\\\" "\\000\\255"'
    null = DNS(id=6, qr=1, qd=DNSQR(qname="aGVsbG8.t.example", qtype="NULL"),
               an=DNSRR(rrname="aGVsbG8.t.example", type="NULL", ttl=0, rdata=b"\x01\x02secret"))
    msg = message(bytes(null))
    assert msg.question.qtype == "NULL" and msg.question.name == "agvsbg8.t.example"
    assert msg.answers[0].type == "NULL" and msg.answers[0].data == "0102736563726574"
    assert chain_answers(msg) == ([], None)  # no addresses: nothing to bind


@pytest.mark.parametrize("qtype,name", [(65, "HTTPS"), (64, "SVCB"), (12, "PTR"),
                                        (255, "ANY"), (15, "MX"), (123, "TYPE123"),
                                        (65280, "TYPE65280")])
def test_query_type_names(qtype, name):
    msg = message(bytes(DNS(id=1, qd=DNSQR(qname="x.example", qtype=qtype))))
    assert msg.question.qtype == name


def test_mx_and_ptr_data():
    pkt = DNS(id=2, qr=1, qd=DNSQR(qname="example.org", qtype="MX"), an=[
        DNSRR(rrname="example.org", type="MX", ttl=60, rdata=b"\x00\x0a" + wire("mail.example.org")),
        DNSRR(rrname="1.2.0.192.in-addr.arpa", type="PTR", ttl=60, rdata="host.example.org")])
    msg = message(bytes(pkt))
    assert [r.data for r in msg.answers] == ["10 mail.example.org", "host.example.org"]


def test_edns():
    pkt = DNS(id=8, rd=1, qd=DNSQR(qname="e.example", qtype="A"), ar=DNSRROPT(
        rclass=1232, z=0x8000, rdata=[EDNS0TLV(optcode=10, optdata=b"\x01" * 8),
                                      EDNS0TLV(optcode=12, optdata=b"\x00" * 20)]))
    msg = message(bytes(pkt))
    assert msg.edns == dns.Edns(udp_size=1232, version=0, dnssec_ok=True, options=(10, 12))
    assert msg.additionals == ()  # the OPT pseudo-record is not a record


def test_edns_extended_rcode():
    pkt = DNS(id=8, qr=1, rcode=0, qd=DNSQR(qname="e.example"),
              ar=DNSRROPT(rclass=512, extrcode=1, version=1))
    assert message(bytes(pkt)).rcode == "BADVERS"


def test_cookie_only_query_without_question():
    opt = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 12) + struct.pack("!HH", 10, 8) + b"c" * 8
    assert message(header(qd=0, ar=1) + opt).questions == ()
    assert message(header(qd=0)) is None  # a bare header is not DNS


def test_two_opt_records_rejected():
    opt = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)
    assert message(header(ar=2) + wire("x.example") + b"\x00\x01\x00\x01" + opt + opt) is None


def test_update_message():
    # RFC 2136: zone example.com SOA; delete the A RRset of www (class ANY, no rdata).
    body = (wire("example.com") + struct.pack("!HH", 6, 1)
            + wire("www.example.com") + struct.pack("!HHIH", 1, 255, 0, 0))
    msg = message(header(qd=1, ns=1, bits=5 << 11) + body)
    assert msg.opcode == dns.UPDATE and msg.authorities[0].rclass == "ANY"
    assert msg.authorities[0].data == ""


def test_odd_bytes_in_names_are_kept_escaped():
    qname = b"\x08A.b\x00C d\"\x07example\x00"
    data = header() + qname + b"\x00\x10\x00\x01"
    msg = message(data)
    assert msg.question.name == "a\\.b\\000c\\032d\\\".example"


def test_ttl_with_top_bit_counts_as_zero():
    data = header(an=1, bits=0x8180) + QUESTION_A + b"\xc0\x0c" \
        + struct.pack("!HHIH", 1, 1, 0x80000001, 4) + b"\xc0\x00\x02\x01"
    assert message(data).answers[0].ttl == 0


def test_truncated_response_may_stop_at_a_record_boundary():
    record = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + b"\xc0\x00\x02\x01"
    cut = header(an=3, bits=0x8380) + QUESTION_A + record  # tc set, 1 of 3 records sent
    assert message(cut).truncated and len(message(cut).answers) == 1
    assert message(header(an=3, bits=0x8180) + QUESTION_A + record) is None  # without tc


def test_root_name():
    msg = message(header() + b"\x00\x00\x02\x00\x01")
    assert msg.question == dns.Question(name=".", qtype="NS", qclass="IN")


# --------------------------------------------------------------------------
# Malformed: rejected quickly


QUESTION = wire("loop.example") + b"\x00\x01\x00\x01"


def answer_with_name(name_bytes: bytes) -> bytes:
    return header(an=1, bits=0x8180) + QUESTION + name_bytes + struct.pack("!HHIH", 1, 1, 60, 4) \
        + b"\xc0\x00\x02\x01"


def test_backward_pointer_accepted():
    assert message(answer_with_name(b"\xc0\x0c")).answers[0].name == "loop.example"


@pytest.mark.parametrize("name_bytes", [
    b"\xc0\x1e",                      # points at itself
    b"\xc0\x30",                      # points forward
    b"\xc0\x05",                      # points into the header
    b"\x01a\xc0\x1e",                 # points back into its own labels: a.a.a.a...
    b"\xc0\x1f\x00",                  # forward pointer to a pointer back here
], ids=["self", "forward", "header", "own-labels", "two-step-loop"])
def test_pointer_loops_and_forward_pointers_rejected(name_bytes):
    with deadline():
        assert message(answer_with_name(name_bytes)) is None


def test_long_backward_chain():
    # Each owner name is "a" and a pointer to the previous one: 100 jumps, all backwards.
    body = bytearray(header(an=100, bits=0x8180) + QUESTION)
    prev = 12
    for _ in range(100):
        start = len(body)
        body += b"\x01a" + struct.pack("!H", 0xC000 | prev)
        body += struct.pack("!HHIH", 1, 1, 60, 4) + b"\x01\x02\x03\x04"
        prev = start
    with deadline():
        msg = message(bytes(body))
    assert msg.answers[-1].name == "a." * 100 + "loop.example"


@pytest.mark.parametrize("data", [
    header() + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01",            # label of 64
    header() + b"\x3f" + b"a" * 63 + b"\x3f" + b"b" * 63 + b"\x3f" + b"c" * 63
    + b"\x3f" + b"d" * 63 + b"\x00\x00\x01\x00\x01",                       # 257 bytes of name
    header(bits=2 << 11) + QUESTION,                                     # opcode STATUS
    header(qd=2) + QUESTION + QUESTION,                                  # two questions
    header() + QUESTION + b"\x00",                                       # trailing byte
    header(an=40) + QUESTION,                                            # counts do not fit
    header() + QUESTION[:-1],                                            # cut short
    header(an=1, bits=0x8180) + QUESTION + b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 5)
    + b"\x01\x02\x03\x04\x05",                                           # A of 5 bytes
    header(an=1, bits=0x8180) + QUESTION + b"\xc0\x0c" + struct.pack("!HHIH", 5, 1, 60, 3)
    + b"\xc0\x0c\x00",                                                   # CNAME with slack
    header(an=1, bits=0x8180) + QUESTION + b"\x00" + struct.pack("!HHIH", 41, 512, 0, 0),
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40),          # TLS ClientHello
    b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
    b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n",
    b"",
], ids=["label64", "name257", "opcode", "qd2", "trailing", "counts", "short", "a5",
        "cname-slack", "opt-in-answers", "tls", "http", "ssh", "empty"])
def test_malformed_rejected(data):
    assert message(data) is None


@pytest.mark.parametrize("data", [b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40),
                                  b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
                                  b"SSH-2.0-OpenSSH_9.2p1\r\n", b"\x00" * 3],
                         ids=["tls", "http", "ssh", "short"])
def test_not_plausible(data):
    assert not is_plausible_dns(data)
    assert not is_plausible_dns(data, tcp=True)


def test_plausible_on_first_bytes():
    data = python_org_response(True)
    assert is_plausible_dns(data) and is_plausible_dns(data[:20], partial=True)
    assert not is_plausible_dns(data[:20])  # a whole datagram: the counts must fit
    assert is_plausible_dns(struct.pack("!H", len(data)) + data[:14], tcp=True)


def test_non_bytes_input():
    assert message(None) is None and message("text") is None
    assert not is_plausible_dns(None)
    assert message(bytearray(python_org_response(False))) is not None


# --------------------------------------------------------------------------
# DNS over TCP


def framed(*messages: bytes) -> bytes:
    return b"".join(struct.pack("!H", len(m)) + m for m in messages)


def test_two_messages_in_one_segment():
    q = bytes(DNS(id=0x1234, rd=1, qd=DNSQR(qname="www.python.org", qtype="A")))
    r = python_org_response(True)
    msgs, complete = tcp_messages(framed(q, r))
    assert complete and [m.is_response for m in msgs] == [False, True]
    assert chain_answers(msgs[1])[0][0] == "dualstack.python.map.fastly.net"


def test_message_split_across_segments():
    stream = framed(bytes(DNS(id=1, rd=1, qd=DNSQR(qname="a.example"))),
                    python_org_response(False))
    first_len = 2 + struct.unpack("!H", stream[:2])[0]
    for cut in range(len(stream)):
        msgs, complete = tcp_messages(stream[:cut])
        assert not complete or cut in (0, first_len), cut
        assert len(msgs) == (1 if cut >= first_len else 0), cut
        assert not tcp_stream(stream[:cut]).malformed, cut
    msgs, complete = tcp_messages(stream)
    assert complete and len(msgs) == 2
    assert tcp_stream(stream).consumed == len(stream)


def test_tcp_garbage_is_malformed_not_pending():
    good = framed(bytes(DNS(id=1, qd=DNSQR(qname="a.example"))))
    found = tcp_stream(good + b"\x05\x00" + b"SSH-2.0-OpenSSH_9.2p1\r\n")
    assert len(found.messages) == 1 and found.malformed and not found.complete
    assert found.consumed == len(good)
    assert tcp_stream(b"\x00\x05hello").malformed  # shorter than a header


# --------------------------------------------------------------------------
# Never raises


def real_messages() -> list[bytes]:
    return [
        python_org_response(False), python_org_response(True),
        bytes(DNS(id=8, rd=1, qd=DNSQR(qname="e.example", qtype="A"),
                  ar=DNSRROPT(rclass=1232, rdata=[EDNS0TLV(optcode=10, optdata=b"\x01" * 8)]))),
        bytes(DNS(id=5, qr=1, qd=DNSQR(qname="t.example", qtype="TXT"),
                  an=DNSRR(rrname="t.example", type="TXT", rdata=[b"a", b"bc"]))),
    ]


def check_invariants(msg):
    if msg is None:
        return
    assert isinstance(msg.rcode, str) and msg.opcode in dns.OPCODE_NAMES
    for rr in msg.questions + msg.answers + msg.authorities + msg.additionals:
        assert rr.name and rr.name.isascii() and rr.name == rr.name.lower()
    chain_answers(msg)
    dns.as_query(msg)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_raise(data):
    check_invariants(message(data))
    is_plausible_dns(data)
    is_plausible_dns(data, tcp=True)
    tcp_messages(data)


@settings(max_examples=800, deadline=None)
@given(st.sampled_from(real_messages()),
       st.lists(st.tuples(st.integers(0, 599), st.integers(0, 255)), max_size=6),
       st.integers(0, 600), st.binary(max_size=8))
def test_mutated_messages_never_raise(data, flips, cut, inserted):
    buf = bytearray(data)
    for where, value in flips:
        if buf:
            buf[where % len(buf)] = value
    buf = bytes(buf[:cut]) + inserted + bytes(buf[cut:])
    with deadline():
        check_invariants(message(buf))
        tcp_messages(framed(buf, buf)[:cut])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789-",
                        min_size=1, max_size=63), min_size=1, max_size=4),
       st.sampled_from(["A", "AAAA", "TXT", "NULL", "MX", "HTTPS"]))
def test_scapy_queries_round_trip(labels, qtype):
    name = ".".join(labels)
    msg = message(bytes(DNS(id=1, rd=1, qd=DNSQR(qname=name, qtype=qtype))))
    assert msg is not None
    assert msg.question.name == name.lower() and msg.question.qtype == qtype
