"""The capture source: the fast path for bulk packets changes nothing but speed."""

from pathlib import Path

from egress.flowtable import FlowTable
from egress.records import FlowRecord
from egress.sources.capture import CaptureSource
from tagging.attribution import Attribution

ROOT = Path(__file__).resolve().parents[2]


def replay(path, monkeypatch=None, fast=True):
    if not fast:
        monkeypatch.setattr(FlowTable, "fast_ipv4", lambda self, *a: False)
    src = CaptureSource([str(path)], Attribution(task="t1"))
    items = list(src)
    return items, src.stats


def test_fast_path_and_full_path_agree(monkeypatch, tmp_path):
    import sys
    sys.path.insert(0, str(ROOT / "bench"))
    from make_capture import write_capture
    cap = tmp_path / "small.pcap"
    made = write_capture(str(cap), flows=300, bulk_packets=6000)
    fast_items, fast_stats = replay(cap)
    slow_items, slow_stats = replay(cap, monkeypatch, fast=False)
    assert fast_items == slow_items
    flows = [i for i in fast_items if isinstance(i, FlowRecord)]
    assert len(flows) == made["flows"]
    assert fast_stats.packets == slow_stats.packets == made["packets"]
    assert fast_stats.decoded == slow_stats.decoded == made["packets"]
    assert sum(f.packets_out + f.packets_in for f in flows) == made["packets"]


def test_only_the_responders_answer_to_a_query_binds(tmp_path):
    from scapy.layers.dns import DNS, DNSQR, DNSRR
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.utils import wrpcap
    from egress.records import NameBinding

    def dns(src, dst, sport, dport, t, **kw):
        p = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src=src, dst=dst) / \
            UDP(sport=sport, dport=dport) / DNS(**kw)
        p.time = t
        return p

    task, resolver = "10.0.0.2", "10.0.0.1"
    q = DNSQR(qname="good.example")
    answer = DNSRR(rrname="good.example", type="A", ttl=60, rdata="203.0.113.1")
    forged = DNSRR(rrname="pypi.org", type="A", ttl=60, rdata="203.0.113.66")
    packets = [
        dns(task, resolver, 5000, 53, 1.0, id=1, rd=1, qd=q),
        dns(resolver, task, 53, 5000, 1.1, id=1, qr=1, qd=q, an=answer),          # binds
        dns(task, resolver, 5001, 53, 2.0, id=2, qr=1,                            # the task
            qd=DNSQR(qname="pypi.org"), an=forged),                               # "answers"
        dns(task, resolver, 5002, 53, 3.0, id=3, rd=1, qd=DNSQR(qname="a.example")),
        dns(resolver, task, 53, 5002, 3.1, id=4, qr=1,                            # wrong id
            qd=DNSQR(qname="pypi.org"), an=forged),
    ]
    cap = tmp_path / "dns.pcap"
    wrpcap(str(cap), packets)
    items, _ = replay(cap)
    bound = [(b.name, b.address, b.resolver) for b in items if isinstance(b, NameBinding)]
    assert bound == [("good.example", "203.0.113.1", resolver)]


def _echo_capture(tmp_path, payloads, name="icmp.pcap"):
    from scapy.layers.inet import ICMP, IP
    from scapy.layers.l2 import Ether
    from scapy.utils import wrpcap
    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    packets = []
    for i, data in enumerate(payloads):
        for kind, src, dst in ((8, "10.0.0.2", "203.0.113.5"), (0, "203.0.113.5", "10.0.0.2")):
            p = eth / IP(src=src, dst=dst) / ICMP(type=kind, id=77, seq=i) / data
            p.time = 1_773_194_400 + i + (0.01 if kind == 0 else 0)
            packets.append(p)
    path = tmp_path / name
    wrpcap(str(path), packets)
    return path


def _judged(path):
    from egress.replay import replay
    from tagging import manifest
    purpose = manifest.parse('version = 1\npurpose = "ping"\ntask = "t1"\n'
                             'waive = ["direct-ip"]\n[[allow]]\ncidr = "203.0.113.0/24"\ntransport = "icmp"\n', "p.toml")
    out = []
    replay(CaptureSource([str(path)], Attribution(task="t1")), purpose, on_record=out.append)
    return [r for r in out if isinstance(r, FlowRecord)]


def test_ping_shaped_echo_is_clean_and_a_tunnel_is_found(tmp_path):
    import random
    import struct
    # iputils ping: a 16-byte timeval, then byte i holds i (0x10, 0x11, ...)
    pings = [struct.pack("<QQ", 1_773_194_400 + i, 0) + bytes(range(0x10, 0x38))
             for i in range(6)]
    (flow,) = _judged(_echo_capture(tmp_path, pings, "ping.pcap"))
    assert flow.app == "icmp" and flow.verdict.value == "allow"
    assert [f.id for f in flow.findings if not f.waived] == []
    rng = random.Random(3)
    tunnel = [rng.randbytes(900) for _ in range(6)]
    (flow,) = _judged(_echo_capture(tmp_path, tunnel, "tunnel.pcap"))
    found = [f for f in flow.findings if f.id == "icmp-tunnel"]
    assert found and found[0].evidence.packets == 12 and found[0].evidence.max_payload == 900
    assert found[0].evidence.entropy > 7


def test_the_window_decides_what_a_detector_sees(tmp_path, monkeypatch):
    """Live, the recorder keeps the first echo payloads only: a tunnel that starts later
    is not seen; --window full shows it. Replay applies the live window by default."""
    import random
    import struct
    from egress.detectors import FULL, live_window
    from egress.replay import replay
    from tagging import manifest
    live = live_window()
    pings = [struct.pack("<QQ", i, 0) + bytes(range(0x10, 0x38)) for i in range(live.packets)]
    rng = random.Random(9)
    cap = _echo_capture(tmp_path, pings + [rng.randbytes(900) for _ in range(8)], "late.pcap")
    purpose = manifest.parse('version = 1\npurpose = "ping"\ntask = "t1"\nwaive = ["direct-ip"]\n'
                             '[[allow]]\ncidr = "203.0.113.0/24"\ntransport = "icmp"\n', "p.toml")

    def icmp_findings(window):
        out = []
        replay(CaptureSource([str(cap)], Attribution(task="t1"), window=window), purpose,
               on_record=out.append)
        (flow,) = [r for r in out if isinstance(r, FlowRecord)]
        return [f.id for f in flow.findings if not f.waived]

    assert icmp_findings(None) == []
    assert icmp_findings(FULL) == ["icmp-tunnel"]


def _ssh_packet(msg: int, body: bytes = b"\x00" * 24) -> bytes:
    payload = bytes([msg]) + body
    pad = 8 - (len(payload) + 5) % 8
    pad += 8 if pad < 4 else 0
    return struct.pack("!IB", len(payload) + pad + 1, pad) + payload + b"\x00" * pad


def _ssh_capture(tmp_path, initiator_is_server: bool):
    """A connection whose initiator speaks as the SSH client, or (reversed) as the server."""
    import sys
    sys.path.insert(0, str(ROOT / "bench"))
    from make_capture import TcpFlow, Writer, ssh_kexinit
    path = tmp_path / ("reversed.pcap" if initiator_is_server else "normal.pcap")
    client_msgs = [_ssh_packet(30), _ssh_packet(21, b"")]          # ECDH_INIT, NEWKEYS
    server_msgs = [_ssh_packet(31, b"\x00" * 200), _ssh_packet(21, b"")]  # ECDH_REPLY, NEWKEYS
    with open(path, "wb") as out:
        w = Writer(out)
        f = TcpFlow(w, 1_773_194_400.0, bytes([10, 0, 0, 2]), bytes([198, 51, 100, 7]),
                    40000, 2222)
        ours, theirs = (server_msgs, client_msgs) if initiator_is_server else \
            (client_msgs, server_msgs)
        f.send(True, b"SSH-2.0-OpenSSH_9.2p1\r\n" + ssh_kexinit("server" if initiator_is_server
                                                               else "client"))
        f.send(False, b"SSH-2.0-OpenSSH_9.2p1\r\n" + ssh_kexinit("client" if initiator_is_server
                                                                else "server"))
        if initiator_is_server:
            f.send(False, theirs[0])
            f.send(True, ours[0] + ours[1])
            f.send(False, theirs[1])
        else:
            f.send(True, ours[0])
            f.send(False, theirs[0] + theirs[1])
            f.send(True, ours[1])
        f.close()
    return path


import struct  # noqa: E402  (used by the SSH packet builder above)


def test_an_initiator_speaking_as_ssh_server_is_role_reversal(tmp_path):
    for reversed_roles in (True, False):
        items, _ = replay(_ssh_capture(tmp_path, reversed_roles))
        (flow,) = [i for i in items if isinstance(i, FlowRecord) and i.app == "ssh"]
        assert flow.observation.ssh_role_reversed is reversed_roles
        from egress.detectors import Context
        from egress.detectors.reverse_ssh import ReverseSshTunnel
        from egress.records import Step
        found = ReverseSshTunnel().inspect(flow, Context(step=Step.WATCH, purpose=None,
                                                         names=()))
        assert bool(found) is reversed_roles
        if found:
            assert found[0].evidence.role_reversal is True
