"""Three namespaces for the rule generator's kernel tests: task -> host (forwards) -> net.

    task ns  10.213.0.2 ──veth── 10.213.0.1 host ns 10.99.0.2 ──veth── 10.99.0.1 net ns
             fd00:213::2         fd00:213::1        fd00:99::2          fd00:99::1
                                 (the resolver)                         203.0.113.10-11,
                                                                        2001:db8::10-11 on lo

Every namespace is made by this run and named uniquely; both veths are made
inside them (never in the root namespace); forwarding is turned on only in
the host namespace made here. Servers and clients are processes started
here and stopped by their PID; everything is removed on exit, also when a
test fails.

This file is also a small stdlib-only script run inside the namespaces (by
root or by a task uid, with any Python 3):

    python3 ruleset_topology.py serve tcp:203.0.113.10:443 echo:203.0.113.10:7 udp:...
    python3 ruleset_topology.py probe tcp 203.0.113.10 443 [--timeout S] [--source A]
    python3 ruleset_topology.py hold 203.0.113.10 7     (an echo now, another per stdin line)
    python3 ruleset_topology.py nft < text          (needs the repo: egress.enforce.nft)

Commands enter a namespace with ``nsenter --net`` (not ``ip netns exec``, which
remounts /sys and hides /sys/fs/cgroup, where nft resolves cgroup paths).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).resolve()

TASK4, HOST4, UP_HOST4, UP_NET4 = "10.213.0.2", "10.213.0.1", "10.99.0.2", "10.99.0.1"
TASK6, HOST6, UP_HOST6, UP_NET6 = "fd00:213::2", "fd00:213::1", "fd00:99::2", "fd00:99::1"
SERVERS4 = ("203.0.113.10", "203.0.113.11")
SERVERS6 = ("2001:db8::10", "2001:db8::11")


class TopologyError(RuntimeError):
    pass


class Topology:
    """``with Topology(tmp_path) as topo:`` builds it; ``topo.task_if`` is the host's end
    of the task's veth (what an ``interface:`` match names)."""

    def __init__(self, workdir: Path):
        self.dir = Path(workdir)
        self.id = f"{os.getpid() % 10000:04d}{secrets.token_hex(2)}"
        self.task_ns, self.host_ns, self.net_ns = (f"eg{self.id}{c}" for c in "thn")
        self.task_side, self.task_if = f"eg{self.id}a", f"eg{self.id}b"
        self.up_if, self.net_if = f"eg{self.id}c", f"eg{self.id}d"
        self.procs: list[subprocess.Popen] = []
        self._made: list[str] = []

    # ----------------------------------------------------------------- build

    def __enter__(self) -> "Topology":
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def sh(self, *cmd, check: bool = True, **kw) -> subprocess.CompletedProcess:
        result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
        if check and result.returncode != 0:
            raise TopologyError(f"{' '.join(map(str, cmd))}: {result.stderr.strip()}")
        return result

    def _build(self) -> None:
        for ns in (self.task_ns, self.host_ns, self.net_ns):
            self.sh("ip", "netns", "add", ns)
            self._made.append(ns)
            # No duplicate address detection: links are usable at once, over IPv6 too.
            self.sh("ip", "netns", "exec", ns, "sysctl", "-q", "-w",
                    "net.ipv6.conf.default.accept_dad=0", "net.ipv6.conf.all.accept_dad=0")
        self.sh("ip", "-n", self.task_ns, "link", "add", self.task_side, "type", "veth",
                "peer", "name", self.task_if, "netns", self.host_ns)
        self.sh("ip", "-n", self.host_ns, "link", "add", self.up_if, "type", "veth",
                "peer", "name", self.net_if, "netns", self.net_ns)
        for ns, dev, a4, a6 in ((self.task_ns, self.task_side, TASK4, TASK6),
                                (self.host_ns, self.task_if, HOST4, HOST6),
                                (self.host_ns, self.up_if, UP_HOST4, UP_HOST6),
                                (self.net_ns, self.net_if, UP_NET4, UP_NET6)):
            self.sh("ip", "-n", ns, "addr", "add", f"{a4}/24", "dev", dev)
            self.sh("ip", "-n", ns, "addr", "add", f"{a6}/64", "dev", dev, "nodad")
            self.sh("ip", "-n", ns, "link", "set", dev, "up")
            self.sh("ip", "-n", ns, "link", "set", "lo", "up")
        for address in SERVERS4:
            self.sh("ip", "-n", self.net_ns, "addr", "add", f"{address}/32", "dev", "lo")
        for address in SERVERS6:
            self.sh("ip", "-n", self.net_ns, "addr", "add", f"{address}/128", "dev", "lo",
                    "nodad")
        self.sh("ip", "-n", self.task_ns, "route", "add", "default", "via", HOST4)
        self.sh("ip", "-n", self.task_ns, "-6", "route", "add", "default", "via", HOST6)
        self.sh("ip", "-n", self.host_ns, "route", "add", "default", "via", UP_NET4)
        self.sh("ip", "-n", self.host_ns, "-6", "route", "add", "default", "via", UP_NET6)
        self.sh("ip", "-n", self.net_ns, "route", "add", "10.213.0.0/24", "via", UP_HOST4)
        self.sh("ip", "-n", self.net_ns, "-6", "route", "add", "fd00:213::/64", "via", UP_HOST6)
        # Forwarding only in the host namespace made here.
        self.sh("ip", "netns", "exec", self.host_ns, "sysctl", "-q", "-w",
                "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")

    # --------------------------------------------------------------- running

    def in_ns(self, ns: str, *cmd) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{ns}", *map(str, cmd)]

    def spawn(self, ns: str, *cmd, log: str) -> subprocess.Popen:
        out = open(self.dir / log, "wb")
        proc = subprocess.Popen(self.in_ns(ns, *cmd), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=ROOT)
        out.close()
        self.procs.append(proc)
        return proc

    def serve(self, ns: str, *listeners: str) -> None:
        """Start this script's servers in ``ns`` and wait until they listen."""
        log = f"serve-{len(self.procs)}.log"
        proc = self.spawn(ns, sys.executable, SCRIPT, "serve", *listeners, log=log)
        deadline = time.monotonic() + 10
        while "ready" not in (self.dir / log).read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise TopologyError("servers did not start: "
                                    + (self.dir / log).read_text(errors="replace"))
            time.sleep(0.05)

    def start_servers(self) -> None:
        """TCP greeters on the net's addresses (443), a DNS-like echo on 10.99.0.1:53 (the
        wrong resolver) and on the host's 10.213.0.1:53 (the task's resolver)."""
        self.serve(self.net_ns, *[f"tcp:{a}:443" for a in SERVERS4 + SERVERS6],
                   f"echo:{SERVERS4[0]}:7",
                   f"tcp:{UP_NET4}:53", f"udp:{UP_NET4}:53", "udp:203.0.113.10:5353")
        self.serve(self.host_ns, f"udp:{HOST4}:53", f"udp:{HOST4}:54")
        deadline = time.monotonic() + 10
        for address in (SERVERS4[0], SERVERS6[0]):    # routes and neighbours work, both ways
            while self.probe("tcp", address, 443, timeout=0.5)["result"] != "ok":
                if time.monotonic() > deadline:
                    raise TopologyError(f"the task cannot reach {address} before any rule")

    def probe(self, proto: str, address: str, port: int, timeout: float = 2.0,
              source: str | None = None, ns: str | None = None, uid: int | None = None,
              cgroup: Path | None = None) -> dict:
        """Try ``proto`` to address:port from the task namespace (or ``ns``), as root or
        as ``uid``, from a process moved into ``cgroup`` (a cgroup2 directory) if given;
        ``{"result": ok|refused|unreachable|timeout|..., "seconds": s}``."""
        cmd = [sys.executable, SCRIPT, "probe", proto, address, str(port),
               "--timeout", str(timeout)]
        if source:
            cmd += ["--source", source]
        if uid is not None:   # the venv's Python lives under /root; any Python 3 runs this
            cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                   "/usr/bin/python3", *cmd[1:]]
        if cgroup is not None:
            cmd = ["sh", "-c", f'echo $$ > "{cgroup}/cgroup.procs" && exec "$@"', "sh", *cmd]
        got = self.sh(*self.in_ns(ns or self.task_ns, *cmd), timeout=timeout + 20)
        return json.loads(got.stdout)

    @contextlib.contextmanager
    def held(self, address: str, port: int = 7):
        """A TCP flow from the task held open: yields ``(first, then)``, the first
        exchange's outcome and a callable running a second exchange on the same flow."""
        proc = subprocess.Popen(self.in_ns(self.task_ns, sys.executable, SCRIPT, "hold",
                                           address, str(port)),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                start_new_session=True)
        self.procs.append(proc)
        try:
            first = json.loads(proc.stdout.readline() or "{}")

            def then() -> dict:
                proc.stdin.write("go\n")
                proc.stdin.flush()
                return json.loads(proc.stdout.readline() or "{}")
            yield first, then
        finally:
            self.stop(proc)

    def ping(self, address: str, ns: str | None = None) -> str:
        got = self.sh(*self.in_ns(ns or self.task_ns, "ping", "-n", "-c", "1", "-W", "2",
                                  address), check=False, timeout=20)
        if got.returncode == 0:
            return "ok"
        return "filtered" if "filtered" in got.stdout.lower() else "lost"

    def nft(self, text: str, ns: str | None = None) -> str:
        """Apply ``text`` with egress.enforce.nft.Nft inside ``ns`` (the host's by default)."""
        got = self.sh(*self.in_ns(ns or self.host_ns, sys.executable, SCRIPT, "nft"),
                      input=text, check=False, cwd=ROOT, timeout=60)
        if got.returncode != 0:
            raise TopologyError(f"nft in {ns or self.host_ns}: {got.stderr.strip()}")
        return got.stdout

    # -------------------------------------------------------------- teardown

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)

    def close(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)
        self.procs.clear()
        for ns in reversed(self._made):
            self.sh("ip", "netns", "del", ns, check=False)
        self._made.clear()


# ------------------------------------------------------- the script's side

def _serve(listeners: list[str]) -> None:
    """tcp: greet each connection with ``hi\\n`` and close; echo: echo over TCP until the
    peer closes; udp: echo each datagram."""
    import selectors
    sel = selectors.DefaultSelector()
    for spec in listeners:
        proto, rest = spec.split(":", 1)
        address, port = rest.rsplit(":", 1)
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
        s = socket.socket(family, kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((address, int(port)))
        if proto != "udp":
            s.listen(64)
        sel.register(s, selectors.EVENT_READ, proto)
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            s = key.fileobj
            if key.data == "tcp":
                conn, _ = s.accept()
                with contextlib.suppress(OSError):
                    conn.sendall(b"hi\n")
                conn.close()
            elif key.data == "echo":
                conn, _ = s.accept()
                sel.register(conn, selectors.EVENT_READ, "conn")
            elif key.data == "conn":
                try:
                    data = s.recv(2048)
                except OSError:
                    data = b""
                if data:
                    with contextlib.suppress(OSError):
                        s.sendall(data)
                else:
                    sel.unregister(s)
                    s.close()
            else:
                data, peer = s.recvfrom(2048)
                s.sendto(data, peer)


def _probe(proto: str, address: str, port: int, timeout: float, source: str | None) -> dict:
    import errno
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    s.settimeout(timeout)
    start = time.monotonic()
    try:
        if source:
            s.bind((source, 0))
        s.connect((address, port))
        if proto == "udp":
            s.send(b"probe")
        data = s.recv(16)
        result = "ok" if data else "closed"
    except ConnectionRefusedError:
        result = "refused"
    except ConnectionResetError:
        result = "reset"
    except socket.timeout:
        result = "timeout"
    except OSError as e:
        result = {errno.EHOSTUNREACH: "unreachable", errno.ENETUNREACH: "unreachable",
                  errno.EACCES: "prohibited", errno.EPERM: "prohibited"}.get(
            e.errno, f"error:{e.errno}")
    finally:
        s.close()
    return {"result": result, "seconds": round(time.monotonic() - start, 3)}


def _exchange(s: socket.socket) -> dict:
    start = time.monotonic()
    try:
        s.sendall(b"ping\n")
        result = "ok" if s.recv(16) == b"ping\n" else "closed"
    except ConnectionResetError:
        result = "reset"
    except socket.timeout:
        result = "timeout"
    except OSError as e:
        result = f"error:{e.errno}"
    return {"result": result, "seconds": round(time.monotonic() - start, 3)}


def _hold(address: str, port: int) -> None:
    """One TCP flow: an exchange, then another for each line arriving on stdin."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(3)
        s.connect((address, port))
        print(json.dumps(_exchange(s)), flush=True)
        while sys.stdin.readline():
            print(json.dumps(_exchange(s)), flush=True)


def _main(argv: list[str]) -> int:
    if argv[0] == "serve":
        _serve(argv[1:])
    elif argv[0] == "probe":
        import argparse
        ap = argparse.ArgumentParser()
        ap.add_argument("proto", choices=["tcp", "udp"])
        ap.add_argument("address")
        ap.add_argument("port", type=int)
        ap.add_argument("--timeout", type=float, default=2.0)
        ap.add_argument("--source")
        a = ap.parse_args(argv[1:])
        print(json.dumps(_probe(a.proto, a.address, a.port, a.timeout, a.source)))
    elif argv[0] == "hold":
        _hold(argv[1], int(argv[2]))
    elif argv[0] == "nft":
        sys.path.insert(0, str(ROOT))
        from egress.enforce.nft import Nft, NftError
        try:
            sys.stdout.write(Nft().run(sys.stdin.read()))
        except NftError as e:
            print(e, file=sys.stderr)
            return 1
    else:
        print(f"unknown command {argv[0]!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
