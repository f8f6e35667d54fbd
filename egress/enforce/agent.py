"""``egress agent``: one long-running auditor for a shared host where tasks come and go.

An orchestrator tells it, over a unix socket only root can use, which task owns which
sockets (``egress task start ID --purpose FILE --uid UID | --cgroup PATH``). For each
task it loads the shared generator's ruleset (``meta skuid`` or ``socket cgroupv2``
match, output hook), redirects the task's DNS to a resolver of its own on the agent
(127.0.1.N:53), arms its dead-man's switch, and labels its flows in the record
(``agentrules``). Every flow is recorded and judged by the live pipeline of ``egress run``
with its task's purpose; sockets of ordinary users no task claims are recorded untagged.

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

from egress.enforce import agentrules, purposefile, tasknet
from egress.enforce.liverecord import LiveRecorder
from egress.enforce.nft import Nft
from egress.enforce.resolver import Resolver
from egress.enforce.ruleset import (Match, TaskRules, arm_deadman, elements_for_name,
                                    generate_nft, names, refresh_elements, remove_nft)
from egress.enforce.run import _Switch, host_upstream
from egress.judge import ANY_SERVER
from egress.records import Mode
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
    nflog_group: int = 7
    first_packets: int = 64
    mark_mask: int = 0x00F00000
    interim_s: int = 60
    deadman_s: int = 5
    group: int | None = None
    """A group whose members may use the socket besides root."""
    # LiveRecorder reads these, as it does egress run's options:
    task: str | None = None
    purpose: object | None = None


@dataclass
class _Net:
    """The agent's view for the live recorder: every local flow is a candidate."""
    nflog_group: int
    netns_path: str | None = None
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
    server: Resolver
    switch: _Switch
    stats: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"task": self.task, "match": str(self.match), "mode": self.mode.value,
                "purpose": self.purpose_path, "resolver": self.resolver,
                "started": self.started, "dns": self.server.counters}


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
                                 task_init=lambda: None, purposes=self.purposes,
                                 label_prefix=agentrules.PREFIX)
        self.live.own_resolvers = set(RESOLVERS) | {ANY_SERVER}
        self.window: dict | None = None
        self.live.unclaimed = lambda: self.window["task"] if self.window else ""
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

    def start_window_task(self, task: str, purpose_path: str) -> dict:
        """A task given neither uid nor cgroup: while it runs, and while it is the host's only
        such task, the flows of ordinary users' sockets no task claims are its (recorded and
        judged, not enforced: no rule can match them). Never system users' (below uid 1000)."""
        manifest.check_task_id(task)
        purpose = purposefile.load(purpose_path, None, None, "of the window")
        with self._lock:
            if self.window is not None:
                raise AgentError(f"task {self.window['task']} is already attributed by time "
                                 "window; give --uid or --cgroup to tell tasks apart")
            if task in self.tasks:
                raise AgentError(f"task {task} is already running")
            self.purposes[task] = dataclasses.replace(purpose, mode=Mode.AUDIT, task=task)
            self.window = {"task": task, "match": "time window", "mode": "audit",
                           "purpose": str(purpose_path), "resolver": None,
                           "started": time.time_ns() // 1000, "dns": {}}
        return self.window

    def start_task(self, task: str, purpose_path: str, match_text: str | None,
                   mode: str | None = None) -> TaskSlot | dict:
        if match_text is None:
            return self.start_window_task(task, purpose_path)
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
            if task in self.tasks:
                raise AgentError(f"task {task} is already running")
            if any(s.match == match for s in self.tasks.values()):
                raise AgentError(f"{match} already belongs to a running task")
            free = [r for r in RESOLVERS if r not in {s.resolver for s in self.tasks.values()}]
            if not free:
                raise AgentError("no resolver address left for another task")
            resolver = free[0]
            rules = TaskRules(task=task, purpose=purpose, match=match, mode=effective.value,
                              resolver4=resolver, nflog_group=self.opts.nflog_group + 1,
                              mark_mask=self.opts.mark_mask, dns_redirected=True,
                              deadman_seconds=self.opts.deadman_s)
            self.purposes[task] = purpose
            self._apply(generate_nft(rules) + arm_deadman(rules) + agentrules.add(
                task, names(task), match, resolver, self.opts.nflog_group,
                self.opts.first_packets))
            server = Resolver(purpose, task, [(resolver, 53)], self.upstream,
                              on_allow=lambda n, a: self._allow(rules, purpose, n, a),
                              on_event=self._event,
                              on_binding=lambda b: self.live.items.put(("binding", b)),
                              min_ttl=self.opts.min_ttl,
                              host_addresses=tasknet.host_addresses())
            try:
                server.start()
            except OSError as e:
                self._apply(remove_nft(rules) + agentrules.remove(names(task), match))
                raise AgentError(f"task {task}: its resolver on {resolver}:53: {e}") from None
            switch = _Switch(self._apply, rules)
            switch.start()
            slot = TaskSlot(task, match, effective, str(purpose_path), resolver,
                            time.time_ns() // 1000, rules, server, switch)
            self.tasks[task] = slot
        return slot

    def stop_task(self, task: str) -> TaskSlot | dict:
        with self._lock:
            if self.window is not None and self.window["task"] == task:
                window, self.window = self.window, None
                return window
            slot = self.tasks.pop(task, None)
        if slot is None:
            raise AgentError(f"no running task {task}")
        slot.switch.stopped.set()
        slot.server.stop()
        self._apply(remove_nft(slot.rules) + agentrules.remove(names(task), slot.match))
        return slot

    def _event(self, event) -> None:
        if self.recorder is not None:
            self.recorder.records([event])

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
                return {"ok": True, "tasks": tasks + ([self.window] if self.window else [])}
            if op == "show":
                slot = self.tasks.get(request["task"])
                if slot is None and self.window and self.window["task"] == request["task"]:
                    return {"ok": True, "task": self.window}
                if slot is None:
                    raise AgentError(f"no running task {request['task']}")
                return {"ok": True, "task": slot.describe()}
            raise AgentError(f"unknown request {op!r}")
        except KeyError as e:
            return {"ok": False, "error": f"request {op!r} lacks {e.args[0]!r}"}
        except (AgentError, ValueError, OSError, manifest.ManifestError,
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

    def run(self) -> None:
        """Until ``stop``: the record runs, tasks come and go."""
        self.live.start()
        self._apply(agentrules.base(self.opts.nflog_group, self.opts.first_packets))
        self.listen()
        self._stop.wait()

    def stop(self) -> None:
        self._stop.set()

    def close(self):
        for task in list(self.tasks):
            try:
                self.stop_task(task)
            except (AgentError, OSError):
                pass
        if self._server is not None:
            self._server.close()
            try:
                Path(self.opts.socket).unlink()
            except FileNotFoundError:
                pass
        self.live.stop_reading()
        try:
            self._apply(f"delete table {agentrules.TABLE}\n")    # the untagged recording
        except Exception:                   # noqa: BLE001 - never loaded, or already gone
            pass
        flows = self.live.finish()
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
