"""``egress agent``: one long-running auditor for a shared host where tasks come and go.

An orchestrator tells it, over a unix socket only root can use, which task owns which
sockets (``egress task start ID --purpose FILE --uid UID | --cgroup PATH``). For each
task it loads the shared generator's ruleset (``meta skuid`` or ``socket cgroupv2``
match, output hook), redirects the task's DNS to a resolver of its own on the agent
(127.0.1.N:53), arms its dead-man's switch, and labels its flows in the record
(``agentrules``). Every flow is recorded and judged by the live pipeline of ``egress run``
with its task's purpose; sockets of ordinary users no task claims are recorded untagged.

Each task's new flows also pass the inline gate of ``egress run`` (its own NFQUEUE,
iptables-nft ``EGRESS-LOCAL-GATE`` from OUTPUT, by the same uid or cgroup), which holds
their first payload until it is judged; watched flows (SSH) are judged again while open
and cut late. Each flow carries its task's connlabel, so the first reply packets are
logged too, and a restarted agent knows whose its open flows are: the agent keeps its
tasks in a state file beside its socket; when it stops, its tasks stay (their rules fail
closed: the dead-man's switch, the gate's unread queue) and their open flows are written
as interim records; the next agent takes the tasks back and picks their open flows up
from a conntrack dump, as the same flows.

The protocol is one JSON object per line each way: ``{"op": "start", ...}`` ->
``{"ok": true, ...}`` or ``{"ok": false, "error": "one line"}``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from egress.enforce import agentrules, gaterules, purposefile, tasknet
from egress.enforce.claims import FOUND_MAX, QUEUE_OFFSET, TreeClaims
from egress.enforce.gateproc import GateProcess, GateSpec
from egress.enforce.liverecord import LiveRecorder
from egress.enforce.nft import Nft, NftError
from egress.enforce.resolver import Resolver
from egress.enforce.ruleset import (Match, TaskRules, arm_deadman, elements_for_name,
                                    generate_nft, names, refresh_elements, remove_nft)
from egress.enforce.run import _Switch, host_upstream
from egress.judge import ANY_SERVER
from egress.records import Mode, TaskEvent
from tagging import manifest

SOCKET = Path("/run/egress/agent.sock")
RESOLVERS = [f"127.0.1.{n}" for n in range(1, 255)]
"""One loopback address per task: where its DNS is redirected, on port 53."""


class AgentError(RuntimeError):
    pass


@dataclass
class AgentOptions:
    socket: Path = SOCKET
    mode: Mode | None = None
    """The least mode for every task (the command line may tighten a task's, never loosen)."""
    upstream: tuple[str, int] | None = None
    min_ttl: int = 30
    nflog_group: int = 2055
    """tasknet.agent_numbers: after every run's groups."""
    first_packets: int = 64
    mark_mask: int = 0x00F00000
    interim_s: int = 60
    deadman_s: int = 5
    group: int | None = None
    """A group whose members may use the socket besides root."""
    queue: int = 1027
    """NFQUEUE numbers: a task's gate reads ``queue + its label`` (tasknet.agent_numbers:
    after every run's)."""
    interfaces: tuple[str, ...] = ()
    """Record only flows leaving by these interfaces (none: every one but loopback)."""
    end_tasks_on_exit: bool = False
    """End every task when the agent stops, instead of leaving them for the next agent."""
    read_back: object | None = None
    """``tasks -> (open flows' last records, DNS bindings)`` from the store (db.read_back),
    for an agent that starts again; None: no store."""
    # LiveRecorder reads these, as it does egress run's options:
    task: str | None = None
    purpose: object | None = None


@dataclass
class _Net:
    """The agent's view for the live recorder: every local flow is a candidate, and its
    process is looked up on the host."""
    nflog_group: int
    netns_path: str | None = None
    host: bool = True
    net4: str = "0.0.0.0/0"
    net6: str = "::/0"
    host4: str | None = None
    host6: str | None = None


@dataclass
class TaskSlot:
    task: str
    match: Match
    mode: Mode
    purpose_path: str
    resolver: str
    started: int
    rules: TaskRules
    server: Resolver | None
    switch: _Switch
    label: int
    queue: int
    stats: dict = field(default_factory=dict)

    @property
    def queue_rules(self) -> dict:
        """gaterules.add_local's arguments."""
        return dict(kind=self.match.kind, value=self.match.value, queue=self.queue,
                    mask=self.rules.mark_mask, audit=self.mode is not Mode.ENFORCE)

    def describe(self) -> dict:
        return {"task": self.task, "match": str(self.match), "mode": self.mode.value,
                "purpose": self.purpose_path, "resolver": self.resolver,
                "started": self.started, "label": self.label, "dns": self.server.counters}

    def state(self) -> dict:
        return {"task": self.task, "match": str(self.match), "mode": self.mode.value,
                "purpose": self.purpose_path, "resolver": self.resolver,
                "started": self.started, "label": self.label}


class Agent:
    def __init__(self, opts: AgentOptions, recorder=None):
        self.opts, self.recorder = opts, recorder
        self.tasks: dict[str, TaskSlot] = {}
        self.purposes: dict = {}
        self._lock = threading.Lock()
        self._nft_lock = threading.Lock()
        self._nft = Nft()
        self._stop = threading.Event()
        self.upstream = opts.upstream or host_upstream()
        self.live = LiveRecorder(opts, _Net(opts.nflog_group), recorder=recorder,
                                 task_init=lambda: 1, purposes=self.purposes,
                                 label_prefix=agentrules.PREFIX)
        self.watch = gaterules.watch_mark(opts.mark_mask)
        self.recording = agentrules.Recording(opts.nflog_group, opts.first_packets, self.watch,
                                              tuple(opts.interfaces))
        self.gate: GateProcess | None = None
        self.picked_up = 0
        self._last_label = 0
        self._pending: dict[tuple, str] = {}   # untagged flows' window task, at their start
        self.problems: list[str] = []
        self.live.own_resolvers = set(RESOLVERS) | {ANY_SERVER}
        self.claimed: dict[str, dict] = {}
        """Tasks no kernel rule matches, recorded and judged in audit mode: by process tree
        (``pid``), or the host's single one by time window (``pid`` None)."""
        self.live.claim = self._claim
        self.claims = TreeClaims(opts.queue + QUEUE_OFFSET)
        self._server: socket.socket | None = None

    # ------------------------------------------------------------ kernel

    def _apply(self, text: str) -> None:
        with self._nft_lock:
            self._nft.run(text)

    def _allow(self, rules: TaskRules, purpose, name: str, addresses) -> None:
        pairs = elements_for_name(purpose, name)
        text = "".join(refresh_elements(rules, a, pairs, ttl) for a, ttl in addresses)
        if text:
            self._apply(text)

    # ------------------------------------------------------------ tasks

    @property
    def window(self) -> dict | None:
        return next((c for c in tuple(self.claimed.values()) if c["pid"] is None), None)

    def start_claimed_task(self, task: str, purpose_path: str, pid: int | None = None,
                           again: dict | None = None) -> dict:
        """A task no kernel rule can match, recorded and judged in audit mode: the flows of
        ordinary users' sockets (uid 1000 and above) that no uid or cgroup task claims are
        its when their process descends from ``pid``; with no pid, while it runs and while
        it is the host's only such task, all of them (by time window). Never system users'."""
        from egress.enforce.owners import uid_of
        from egress.enforce.tasknet import start_ticks
        manifest.check_task_id(task)
        if pid is not None:
            uid = uid_of(pid)
            if uid is None:
                raise AgentError(f"no process {pid}")
            if uid < agentrules.UNTAGGED_MIN_UID:
                raise AgentError(f"process {pid} runs as uid {uid}: a process tree is followed "
                                 f"among ordinary users' sockets (uid {agentrules.UNTAGGED_MIN_UID}"
                                 " and above); give --uid or --cgroup")
            if again and again.get("pid_start") != start_ticks(pid):
                raise AgentError(f"process {pid} is not the one the task had (it ended)")
        purpose = purposefile.load(purpose_path, None, None,
                                   f"of process {pid}" if pid else "of the window")
        with self._lock:
            window = self.window
            if pid is None and window is not None:
                raise AgentError(f"task {window['task']} is already attributed by time "
                                 "window; give --uid, --cgroup or --pid to tell tasks apart")
            if task in self.tasks or task in self.claimed:
                raise AgentError(f"task {task} is already running")
            self.purposes[task] = dataclasses.replace(purpose, mode=Mode.AUDIT, task=task)
            self.claimed[task] = {
                "task": task, "match": f"pid:{pid}" if pid else "time window", "mode": "audit",
                "purpose": str(purpose_path), "resolver": None,
                "started": again["started"] if again else time.time_ns() // 1000, "dns": {},
                "pid": pid, "pid_start": start_ticks(pid) if pid else None}
            self._save()
        if pid is not None:
            try:
                self.claims.add(task, pid)
            except (OSError, tasknet.NetError) as e:
                self.stop_task(task)
                raise AgentError(f"task {task}: following process {pid}: {e}") from None
        if not again:
            self._begin(task, self.purposes[task], Mode.AUDIT, self.claimed[task]["started"])
        return self.claimed[task]

    def _claim(self, key: tuple, final: bool) -> str:
        """The task of a flow no uid or cgroup task claimed (``key``: proto, src, sport, dst,
        dport): the process tree its socket's holder was found in; else the task by time
        window when the flow started; else none (""). While process trees are followed, the
        answer at the first packet waits (the tree's lookup may not be done yet) and the
        window of that moment is kept for the final one."""
        found = self.claims.take(key)
        if found is not None:
            self.live.owner(key, found[1])
            self._pending.pop(key, None)
            return found[0]
        if final:
            return self._pending.pop(key, "")
        window = self.window
        task = window["task"] if window else ""
        if not self.claims.trees:
            return task
        self._pending[key] = task
        while len(self._pending) > FOUND_MAX:
            self._pending.pop(next(iter(self._pending)))
        return ""

    def start_task(self, task: str, purpose_path: str, match_text: str | None,
                   mode: str | None = None, *, again: dict | None = None) -> TaskSlot | dict:
        """A task's rules, resolver, gate and recording. ``again``: the state of a task a
        previous agent ran (its label, resolver and start are kept)."""
        if match_text is None or match_text.startswith("pid:"):
            pid = int(match_text[4:]) if match_text else None
            return self.start_claimed_task(task, purpose_path, pid, again)
        manifest.check_task_id(task)
        match = Match.parse(match_text)
        if match.kind == "interface":
            raise AgentError("the agent matches a task by --uid or --cgroup (egress run "
                             "handles interfaces)")
        uid = int(match.value) if match.kind == "uid" else None
        purpose = purposefile.load(purpose_path, uid, None, f"uid {uid}" if uid is not None
                                   else f"of {match}")
        least = Mode(mode) if mode else self.opts.mode
        effective = purpose.effective_mode(least)
        purpose = dataclasses.replace(purpose, mode=effective, task=task)
        with self._lock:
            if task in self.tasks or task in self.claimed:
                raise AgentError(f"task {task} is already running")
            if any(s.match == match for s in self.tasks.values()):
                raise AgentError(f"{match} already belongs to a running task")
            resolver, label = self._free(again)
            block, allow, deny = gaterules.marks(self.opts.mark_mask)
            # A refused first packet goes by the gate too, which finds its process while
            # the socket exists, then refuses it (as under egress run).
            rules = TaskRules(task=task, purpose=purpose, match=match, mode=effective.value,
                              resolver4=resolver, nflog_group=self.opts.nflog_group + 1,
                              mark_mask=self.opts.mark_mask, dns_redirected=True,
                              deadman_seconds=self.opts.deadman_s, block_mark=block,
                              deny_mark=deny)
            queue = self.opts.queue + label
            slot = TaskSlot(task, match, effective, str(purpose_path), resolver,
                            again["started"] if again else time.time_ns() // 1000,
                            rules, None, _Switch(self._apply, rules), label, queue)
            try:
                self.gate.add(GateSpec(queue=queue, task=task, purpose=purpose, mode=effective,
                                       allow_mark=allow, block_mark=block,
                                       own_resolvers=frozenset({resolver, ANY_SERVER}),
                                       min_ttl=self.opts.min_ttl, mask=self.opts.mark_mask,
                                       deny_mark=deny, watch_mark=self.watch, host=True))
                self.purposes[task] = purpose
                self._apply(generate_nft(rules) + arm_deadman(rules) + agentrules.add(
                    task, names(task), match, resolver, label, self.recording))
                slot.server = Resolver(purpose, task, [(resolver, 53)], self.upstream,
                                       on_allow=lambda n, a: self._allow(rules, purpose, n, a),
                                       on_event=self._event, on_binding=self._binding,
                                       min_ttl=self.opts.min_ttl,
                                       host_addresses=tasknet.host_addresses())
                gaterules.add_local(**slot.queue_rules)
                slot.server.start()
            except (OSError, RuntimeError, tasknet.NetError, NftError) as e:
                self.purposes.pop(task, None)
                self._unload(slot)
                raise AgentError(f"task {task}: {' '.join(str(e).split())}") from None
            slot.switch.start()
            self.tasks[task] = slot
            self._apply(self._replies())
            self._save()
        if not again:
            self._begin(task, purpose, effective, slot.started)
        return slot

    def _free(self, again: dict | None) -> tuple[str, int]:
        """A resolver address and a connlabel bit no running task has (or the ones a task
        had under the previous agent)."""
        if again:
            return again["resolver"], again["label"]
        taken = {s.resolver for s in self.tasks.values()}
        labels = {s.label for s in self.tasks.values()}
        resolver = next((r for r in RESOLVERS if r not in taken), None)
        # Labels rotate: a stopped task's flows may still be open with its bit.
        order = [*agentrules.LABELS]
        start = order.index(self._last_label) + 1 if self._last_label in order else 0
        label = next((n for n in order[start:] + order[:start] if n not in labels), None)
        if resolver is None or label is None:
            raise AgentError("no resolver address or label left for another task")
        self._last_label = label
        return resolver, label

    def _replies(self) -> str:
        return agentrules.replies(self.recording,
                                  [(s.task, s.label) for s in self.tasks.values()])

    def _unload(self, slot: TaskSlot) -> dict:
        """Whatever of a task's kernel state is loaded, quietly, as far as it goes: its queue
        rules (either mode's: a previous agent may have run it in the other), its ruleset
        and recording, its gate. The gate's counters."""
        for audit in (False, True):
            gaterules.remove_local(**dict(slot.queue_rules, audit=audit))
        try:
            self._apply(remove_nft(slot.rules)
                        + agentrules.remove(names(slot.task), slot.match))
        except Exception:                   # noqa: BLE001 - never loaded, or gone already
            pass
        try:
            return self.gate.remove(slot.queue)
        except (OSError, RuntimeError, EOFError):
            return {}

    def stop_task(self, task: str) -> TaskSlot | dict:
        with self._lock:
            claimed = self.claimed.pop(task, None)
            if claimed is not None:
                self._save()
        if claimed is not None:
            if claimed["pid"] is not None:
                self.claims.remove(task)
            self.live.end_task(task)
            self._end(task)
            return claimed
        with self._lock:
            slot = self.tasks.pop(task, None)
            if slot is None:
                raise AgentError(f"no running task {task}")
            self._save()
        slot.switch.stopped.set()
        slot.server.stop()
        slot.stats = self._unload(slot)
        self._apply(self._replies())
        self.live.end_task(task)
        self._end(task)
        return slot

    def _binding(self, binding) -> None:
        """An answer the task's resolver gave: to the gate (it judges names) and the record."""
        self.gate.bind(binding)
        self.live.items.put(("binding", binding))

    # ------------------------------------------------------------ restart

    @property
    def state_path(self) -> Path:
        return Path(self.opts.socket).with_suffix(".state.json")

    def _save(self) -> None:
        """The running tasks, for the next agent (written whole, then renamed)."""
        state = {"tasks": [s.state() for s in self.tasks.values()]
                 + [dict(c, dns=None) for c in self.claimed.values()]}
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1) + "\n")
        os.chmod(tmp, 0o600)
        tmp.replace(self.state_path)

    def _restore(self) -> list[str]:
        """The tasks the previous agent left, their DNS bindings, and their open flows, as
        the same flows. Returns one line per problem (a task that cannot come back: what
        it left in the kernel is removed)."""
        try:
            state = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return []
        except ValueError as e:
            return [f"{self.state_path}: not readable ({e}); no task restored"]
        problems = []
        for t in state.get("tasks", []):
            match = None if t.get("match") == "time window" else t.get("match")
            try:
                self.start_task(t["task"], t["purpose"], match, t.get("mode"), again=t)
            except (KeyError, AgentError, ValueError, OSError, RuntimeError,
                    manifest.ManifestError, purposefile.PurposeFileError) as e:
                self._remove_leftovers(t)
                problems.append(f"task {t.get('task')}: not restored: {' '.join(str(e).split())}")
        self._save()
        try:
            self._pick_up()
        except (OSError, RuntimeError, ValueError) as e:   # the store or conntrack: said, not fatal
            problems.append(f"open flows not picked up: {' '.join(str(e).split())}")
        return problems

    def _remove_leftovers(self, t: dict) -> None:
        """What a task the previous agent ran left in the kernel, when it cannot come back:
        its ruleset (found by its match), recording and DNS chains, and queue rules."""
        from egress.enforce.rulesapply import RulesError, remove as remove_rules
        try:
            match = Match.parse(t["match"])
            label = int(t["label"])
        except (KeyError, TypeError, ValueError):
            return                          # a task no kernel rule matched
        with self._nft_lock:
            try:
                remove_rules(match, nft=self._nft)
            except RulesError:
                pass
        try:
            self._apply(agentrules.remove(names(t["task"]), match))
        except Exception:                   # noqa: BLE001 - gone already
            pass
        for audit in (False, True):
            gaterules.remove_local(match.kind, match.value, self.opts.queue + label,
                                   self.opts.mark_mask, audit)

    def _pick_up(self) -> None:
        """Open flows of the tasks, from a conntrack dump, by their connlabel (untagged ones
        and the process trees' by their stored record); each with its last stored record, so
        its observations and verdict go on. A stored open flow no longer in conntrack ended
        while no agent ran: it is closed as it was last seen."""
        from egress.enforce.ctevents import dump as ct_dump
        from egress.replay import Rebind
        owners = {s.label: s.task for s in self.tasks.values()}
        stored, bindings = self._stored([*owners.values(), *self.claimed])
        for binding in bindings:            # to the judges only: the store has them
            self.gate.bind(binding)
            self.live.items.put(("binding", Rebind(binding)))
        picked = 0
        for entry in ct_dump():
            t = entry.orig
            if t is None:
                continue
            label = next((n for n in owners if entry.labels >> n & 1), None)
            record = stored.pop((t.proto, t.src, t.sport, t.dst, t.dport), None)
            if label is not None:
                task = owners[label]
            elif entry.labels >> agentrules.UNTAGGED_LABEL & 1 and record is not None:
                task = record.task          # a process tree's, the window's, or untagged
            else:
                continue
            if record is not None and record.task != task:
                record = None               # the tuple was another task's, earlier
            self.live.items.put(("resume", entry, task, record))
            picked += 1
        for record in stored.values():
            self.live.items.put(("resume", None, record.task, record))
        self.picked_up = picked

    def _stored(self, tasks: list[str]) -> tuple[dict, list]:
        """The last stored record of each open (interim) flow of ``tasks`` and of untagged
        ones, by tuple, and the tasks' DNS bindings."""
        if self.opts.read_back is None:
            return {}, []
        from egress.sources.capture import PROTO_NAMES
        numbers = {name: n for n, name in PROTO_NAMES.items()}
        flows, bindings = self.opts.read_back(tasks)
        return {(numbers.get(f.proto), f.src, f.sport, f.dst, f.dport): f
                for f in flows}, bindings

    def _event(self, event) -> None:
        if self.recorder is not None:
            self.recorder.records([event])

    def _begin(self, task: str, purpose, mode: Mode, started: int) -> None:
        """A task is in the store from its start, flows or not."""
        if self.recorder is not None:
            self.recorder.task(task, purpose, mode, started)
            self._event(TaskEvent(task=task, time=started, event="task-started"))

    def _end(self, task: str) -> None:
        if self.recorder is not None:
            now = time.time_ns() // 1000
            self._event(TaskEvent(task=task, time=now, event="task-ended"))
            self.recorder.end_task(task, now)

    # ------------------------------------------------------------ control socket

    def handle(self, request: dict) -> dict:
        op = request.get("op")
        try:
            if op == "start":
                slot = self.start_task(request["task"], request["purpose"],
                                       request.get("match"), request.get("mode"))
                return {"ok": True, "task": _described(slot)}
            if op == "stop":
                return {"ok": True, "task": _described(self.stop_task(request["task"]))}
            if op == "list":
                tasks = [s.describe() for s in self.tasks.values()]
                return {"ok": True, "tasks": tasks + list(self.claimed.values())}
            if op == "show":
                slot = self.tasks.get(request["task"])
                if slot is None and request["task"] in self.claimed:
                    return {"ok": True, "task": self.claimed[request["task"]]}
                if slot is None:
                    raise AgentError(f"no running task {request['task']}")
                return {"ok": True, "task": slot.describe()}
            raise AgentError(f"unknown request {op!r}")
        except KeyError as e:
            return {"ok": False, "error": f"request {op!r} lacks {e.args[0]!r}"}
        except (AgentError, ValueError, OSError, RuntimeError, manifest.ManifestError,
                purposefile.PurposeFileError) as e:
            return {"ok": False, "error": " ".join(str(e).split())}

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                try:
                    line = conn.makefile("rb").readline(65536)
                    request = json.loads(line or b"{}")
                    reply = self.handle(request if isinstance(request, dict) else {})
                except (OSError, ValueError) as e:
                    reply = {"ok": False, "error": f"bad request: {e}"}
                except Exception as e:      # noqa: BLE001 - a bug of ours: the socket stays up
                    reply = {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}
                try:
                    conn.sendall(json.dumps(reply).encode() + b"\n")
                except OSError:
                    pass

    def listen(self) -> None:
        path = Path(self.opts.socket)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            if _answers(path):
                raise AgentError(f"{path}: another agent is running")
            path.unlink()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            server.bind(str(path))
        finally:
            os.umask(old)
        if self.opts.group is not None:
            os.chown(path, 0, self.opts.group)
            os.chmod(path, 0o660)
        server.listen(16)
        self._server = server
        threading.Thread(target=self._serve, name="egress-agent-control", daemon=True).start()

    # ------------------------------------------------------------ life

    def run(self, on_ready=lambda agent: None) -> None:
        """Until ``stop``: the record runs, tasks come and go. The gate is forked first,
        before any thread of ours exists; the tasks a previous agent left come back before
        the socket listens."""
        self.gate = GateProcess()
        self.gate.wait_ready()
        threading.Thread(target=self._gate_events, name="egress-gate-events",
                         daemon=True).start()
        self._apply(agentrules.base(self.recording)
                    + gaterules.post_gate(self.opts.mark_mask, "output"))
        # Tasks and open flows back first: their records go on before any new packet's.
        self.problems = self._restore()
        self.live.start()
        self.listen()
        on_ready(self)
        self._stop.wait()

    def _gate_events(self) -> None:
        """Owners the gate found for flows it refused, onto the record."""
        while not self._stop.is_set():
            try:
                if self.gate.events.poll(0.2):
                    kind, *rest = self.gate.events.recv()
                    if kind == "owner":
                        self.live.owner(*rest)
            except (EOFError, OSError):
                return

    def stop(self) -> None:
        self._stop.set()

    def close(self):
        """Stop. The tasks stay for the next agent (their rules fail closed meanwhile) and
        their open flows are written as interim records; unless ``end_tasks_on_exit``."""
        keep = not self.opts.end_tasks_on_exit
        if self._server is not None:        # no task starts or stops from here on
            self._server.close()
        for task in list(self.tasks) + list(self.claimed):
            if keep:
                slot = self.tasks.get(task)
                if slot is not None:
                    slot.switch.stopped.set()
                    slot.server.stop()
                continue
            try:
                self.stop_task(task)
            except (AgentError, OSError):
                pass
        if self._server is not None:
            try:
                Path(self.opts.socket).unlink()
            except FileNotFoundError:
                pass
        self.live.stop_reading()
        if keep and (self.tasks or self.claimed):
            self.live.items.put(("suspend",))
        else:
            try:
                self._apply(f"delete table {agentrules.TABLE}\n")    # the untagged recording
            except Exception:               # noqa: BLE001 - never loaded, or already gone
                pass
            self.state_path.unlink(missing_ok=True)
        self.claims.close()
        flows = self.live.finish()
        if self.gate is not None:
            self.gate.stop()
        self._nft.close()
        return flows


def _described(slot) -> dict:
    return slot if isinstance(slot, dict) else slot.describe()


def _answers(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1)
            s.connect(str(path))
        return True
    except OSError:
        return False


def request(payload: dict, path: Path = SOCKET, timeout: float = 30) -> dict:
    """One request to a running agent; AgentError when none answers."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(json.dumps(payload).encode() + b"\n")
            line = s.makefile("rb").readline()
    except FileNotFoundError:
        raise AgentError(f"no agent at {path} (start one with egress agent)") from None
    except PermissionError:
        raise AgentError(f"{path}: permission denied (root, or the agent's group)") from None
    except OSError as e:
        raise AgentError(f"{path}: {e.strerror or e}") from None
    try:
        return json.loads(line)
    except ValueError:
        raise AgentError(f"{path}: the agent gave no answer") from None
