"""The task's own resolver for ``egress run``: the only DNS server a contained task can reach.

Why a resolver of our own rather than rules on DNS packets: the query is
itself a leak (a name under an attacker's domain reaches the attacker's
server through any recursive resolver), so names the purpose does not allow
must be answered here and never forwarded; and an allowed answer's
addresses must be in the kernel's sets before the task can connect to them,
so the answer is held until ``on_allow`` returned (fail closed: if it
raises, the task gets SERVFAIL and no address).

Decisions (names, addresses, rewriting) live in egress.enforce.dnspolicy;
this module does the sockets, threads, upstream and callbacks.

    resolver = Resolver(purpose, "fix-1234", [("10.213.0.1", 53)], ("192.0.2.53", 53),
                        on_allow=sets.add, on_event=ledger.event, on_binding=ledger.bind)
    resolver.start()
    ...
    resolver.stop(); print(resolver.counters)
"""

from __future__ import annotations

import logging
import selectors
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype

from egress.enforce.dnspolicy import NamePolicy, display_name, query_name, rewrite
from egress.records import Finding, NameBinding, TaskEvent

log = logging.getLogger(__name__)

EDNS_PAYLOAD = 1232
"""The UDP size we advertise (DNS flag day 2020: no IP fragmentation)."""
MAX_UPSTREAM_PAYLOAD = 4096
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)

COUNTERS = ("queries", "refused", "forwarded", "malformed", "servfail", "truncated",
            "upstream_tcp", "dropped_addresses", "ech_stripped", "overload", "callback_errors")


class Resolver:
    """A DNS server over UDP and TCP that answers for one task under its purpose.

    - A name no host rule of the purpose covers: NXDOMAIN, a ``dns-refused``
      task event, never forwarded (any query type).
    - An allowed name: forwarded to ``upstream`` over UDP (TCP when the answer
      is truncated, or straight away when the task asked over TCP), rewritten
      (dnspolicy.rewrite), then ``on_allow(name, [(address, ttl)])`` is called
      and must return before the answer leaves; ``on_binding(NameBinding)``
      follows for each (chain name, address). ``ttl`` is max(answer TTL, min_ttl).
    - Malformed packets are counted; those with a readable query header get
      FORMERR, the rest are dropped. Nothing a client sends stops the server.

    ``listen`` takes (address, port) pairs, IPv4 or IPv6; port 0 picks a free
    port (the same for UDP and TCP), see ``addresses`` after ``start()``.
    """

    def __init__(self, purpose, task: str | None, listen: list[tuple[str, int]],
                 upstream: tuple[str, int],
                 on_allow: Callable[[str, list[tuple[str, int]]], None],
                 on_event: Callable[[TaskEvent], None],
                 on_binding: Callable[[NameBinding], None], *,
                 min_ttl: int = 30, host_addresses=(), timeout: float = 3.0,
                 workers: int = 32, max_pending: int = 1024, tcp_idle: float = 10.0):
        self.purpose, self.task = purpose, task
        self.policy = NamePolicy(purpose, host_addresses)
        self.listen = list(listen)
        self.upstream = upstream
        self.on_allow, self.on_event, self.on_binding = on_allow, on_event, on_binding
        self.min_ttl, self.timeout = min_ttl, timeout
        self.workers, self.max_pending, self.tcp_idle = workers, max_pending, tcp_idle
        self.addresses: list[tuple[str, int]] = []
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._lock = threading.Lock()
        self._pending = 0
        self._stopping = threading.Event()
        self._sockets: list[socket.socket] = []
        self._conns: set[socket.socket] = set()
        self._selector = self._pool = self._thread = self._wake = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Bind every listen address (UDP and TCP) and serve in background threads."""
        self._selector = selectors.DefaultSelector()
        try:
            for address, port in self.listen:
                udp, tcp = _bind_pair(address, port)
                self._sockets += [udp, tcp]
                local = udp.getsockname()[:2]
                self.addresses.append(local)
                self._selector.register(udp, selectors.EVENT_READ, ("udp", local))
                self._selector.register(tcp, selectors.EVENT_READ, ("tcp", local))
        except BaseException:
            self._close_sockets()
            raise
        self._wake = socket.socketpair()
        self._selector.register(self._wake[0], selectors.EVENT_READ, ("wake", None))
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="egress-dns")
        self._thread = threading.Thread(target=self._loop, name="egress-dns-loop", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving; queries in flight finish (their callbacks are not cut short)."""
        if self._thread is None:
            return
        self._stopping.set()
        self._wake[1].send(b"x")
        self._thread.join()
        self._close_sockets()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._pool.shutdown(wait=True, cancel_futures=True)
        for s in self._wake:
            s.close()
        self._selector.close()
        self._thread = None

    def __enter__(self) -> "Resolver":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def counters(self) -> dict[str, int]:
        """A snapshot of the counters, for the run's summary."""
        with self._lock:
            return dict(self._counts)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def _close_sockets(self) -> None:
        for s in self._sockets:
            s.close()
        self._sockets.clear()

    # ------------------------------------------------------------ serving

    def _loop(self) -> None:
        while not self._stopping.is_set():
            for key, _ in self._selector.select(timeout=1.0):
                kind, local = key.data
                try:
                    if kind == "udp":
                        data, peer = key.fileobj.recvfrom(65535)
                        self._submit(self._serve_udp, key.fileobj, data, peer, local)
                    elif kind == "tcp":
                        conn, _ = key.fileobj.accept()
                        self._accept(conn, local)
                except OSError:     # a vanished client, a full queue: never the loop's end
                    continue

    def _submit(self, fn, *args) -> bool:
        with self._lock:
            if self._pending >= self.max_pending:
                self._counts["overload"] += 1
                return False
            self._pending += 1

        def run():
            try:
                fn(*args)
            except Exception:
                log.exception("task resolver: serving a query failed")
            finally:
                with self._lock:
                    self._pending -= 1
        self._pool.submit(run)
        return True

    def _accept(self, conn: socket.socket, local) -> None:
        with self._lock:
            full = len(self._conns) >= max(1, self.workers // 2)  # keep workers for UDP
            if not full:
                self._conns.add(conn)
        if full or not self._submit(self._serve_tcp, conn, local):
            with self._lock:
                self._conns.discard(conn)
            self._count("overload")
            conn.close()

    def _serve_udp(self, sock: socket.socket, data: bytes, peer, local) -> None:
        reply = self.answer(data, "udp", local)
        if reply is not None:
            try:
                sock.sendto(reply, peer)
            except OSError:
                pass

    def _serve_tcp(self, conn: socket.socket, local) -> None:
        """Length-prefixed queries on one connection, answered in order, until idle."""
        try:
            conn.settimeout(self.tcp_idle)
            while not self._stopping.is_set():
                head = _recv_exact(conn, 2)
                if head is None:
                    break
                wire = _recv_exact(conn, struct.unpack("!H", head)[0])
                if wire is None:
                    break
                reply = self.answer(wire, "tcp", local)
                if reply is None:
                    break
                conn.sendall(struct.pack("!H", len(reply)) + reply)
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    # ------------------------------------------------------------ one query

    def answer(self, wire: bytes, transport: str, local: tuple[str, int]) -> bytes | None:
        """The reply to one query as bytes, or None to send nothing.

        ``transport`` is "udp" or "tcp" (UDP replies respect the client's size);
        ``local`` is the listen address that received it (for bindings).
        """
        self._count("queries")
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            self._count("malformed")
            return _formerr(wire)
        if query.flags & dns.flags.QR:
            self._count("malformed")        # a response sent to us: answering could loop
            return None
        try:
            return self._answer(query, transport, local)
        except Exception:
            log.exception("task resolver: answering failed")
            return self._servfail(query)

    def _answer(self, query: dns.message.Message, transport: str, local) -> bytes | None:
        if query.opcode() != dns.opcode.QUERY:
            return _render(_reply(query, dns.rcode.NOTIMP))
        if len(query.question) != 1:
            self._count("malformed")
            return _render(_reply(query, dns.rcode.FORMERR))
        question = query.question[0]
        qname, qtype = question.name, question.rdtype
        name = query_name(qname)
        if not self.policy.allows(name):
            self._refuse(qname, qtype)
            return _render(_reply(query, dns.rcode.NXDOMAIN))
        if question.rdclass != dns.rdataclass.IN or (
                dns.rdatatype.is_metatype(qtype) and qtype != dns.rdatatype.ANY):
            return _render(_reply(query, dns.rcode.REFUSED))   # zone transfers, CHAOS, ...

        try:
            upstream = self._forward(query, qname, qtype, question.rdclass, transport == "tcp")
        except Exception as e:
            log.warning("task resolver: upstream %s failed for %s: %s", self.upstream, name, e)
            return self._servfail(query)
        reply = _reply(query, upstream.rcode())
        reply.flags |= upstream.flags & dns.flags.AD
        reply.answer, reply.authority = upstream.answer, upstream.authority
        reply.additional = upstream.additional
        done = rewrite(reply, qname, self.policy, self.min_ttl)
        if done.dropped:
            self._count("dropped_addresses", len(done.dropped))
        if done.ech_stripped:
            self._count("ech_stripped", done.ech_stripped)

        try:
            out = reply.to_wire(max_size=_client_size(query) if transport == "udp" else 65535)
        except dns.exception.TooBig:
            # No partial answer: it would release addresses before on_allow; the
            # client retries over TCP and that query admits them.
            self._count("truncated")
            truncated = _reply(query, upstream.rcode())
            truncated.flags |= dns.flags.TC
            return _render(truncated)

        if done.addresses:
            try:
                self.on_allow(name, sorted(done.addresses.items()))
                when = time.time_ns() // 1000
                for chain_name in done.names():
                    for address, ttl in sorted(done.addresses.items()):
                        self.on_binding(NameBinding(task=self.task, name=chain_name,
                                                    address=address, ttl=ttl, time=when,
                                                    resolver=local[0], resolver_port=local[1]))
            except Exception as e:
                log.warning("task resolver: admitting %s failed, answering SERVFAIL: %s", name, e)
                self._count("callback_errors")
                return self._servfail(query)
        return out

    def _forward(self, query, qname, qtype, qclass, tcp: bool) -> dns.message.Message:
        """Ask upstream a fresh query: the name (lower case), type, class, RD/CD and the
        client's EDNS size and DO bit. Nothing else of the client's message goes on
        (EDNS options and the name's letter case could carry data)."""
        edns = {}
        if query.edns >= 0:
            edns = dict(use_edns=0, payload=min(max(query.payload, 512), MAX_UPSTREAM_PAYLOAD),
                        want_dnssec=bool(query.ednsflags & dns.flags.DO))
        q = dns.message.make_query(qname.canonicalize(), qtype, qclass,
                                   flags=query.flags & (dns.flags.RD | dns.flags.CD), **edns)
        host, port = self.upstream
        self._count("forwarded")
        if not tcp:
            r = dns.query.udp(q, host, timeout=self.timeout, port=port,
                              ignore_unexpected=True, ignore_errors=True)
            if not r.flags & dns.flags.TC:
                return r
        self._count("upstream_tcp")
        return dns.query.tcp(q, host, timeout=self.timeout, port=port)

    def _refuse(self, qname, qtype) -> None:
        self._count("refused")
        finding = Finding.make("dns-refused", name=display_name(qname),
                               qtype=dns.rdatatype.to_text(qtype),
                               waived="dns-refused" in self.purpose.waive)
        event = TaskEvent(task=self.task, time=time.time_ns() // 1000, event="dns-refused",
                          findings=[finding])
        try:
            self.on_event(event)
        except Exception as e:     # the refusal stands; only the record failed
            self._count("callback_errors")
            log.warning("task resolver: recording a refused lookup failed: %s", e)

    def _servfail(self, query) -> bytes | None:
        self._count("servfail")
        try:
            return _render(_reply(query, dns.rcode.SERVFAIL))
        except Exception:
            return None


# ---------------------------------------------------------------- helpers


def _reply(query: dns.message.Message, rcode) -> dns.message.Message:
    """An empty response to ``query`` with ``rcode`` (EDNS when the client used it)."""
    reply = dns.message.make_response(query, recursion_available=True, our_payload=EDNS_PAYLOAD)
    reply.flags |= query.flags & dns.flags.CD
    reply.set_rcode(rcode)
    return reply


def _render(message: dns.message.Message) -> bytes:
    return message.to_wire(max_size=65535)


def _client_size(query: dns.message.Message) -> int:
    """The UDP size the client can take: its EDNS payload, else 512 (RFC 1035)."""
    return max(512, query.payload) if query.edns >= 0 else 512


def _formerr(wire: bytes) -> bytes | None:
    """FORMERR echoing the id of a packet with a query header; None for anything else."""
    if len(wire) < 12 or wire[2] & 0x80:
        return None
    flags = 0x8000 | (wire[2] & 0x79) << 8 | dns.rcode.FORMERR   # QR, opcode, RD kept
    return wire[:2] + struct.pack("!HHHHH", flags, 0, 0, 0, 0)


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def _bind_pair(address: str, port: int) -> tuple[socket.socket, socket.socket]:
    """A UDP and a TCP socket on the same address and port (port 0: a free one for both)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    for _ in range(20):
        udp = _socket(family, socket.SOCK_DGRAM, address, port)
        try:
            tcp = _socket(family, socket.SOCK_STREAM, address, udp.getsockname()[1])
        except OSError:
            udp.close()
            if port:
                raise
            continue                     # the free UDP port is taken for TCP: another
        tcp.listen(64)
        return udp, tcp
    raise OSError(f"no port free for both UDP and TCP on {address}")


def _socket(family, kind, address: str, port: int) -> socket.socket:
    s = socket.socket(family, kind)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            # A veth's IPv6 address is "tentative" during duplicate address detection;
            # freebind lets us bind before it settles instead of failing the run.
            s.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        s.bind((address, port))
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s
