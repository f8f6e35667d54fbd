"""Write a deterministic synthetic capture for the replay benchmark.

    python bench/make_capture.py OUT.pcap [--flows 5000] [--bulk-packets 160000]

Ethernet/IPv4 pcap of one task host (10.213.0.2..) talking to documentation
addresses: DNS lookups (with answers), TLS (ClientHello with SNI, then the
server's bulk data), HTTP/1.1 GETs with bulk responses, SSH sessions
(banners and KEXINITs), and Stratum logins on port 3333. Every TCP flow has
a full handshake and close, every flow its own client port (no port reuse,
no mid-stream pick-ups). Payload templates are built once with scapy; the
packets are written with struct, so making 200k packets takes seconds.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import sys

from scapy.layers.dns import DNS, DNSQR, DNSRR
from scapy.layers.tls.extensions import (ServerName, TLS_Ext_ServerName,
                                         TLS_Ext_SupportedGroups, TLS_Ext_SupportedVersion_CH,
                                         TLS_Ext_SignatureAlgorithms, TLS_Ext_ALPN,
                                         ProtocolName)
from scapy.layers.tls.handshake import TLSClientHello
from scapy.layers.tls.record import TLS

MSS = 1448
T0 = 1_773_194_400  # 2026-03-11T02:00:00Z


def client_hello(sni: str) -> bytes:
    ch = TLSClientHello(
        version=0x0303, ciphers=[0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F],
        ext=[TLS_Ext_ServerName(servernames=[ServerName(servername=sni.encode())]),
             TLS_Ext_SupportedGroups(groups=[29, 23]),
             TLS_Ext_SignatureAlgorithms(sig_algs=[0x0403, 0x0804]),
             TLS_Ext_ALPN(protocols=[ProtocolName(protocol=b"h2"),
                                     ProtocolName(protocol=b"http/1.1")]),
             TLS_Ext_SupportedVersion_CH(versions=[0x0304, 0x0303])])
    return bytes(TLS(version=0x0301, msg=[ch]))


def ssh_kexinit(side: str) -> bytes:
    lists = ["curve25519-sha256,ecdh-sha2-nistp256", "ssh-ed25519,rsa-sha2-512",
             "chacha20-poly1305@openssh.com,aes128-ctr", "chacha20-poly1305@openssh.com,aes128-ctr",
             "umac-64-etm@openssh.com,hmac-sha2-256", "umac-64-etm@openssh.com,hmac-sha2-256",
             "none,zlib@openssh.com", "none,zlib@openssh.com", "", ""]
    if side == "server":
        lists[0] = "curve25519-sha256,diffie-hellman-group14-sha256"
    payload = bytes([20]) + bytes(range(16)) + b"".join(
        struct.pack("!I", len(x)) + x.encode() for x in lists) + b"\x00" + b"\x00" * 4
    pad = 8 - (len(payload) + 5) % 8
    pad += 8 if pad < 4 else 0
    return struct.pack("!IB", len(payload) + pad + 1, pad) + payload + b"\x00" * pad


def dns_pair(qid: int, name: str, address: str) -> tuple[bytes, bytes]:
    query = DNS(id=qid, rd=1, qd=DNSQR(qname=name, qtype="A"))
    answer = DNS(id=qid, qr=1, rd=1, ra=1, qd=DNSQR(qname=name, qtype="A"),
                 an=DNSRR(rrname=name, type="A", ttl=300, rdata=address))
    return bytes(query), bytes(answer)


def checksum(header: bytes) -> int:
    s = sum(struct.unpack(f"!{len(header) // 2}H", header))
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


class Writer:
    ETH = bytes.fromhex("02000000000202000000000108 00".replace(" ", ""))

    def __init__(self, out):
        self.out = out
        self.packets = 0
        self.ipid = 0
        out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))

    def ip(self, ts: float, src: bytes, dst: bytes, proto: int, l4: bytes) -> None:
        self.ipid = (self.ipid + 1) & 0xFFFF
        head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), self.ipid, 0x4000, 64,
                           proto, 0, src, dst)
        head = head[:10] + struct.pack("!H", checksum(head)) + head[12:]
        frame = self.ETH + head + l4
        sec = int(ts)
        self.out.write(struct.pack("<IIII", sec, int((ts - sec) * 1e6), len(frame), len(frame)))
        self.out.write(frame)
        self.packets += 1

    def udp(self, ts, src, dst, sport, dport, payload):
        self.ip(ts, src, dst, 17, struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)

    def tcp(self, ts, src, dst, sport, dport, seq, ack, flags, payload=b""):
        self.ip(ts, src, dst, 6, struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF,
                                             ack & 0xFFFFFFFF, 0x50, flags, 65535, 0, 0) + payload)


class TcpFlow:
    """Writes one TCP conversation: handshake, exchanges, close."""

    def __init__(self, w: Writer, ts: float, c: bytes, s: bytes, cport: int, sport: int):
        self.w, self.ts, self.c, self.s, self.cp, self.sp = w, ts, c, s, cport, sport
        self.cseq, self.sseq = 1000, 5000
        w.tcp(self.tick(), c, s, cport, sport, self.cseq, 0, 0x02)
        w.tcp(self.tick(), s, c, sport, cport, self.sseq, self.cseq + 1, 0x12)
        self.cseq += 1
        self.sseq += 1
        w.tcp(self.tick(), c, s, cport, sport, self.cseq, self.sseq, 0x10)

    def tick(self, dt: float = 0.0004) -> float:
        self.ts += dt
        return self.ts

    def send(self, from_client: bool, data: bytes) -> None:
        for i in range(0, len(data), MSS):
            chunk = data[i:i + MSS]
            if from_client:
                self.w.tcp(self.tick(), self.c, self.s, self.cp, self.sp, self.cseq, self.sseq, 0x18, chunk)
                self.cseq += len(chunk)
            else:
                self.w.tcp(self.tick(), self.s, self.c, self.sp, self.cp, self.sseq, self.cseq, 0x18, chunk)
                self.sseq += len(chunk)

    def bulk_from_server(self, packets: int, rng: random.Random) -> None:
        block = rng.randbytes(MSS)
        for i in range(packets):
            self.w.tcp(self.tick(0.00005), self.s, self.c, self.sp, self.cp, self.sseq, self.cseq, 0x10, block)
            self.sseq += MSS
            if i % 8 == 7:
                self.w.tcp(self.tick(0.00001), self.c, self.s, self.cp, self.sp, self.cseq, self.sseq, 0x10)

    def close(self) -> None:
        w = self.w
        w.tcp(self.tick(), self.c, self.s, self.cp, self.sp, self.cseq, self.sseq, 0x11)
        w.tcp(self.tick(), self.s, self.c, self.sp, self.cp, self.sseq, self.cseq + 1, 0x11)
        w.tcp(self.tick(), self.c, self.s, self.cp, self.sp, self.cseq + 1, self.sseq + 1, 0x10)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--flows", type=int, default=5000)
    ap.add_argument("--bulk-packets", type=int, default=160_000,
                    help="server data packets spread over the bulk TLS and HTTP flows")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    print(json.dumps(write_capture(args.out, args.flows, args.bulk_packets, args.seed)),
          file=sys.stderr)
    return 0


def write_capture(out_path: str, flows: int = 5000, bulk_packets: int = 160_000,
                  seed: int = 1) -> dict:
    """Write the capture; returns its packet and flow counts."""
    args = argparse.Namespace(out=out_path, flows=flows, bulk_packets=bulk_packets, seed=seed)
    rng = random.Random(args.seed)
    resolver = bytes([10, 213, 0, 1])
    kinds = (["dns"] * 40 + ["tls"] * 30 + ["http"] * 15 + ["ssh"] * 8 + ["stratum"] * 7)
    plan = [kinds[i % len(kinds)] for i in range(args.flows)]
    bulk_flows = [i for i, k in enumerate(plan) if k in ("tls", "http")][::4]
    per_bulk = args.bulk_packets // max(1, len(bulk_flows))
    bulk = set(bulk_flows)
    counts = {k: 0 for k in set(kinds)}
    ch_cache: dict[str, bytes] = {}
    kex_c, kex_s = ssh_kexinit("client"), ssh_kexinit("server")
    with open(args.out, "wb") as out:
        w = Writer(out)
        ts = float(T0)
        for i, kind in enumerate(plan):
            counts[kind] += 1
            client = bytes([10, 213, 0, 2 + (i // 40000)])
            cport = 20000 + i % 40000
            server = bytes([203, 0, 113, 1 + i % 200]) if kind != "stratum" else bytes([198, 51, 100, 1 + i % 50])
            name = f"host{i % 300}.example.org"
            ts += 0.01
            if kind == "dns":
                q, a = dns_pair(i & 0xFFFF, name, ".".join(map(str, server)))
                w.udp(ts, client, resolver, cport, 53, q)
                w.udp(ts + 0.002, resolver, client, 53, cport, a)
                continue
            flow = TcpFlow(w, ts, client, server, cport,
                           {"tls": 443, "http": 80, "ssh": 22, "stratum": 3333}[kind])
            if kind == "tls":
                ch = ch_cache.setdefault(name, client_hello(name))
                flow.send(True, ch)
                flow.send(False, rng.randbytes(1200))  # ServerHello .. Finished, opaque here
                flow.send(True, rng.randbytes(80))
            elif kind == "http":
                flow.send(True, f"GET /pkg/{i} HTTP/1.1\r\nHost: {name}\r\nUser-Agent: curl/8.5.0\r\n"
                                f"Accept: */*\r\n\r\n".encode())
                flow.send(False, b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                                 b"Content-Length: 1000000\r\n\r\n")
            elif kind == "ssh":
                flow.send(False, b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n")
                flow.send(True, b"SSH-2.0-OpenSSH_9.6\r\n")
                flow.send(True, kex_c)
                flow.send(False, kex_s)
                for _ in range(6):
                    flow.send(True, rng.randbytes(36))
                    flow.send(False, rng.randbytes(52))
            else:
                login = {"id": 1, "jsonrpc": "2.0", "method": "login",
                         "params": {"login": "4" + "A" * 94, "pass": "x", "agent": "XMRig/6.21.0"}}
                flow.send(True, json.dumps(login).encode() + b"\n")
                flow.send(False, b'{"id":1,"jsonrpc":"2.0","error":null,"result":{"id":"1","job":'
                                 b'{"blob":"0707","job_id":"1","target":"b88d0600"},"status":"OK"}}\n')
                flow.send(True, b'{"id":2,"jsonrpc":"2.0","method":"submit","params":{"id":"1",'
                                b'"job_id":"1","nonce":"00000000","result":"ab"}}\n')
            if i in bulk:
                flow.bulk_from_server(per_bulk, rng)
            flow.close()
    return {"packets": w.packets, "flows": args.flows, "tcp_flows": args.flows - counts["dns"],
            "by_kind": counts}


if __name__ == "__main__":
    sys.exit(main())
