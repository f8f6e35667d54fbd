"""NfQueue on the kernel: the inline gate with real traffic in a closed lab.

Two network namespaces made for each test (A, the task side, and B, its only peer), joined by
one veth created inside A; nothing touches the root namespace (no link, no forwarding, no
NAT there). A gets the gate as egress loads it (KERNEL.md): an iptables-nft user chain in
``mangle`` OUTPUT (priority -150) that queues unjudged packets, then an nft chain at -140 that
copies the verdict's packet mark to the ct mark and drops the block value. NfQueue binds in
the namespace of the calling process, so each check runs as a script inside A
(``ip netns exec A .venv/bin/python``) and prints JSON. B runs a server, started and stopped
here by PID, that logs every byte it gets and counts (nft) the packets that reach it.

The gate script accepts handshake packets unmarked and judges the first packet with data:
ALLOW or BLOCK as the packet mark; once the ct mark is set, the flow's packets no longer
enter the queue. Root is needed; under CI=true its absence fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lab.pair import NamespacePair, skip_or_fail

REPO = Path(__file__).resolve().parents[2]
PYTHON = str(REPO / ".venv" / "bin" / "python") \
    if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
A_ADDR, B_ADDR = "198.51.100.2", "198.51.100.1"
A_ADDR6, B_ADDR6 = "2001:db8:98::2", "2001:db8:98::1"
REQUEST = "GET /allowed HTTP/1.0\r\nHost: b\r\n\r\n"
QUEUE, MASK, BLOCK, ALLOW = 3, 0x00F00000, 0x00100000, 0x00200000
"""The mark values of egress.enforce.ruleset (MARK_MASK, BLOCK_MARK) and an allow value."""

GATE_IPTABLES = f"""*mangle
:EGRESS-GATE - [0:0]
-A OUTPUT -j EGRESS-GATE
-A EGRESS-GATE -m connmark ! --mark 0/{MASK:#010x} -j RETURN
-A EGRESS-GATE -p tcp --dport 8080 -j NFQUEUE --queue-num {QUEUE}
-A EGRESS-GATE -p udp --dport 9000 -j NFQUEUE --queue-num {QUEUE}
COMMIT
"""
"""Loaded with ``iptables-nft-restore --noflush`` and ``ip6tables-nft-restore --noflush``.
No --queue-bypass: with no reader the packets are dropped."""

POST_GATE_NFT = f"""table inet t {{
  chain post {{
    type filter hook output priority -140;
    meta mark & {MASK:#010x} == {BLOCK:#010x} ct mark set ct mark | {BLOCK:#010x}
    meta mark & {MASK:#010x} == {ALLOW:#010x} ct mark set ct mark | {ALLOW:#010x}
    meta mark & {MASK:#010x} == {BLOCK:#010x} counter drop
    ct mark & {MASK:#010x} == {BLOCK:#010x} counter drop
  }}
}}
"""
"""After the gate at the same hook: the verdict's mark becomes the ct mark (so later packets
skip the queue), the block value is dropped, and so are later packets of a blocked flow
(their own packet mark is 0)."""

B_COUNTER_NFT = """table inet seen {
  counter tcp8080 { }
  chain in {
    type filter hook input priority 0;
    tcp dport 8080 counter name tcp8080
  }
}
"""

SERVER = r"""
import json, socket, sys, threading
port, log = int(sys.argv[1]), open(sys.argv[2], "a", buffering=1)
lock = threading.Lock()

def note(proto, peer, data):
    with lock:
        log.write(json.dumps({"proto": proto, "port": peer[1],
                              "data": data.decode("latin-1")}) + "\n")

def serve(c, peer):
    with c:
        while data := c.recv(65536):
            note("tcp", peer, data)
            c.sendall(b"ok %d" % len(data))

def udp():
    u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    u.bind(("::", 9000))
    while True:
        data, peer = u.recvfrom(65536)
        note("udp", peer, data)

s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", port)); s.listen(1024)
threading.Thread(target=udp, daemon=True).start()
print("ready", flush=True)
while True:
    c, peer = s.accept()
    threading.Thread(target=serve, args=(c, peer), daemon=True).start()
"""

PRELUDE = f"""
import json, socket, struct, subprocess, sys, threading, time
sys.path.insert(0, {str(REPO)!r})
from egress.enforce.nfqueue import NfQueue
A, B, A6, B6 = {A_ADDR!r}, {B_ADDR!r}, {A_ADDR6!r}, {B_ADDR6!r}
QUEUE, MASK, BLOCK, ALLOW = {QUEUE}, {MASK}, {BLOCK}, {ALLOW}

def l4_of(payload):
    # (family, src, proto, sport, dport, tcp flags, data) of an IP packet, read here
    if payload[0] >> 4 == 4:
        hl, fam, proto = (payload[0] & 15) * 4, 4, payload[9]
        src = socket.inet_ntop(socket.AF_INET, payload[12:16])
    else:
        hl, fam, proto = 40, 6, payload[6]
        src = socket.inet_ntop(socket.AF_INET6, payload[8:24])
    sport, dport = struct.unpack_from(">HH", payload, hl)
    if proto == 6:
        return fam, src, proto, sport, dport, payload[hl + 13], \\
            payload[hl + (payload[hl + 12] >> 4) * 4:]
    return fam, src, proto, sport, dport, 0, payload[hl + 8:]

class Gate(threading.Thread):
    # handshake packets go out unmarked (still unjudged); the first packet with data gets
    # decide(data) -> ALLOW or BLOCK as its packet mark, other mark bits kept
    def __init__(self, q, decide=lambda data: ALLOW):
        super().__init__(daemon=True)
        self.q, self.decide, self.seen, self.done = q, decide, [], threading.Event()

    def run(self):
        while not self.done.is_set():
            for p in self.q.read(0.05):
                fam, src, proto, sport, dport, flags, data = l4_of(p.payload)
                value = self.decide(data) if data else None
                t = time.monotonic_ns()         # the verdict leaves now
                self.q.verdict(p.packet_id, True,
                               None if value is None else (p.mark & ~MASK) | value)
                self.seen.append(dict(t=t, id=p.packet_id, family=p.family,
                    fam=fam, src=src, proto=proto, sport=sport, dport=dport, flags=flags,
                    data=data.decode("latin-1"), value=value, mark=p.mark, hook=p.hook,
                    hw=p.hw_protocol, indev=p.indev, outdev=p.outdev, uid=p.uid, gid=p.gid,
                    cap_len=p.cap_len, skb_info=p.skb_info, length=len(p.payload)))

    def stop(self):
        self.done.set(); self.join(5)
        return self.seen

def ct_mark(sport, proto="tcp"):
    # the conntrack tool's view of the flow from sport (None when it has no entry)
    out = subprocess.run(["conntrack", "-L", "-p", proto, "--sport", str(sport)],
                         capture_output=True,
                         text=True).stdout
    for line in out.splitlines():
        if "mark=" in line:
            return int(line.split("mark=")[1].split()[0])
    return None

def exchange(dst, data, timeout=5.0):
    # connect, send, wait for the answer: (sport, answer or None on timeout)
    c = socket.create_connection((dst, 8080), timeout=timeout)
    sport = c.getsockname()[1]
    c.sendall(data)
    try:
        return sport, c.recv(100).decode()
    except socket.timeout:
        return sport, None
    finally:
        c.close()
"""


class NfqLab(NamespacePair):
    """Namespaces A and B with one veth between them, the gate loaded in A, a server in B.
    Used by bench/nfqueue_latency.py too."""

    tag, prelude, python = "egQ", PRELUDE, PYTHON

    def __init__(self, workdir: Path):
        super().__init__(workdir, A_ADDR, B_ADDR, A_ADDR6, B_ADDR6)
        self.log = self.dir / "server.log"

    def build(self) -> None:
        super().build()
        for tool in ("iptables-nft-restore", "ip6tables-nft-restore"):
            self.sh("ip", "netns", "exec", self.a, tool, "--noflush", input=GATE_IPTABLES)
        self.sh("ip", "netns", "exec", self.a, "nft", "-f", "-", input=POST_GATE_NFT)
        self.sh("ip", "netns", "exec", self.b, "nft", "-f", "-", input=B_COUNTER_NFT)
        script = self.dir / "server.py"
        script.write_text(SERVER)
        proc = subprocess.Popen(["ip", "netns", "exec", self.b, PYTHON, str(script), "8080",
                                 str(self.log)], stdout=subprocess.PIPE, text=True)
        self.procs.append(proc)
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the server in B did not start")

    def in_a(self, *parts: str, timeout: float = 120) -> dict:
        return super().in_a(*parts, timeout=timeout)

    def server_log(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def reached_b(self) -> int:
        """TCP packets to port 8080 that reached B's input hook."""
        out = json.loads(self.sh("ip", "netns", "exec", self.b, "nft", "-j", "list", "counter",
                                 "inet", "seen", "tcp8080"))
        return [x["counter"] for x in out["nftables"] if "counter" in x][0]["packets"]

    def gate_counters(self) -> dict[str, int]:
        """Packets the NFQUEUE rules and the post chain's drop rules counted, in A."""
        queued = 0
        for tool in ("iptables-nft", "ip6tables-nft"):
            out = self.sh("ip", "netns", "exec", self.a, tool, "-t", "mangle", "-L",
                          "EGRESS-GATE", "-v", "-x", "-n")
            queued += sum(int(line.split()[0]) for line in out.splitlines() if "NFQUEUE" in line)
        rules = json.loads(self.sh("ip", "netns", "exec", self.a, "nft", "-j", "list", "chain",
                                   "inet", "t", "post"))["nftables"]
        drops = [e["counter"]["packets"] for r in rules if "rule" in r
                 for e in r["rule"]["expr"] if "counter" in e]
        return {"queued": queued, "dropped_block_mark": drops[0], "dropped_block_ct": drops[1]}


def lab_problem() -> str | None:
    if os.geteuid() != 0:
        return "the NFQUEUE lab needs root (network namespaces)"
    missing = [t for t in ("ip", "nft", "iptables-nft", "ip6tables-nft", "iptables-nft-restore",
                           "ip6tables-nft-restore", "conntrack") if shutil.which(t) is None]
    return f"the NFQUEUE lab needs {', '.join(missing)}" if missing else None


@pytest.fixture
def nfq_lab(tmp_path):
    problem = lab_problem()
    if problem:
        skip_or_fail(problem)
    lab = NfqLab(tmp_path)
    try:
        lab.build()
        yield lab
    finally:
        lab.close()


def test_allow_mark_passes_and_becomes_the_ct_mark(nfq_lab):
    r = nfq_lab.in_a("""
        q = NfQueue(QUEUE)
        gate = Gate(q); gate.start()
        flows = {}
        for dst in (B, B6):
            c = socket.create_connection((dst, 8080), timeout=5)
            sport = c.getsockname()[1]
            c.sendall(b"GET /allowed HTTP/1.0\\r\\nHost: b\\r\\n\\r\\n")
            first = c.recv(100).decode()
            c.sendall(b"second")                       # after the verdict: not queued
            second = c.recv(100).decode()
            flows[dst] = dict(sport=sport, answers=[first, second], ct_mark=ct_mark(sport))
            c.close()
        time.sleep(0.3)
        seen = gate.stop()
        print(json.dumps({"flows": flows, "seen": seen, "stats": q.stats(),
                          "kernel": q.kernel_stats(), "ifindex": socket.if_nametoindex("vA")}))
    """)
    for dst, fam, src in ((B_ADDR, 4, A_ADDR), (B_ADDR6, 6, A_ADDR6)):
        flow = r["flows"][dst]
        assert flow["answers"] == [f"ok {len(REQUEST)}", "ok 6"]
        assert flow["ct_mark"] == ALLOW                       # conntrack -L: mark=2097152
        mine = [p for p in r["seen"] if p["sport"] == flow["sport"] and p["fam"] == fam]
        # SYN, the handshake's ACK, then the request, judged: nothing of the flow after it
        assert [(p["flags"] & 0x12, p["data"]) for p in mine] == \
            [(0x02, ""), (0x10, ""), (0x10, REQUEST)]
        assert [p["value"] for p in mine] == [None, None, ALLOW]
        for p in mine:
            assert (p["family"], p["src"], p["dport"], p["mark"], p["hook"]) == \
                (fam, src, 8080, 0, 3)                      # NF_INET_LOCAL_OUT
            assert p["hw"] == (0x0800 if fam == 4 else 0x86DD)
            assert (p["outdev"], p["indev"], p["uid"], p["gid"]) == (r["ifindex"], 0, 0, 0)
            assert p["cap_len"] is None
    got = [(e["port"], e["data"]) for e in nfq_lab.server_log()]
    for dst in (B_ADDR, B_ADDR6):
        sport = r["flows"][dst]["sport"]
        assert [d for port, d in got if port == sport] == [REQUEST, "second"]
    assert r["stats"] == {"received": 6, "verdicts": 6, "malformed": 0, "errors": 0,
                          "overruns": 0}
    assert r["kernel"]["held"] == 0 and r["kernel"]["queue_dropped"] == 0
    assert nfq_lab.gate_counters()["queued"] == 6


def test_block_mark_is_dropped_after_the_gate(nfq_lab):
    r = nfq_lab.in_a("""
        q = NfQueue(QUEUE)
        gate = Gate(q, decide=lambda data: BLOCK if b"/blocked" in data else ALLOW); gate.start()
        blocked_port, blocked = exchange(B, b"GET /blocked HTTP/1.0\\r\\n\\r\\n", timeout=2.5)
        mark = ct_mark(blocked_port)
        fine_port, fine = exchange(B, b"GET /fine HTTP/1.0\\r\\n\\r\\n")
        time.sleep(0.3)
        print(json.dumps({"blocked": [blocked_port, blocked, mark], "fine": [fine_port, fine],
                          "seen": gate.stop(), "stats": q.stats()}))
    """)
    blocked_port, answer, mark = r["blocked"]
    assert answer is None and mark == BLOCK
    assert r["fine"][1] == f"ok {len('GET /fine HTTP/1.0') + 4}"
    log = nfq_lab.server_log()
    assert [e["data"] for e in log] == ["GET /fine HTTP/1.0\r\n\r\n"]
    assert all(e["port"] != blocked_port for e in log)
    judged = [p for p in r["seen"] if p["sport"] == blocked_port and p["data"]]
    # judged once: its retransmissions carry the block ct mark, skip the queue, are dropped
    assert [(p["data"], p["value"]) for p in judged] == [("GET /blocked HTTP/1.0\r\n\r\n", BLOCK)]
    counters = nfq_lab.gate_counters()
    assert counters["dropped_block_mark"] == 1
    assert counters["dropped_block_ct"] >= 1                # retransmissions, the FIN
    assert r["stats"]["errors"] == r["stats"]["malformed"] == 0


def test_fail_closed_without_a_reader_and_when_it_dies(nfq_lab):
    r = nfq_lab.in_a("""
        def attempt(timeout=2.5):
            try:
                socket.create_connection((B, 8080), timeout=timeout).close()
                return "connected"
            except socket.timeout:
                return "timeout"
        nobody = attempt()
        q = NfQueue(QUEUE)
        c = socket.socket(); c.setblocking(False)
        c.connect_ex((B, 8080))
        held = q.read(2.0)
        before = q.kernel_stats()
        q.close()                       # the reader dies holding the SYN: it is dropped
        time.sleep(2.5)                 # the SYN's retransmission meets no reader
        err = c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        try:
            c.getpeername(); state = "connected"
        except OSError:
            state = "not connected"
        print(json.dumps({"nobody": nobody, "held": len(held), "before": before,
                          "after_close": state, "so_error": err}))
    """)
    assert r["nobody"] == "timeout"
    assert r["held"] == 1 and r["before"]["held"] == 1
    assert r["after_close"] == "not connected"
    assert nfq_lab.reached_b() == 0                     # not one packet reached B
    assert nfq_lab.server_log() == []
    assert nfq_lab.gate_counters()["queued"] >= 3        # SYNs and their retransmissions


def test_full_queue_drops_in_enforce_mode_and_accepts_only_when_fail_open(nfq_lab):
    r = nfq_lab.in_a("""
        def attempt(timeout=2.5):
            try:
                sport, answer = exchange(B, b"late", timeout=timeout)
                return answer
            except socket.timeout:
                return "timeout"
        out = {}
        for mode, fail_open in (("enforce", False), ("audit", True)):
            q = NfQueue(QUEUE, maxlen=1, fail_open=fail_open)
            first = socket.socket(); first.setblocking(False)
            first.connect_ex((B, 8080))              # its SYN fills the queue (not read)
            time.sleep(0.2)
            out[mode] = dict(second=attempt(), kernel=q.kernel_stats())
            q.close(); first.close()
        print(json.dumps(out))
    """)
    assert r["enforce"]["second"] == "timeout"
    assert r["enforce"]["kernel"]["held"] == 1 and r["enforce"]["kernel"]["queue_dropped"] >= 1
    assert r["audit"]["second"] == "ok 4"               # accepted around the full queue
    assert r["audit"]["kernel"]["queue_dropped"] == 0
    assert [e["data"] for e in nfq_lab.server_log()] == ["late"]


def test_verdict_batch_and_an_unknown_id(nfq_lab):
    r = nfq_lab.in_a("""
        q = NfQueue(QUEUE)
        out = {}
        for name, accept in (("dropped", False), ("accepted", True)):
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            for i in range(5):
                u.sendto(b"%s %d" % (name.encode(), i), (B, 9000))
            held = []
            deadline = time.time() + 5
            while len(held) < 5 and time.time() < deadline:
                held += q.read(0.5)
            q.verdict_batch(max(p.packet_id for p in held), accept, ALLOW if accept else None)
            time.sleep(0.2)
            u.sendto(b"%s after" % name.encode(), (B, 9000))   # ct mark set: not queued
            after = q.read(0.5)
            for p in after:                          # else the next batch would cover it
                q.verdict(p.packet_id, False)
            out[name] = dict(held=[p.payload[28:].decode() for p in held],
                             after=[p.payload[28:].decode() for p in after],
                             ct_mark=ct_mark(u.getsockname()[1], "udp"))
        q.verdict(0x7FFFFFF0, True)                  # an id the kernel does not hold
        q.read(0.5)
        out["stats"], out["last_error"] = q.stats(), q.decoder.last_error
        print(json.dumps(out))
    """)
    assert r["dropped"]["held"] == [f"dropped {i}" for i in range(5)]
    assert r["dropped"]["after"] == ["dropped after"]    # dropped flow: judged again
    assert r["accepted"]["held"] == [f"accepted {i}" for i in range(5)]
    assert r["accepted"]["after"] == [] and r["accepted"]["ct_mark"] == ALLOW
    got = [e["data"] for e in nfq_lab.server_log() if e["proto"] == "udp"]
    assert got == [f"accepted {i}" for i in range(5)] + ["accepted after"]
    assert r["stats"]["errors"] == 1 and r["last_error"] == 2      # ENOENT
    assert r["stats"]["malformed"] == 0


def test_gso_send_is_one_packet_and_copy_range_cuts_only_the_copy(nfq_lab):
    r = nfq_lab.in_a("""
        q = NfQueue(QUEUE, copy_range=200)
        gate = Gate(q); gate.start()
        c = socket.create_connection((B, 8080), timeout=5)
        sport = c.getsockname()[1]
        c.sendall(b"x" * 50000)
        c.shutdown(socket.SHUT_WR)
        answers = b""
        while data := c.recv(1000):
            answers += data
        c.close()
        time.sleep(0.3)
        print(json.dumps({"sport": sport, "seen": gate.stop(), "kernel": q.kernel_stats()}))
    """)
    judged = [p for p in r["seen"] if p["sport"] == r["sport"] and p["data"]]
    # GSO packets above the MTU, each copied up to copy_range. Every packet that passed the
    # gate before the first verdict set the ct mark is queued too (here the first send left
    # as 2 GSO packets at once): the judge answers a flow's packets alike.
    assert 1 <= len(judged) <= 4
    for p in judged:
        assert p["length"] == 200 and 1500 < p["cap_len"] <= 65535
        assert p["skb_info"] & 2                # NFQA_SKB_GSO
    assert r["kernel"]["copy_range"] == 200
    got = [e for e in nfq_lab.server_log() if e["port"] == r["sport"]]
    assert sum(len(e["data"]) for e in got) == 50000     # the whole packet was released


LATENCY_CLIENT = r"""
import json, socket, sys, time
dst, count = sys.argv[1], int(sys.argv[2])
out = []
for i in range(count):
    t0 = time.monotonic_ns()
    c = socket.create_connection((dst, 8080), timeout=5)
    t1 = time.monotonic_ns()
    c.sendall(b"GET /n%d HTTP/1.0\r\n\r\n" % i)
    t2 = time.monotonic_ns()
    answer = c.recv(100)
    t3 = time.monotonic_ns()
    out.append([c.getsockname()[1], t0, t1, t2, t3, answer.decode()])
    c.close()
print(json.dumps(out))
"""

LATENCY = """
def latency(dst, count, client_path):
    # client in its own process (no shared GIL); both sides read CLOCK_MONOTONIC
    q = NfQueue(QUEUE)
    gate = Gate(q); gate.start()
    done = subprocess.run([sys.executable, client_path, dst, str(count)], capture_output=True,
                          text=True, check=True)
    time.sleep(0.2)
    seen = gate.stop()
    conns = json.loads(done.stdout)
    verdict_at = {(p["sport"], bool(p["data"]), p["flags"] & 0x02): p["t"] for p in seen}
    def pct(values, f):
        values = sorted(values)
        return values[min(len(values) - 1, int(f * len(values)))] / 1000
    send = [verdict_at[(c[0], True, 0)] - c[3] for c in conns]
    syn = [verdict_at[(c[0], False, 2)] - c[1] for c in conns]
    rtt = [c[4] - c[3] for c in conns]
    return {"count": len(conns), "answered": sum(c[5].startswith("ok") for c in conns),
            "send_to_verdict_us": [pct(send, 0.5), pct(send, 0.99)],
            "connect_to_syn_verdict_us": [pct(syn, 0.5), pct(syn, 0.99)],
            "request_rtt_us": [pct(rtt, 0.5), pct(rtt, 0.99)],
            "queued": len(seen), "stats": q.stats()}
"""


def test_latency_send_to_verdict_for_200_connections(nfq_lab):
    client = nfq_lab.dir / "client.py"
    client.write_text(LATENCY_CLIENT)
    r = nfq_lab.in_a(LATENCY, f"print(json.dumps(latency(B, 200, {str(client)!r})))")
    print(f"\nNFQUEUE verdict latency, 200 connections (median, p99 in µs): "
          f"send->verdict {r['send_to_verdict_us']}, "
          f"connect->SYN verdict {r['connect_to_syn_verdict_us']}, "
          f"request RTT {r['request_rtt_us']}")
    assert r["count"] == r["answered"] == 200
    assert r["queued"] == 600                   # SYN, ACK, request: then the ct mark skips
    assert r["stats"]["errors"] == r["stats"]["malformed"] == r["stats"]["overruns"] == 0
    median, p99 = r["send_to_verdict_us"]
    assert 0 < median <= p99 < 200_000           # generous: a loaded 2-CPU machine
