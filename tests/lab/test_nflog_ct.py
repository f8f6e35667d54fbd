"""NflogReader and ConntrackEvents on the kernel, with real traffic in a closed lab.

Two network namespaces made for each test (A, the task side, and B, its only peer), joined
by one veth created inside A; nothing touches the root namespace. The readers act in the
namespace of the calling process, so each check runs as a script inside A (``ip netns exec``)
that loads its nft rules, makes its traffic, reads, and prints JSON. Servers in B are
started and stopped here, by PID. Root is needed; under CI=true its absence fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.lab.pair import NamespacePair, skip_or_fail

REPO = Path(__file__).resolve().parents[2]
A_ADDR, B_ADDR = "198.51.100.2", "198.51.100.1"
A_ADDR6, B_ADDR6 = "2001:db8:99::2", "2001:db8:99::1"

SERVER = r"""
import socket, sys
mode, port, reply = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if mode == "tcp":
    s = socket.socket(socket.AF_INET6)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", port)); s.listen()
    print("ready", flush=True)
    while True:
        c, _ = s.accept()
        while c.recv(65536):
            pass
        c.sendall(b"r" * reply); c.close()
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", port))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(65536)
    s.sendto(data, peer)
"""

PRELUDE = f"""
import json, socket, struct, subprocess, sys, time
sys.path.insert(0, {str(REPO)!r})
from egress.enforce.nflog import NflogReader
from egress.enforce.ctevents import ConntrackEvents, dump, enable_accounting
A, B, A6, B6 = {A_ADDR!r}, {B_ADDR!r}, {A_ADDR6!r}, {B_ADDR6!r}

def nft(text):
    subprocess.run(["nft", "-f", "-"], input=text, text=True, check=True)

def sysctl(name, value):
    with open("/proc/sys/" + name.replace(".", "/"), "w") as f:
        f.write(str(value))

def flow_of(payload):
    # (family, src, dst, proto, sport, dport) of an IP packet, read here independently
    if payload[0] >> 4 == 4:
        hl = (payload[0] & 15) * 4
        fam, src, dst, proto = 4, socket.inet_ntop(socket.AF_INET, payload[12:16]), \\
            socket.inet_ntop(socket.AF_INET, payload[16:20]), payload[9]
    else:
        hl, fam, proto = 40, 6, payload[6]
        src = socket.inet_ntop(socket.AF_INET6, payload[8:24])
        dst = socket.inet_ntop(socket.AF_INET6, payload[24:40])
    sport, dport = struct.unpack_from(">HH", payload, hl)
    return [fam, src, dst, proto, sport, dport]

def ev_json(e):
    d = {{k: getattr(e, k) for k in e.__slots__ if k not in ("orig", "reply")}}
    for side in ("orig", "reply"):
        t = getattr(e, side)
        d[side] = None if t is None else {{k: getattr(t, k) for k in t.__slots__}}
    return d
"""


class ClosedLab(NamespacePair):
    """Namespaces A and B, one veth between them, nothing else."""

    tag, prelude = "egN", PRELUDE

    def __init__(self, workdir: Path):
        super().__init__(workdir, A_ADDR, B_ADDR, A_ADDR6, B_ADDR6)

    def serve(self, mode: str, port: int, reply: int = 0) -> None:
        """A server in B (TCP: reads to EOF, answers ``reply`` bytes; UDP: echoes)."""
        script = self.dir / "server.py"
        script.write_text(SERVER)
        proc = subprocess.Popen(["ip", "netns", "exec", self.b, sys.executable, str(script),
                                 mode, str(port), str(reply)], stdout=subprocess.PIPE,
                                text=True)
        self.procs.append(proc)
        assert proc.stdout.readline().strip() == "ready"


@pytest.fixture
def closed_lab(tmp_path):
    if os.geteuid() != 0:
        skip_or_fail("the NFLOG/conntrack lab needs root (network namespaces)")
    missing = [t for t in ("ip", "nft", "conntrack") if shutil.which(t) is None]
    if missing:
        skip_or_fail(f"the NFLOG/conntrack lab needs {', '.join(missing)}")
    lab = ClosedLab(tmp_path)
    try:
        lab.build()
        yield lab
    finally:
        lab.close()


def test_nflog_first_packets_and_a_rejected_flow(closed_lab):
    closed_lab.serve("tcp", 8080)
    closed_lab.serve("udp", 5353)
    r = closed_lab.in_a("""
        nft('''table inet t {
          chain out {
            type filter hook output priority 0;
            tcp dport 81 log group 7 prefix "x" reject
            meta l4proto { tcp, udp } ct original packets < 3 log group 7
          }
        }''')
        reader = NflogReader(7, snaplen=128)
        c = socket.create_connection((B, 8080))
        for _ in range(4):
            c.sendall(b"d" * 100); time.sleep(0.05)
        c.shutdown(socket.SHUT_WR); c.recv(10)
        tcp_sport = c.getsockname()[1]
        c.close()
        u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        for _ in range(5):
            u.sendto(b"q" * 20, (B6, 5353))
        try:
            socket.create_connection((B, 81), timeout=5)
            refused = False
        except ConnectionRefusedError:
            refused = True
        packets = []
        deadline = time.time() + 5
        while time.time() < deadline:
            packets += reader.read(0.5)
        print(json.dumps({"refused": refused, "stats": reader.stats(),
            "ifindex": socket.if_nametoindex("vA"), "tcp_sport": tcp_sport,
            "packets": [dict(flow=flow_of(p.payload), family=p.family, prefix=p.prefix,
                             seq=p.seq, outdev=p.outdev, indev=p.indev, uid=p.uid, mark=p.mark,
                             length=len(p.payload), time=p.time) for p in packets]}))
    """)
    assert r["refused"]
    packets = r["packets"]
    tcp = [p for p in packets if p["flow"][5] == 8080]
    udp = [p for p in packets if p["flow"][5] == 5353]
    rejected = [p for p in packets if p["flow"][5] == 81]
    # the first two packets of each flow in its original direction, no more
    assert [p["flow"] for p in tcp] == [[4, A_ADDR, B_ADDR, 6, r["tcp_sport"], 8080]] * 2
    assert len(udp) == 2 and all(p["flow"][:4] == [6, A_ADDR6, B_ADDR6, 17] for p in udp)
    assert all(p["family"] == 6 and p["length"] == 40 + 8 + 20 for p in udp)
    assert [(p["prefix"], p["flow"][1:4]) for p in rejected] == [("x", [A_ADDR, B_ADDR, 6])]
    assert all(p["prefix"] == "" for p in tcp + udp)
    assert len(packets) == 5
    assert all(p["outdev"] == r["ifindex"] and p["indev"] == 0 and p["uid"] == 0 for p in packets)
    assert [p["seq"] for p in packets] == list(range(5))
    assert all(abs(p["time"] / 1e6 - time.time()) < 120 for p in packets)
    assert r["stats"] == {"received": 5, "lost": 0, "overruns": 0, "malformed": 0}


def test_nflog_burst_over_a_small_buffer_is_counted_as_lost(closed_lab):
    r = closed_lab.in_a("""
        nft('''table inet t {
          chain out {
            type filter hook output priority 0;
            udp dport 9999 log group 7
          }
        }''')
        reader = NflogReader(7, rcvbuf=4096, qthresh=1)
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for i in range(2000):
            u.sendto(b"b" * 64, (B, 9999))
        got = 0
        while batch := reader.read(0.5):
            got += len(batch)
        u.sendto(b"last", (B, 9999))       # a packet after the losses shows the gap
        while batch := reader.read(0.5):
            got += len(batch)
        print(json.dumps({"got": got, "rcvbuf": reader.rcvbuf, **reader.stats()}))
    """)
    assert r["got"] == r["received"] > 0
    assert r["lost"] > 0 and r["overruns"] > 0
    assert r["received"] + r["lost"] == 2001
    assert r["malformed"] == 0


CT_RULES = """
nft('''table inet t {
  counter orig { }
  counter reply { }
  chain out {
    type filter hook output priority 0;
    ct state new counter
    ip daddr 198.51.100.1 tcp dport 8080 counter name orig
    ip daddr 198.51.100.1 udp dport 6000 ct mark set 0x10
  }
  chain in {
    type filter hook input priority 0;
    ip saddr 198.51.100.1 tcp sport 8080 counter name reply
  }
}''')
"""

WAIT_DESTROY = """
def collect(ev, until, want):
    # events until ``want(events)`` or the deadline; a dump reaps expired entries at once
    events = []
    while time.time() < until and not want(events):
        events += [ev_json(e) for e in ev.read(0.5)]
        dump()
    return events

def nft_counter(name):
    out = json.loads(subprocess.run(["nft", "-j", "list", "counter", "inet", "t", name],
                     capture_output=True, text=True, check=True).stdout)
    c = [x["counter"] for x in out["nftables"] if "counter" in x][0]
    return [c["packets"], c["bytes"]]
"""


def test_conntrack_events_for_tcp_with_counters(closed_lab):
    closed_lab.serve("tcp", 8080, reply=5000)
    started = time.time_ns()
    r = closed_lab.in_a(CT_RULES, WAIT_DESTROY, """
        before = enable_accounting()
        sysctl("net.netfilter.nf_conntrack_tcp_timeout_time_wait", 1)
        ev = ConntrackEvents()
        c = socket.create_connection((B, 8080))
        c.sendall(b"d" * 100000)
        c.shutdown(socket.SHUT_WR)
        got = 0
        while d := c.recv(65536):
            got += len(d)
        port = c.getsockname()[1]
        c.close()
        def done(events):
            return any(e["kind"] == "destroy" and e["orig"]["sport"] == port for e in events)
        events = collect(ev, time.time() + 30, done)
        print(json.dumps({"before": before, "port": port, "got": got, "events": events,
                          "orig": nft_counter("orig"), "reply": nft_counter("reply"),
                          "stats": ev.stats()}))
    """)
    ended = time.time_ns()
    assert r["got"] == 5000
    mine = [e for e in r["events"] if e["orig"]["sport"] == r["port"]]
    assert [e["kind"] for e in mine] == ["new", "destroy"]
    new, destroy = mine
    assert new["id"] == destroy["id"]
    for e in mine:
        assert {k: e["orig"][k] for k in ("family", "src", "dst", "proto", "dport")} == \
            {"family": 4, "src": A_ADDR, "dst": B_ADDR, "proto": 6, "dport": 8080}
        assert (e["reply"]["src"], e["reply"]["sport"], e["reply"]["dport"]) == \
            (B_ADDR, 8080, r["port"])
    assert new["orig_bytes"] is None                      # counters come with DESTROY
    assert [destroy["orig_packets"], destroy["orig_bytes"]] == r["orig"]
    assert [destroy["reply_packets"], destroy["reply_bytes"]] == r["reply"]
    assert destroy["orig_bytes"] > 100000 and destroy["reply_bytes"] > 5000
    assert started <= destroy["start_ns"] <= destroy["stop_ns"] <= ended
    assert r["stats"]["lost"] == 0 and r["stats"]["malformed"] == 0


def test_conntrack_events_for_udp_v4_and_v6(closed_lab):
    closed_lab.serve("udp", 5353)
    r = closed_lab.in_a(CT_RULES, WAIT_DESTROY, """
        enable_accounting()
        sysctl("net.netfilter.nf_conntrack_udp_timeout", 1)
        sysctl("net.netfilter.nf_conntrack_udp_timeout_stream", 1)
        ev = ConntrackEvents()
        ports = {}
        for fam, dst in ((socket.AF_INET, B), (socket.AF_INET6, B6)):
            u = socket.socket(fam, socket.SOCK_DGRAM)
            u.settimeout(5)
            for _ in range(3):
                u.sendto(b"u" * 500, (dst, 5353))
                u.recvfrom(1000)
            ports[dst] = u.getsockname()[1]
            u.close()
        def done(events):
            return sum(e["kind"] == "destroy" and e["orig"]["dport"] == 5353 for e in events) == 2
        events = collect(ev, time.time() + 30, done)
        print(json.dumps({"ports": ports, "events": events, "stats": ev.stats()}))
    """)
    for dst, src, header in ((B_ADDR, A_ADDR, 28), (B_ADDR6, A_ADDR6, 48)):
        mine = [e for e in r["events"] if e["orig"]["dst"] == dst]
        assert [e["kind"] for e in mine] == ["new", "destroy"]
        d = mine[1]
        assert (d["orig"]["src"], d["orig"]["proto"], d["orig"]["sport"], d["orig"]["dport"]) \
            == (src, 17, r["ports"][dst], 5353)
        assert (d["orig"]["family"], d["reply"]["sport"]) == (4 if ":" not in dst else 6, 5353)
        size = 500 + header
        assert (d["orig_packets"], d["orig_bytes"], d["reply_packets"], d["reply_bytes"]) == \
            (3, 3 * size, 3, 3 * size)
    assert r["stats"] == {"received": 4, "lost": 0, "malformed": 0}


def test_dump_by_mark_is_kernel_filtered_and_cumulative(closed_lab):
    closed_lab.serve("udp", 6000)
    closed_lab.serve("udp", 6001)
    r = closed_lab.in_a(CT_RULES, """
        enable_accounting()
        socks = {}
        for port in (6000, 6001):
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5)
            u.sendto(b"m" * 100, (B, port)); u.recvfrom(1000)
            socks[port] = u
        def flows(entries):
            return sorted([e.orig.dport, e.mark, e.orig_packets] for e in entries)
        marked, unmarked, everything = dump(mark=0x10), dump(mark=0, mask=0x10), dump()
        again = dump(mark=0x10)
        socks[6000].sendto(b"m" * 100, (B, 6000)); socks[6000].recvfrom(1000)
        later = dump(mark=0x10)
        tool = subprocess.run(["conntrack", "-L", "-m", "0x10"], capture_output=True,
                              text=True).stdout
        print(json.dumps({"marked": flows(marked), "unmarked": flows(unmarked),
                          "all": flows(everything), "again": flows(again),
                          "later": flows(later), "tool": tool}))
    """)
    assert r["marked"] == [[6000, 0x10, 1]]
    assert r["unmarked"] == [[6001, 0, 1]]
    assert r["all"] == [[6000, 0x10, 1], [6001, 0, 1]]
    assert r["again"] == r["marked"]                    # reading did not zero the counters
    assert r["later"] == [[6000, 0x10, 2]]
    assert "dport=6000" in r["tool"] and "dport=6001" not in r["tool"]


def test_conntrack_overrun_is_counted(closed_lab):
    r = closed_lab.in_a(CT_RULES, """
        ev = ConntrackEvents(groups=("new",), rcvbuf=4096)
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for port in range(20000, 20500):
            u.sendto(b"n", (B, port))
        got = 0
        while batch := ev.read(0.5):
            got += len(batch)
        print(json.dumps({"got": got, **ev.stats()}))
    """)
    assert 0 < r["got"] == r["received"] < 500
    assert r["lost"] > 0 and r["malformed"] == 0
