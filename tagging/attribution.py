"""Attribution of captured flows to tasks: which side is the task host, which task owns a flow.

A capture has no task ids in it. ``--local CIDR`` says which addresses are
the task host's (so a flow another host opened to it is inbound, not
egress); ``--tasks FILE`` names several tasks, each with the source
addresses and/or the time window that are its own, and its purpose:

```toml
[[task]]
id = "fix-1234"
purpose = "fix-1234.toml"          # relative to this file
sources = ["10.213.0.2", "10.213.1.0/24"]   # optional: the task's addresses
start = "2026-03-11T02:00:00Z"     # optional: its window, ISO 8601 with a zone
end = "2026-03-11T03:00:00Z"       # optional
```

A flow belongs to the first task whose sources hold its initiator and whose
window holds its start. An outbound flow that fits no task is untagged (and
flagged by the judge). Strict like manifests: an unknown key is an error.
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass
from pathlib import Path

from egress.records import RecordError, parse_time
from tagging import manifest
from tagging.manifest import ManifestError, Purpose, check_task_id

TASK_KEYS = ("id", "purpose", "sources", "start", "end")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TasksError(ValueError):
    """``FILE: KEY: problem``, one line."""


def parse_networks(values, where: str = "--local") -> tuple[Network, ...]:
    """Addresses or CIDRs (an address is its /32 or /128)."""
    out = []
    for value in values:
        try:
            out.append(ipaddress.ip_network(value, strict=True))
        except (ValueError, TypeError) as e:
            raise TasksError(f"{where}: {value!r}: {e}") from None
    return tuple(out)


@dataclass(frozen=True)
class TaskSpec:
    id: str
    """The task id its flows get."""
    purpose: Purpose
    """The purpose its flows are judged by."""
    sources: tuple[Network, ...] = ()
    """The task's own addresses; empty means any source."""
    start: int | None = None
    """Start of its window, microseconds since the epoch; None is open."""
    end: int | None = None
    """End of its window (exclusive); None is open."""

    def owns(self, initiator, start: int) -> bool:
        if self.sources and not any(initiator in net for net in self.sources
                                    if net.version == initiator.version):
            return False
        if self.start is not None and start < self.start:
            return False
        return self.end is None or start < self.end


def load_tasks(path: str | Path) -> list[TaskSpec]:
    """Read a tasks file; TasksError (or ManifestError for a task's purpose) names the key."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise TasksError(f"{path}: cannot read: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise TasksError(f"{path}: not valid TOML: {e}") from None

    def fail(key, problem):
        raise TasksError(f"{path}: {key}: {problem}")

    unknown = sorted(set(data) - {"task"})
    if unknown:
        fail(unknown[0], "unknown key (expected [[task]] tables)")
    tables = data.get("task")
    if not isinstance(tables, list) or not tables:
        fail("task", "expected one or more [[task]] tables")
    specs, seen = [], set()
    for i, table in enumerate(tables):
        where = f"task[{i}]"
        if not isinstance(table, dict):
            fail(where, "expected a table")
        for key in table:
            if key not in TASK_KEYS:
                fail(f"{where}.{key}", f"unknown key (expected {', '.join(TASK_KEYS)})")
        for key in ("id", "purpose"):
            if not isinstance(table.get(key), str):
                fail(f"{where}.{key}", "required, a string")
        try:
            task_id = check_task_id(table["id"])
        except ValueError as e:
            fail(f"{where}.id", str(e))
        if task_id in seen:
            fail(f"{where}.id", f"task {task_id!r} is named twice")
        seen.add(task_id)
        purpose = manifest.load(path.parent / table["purpose"])   # ManifestError names it
        sources = table.get("sources", [])
        if not isinstance(sources, list):
            fail(f"{where}.sources", "expected a list of addresses or CIDRs")
        try:
            nets = parse_networks(sources, f"{where}.sources")
        except TasksError as e:
            fail(f"{where}.sources", str(e).split(": ", 1)[1])
        times = {}
        for key in ("start", "end"):
            if key in table:
                try:
                    times[key] = parse_time(table[key]) if isinstance(table[key], str) \
                        else _toml_time(table[key])
                except (RecordError, TypeError, ValueError) as e:
                    fail(f"{where}.{key}", str(e))
        if "start" in times and "end" in times and times["end"] <= times["start"]:
            fail(f"{where}.end", "is not after start")
        specs.append(TaskSpec(id=task_id, purpose=purpose, sources=nets, **times))
    return specs


def _toml_time(value) -> int:
    """A TOML offset date-time (tomllib gives a datetime) in microseconds."""
    import datetime as dt
    if not isinstance(value, dt.datetime) or value.tzinfo is None:
        raise ValueError("expected a date and time with a zone (2026-03-11T02:00:00Z)")
    return parse_time(value.isoformat())


class Attribution:
    """Who owns a captured flow, and which way it goes."""

    def __init__(self, *, task: str | None = None, tasks: list[TaskSpec] = (),
                 local: tuple[Network, ...] = ()):
        self.task = task
        """The one task that owns every outbound flow (``--task``), when no tasks file."""
        self.tasks = list(tasks)
        self.local = local
        self._cache: dict[str, object] = {}

    def _ip(self, text: str):
        ip = self._cache.get(text)
        if ip is None:
            ip = self._cache[text] = ipaddress.ip_address(text)
        return ip

    def is_local(self, address: str) -> bool:
        ip = self._ip(address)
        return any(ip in net for net in self.local if net.version == ip.version)

    def direction(self, initiator: str, responder: str) -> str:
        """``inbound`` when only the responder is the task host's; else ``outbound``."""
        if self.local and not self.is_local(initiator) and self.is_local(responder):
            return "inbound"
        return "outbound"

    def owner(self, initiator: str, responder: str, start: int) -> str | None:
        """The task that owns the flow; None when none does (untagged)."""
        if self.direction(initiator, responder) == "inbound":
            host = responder            # another host reached the task's host
        else:
            host = initiator
            if self.local and not self.is_local(initiator):
                return None             # neither side is the task host: not its flow
        if self.tasks:
            ip = self._ip(host)
            for spec in self.tasks:
                if spec.owns(ip, start):
                    return spec.id
            return None
        return self.task

    def purposes(self) -> dict[str, Purpose]:
        return {spec.id: spec.purpose for spec in self.tasks}
