"""How long a packet waits in the inline gate (NFQUEUE + egress.enforce.nfqueue), and how many
packets per second one Python reader passes.

Everything runs in a closed lab (tests/lab/test_nfqueue_kernel.py, NfqLab): two network
namespaces made for the run, A (task side) and B (server), one veth between them created
inside them; nothing is linked into the root namespace, nothing forwarded or NATed there.
A holds the gate as the tests load it: an iptables-nft chain EGRESS-GATE in mangle OUTPUT
(``-m connmark ! --mark 0/0x00f00000 -j RETURN``, then ``-p tcp --dport 8080 -j NFQUEUE
--queue-num 3``, no --queue-bypass) and an nft chain at priority -140 that copies the
verdict's packet mark to the ct mark.

- tcp: N short connections (HTTP-like request, answer, close) from client processes in A;
  the reader (a thread in another process in A) accepts handshake packets unmarked and gives
  the first packet with data the allow mark, so each connection puts 3 packets through the
  queue. Per connection: client send -> verdict sent (both read CLOCK_MONOTONIC), connect ->
  SYN verdict, request round trip; overall connections/s and queued packets/s.
- udp: K datagrams of one flow, each verdicted unmarked (so every one is queued): packets/s
  with one verdict per packet, then with one NFQNL_MSG_VERDICT_BATCH per read.
- baseline: the same TCP clients with the gate chain flushed: the round trip without it.
- decode: NfqDecoder.feed on one packet message, µs per packet (no kernel).

    sudo .venv/bin/python bench/nfqueue_latency.py [--connections 2000] [--clients 1]
        [--datagrams 20000] [--json out.json]

Exit 0 when it ran, 1 when the lab could not be built or a phase failed.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from egress.enforce import nfqueue as nfq  # noqa: E402
from tests.lab.test_nfqueue_kernel import LATENCY_CLIENT, NfqLab, lab_problem  # noqa: E402

PERCENTILES = """
def pct(values, f):
    values = sorted(values)
    return round(values[min(len(values) - 1, int(f * len(values)))] / 1000, 1) \\
        if values else None

def spread(values):
    return {"median_us": pct(values, 0.5), "p99_us": pct(values, 0.99),
            "max_us": pct(values, 1.0)}

def run_clients(dst, count, clients, client_path):
    procs = [subprocess.Popen([sys.executable, client_path, dst, str(count // clients)],
                              stdout=subprocess.PIPE, text=True) for _ in range(clients)]
    conns = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        if proc.returncode:
            raise SystemExit(f"client failed: {proc.returncode}")
        conns += json.loads(out)
    return conns
"""

TCP = """
q = NfQueue(QUEUE)
gate = Gate(q); gate.start()
started = time.monotonic_ns()
conns = run_clients(B, COUNT, CLIENTS, CLIENT)
wall = (time.monotonic_ns() - started) / 1e9
time.sleep(0.2)
seen = gate.stop()
at = {(p["sport"], bool(p["data"]), p["flags"] & 0x02): p["t"] for p in seen}
first, last = min(p["t"] for p in seen), max(p["t"] for p in seen)
print(json.dumps({
    "connections": len(conns), "answered": sum(c[5].startswith("ok") for c in conns),
    "send_to_verdict": spread([at[(c[0], True, 0)] - c[3] for c in conns]),
    "connect_to_syn_verdict": spread([at[(c[0], False, 2)] - c[1] for c in conns]),
    "request_rtt": spread([c[4] - c[3] for c in conns]),
    "connect_time": spread([c[2] - c[1] for c in conns]),
    "connections_per_s": round(len(conns) / wall, 1),
    "queued": len(seen), "queued_per_s": round(len(seen) / ((last - first) / 1e9), 1),
    "stats": q.stats(), "kernel": q.kernel_stats()}))
"""

UDP = """
def flood(batch):
    q = NfQueue(QUEUE)
    sender = subprocess.Popen([sys.executable, "-c", f'''
import socket
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range({DATAGRAMS}):
    u.sendto(b"d" * 64, ("{B}", 9000))
'''])
    got, first, last = 0, None, None
    deadline = time.time() + 300
    while got < DATAGRAMS and time.time() < deadline:
        packets = q.read(1.0)
        if not packets:
            continue
        if batch:
            q.verdict_batch(max(p.packet_id for p in packets), True)
        else:
            for p in packets:
                q.verdict(p.packet_id, True)
        now = time.monotonic_ns()
        first = first or now
        last = now
        got += len(packets)
    sender.wait(60)
    stats, kernel = q.stats(), q.kernel_stats()
    q.close()
    return {"datagrams": got, "packets_per_s": round(got / max((last - first) / 1e9, 1e-9), 1),
            "stats": stats, "kernel": kernel}

print(json.dumps({"per_packet": flood(False), "batch": flood(True)}))
"""

BASELINE = """
started = time.monotonic_ns()
conns = run_clients(B, COUNT, CLIENTS, CLIENT)
wall = (time.monotonic_ns() - started) / 1e9
print(json.dumps({"connections": len(conns), "request_rtt": spread([c[4] - c[3] for c in conns]),
                  "connect_time": spread([c[2] - c[1] for c in conns]),
                  "connections_per_s": round(len(conns) / wall, 1)}))
"""


def decode_cost(count: int = 50_000) -> float:
    """µs per packet for NfqDecoder.feed on one message as the kernel sends it."""
    payload = bytes.fromhex("450000340001400040060000c6336402c6336401") + b"\0" * 40
    body = b"".join((
        nfq.nla(nfq.NFQA_PACKET_HDR, struct.pack(">IHB", 1, 0x0800, 3)),
        nfq.nla(nfq.NFQA_IFINDEX_OUTDEV, struct.pack(">I", 2)),
        nfq.nla(nfq.NFQA_UID, struct.pack(">I", 1000)),
        nfq.nla(nfq.NFQA_GID, struct.pack(">I", 1000)),
        nfq.nla(nfq.NFQA_SKB_INFO, struct.pack(">I", 0)),
        nfq.nla(nfq.NFQA_PAYLOAD, payload)))
    msg = nfq.nfmsg(nfq.NFNL_SUBSYS_QUEUE, nfq.NFQNL_MSG_PACKET, 0, body, family=2, res_id=3)
    dec = nfq.NfqDecoder()
    started = time.perf_counter()
    for _ in range(count):
        dec.feed(msg, 0)
    return (time.perf_counter() - started) / count * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=1, help="client processes in parallel")
    ap.add_argument("--datagrams", type=int, default=20000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    result: dict = {"decode_us_per_packet": round(decode_cost(), 2)}
    problem = lab_problem()
    if problem:
        print(problem, file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="nfqbench") as tmp:
        lab = NfqLab(Path(tmp))
        try:
            lab.build()
            client = lab.dir / "client.py"
            client.write_text(LATENCY_CLIENT)
            consts = (f"COUNT, CLIENTS, CLIENT, DATAGRAMS = {args.connections}, "
                      f"{args.clients}, {str(client)!r}, {args.datagrams}")
            result["tcp"] = lab.in_a(PERCENTILES, consts, TCP, timeout=1200)
            result["udp"] = lab.in_a(consts, UDP, timeout=1200)
            for tool in ("iptables-nft", "ip6tables-nft"):
                lab.sh("ip", "netns", "exec", lab.a, tool, "-t", "mangle", "-F", "EGRESS-GATE")
            result["baseline"] = lab.in_a(PERCENTILES, consts, BASELINE, timeout=1200)
        except Exception as e:      # noqa: BLE001 -- report and exit 1, the lab still goes
            print(f"benchmark failed: {e}", file=sys.stderr)
            return 1
        finally:
            lab.close()
    tcp, udp, base = result["tcp"], result["udp"], result["baseline"]
    print(f"NFQUEUE gate, {tcp['connections']} connections, {args.clients} client process(es)"
          f" ({tcp['answered']} answered, {tcp['queued']} packets queued)")
    for name in ("send_to_verdict", "connect_to_syn_verdict", "request_rtt", "connect_time"):
        s = tcp[name]
        print(f"  {name:24} median {s['median_us']:8.1f} µs   p99 {s['p99_us']:8.1f} µs"
              f"   max {s['max_us']:8.1f} µs")
    for name in ("request_rtt", "connect_time"):
        s = base[name]
        print(f"  without gate {name:11} median {s['median_us']:8.1f} µs   "
              f"p99 {s['p99_us']:8.1f} µs")
    print(f"  {tcp['connections_per_s']} connections/s, {tcp['queued_per_s']} queued packets/s"
          f" (without gate: {base['connections_per_s']} connections/s)")
    print(f"  UDP through the queue: {udp['per_packet']['packets_per_s']} packets/s with one "
          f"verdict each, {udp['batch']['packets_per_s']} with a batch verdict per read")
    print(f"  decode: {result['decode_us_per_packet']} µs per packet")
    print(f"  counters: tcp {tcp['stats']} kernel {tcp['kernel']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
