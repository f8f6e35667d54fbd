"""A Stratum pool and miner for the lab, speaking XMRig's JSON-RPC dialect.

Our own, and said so: XMRig is not packaged in Debian, and the lab installs
only what Debian ships. The messages follow XMRig's ``login`` / ``job`` /
``submit`` as XMRig sends them (one JSON object a line), over TCP or TLS.

    python -m tests.lab.stratum pool ADDRESS PORT [--tls CERT KEY]
    python -m tests.lab.stratum miner HOST PORT [--tls CA] [--shares N]
"""

import argparse
import json
import socket
import ssl
import sys
import threading
import time

JOB = {"blob": "0707e3f0bda806" + "00" * 36, "job_id": "1", "target": "b88d0600",
       "algo": "rx/0", "height": 3000000}


def pool(address: str, port: int, cert: str | None, key: str | None) -> None:
    server = socket.create_server((address, port))
    context = None
    if cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
    while True:
        conn, _ = server.accept()
        if context:
            try:
                conn = context.wrap_socket(conn, server_side=True)
            except (ssl.SSLError, OSError):
                continue
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def serve(conn) -> None:
    with conn, conn.makefile("rwb") as f:
        for line in f:
            msg = json.loads(line)
            if msg.get("method") == "login":
                reply = {"id": msg["id"], "jsonrpc": "2.0", "error": None,
                         "result": {"id": "lab-miner", "job": JOB, "status": "OK"}}
            else:
                reply = {"id": msg["id"], "jsonrpc": "2.0", "error": None,
                         "result": {"status": "OK"}}
            f.write(json.dumps(reply).encode() + b"\n")
            f.flush()


def miner(host: str, port: int, ca: str | None, shares: int) -> None:
    sock = socket.create_connection((host, port), timeout=10)
    if ca:
        sock = ssl.create_default_context(cafile=ca).wrap_socket(sock, server_hostname=host)
    login = {"id": 1, "jsonrpc": "2.0", "method": "login",
             "params": {"login": "4" + "A" * 94, "pass": "x", "rigid": "",
                        "agent": "XMRig/6.21.0 (Linux x86_64) libuv/1.44.2 gcc/12.2.0",
                        "algo": ["rx/0"]}}
    with sock, sock.makefile("rwb") as f:
        f.write(json.dumps(login).encode() + b"\n")
        f.flush()
        json.loads(f.readline())
        for n in range(shares):
            time.sleep(0.2)
            submit = {"id": 2 + n, "jsonrpc": "2.0", "method": "submit",
                      "params": {"id": "lab-miner", "job_id": "1", "nonce": f"{n:08x}",
                                 "result": "ab" * 32}}
            f.write(json.dumps(submit).encode() + b"\n")
            f.flush()
            json.loads(f.readline())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["pool", "miner"])
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--tls", nargs="+")
    ap.add_argument("--shares", type=int, default=3)
    args = ap.parse_args()
    if args.role == "pool":
        cert, key = (args.tls + [None, None])[:2] if args.tls else (None, None)
        pool(args.host, args.port, cert, key)
    else:
        miner(args.host, args.port, args.tls[0] if args.tls else None, args.shares)
    return 0


if __name__ == "__main__":
    sys.exit(main())
