"""The record of a live task: what the kernel logged and counted, judged as replay judges.

Two feeds go onto one queue, in arrival order, for the live source
(``egress.sources.live``): the first packets of each flow and all the task's
DNS (NFLOG; the answers bind names), and conntrack's DESTROY events plus a
dump every ``interim_s`` (counters and interim records of long flows). A thread runs
the replay pipeline over it. Records judged while their flow is open can
cut it (``late``): in enforce mode a block verdict marks the flow's
conntrack entry blocked (later packets meet the blocked-mark reset; the
entry is kept, or the next packet would start a new, unmarked flow) and
destroys its sockets in the task (SOCK_DESTROY).
"""

from __future__ import annotations

import ipaddress
import queue
import threading
import time
from collections import Counter
from typing import Callable

from egress.enforce import gaterules, recording, tasknet
from egress.enforce.ctevents import ConntrackEvents, dump as ct_dump
from egress.records import Action, Finding, Mode, TaskEvent, Verdict
from egress.replay import ReplayResult


def ours(event, nets) -> bool:
    """A conntrack entry of the task: its original source is one of the task's subnets."""
    t = event.orig
    if t is None or not t.src:
        return False
    address = ipaddress.ip_address(t.src)
    return any(address in n for n in nets)


class LiveRecorder:
    def __init__(self, opts, net: tasknet.TaskNet, *, recorder=None,
                 task_init: Callable[[], int | None],
                 on_record: Callable[[object], None] = lambda r: None,
                 purposes: dict | None = None, label_prefix: str | None = None):
        """``opts``: the run's options (task, purpose, mode, min_ttl, mark_mask, interim_s);
        ``recorder``: the store's; ``task_init``: the host pid of the task's init, once it
        runs; ``on_record``: each judged record (interim ones included). On a shared host
        (the agent): ``purposes`` per task (filled as tasks start) and ``label_prefix``, the
        NFLOG prefix before the task id that labels each task's packets."""
        self.opts, self.net, self.recorder = opts, net, recorder
        self.task_init, self.on_record = task_init, on_record
        self.purposes, self.label_prefix = purposes, label_prefix
        self.claim: Callable[[tuple, bool], str] = lambda key, final: ""
        """The task of a flow no task's socket claims, by its (proto, src, sport, dst, dport);
        "" untagged. The agent's tasks by process tree, or its task by time window."""
        self.nets = [ipaddress.ip_network(net.net4), ipaddress.ip_network(net.net6)]
        self.own_resolvers = {a for a in (net.host4, net.host6) if a}
        self.items: queue.Queue = queue.Queue()
        self.losses: list[str] = []
        self.notes: list[str] = []
        self.cut: set[str] = set()
        self.owners = None
        self._judged: dict = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._reader = self._ct = self._judge = None
        self.log_stats: dict = {}
        self.ct_stats: dict = {}

    # ------------------------------------------------------------ feeds

    def start(self) -> None:
        from egress.enforce.nflog import NflogReader
        self._ct = ConntrackEvents(groups=("destroy",))
        self._reader = NflogReader(self.net.nflog_group, snaplen=recording.SNAPLEN)
        for target, name in ((self._read_conntrack, "egress-conntrack"),
                             (self._read_log, "egress-nflog")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        self._judge = threading.Thread(target=self._run_judge, name="egress-judge", daemon=True)
        self._judge.start()

    def owner(self, key: tuple, info) -> None:
        """A flow's process found elsewhere (the gate, for a packet it refused)."""
        if self.owners is not None:
            self.owners.add(key, info)

    def _read_log(self) -> None:
        """NFLOG -> the queue, until the task has ended and the log is drained."""
        while True:
            got = self._reader.read(timeout=0.2)
            for packet in got:
                item = ("packet", packet.time, packet.payload,
                        packet.prefix == recording.WATCH_PREFIX)
                if self.label_prefix is not None:
                    label = packet.prefix[len(self.label_prefix):] \
                        if packet.prefix.startswith(self.label_prefix) else ""
                    item += (label,)
                self.items.put(item)
            if not got and self._stop.is_set():
                return

    def _read_conntrack(self) -> None:
        next_dump = time.monotonic() + self.opts.interim_s
        while not self._stop.is_set():
            for event in self._ct.read(timeout=0.2):
                if event.kind == "destroy" and ours(event, self.nets):
                    self.items.put(("ct", event))
            if time.monotonic() >= next_dump:
                next_dump = time.monotonic() + self.opts.interim_s
                self._dump("ct-interim")

    def _dump(self, kind: str) -> None:
        try:
            for entry in ct_dump():
                if ours(entry, self.nets):
                    self.items.put((kind, entry))
        except OSError as e:
            self.losses.append(f"a conntrack dump failed: {e}")

    # ------------------------------------------------------------ judging

    def _run_judge(self) -> None:
        from egress.replay import replay
        from egress.sources.live import LiveSource, Owners
        from tagging.attribution import Attribution
        opts, net = self.opts, self.net
        who = Attribution(task=opts.task, local=self.nets)
        owners = self.owners = Owners(net.netns_path, self.task_init, self.nets) \
            if net.netns_path or getattr(net, "host", False) else None
        source = LiveSource(self.items, who, owners=owners,
                            claim=lambda key, final: self.claim(key, final))
        try:
            self._judged["flows"] = replay(
                source, opts.purpose, purposes=self.purposes, task=opts.task, mode=opts.mode,
                min_ttl_s=opts.min_ttl, recorder=self.recorder, on_record=self._late,
                action_of=self.action, own_resolvers=frozenset(self.own_resolvers),
                task_lifecycle=self.label_prefix is None)
        except Exception as e:              # noqa: BLE001 - reported; the run goes on
            self.losses.append(f"recording failed: {e}")
        finally:
            if owners is not None:
                owners.close()

    def action(self, record) -> Action:
        """What the kernel did: enforce mode refuses what is blocked (at its first packet or
        payload) or cuts it while open; the rest passed."""
        if record.verdict is Verdict.BLOCK and record.mode is Mode.ENFORCE:
            return Action.KILLED if record.flow_id in self.cut else Action.REJECTED
        return Action.PASSED

    def _late(self, record) -> None:
        self.on_record(record)
        if getattr(record, "event", None) != "interim" or record.verdict is not Verdict.BLOCK \
                or record.mode is not Mode.ENFORCE or record.flow_id in self.cut:
            return
        self.cut.add(record.flow_id)
        mask = self.opts.mark_mask
        block = gaterules.marks(mask)[0]
        try:
            for entry in ct_dump():
                t = entry.orig
                if t and (t.src, t.sport, t.dst, t.dport) == (record.src, record.sport,
                                                              record.dst, record.dport):
                    tasknet.sh("conntrack", "-U", "-p", record.proto, "--orig-src", t.src,
                               "--orig-dst", t.dst, "--sport", str(t.sport),
                               "--dport", str(t.dport),
                               "--mark", str((entry.mark & ~mask) | block))
            from egress.enforce.owners import destroy_sockets
            destroy_sockets(self.net.netns_path, record.proto, record.src, record.sport,
                            record.dst, record.dport)
        except (OSError, tasknet.NetError) as e:
            self.losses.append(f"cutting {record.dst}:{record.dport} late failed: {e}")
            return
        self.notes.append(f"cut {record.dst}:{record.dport} while open: "
                          + ", ".join(f.id for f in record.findings if not f.waived))

    # ------------------------------------------------------------ end

    def end_task(self, task: str) -> None:
        """A task of a shared host has ended: its flows get conntrack's totals so far and
        end with it (a closed connection's entry lingers in TIME_WAIT for minutes)."""
        self._dump("ct")
        self.items.put(("end-task", task))

    def stop_reading(self) -> None:
        """The task has ended: drain the feeds, then give flows still open conntrack's totals
        so far (closed TCP flows sit in TIME_WAIT for minutes before their DESTROY)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        if self._ct is not None:
            self._dump("ct")

    def finish(self) -> ReplayResult:
        """Judge what is left; the flows' summary. Losses become an events-lost event each."""
        self.items.put(None)
        if self._judge is not None:
            self._judge.join(timeout=60)
        if self._reader is not None:
            self.log_stats = self._reader.stats()
            self._reader.close()
        if self._ct is not None:
            self.ct_stats = self._ct.stats()
            self._ct.close()
        return self._judged.get("flows") or ReplayResult(tasks={}, skipped=Counter(),
                                                         violations=False)

    def lost_events(self) -> list[TaskEvent]:
        log, lost = self.log_stats, []
        if log.get("lost") or log.get("overruns"):
            lost.append((log["lost"] + log["overruns"], "NFLOG sequence gaps and overruns"))
        if self.ct_stats.get("lost"):
            lost.append((self.ct_stats["lost"], "conntrack event overruns"))
        out = []
        for count, reason in lost:
            self.losses.append(f"{reason}: {count:,} lost; flows may be missing or undercounted")
            out.append(TaskEvent(task=self.opts.task, time=time.time_ns() // 1000,
                                 event="events-lost",
                                 findings=[Finding.make("events-lost", count=count,
                                                        reason=reason)]))
        return out
