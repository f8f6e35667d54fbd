"""The gate in a process of its own, so database writes and garbage collection in the
auditor never stall a verdict.

Forked by the auditor before it starts any thread. It binds the run's queue,
says ``ready``, then serves: DNS bindings from the auditor come first (a
binding is sent before its answer is released, so it is here before the
task's connection), then queued packets, then the time caps. A detector or
judge that raises inside the gate blocks the flow in enforce mode
(``internal-error``: the judge turns exceptions into findings). If the gate
dies, queued packets find no reader and the kernel drops them: fail closed.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import signal
import threading
import time
from dataclasses import dataclass

from egress.enforce.gate import Caps, Gate
from egress.records import Mode, Severity


QUEUE_MAXLEN = 16384
"""Packets the kernel holds for the gate before it drops (enforce: fails closed) or passes
(audit) the next ones; counted and reported either way."""


@dataclass(frozen=True)
class GateSpec:
    queue: int
    task: str
    purpose: object
    mode: Mode
    allow_mark: int
    block_mark: int
    own_resolvers: frozenset[str]
    min_ttl: int = 30
    caps: Caps = Caps()
    mask: int = 0
    deny_mark: int | None = None
    netns_path: str | None = None
    """The task's network namespace: where refused sockets are looked up for their owner."""
    watch_mark: int = 0
    host: bool = False
    """The task's sockets are the host's own (the host agent): owners are looked up here."""


def die_with_parent() -> None:
    """A forked helper ends when the auditor does, even by SIGKILL (an orphaned gate would
    keep the queue bound)."""
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:                   # the parent died before the call
        os._exit(1)


class _Served:
    """One task's gate and its queue, in the gate process."""

    def __init__(self, spec: GateSpec, root: list):
        from egress.enforce.nfqueue import NfQueue
        self.spec, self.root = spec, root
        self.diag = None
        if spec.netns_path or spec.host:
            from egress.enforce.owners import SockDiag
            self.diag = SockDiag(spec.netns_path)
        self.gate = Gate(spec.task, spec.purpose, spec.mode, allow_mark=spec.allow_mark,
                         block_mark=spec.block_mark, own_resolvers=spec.own_resolvers,
                         min_ttl=spec.min_ttl, caps=spec.caps, deny_mark=spec.deny_mark,
                         mask=spec.mask, owner_of=self.owner_of, watch_mark=spec.watch_mark)
        try:
            self.queue = NfQueue(spec.queue, fail_open=spec.mode is not Mode.ENFORCE,
                                 maxlen=QUEUE_MAXLEN)
        except OSError:
            self.close()
            raise
        self.latencies: list[int] = []
        self.original: dict[int, int] = {}              # packet id -> its mark when queued

    def fileno(self) -> int:
        return self.queue.fileno()

    def owner_of(self, proto, src, sport, dst, dport):
        from egress.enforce.owners import owner_of as holder
        if self.diag is None or self.root[0] is None:
            return None
        sock = self.diag.find("tcp" if proto == 6 else "udp", src, sport, dst, dport)
        info = holder(sock.inode, self.root[0]) if sock is not None else None
        return info.record() if info is not None else None

    def _verdict(self, packet_id, accept, mark) -> None:
        """The verdict's value in our bits; other tools' bits as the packet had them."""
        had = self.original.pop(packet_id, 0)
        self.queue.verdict(packet_id, accept,
                           None if mark is None else (had & ~self.spec.mask) | mark)

    def read(self) -> None:
        for packet in self.queue.read(timeout=0):
            got = time.time_ns() // 1000
            self.original[packet.packet_id] = packet.mark
            verdicts = self.gate.packet(packet.packet_id, packet.payload, mark=packet.mark)
            for verdict in verdicts:
                self._verdict(*verdict)
            if verdicts and verdicts[-1][2] is not None:
                self.latencies.append(time.time_ns() // 1000 - got)

    def tick(self, events) -> None:
        for verdict in self.gate.tick():
            self._verdict(*verdict)
        for key, info in self.gate.owners:
            events.send(("owner", key, info))
        self.gate.owners.clear()
        for record in self.gate.decisions:
            critical = [f for f in record.findings
                        if f.severity is Severity.CRITICAL and not f.waived]
            if critical:
                events.send(("critical", f"{record.dst}:{record.dport}", critical,
                             self.spec.task))
        self.gate.decisions.clear()

    def stats(self) -> tuple[dict, list[int]]:
        stats = dict(self.gate.stats, **{f"queue {k}": v for k, v in self.queue.stats().items()})
        kernel = self.queue.kernel_stats() or {}
        stats["queue dropped"] = kernel.get("queue_dropped", 0) + kernel.get("user_dropped", 0)
        return stats, self.latencies[-10000:]

    def close(self) -> None:
        if getattr(self, "queue", None) is not None:
            self.queue.close()
        if self.diag is not None:
            self.diag.close()


def _serve(specs: list[GateSpec], conn, events) -> None:
    """Gates for ``specs``, and for tasks added later (``add``, the host agent's)."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)        # the auditor says when to stop
    root = [1 if any(s.host for s in specs) else None]  # where a socket's owner is looked for
    served: dict[int, _Served] = {}
    for spec in specs:
        try:
            served[spec.queue] = _Served(spec, root)
        except OSError as e:
            conn.send(("error", f"NFQUEUE {spec.queue}: {e}"))
            return
    conn.send(("ready", os.getpid()))
    running = True
    while running:
        ready, _, _ = select.select([*served.values(), conn], [], [], 0.05)
        while conn.poll():
            kind, *rest = conn.recv()
            if kind == "binding":                   # each gate admits only its task's
                for one in served.values():
                    one.gate.bind(rest[0])
            elif kind == "root":
                root[0] = rest[0]
            elif kind == "add":
                spec = rest[0]
                root[0] = root[0] or (1 if spec.host else None)
                try:
                    served[spec.queue] = _Served(spec, root)
                    conn.send(("added", None))
                except OSError as e:
                    conn.send(("added", f"NFQUEUE {spec.queue}: {e}"))
            elif kind == "remove":
                one = served.pop(rest[0], None)
                got = one.stats() if one is not None else ({}, [])
                if one is not None:
                    one.close()
                conn.send(("removed", *got))
            elif kind == "stop":
                running = False
        for one in ready:
            if one is not conn and one.spec.queue in served:
                one.read()
        for one in served.values():
            one.tick(events)
    stats, latencies = {}, []
    for one in served.values():
        got, lat = one.stats()
        for k, v in got.items():
            stats[k] = stats.get(k, 0) + v
        latencies += lat
        one.close()
    conn.send(("stats", stats, latencies[-10000:]))


class GateProcess:
    def __init__(self, spec: GateSpec | None = None):
        """One run's gate (``spec``), or none yet: the host agent adds a gate per task."""
        ctx = multiprocessing.get_context("fork")
        self._conn, child = ctx.Pipe()
        self.events, child_events = ctx.Pipe(duplex=False)   # critical findings, as they come
        self.proc = ctx.Process(target=_serve, args=([spec] if spec else [], child, child_events),
                                name="egress-gate", daemon=True)
        self.proc.start()
        child.close()
        child_events.close()
        self._lock = threading.Lock()           # bindings come from the resolver's workers
        self.stats: dict = {}
        self.latencies: list[int] = []

    def wait_ready(self, timeout: float = 10) -> None:
        if not self._conn.poll(timeout):
            raise RuntimeError("the gate did not start")
        kind, detail = self._conn.recv()
        if kind != "ready":
            raise RuntimeError(f"the gate could not start: {detail}")

    def add(self, spec: GateSpec) -> None:
        """A task's gate, on its own queue; RuntimeError if the queue cannot be bound."""
        with self._lock:
            self._conn.send(("add", spec))
            if not self._conn.poll(10):
                raise RuntimeError(f"the gate did not answer for queue {spec.queue}")
            _, error = self._conn.recv()
        if error:
            raise RuntimeError(error)

    def remove(self, queue: int) -> dict:
        """A task's gate is closed; its counters."""
        with self._lock:
            self._conn.send(("remove", queue))
            if not self._conn.poll(10):
                return {}
            _, stats, _ = self._conn.recv()
        return stats

    def task_started(self, init_pid: int) -> None:
        with self._lock:
            self._conn.send(("root", init_pid))

    def bind(self, binding) -> None:
        with self._lock:
            self._conn.send(("binding", binding))

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                with self._lock:
                    self._conn.send(("stop",))
                if self._conn.poll(10):
                    _, self.stats, self.latencies = self._conn.recv()
            except (OSError, EOFError, ValueError):
                pass
            self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
