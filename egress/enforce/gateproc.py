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


def die_with_parent() -> None:
    """A forked helper ends when the auditor does, even by SIGKILL (an orphaned gate would
    keep the queue bound)."""
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:                   # the parent died before the call
        os._exit(1)


def _serve(spec: GateSpec, conn, events) -> None:
    from egress.enforce.nfqueue import NfQueue
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)        # the auditor says when to stop
    root = [None]                                       # the task's init, once it runs
    diag = None
    if spec.netns_path:
        from egress.enforce.owners import SockDiag
        diag = SockDiag(spec.netns_path)

    def owner_of(proto, src, sport, dst, dport):
        from egress.enforce.owners import owner_of as holder
        if diag is None or root[0] is None:
            return None
        sock = diag.find("tcp" if proto == 6 else "udp", src, sport, dst, dport)
        info = holder(sock.inode, root[0]) if sock is not None else None
        if info is None:
            return None
        from egress.records import ProcessInfo
        return ProcessInfo(pid=info.pid, ppid=info.ppid, uid=info.uid, exe=info.exe,
                           cmdline=" ".join(info.cmdline))

    gate = Gate(spec.task, spec.purpose, spec.mode, allow_mark=spec.allow_mark,
                block_mark=spec.block_mark, own_resolvers=spec.own_resolvers,
                min_ttl=spec.min_ttl, caps=spec.caps, deny_mark=spec.deny_mark,
                mask=spec.mask, owner_of=owner_of, watch_mark=spec.watch_mark)
    try:
        queue = NfQueue(spec.queue, fail_open=spec.mode is not Mode.ENFORCE, maxlen=QUEUE_MAXLEN)
    except OSError as e:
        conn.send(("error", f"NFQUEUE {spec.queue}: {e}"))
        return
    conn.send(("ready", os.getpid()))
    latencies: list[int] = []
    original: dict[int, int] = {}                       # packet id -> its mark when queued

    def _merged(marks, packet_id, mark):
        """The verdict's value in our bits; other tools' bits as the packet had them."""
        had = marks.pop(packet_id, 0)
        return None if mark is None else (had & ~spec.mask) | mark

    running = True
    while running:
        ready, _, _ = select.select([queue, conn], [], [], 0.05)
        while conn.poll():
            kind, *rest = conn.recv()
            if kind == "binding":
                gate.bind(rest[0])
            elif kind == "root":
                root[0] = rest[0]
            elif kind == "stop":
                running = False
        if queue in ready:
            for packet in queue.read(timeout=0):
                got = time.time_ns() // 1000
                original[packet.packet_id] = packet.mark
                verdicts = gate.packet(packet.packet_id, packet.payload, mark=packet.mark)
                for packet_id, accept, mark in verdicts:
                    queue.verdict(packet_id, accept, _merged(original, packet_id, mark))
                if verdicts and verdicts[-1][2] is not None:
                    latencies.append(time.time_ns() // 1000 - got)
        for packet_id, accept, mark in gate.tick():
            queue.verdict(packet_id, accept, _merged(original, packet_id, mark))
        for key, info in gate.owners:
            events.send(("owner", key, info))
        gate.owners.clear()
        for record in gate.decisions:
            critical = [f for f in record.findings
                        if f.severity is Severity.CRITICAL and not f.waived]
            if critical:
                events.send(("critical", f"{record.dst}:{record.dport}", critical))
        gate.decisions.clear()
    stats = dict(gate.stats, **{f"queue {k}": v for k, v in queue.stats().items()})
    kernel = queue.kernel_stats() or {}
    stats["queue dropped"] = kernel.get("queue_dropped", 0) + kernel.get("user_dropped", 0)
    conn.send(("stats", stats, latencies[-10000:]))
    queue.close()


class GateProcess:
    def __init__(self, spec: GateSpec):
        ctx = multiprocessing.get_context("fork")
        self._conn, child = ctx.Pipe()
        self.events, child_events = ctx.Pipe(duplex=False)   # critical findings, as they come
        self.proc = ctx.Process(target=_serve, args=(spec, child, child_events),
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
