"""``egress run``: one agent task, contained, with its purpose enforced by the kernel.

The order matters and is fail-closed: the task's network and its ruleset
(dead-man's switch armed) exist before its resolver answers, and the command
starts only when both are up. The ruleset is what enforces; this process
feeds it (addresses from allowed answers), keeps the switch armed and keeps
the record. If this process dies the switch expires within seconds and the
task has no egress at all; ``egress cleanup`` removes what is left.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from egress.enforce import gaterules, purposefile, sandbox, tasknet
from egress.enforce.gateproc import GateProcess, GateSpec
from egress.enforce.nft import Nft
from egress.detectors import live_window
from egress.enforce.resolver import Resolver
from egress.enforce.ruleset import (Match, TaskRules, arm_deadman, elements_for_name,
                                    generate_nft, refresh_elements, remove_nft)
from egress.enforce.liverecord import LiveRecorder
from egress.records import Finding, Mode, Severity, TaskEvent
from tagging.manifest import Purpose

FORWARDED = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM,
             signal.SIGUSR1, signal.SIGUSR2)


class RunError(RuntimeError):
    pass


@dataclass
class RunOptions:
    task: str
    purpose: Purpose | None
    """None: read from the run's purpose file, once the task's user is known."""
    argv: list[str]
    mode: Mode = Mode.AUDIT
    requested_mode: Mode | None = None
    """The command line's mode: may tighten the purpose's, never loosen it."""
    user: str | None = None
    upstream: tuple[str, int] | None = None
    """The resolver allowed names are forwarded to; the host's first nameserver by default."""
    pool4: str = tasknet.DEFAULT_POOL4
    pool6: str = tasknet.DEFAULT_POOL6
    uplink: str | None = None
    min_ttl: int = 30
    deadman_s: int = 5
    nflog_group: int = 7
    """The first NFLOG group runs may take (two each: first packets, rejections)."""
    queue: int = 3
    """The first NFQUEUE number runs may take (one each: the gate)."""
    mark_mask: int = 0x00F00000
    priority: int = -180
    fail_on_violation: bool = False
    first_packets: int | None = None
    """Packets of each flow and direction logged whole; None: the detectors' window."""
    interim_s: int = 60
    """Seconds between interim records of long flows (a conntrack dump)."""
    kill_on: str | None = None
    """``critical``: a critical finding ends the task's whole process tree."""


@dataclass
class RunResult:
    status: int
    """The command's exit status (10 with --fail-on-violation and violations)."""
    command_status: int
    resolver: dict[str, int] = field(default_factory=dict)
    events: list[TaskEvent] = field(default_factory=list)
    violations: bool = False
    flows: object | None = None
    """The recorded flows' summary (egress.replay.ReplayResult), when recorded."""
    losses: list[str] = field(default_factory=list)
    """What the record may lack, one line each (lost log messages, a switch not re-armed)."""
    notes: list[str] = field(default_factory=list)
    """What egress did to the task beyond its rules (flows cut while open, the task killed)."""
    gate: dict = field(default_factory=dict)
    """The gate's counters (held, allowed, blocked, decided on ...)."""
    gate_latency_us: list[int] = field(default_factory=list)
    """Per judged flow: µs from reading its deciding packet to its verdict."""


def host_upstream() -> tuple[str, int]:
    """The host's first nameserver (/etc/resolv.conf), for names the purpose allows."""
    try:
        for line in Path("/etc/resolv.conf").read_text().splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] == "nameserver":
                return words[1].split("%")[0], 53
    except OSError:
        pass
    raise RunError("no nameserver in /etc/resolv.conf: give the upstream resolver "
                   "(configuration key upstream)")


class _Switch(threading.Thread):
    """Re-arms the dead-man's switch three times per timeout, until stopped."""

    def __init__(self, apply: Callable[[str], None], rules: TaskRules):
        super().__init__(name="egress-deadman", daemon=True)
        self.apply, self.rules = apply, rules
        self.stopped = threading.Event()
        self.failures = 0

    def run(self) -> None:
        while not self.stopped.wait(self.rules.deadman_seconds / 3):
            try:
                self.apply(arm_deadman(self.rules))
            except Exception:               # noqa: BLE001 - counted; the switch fails closed
                self.failures += 1


class TaskRun:
    def __init__(self, opts: RunOptions, *, purpose_path: str | None = None,
                 recorder=None, on_event: Callable[[TaskEvent], None] | None = None):
        self.opts = opts
        self.purpose_path = purpose_path
        self.recorder = recorder
        self.on_event = on_event
        self.events: list[TaskEvent] = []
        self.losses: list[str] = []
        self.notes: list[str] = []
        self._box: sandbox.Sandbox | None = None
        self._killed = False
        self._live: LiveRecorder | None = None
        self._init_pid: int | None = None
        self._nft_lock = threading.Lock()
        self._nft: Nft | None = None

    # ------------------------------------------------------------ kernel

    def _apply(self, text: str) -> None:
        with self._nft_lock:
            self._nft.run(text)

    def _allow(self, rules: TaskRules, name: str, addresses: list[tuple[str, int]]) -> None:
        """Put an allowed answer's addresses into the task's sets; returns once the kernel
        has them (the resolver releases the answer only then)."""
        pairs = elements_for_name(self.opts.purpose, name)
        text = "".join(refresh_elements(rules, address, pairs, ttl)
                       for address, ttl in addresses)
        if text:
            self._apply(text)

    def _event(self, event: TaskEvent) -> None:
        self.events.append(event)
        if self.on_event:
            self.on_event(event)

    def _critical(self, findings, where: str) -> None:
        """A critical finding: with --kill-on critical, end the task (SIGKILL to the init of
        its PID namespace takes every process of the task with it), once, on the record."""
        critical = [f for f in findings if f.severity is Severity.CRITICAL and not f.waived]
        if not critical or self.opts.kill_on != "critical" or self._killed:
            return
        init = self._task_init()
        if init is None:
            return
        self._killed = True
        try:
            os.kill(init, signal.SIGKILL)
        except ProcessLookupError:
            return
        self._event(TaskEvent(task=self.opts.task, time=time.time_ns() // 1000,
                              event="task-killed", findings=[dataclasses.replace(f)
                                                             for f in critical]))
        self.notes.append(f"task killed: {', '.join(f.id for f in critical)} at {where}")

    def _watch_gate(self, gate, stop: threading.Event) -> None:
        """Critical findings from the gate, as they are decided."""
        while not stop.is_set():
            try:
                if gate.events.poll(0.2):
                    kind, *rest = gate.events.recv()
                    if kind == "critical":
                        self._critical(rest[1], rest[0])
                    elif kind == "owner" and self._live is not None:
                        self._live.owner(*rest)
            except (EOFError, OSError):
                return

    def _task_init(self, wait: bool = False) -> int | None:
        """The host pid of the task's PID-namespace init (the root of its process tree)."""
        from egress.enforce.owners import children
        deadline = time.monotonic() + (2 if wait else 0)
        while self._init_pid is None and self._box is not None and self._box.proc is not None:
            found = children(self._box.proc.pid)
            self._init_pid = found[0] if found else None
            if self._init_pid is not None or time.monotonic() >= deadline:
                break
            time.sleep(0.005)
        return self._init_pid

    # ------------------------------------------------------------ run

    def run(self) -> RunResult:
        from egress.enforce import recording
        opts = self.opts
        if os.geteuid() != 0:
            raise RunError("egress run needs root (it makes network namespaces and loads "
                           "nftables rules: CAP_NET_ADMIN and CAP_SYS_ADMIN)")
        user = sandbox.task_user(opts.user, sandbox.caller_uid())
        if self.purpose_path:               # read once, and only if out of the task's reach
            opts.purpose = purposefile.load(self.purpose_path, user.uid, user.gid, user.name)
            opts.mode = opts.purpose.effective_mode(opts.requested_mode)
        upstream = opts.upstream or host_upstream()
        window = live_window()

        net = tasknet.create(opts.task, opts.pool4, opts.pool6, opts.uplink, opts.nflog_group,
                             opts.queue)
        rules = TaskRules(task=opts.task, purpose=opts.purpose,
                          match=Match("interface", net.host_if), mode=Mode(opts.mode).value,
                          resolver4=net.host4, resolver6=net.host6,
                          task_addr4=net.task4, task_addr6=net.task6,
                          nflog_group=net.nflog_group + 1, deadman_seconds=opts.deadman_s,
                          mark_mask=opts.mark_mask, block_mark=gaterules.marks(opts.mark_mask)[0],
                          deny_mark=gaterules.marks(opts.mark_mask)[2],
                          priority=opts.priority)
        net.removal = remove_nft(rules) + recording.remove(net.host_if)
        net.save()
        live = self._live = LiveRecorder(
            opts, net, recorder=self.recorder, task_init=self._task_init,
            on_record=lambda r: self._critical(r.findings, getattr(r, "dst", "task")))
        box = switch = resolver = gate = None
        stop_log = threading.Event()
        block, allow, deny = gaterules.marks(opts.mark_mask)
        try:
            # The gate first, forked before any thread of ours exists; then the rules and
            # the switch, then the resolver, then the command: each step fails closed.
            gate = GateProcess(GateSpec(queue=net.queue, task=opts.task, purpose=opts.purpose,
                                        mode=Mode(opts.mode), allow_mark=allow,
                                        block_mark=block, min_ttl=opts.min_ttl,
                                        own_resolvers=frozenset({net.host4, net.host6}),
                                        mask=opts.mark_mask, deny_mark=deny,
                                        netns_path=net.netns_path,
                                        watch_mark=gaterules.watch_mark(opts.mark_mask)))
            gate.wait_ready()
            threading.Thread(target=self._watch_gate, args=(gate, stop_log),
                             name="egress-gate-events", daemon=True).start()
            self._nft = Nft()
            self._apply(recording.add(net.host_if, net.nflog_group,
                                      opts.first_packets or window.packets,
                                      gaterules.watch_mark(opts.mark_mask))
                        + generate_nft(rules) + arm_deadman(rules)
                        + gaterules.post_gate(opts.mark_mask))
            net.gate = dict(host_if=net.host_if, queue=net.queue, mask=opts.mark_mask,
                            audit=Mode(opts.mode) is not Mode.ENFORCE)
            net.save()
            gaterules.add(**net.gate)
            switch = _Switch(self._apply, rules)
            switch.start()
            live.start()
            resolver = Resolver(opts.purpose, opts.task,
                                [(net.host4, 53), (net.host6, 53)], upstream,
                                on_allow=lambda name, addrs: self._allow(rules, name, addrs),
                                on_event=self._event,
                                # the record takes names from the answers as NFLOG logs them
                                on_binding=gate.bind,
                                min_ttl=opts.min_ttl, host_addresses=tasknet.host_addresses())
            resolver.start()
            net.resolv_conf.write_text(f"nameserver {net.host4}\nnameserver {net.host6}\n")
            box = sandbox.Sandbox(net.netns_path, list(opts.argv), user,
                                  resolv_conf=str(net.resolv_conf))
            box.start()
            self._box = box
            if self._task_init(wait=True) is not None:
                gate.task_started(self._init_pid)
            net.task_pid = box.proc.pid
            net.save()
            previous = {s: signal.signal(s, lambda signum, _f: box.signal(signum))
                        for s in FORWARDED}
            try:
                command_status = box.wait()
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)
        finally:
            if box and box.proc and box.proc.poll() is None:
                # We are leaving early (an error, an interrupt): nothing of the task may run
                # on once its rules are gone.
                from egress.enforce.cleanup import stop_task
                stop_task(box.proc.pid)
            if switch:
                switch.stopped.set()
            if resolver:
                resolver.stop()
            if box:
                box.close()
            if net.gate:
                gaterules.remove(**net.gate)
            if gate:
                gate.stop()
            if self._nft:
                try:
                    self._apply(net.removal)
                except Exception:           # noqa: BLE001 - cleanup removes what is left
                    pass
            stop_log.set()
            live.stop_reading()
            tasknet.remove(net)
            flows = live.finish()
            if self._nft:
                self._nft.close()
        return self._result(command_status, resolver, switch, flows, gate)

    def _result(self, command_status, resolver, switch, flows, gate) -> RunResult:
        opts, live = self.opts, self._live
        for event in live.lost_events():
            self._event(event)
        dropped = gate.stats.get("queue dropped", 0) if gate else 0
        if dropped:
            self.losses.append(f"the gate's queue dropped {dropped:,} packet(s) when full "
                               "(enforce: their flows stalled or failed; audit: passed unjudged)")
            self._event(TaskEvent(task=opts.task, time=time.time_ns() // 1000,
                                  event="events-lost",
                                  findings=[Finding.make("events-lost", count=dropped,
                                                         reason="gate queue full")]))
        losses = self.losses + live.losses
        if self.recorder and self.events:
            if opts.task not in flows.tasks:
                self.recorder.task(opts.task, opts.purpose, opts.mode, self.events[0].time)
            self.recorder.records(self.events)
            self.recorder.end_task(opts.task, time.time_ns() // 1000)
        if switch and switch.failures:
            losses.append(f"the dead-man's switch failed to re-arm {switch.failures} time(s)")
        violations = flows.violations or any(
            f.severity.rank >= Severity.MEDIUM.rank and not f.waived
            for e in self.events for f in e.findings)
        status = 10 if (opts.fail_on_violation and violations) else command_status
        return RunResult(status=status, command_status=command_status,
                         resolver=resolver.counters if resolver else {},
                         events=self.events, violations=violations, flows=flows, losses=losses,
                         notes=self.notes + live.notes,
                         gate=gate.stats if gate else {},
                         gate_latency_us=gate.latencies if gate else [])
