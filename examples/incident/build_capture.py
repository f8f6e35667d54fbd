"""Writes incident.pcap: the seed incident as packets (synthetic, deterministic).

The same story as flows.jsonl, at packet level: DNS lookups with answers,
TLS ClientHellos, an SSH session (banners and KEXINITs) to a relay, an
XMRig Stratum login to a pool, an HTTP GET to the metadata service, a TLS
connection naming another server than the address it goes to, and one to
a bare address. Built with the benchmark's packet writer; the lab of real
tools (OpenSSH, curl, a miner) comes with the detectors.
Run: .venv/bin/python examples/incident/build_capture.py examples/incident/incident.pcap
"""

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from make_capture import (T0, TcpFlow, Writer, client_hello, dns_pair,  # noqa: E402
                          ssh_kexinit)

TASK_HOST, RESOLVER = bytes([10, 213, 0, 2]), bytes([10, 213, 0, 1])


def ip(text: str) -> bytes:
    return bytes(int(x) for x in text.split("."))


def main(out: str) -> None:
    rng = random.Random(7)
    with open(out, "wb") as f:
        w = Writer(f)
        port = iter(range(40001, 41000))
        qid = iter(range(1, 1000))

        def lookup(ts: float, name: str, address: str) -> None:
            q, a = dns_pair(next(qid), name, address)
            p = next(port)
            w.udp(ts, TASK_HOST, RESOLVER, p, 53, q)
            w.udp(ts + 0.003, RESOLVER, TASK_HOST, 53, p, a)

        def tls(ts: float, address: str, sni: str, download: int = 20) -> None:
            flow = TcpFlow(w, ts, TASK_HOST, ip(address), next(port), 443)
            flow.send(True, client_hello(sni))
            flow.send(False, rng.randbytes(1400))
            flow.bulk_from_server(download, rng)
            flow.close()

        t = float(T0)
        # What the task was for: PyPI, GitHub and the team's CI server.
        lookup(t, "pypi.org", "203.0.113.10")
        tls(t + 0.1, "203.0.113.10", "pypi.org")
        lookup(t + 1.5, "files.pythonhosted.org", "203.0.113.11")
        tls(t + 1.6, "203.0.113.11", "files.pythonhosted.org", download=60)
        lookup(t + 12, "github.com", "203.0.113.20")
        tls(t + 12.1, "203.0.113.20", "github.com", download=30)
        lookup(t + 16, "ci.billing.example", "203.0.113.30")
        tls(t + 16.1, "203.0.113.30", "ci.billing.example")

        # A reverse SSH tunnel to a relay ...
        lookup(t + 300, "relay.example", "198.51.100.7")
        ssh = TcpFlow(w, t + 300.2, TASK_HOST, ip("198.51.100.7"), next(port), 22)
        ssh.send(False, b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n")
        ssh.send(True, b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n")
        ssh.send(True, ssh_kexinit("client"))
        ssh.send(False, ssh_kexinit("server"))
        for _ in range(40):
            ssh.send(False, rng.randbytes(52))     # the server drives: a forwarded session
            ssh.send(True, rng.randbytes(36))
        ssh.close()
        # ... Stratum to a mining pool ...
        lookup(t + 420, "pool.supportxmr.com", "198.51.100.42")
        pool = TcpFlow(w, t + 420.3, TASK_HOST, ip("198.51.100.42"), next(port), 3333)
        login = {"id": 1, "jsonrpc": "2.0", "method": "login",
                 "params": {"login": "4" + "A" * 94, "pass": "x", "rigid": "",
                            "agent": "XMRig/6.21.0 (Linux x86_64) libuv/1.44.2 gcc/12.2.0"}}
        pool.send(True, json.dumps(login).encode() + b"\n")
        pool.send(False, b'{"id":1,"jsonrpc":"2.0","error":null,"result":{"id":"7","job":'
                         b'{"blob":"0707","job_id":"1","target":"b88d0600"},"status":"OK"}}\n')
        pool.close()
        # ... the cloud metadata service ...
        meta = TcpFlow(w, t + 500, TASK_HOST, ip("169.254.169.254"), next(port), 80)
        meta.send(True, b"GET /latest/meta-data/iam/security-credentials/ HTTP/1.1\r\n"
                        b"Host: 169.254.169.254\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n")
        meta.send(False, b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\ndeploy-role\n")
        meta.close()
        # ... PyPI's address, another name in the ClientHello ...
        tls(t + 610, "203.0.113.10", "relay.example")
        # ... and GitHub's API by a bare address.
        tls(t + 700, "203.0.113.99", "api.github.com")


if __name__ == "__main__":
    main(sys.argv[1])
