"""How fast NFLOG and conntrack messages decode in Python, against the 2k flows/s target.

A flow costs about 3 NFLOG packets (``ct original packets < 3``) plus a NEW and a DESTROY
conntrack event, so 2k flows/s needs about 6k NFLOG and 4k conntrack decodes per second.
The messages are built as the kernel sends them: NFLOG in batches of 16 closed by
NLMSG_DONE (the reader's default queue threshold), conntrack one event per datagram.

    .venv/bin/python bench/netlink_decode.py [--count 20000]
"""

from __future__ import annotations

import argparse
import socket
import struct
import time

from egress.enforce import ctevents as ct
from egress.enforce import nflog as nl

PACKET = bytes.fromhex("450000340001400040060000c6336402c6336401") + b"\0" * 32


def nflog_message(seq: int) -> bytes:
    return nl.nfmsg(nl.NFNL_SUBSYS_ULOG, nl.NFULNL_MSG_PACKET, 0, b"".join((
        nl.nla(nl.NFULA_PACKET_HDR, struct.pack(">HBB", 0x0800, 3, 0)),
        nl.nla(nl.NFULA_MARK, struct.pack(">I", 0x10)),
        nl.nla(nl.NFULA_IFINDEX_OUTDEV, struct.pack(">I", 2)),
        nl.nla(nl.NFULA_UID, struct.pack(">I", 1000)),
        nl.nla(nl.NFULA_GID, struct.pack(">I", 1000)),
        nl.nla(nl.NFULA_PAYLOAD, PACKET), nl.nla(nl.NFULA_PREFIX, b"egress-first\0"),
        nl.nla(nl.NFULA_SEQ, struct.pack(">I", seq)),
        nl.nla(nl.NFULA_SEQ_GLOBAL, struct.pack(">I", seq)))), family=socket.AF_INET, res_id=7)


def nest(atype: int, data: bytes) -> bytes:
    return nl.nla(atype | nl.NLA_F_NESTED, data)


def ct_tuple(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (nest(ct.CTA_TUPLE_IP, nl.nla(ct.CTA_IP_V4_SRC, socket.inet_aton(src))
                 + nl.nla(ct.CTA_IP_V4_DST, socket.inet_aton(dst)))
            + nest(ct.CTA_TUPLE_PROTO, nl.nla(ct.CTA_PROTO_NUM, b"\x06")
                   + nl.nla(ct.CTA_PROTO_SRC_PORT, struct.pack(">H", sport))
                   + nl.nla(ct.CTA_PROTO_DST_PORT, struct.pack(">H", dport))))


def ct_destroy(i: int) -> bytes:
    sport = 1024 + i % 60000
    counters = nl.nla(ct.CTA_COUNTERS_PACKETS, struct.pack(">Q", 10)) \
        + nl.nla(ct.CTA_COUNTERS_BYTES, struct.pack(">Q", 5000))
    return nl.nfmsg(nl.NFNL_SUBSYS_CTNETLINK, ct.IPCTNL_MSG_CT_DELETE, 0, b"".join((
        nest(ct.CTA_TUPLE_ORIG, ct_tuple("198.51.100.2", "198.51.100.1", sport, 443)),
        nest(ct.CTA_TUPLE_REPLY, ct_tuple("198.51.100.1", "198.51.100.2", 443, sport)),
        nl.nla(ct.CTA_STATUS, struct.pack(">I", 0x18e)), nl.nla(ct.CTA_MARK, struct.pack(">I", 16)),
        nest(ct.CTA_COUNTERS_ORIG, counters), nest(ct.CTA_COUNTERS_REPLY, counters),
        nl.nla(ct.CTA_ID, struct.pack(">I", i)),
        nest(ct.CTA_TIMESTAMP, nl.nla(ct.CTA_TIMESTAMP_START, struct.pack(">Q", 10**18))
             + nl.nla(ct.CTA_TIMESTAMP_STOP, struct.pack(">Q", 10**18 + 10**9))))),
        family=socket.AF_INET)


def rate(datagrams: list[bytes], decoder, count: int) -> float:
    start = time.perf_counter()
    for data in datagrams:
        decoder.feed(data)
    elapsed = time.perf_counter() - start
    assert decoder.received == count and decoder.malformed == 0
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    done = struct.pack("=IHHII", 20, nl.NLMSG_DONE, nl.NLM_F_MULTI, 0, 0) + b"\0" * 4
    msgs = [nflog_message(i) for i in range(args.count)]
    batches = [b"".join(msgs[i:i + 16]) + done for i in range(0, args.count, 16)]
    events = [ct_destroy(i) for i in range(args.count)]
    nflog = sorted(rate(batches, nl.NflogDecoder(), args.count) for _ in range(args.repeats))
    conn = sorted(rate(events, ct.CtDecoder(), args.count) for _ in range(args.repeats))
    med_n, med_c = nflog[len(nflog) // 2], conn[len(conn) // 2]
    print(f"NFLOG packets:       {med_n:9,.0f}/s median of {args.repeats} "
          f"({nflog[0]:,.0f}-{nflog[-1]:,.0f})")
    print(f"conntrack DESTROYs:  {med_c:9,.0f}/s median of {args.repeats} "
          f"({conn[0]:,.0f}-{conn[-1]:,.0f})")
    per_flow = 3 / med_n + 2 / med_c
    print(f"one flow (3 NFLOG + NEW + DESTROY): {per_flow * 1e6:.0f} µs; 2k flows/s use "
          f"{per_flow * 2000:.0%} of one core for decoding")


if __name__ == "__main__":
    main()
