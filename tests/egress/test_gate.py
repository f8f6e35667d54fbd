"""The gate's decisions on packets built with scapy: held until identified, judged at the gate
step, past a cap judged on what was seen; in audit mode never blocked."""

import time

from scapy.layers.inet import IP, TCP, UDP

from egress.enforce.gate import Caps, Gate
from egress.records import Mode, NameBinding, Step
from tagging import manifest
from tests.egress.identify.test_tls import make_hello, records

ALLOW, BLOCK = 0x200000, 0x100000
TASK_IP, INDEX, POOL = "10.213.0.2", "203.0.113.10", "198.51.100.42"
RESOLVER = "10.213.0.1"

PURPOSE = manifest.parse('''version = 1
purpose = "index"
task = "t1"
[[allow]]
host = "pypi.lab"
[[allow]]
host = "raw.lab"
ports = [7000]
protocol = "any"
''', "p.toml")


def gate(mode=Mode.ENFORCE, caps=Caps()):
    g = Gate("t1", PURPOSE, mode, allow_mark=ALLOW, block_mark=BLOCK,
             own_resolvers=frozenset({RESOLVER}), caps=caps)
    now = time.time_ns() // 1000
    for name, address in (("pypi.lab", INDEX), ("raw.lab", POOL)):
        g.bind(NameBinding(task="t1", name=name, address=address, ttl=300, time=now - 1000,
                           resolver=RESOLVER, resolver_port=53))
    return g


def tcp(dst, payload=b"", dport=443, sport=40000, flags="PA", seq=1000):
    return bytes(IP(src=TASK_IP, dst=dst) / TCP(sport=sport, dport=dport, flags=flags, seq=seq)
                 / payload)


def handshake(g, dst, dport=443, sport=40000):
    assert g.packet(1, tcp(dst, dport=dport, sport=sport, flags="S", seq=999)) == [(1, True, None)]


def test_a_client_hello_to_the_declared_index_is_allowed():
    g = gate()
    handshake(g, INDEX)
    assert g.packet(2, tcp(INDEX, records(make_hello(sni="pypi.lab")))) == [(2, True, ALLOW)]
    assert g.decisions[0].app == "tls" and g.decisions[0].verdict.value == "allow"


def test_a_client_hello_in_two_segments_is_held_until_whole():
    g = gate()
    handshake(g, INDEX)
    hello = records(make_hello(sni="pypi.lab", key_share=1216))     # post-quantum sized
    assert g.packet(2, tcp(INDEX, hello[:1000])) == []
    assert g.packet(3, tcp(INDEX, hello[1000:], seq=2000)) == [(2, True, ALLOW), (3, True, ALLOW)]


def test_ssh_to_the_index_address_is_blocked_before_its_banner_leaves():
    g = gate()
    handshake(g, INDEX)
    assert g.packet(2, tcp(INDEX, b"SSH-2.0-OpenSSH_9.2p1\r\n")) == [(2, True, BLOCK)]
    ids = {f.id for f in g.decisions[0].findings}
    assert "protocol-mismatch" in ids or "ssh-egress" in ids


def test_stratum_on_an_allowed_any_protocol_port_is_blocked():
    g = gate()
    handshake(g, POOL, dport=7000)
    login = (b'{"id":1,"jsonrpc":"2.0","method":"login","params":{"login":"x","pass":"x",'
             b'"agent":"XMRig/6.21.0"}}\n')
    assert g.packet(2, tcp(POOL, login, dport=7000)) == [(2, True, BLOCK)]
    assert "mining-stratum" in {f.id for f in g.decisions[0].findings}


def test_unknown_bytes_past_the_time_cap_are_a_protocol_mismatch_where_tls_is_required():
    g = gate(caps=Caps(millis=50))
    handshake(g, INDEX)
    assert g.packet(2, tcp(INDEX, b"\x00\x01")) == []
    time.sleep(0.06)
    assert g.tick() == [(2, True, BLOCK)]
    assert "protocol-mismatch" in {f.id for f in g.decisions[0].findings}


def test_unknown_bytes_past_the_packet_cap_pass_where_any_protocol_is_declared():
    g = gate(caps=Caps(packets=3))
    handshake(g, POOL, dport=7000)
    assert g.packet(2, tcp(POOL, b"\x00\x01", dport=7000, seq=1000)) == []
    assert g.packet(3, tcp(POOL, b"\x00\x02", dport=7000, seq=1002)) == []
    assert g.packet(4, tcp(POOL, b"\x00\x03", dport=7000, seq=1004)) == [
        (2, True, ALLOW), (3, True, ALLOW), (4, True, ALLOW)]


def test_audit_mode_never_blocks():
    g = gate(Mode.AUDIT)
    handshake(g, INDEX)
    assert g.packet(2, tcp(INDEX, b"SSH-2.0-OpenSSH_9.2p1\r\n")) == [(2, True, ALLOW)]
    assert g.decisions[0].verdict.value == "flag"


def test_a_decided_flow_keeps_its_mark_for_retransmissions():
    g = gate()
    handshake(g, INDEX)
    g.packet(2, tcp(INDEX, b"SSH-2.0-OpenSSH_9.2p1\r\n"))
    assert g.packet(3, tcp(INDEX, b"SSH-2.0-OpenSSH_9.2p1\r\n")) == [(3, True, BLOCK)]


def test_an_undeclared_udp_flow_is_blocked_at_its_first_datagram():
    g = gate()
    pkt = bytes(IP(src=TASK_IP, dst="192.0.2.9") / UDP(sport=5000, dport=9999) / b"hello")
    assert g.packet(1, pkt) == [(1, True, BLOCK)]


def test_garbage_is_dropped_in_enforce_and_passed_in_audit():
    assert gate().packet(1, b"\x45\x00") == [(1, False, None)]
    assert gate(Mode.AUDIT).packet(1, b"\x45\x00") == [(1, True, None)]


def test_a_detector_that_raises_blocks_the_flow_in_enforce_mode():
    class Broken:
        name, steps = "broken", frozenset({Step.GATE})

        def inspect(self, flow, ctx):
            raise RuntimeError("bug")

    g = gate()
    g.judge.detectors.append(Broken())
    handshake(g, INDEX)
    assert g.packet(2, tcp(INDEX, records(make_hello(sni="pypi.lab")))) == [(2, True, BLOCK)]
    assert "internal-error" in {f.id for f in g.decisions[0].findings}
